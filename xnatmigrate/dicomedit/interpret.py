"""Apply a parsed DicomEdit 6 script to a pydicom ``Dataset``, as XNAT's DicomEdit 6 engine does.

Statement semantics follow dicomedit's ``DicomEditParseTreeVisitor`` (danielmarcus/xnat-monorepo,
libs/dicom-edit6/src/main/java/org/nrg/dicom/dicomedit/DicomEditParseTreeVisitor.java), one ``visit…``
method per construct, cited below; functions follow ``functions/*.java`` (see ``functions.py``).

Departure from XNAT (deliberate): ``newUID`` and ``mapReferencedUIDs`` get a fresh random UID from dcm4che
in XNAT (NewUIDScriptFunction, MapReferencedUIDsMethod → UIDUtils.createUID). xnatmigrate derives those
UIDs with HMAC-SHA256 from the input and the secret in the environment variable
``XNATMIGRATE_ANON_SECRET`` (never from a manifest), so that applying a script again to the same file
gives the same bytes, and the same original UID maps to the same new UID in every file, as XNAT's
per-JVM map does only until a restart:

- ``newUID[]``: ``"2.25." + uuid8(HMAC(secret, "newUID" ‖ SOPInstanceUID of the file before the script ‖
  line:column of the call ‖ how many newUID calls came before in this file))``;
- ``mapReferencedUIDs[prefix, paths…]``: ``prefix + "." + uuid8(HMAC(secret, "mapReferencedUIDs" ‖
  original UID))``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from pydicom.dataset import Dataset

from xnatmigrate.dicomedit import functions as fn
from xnatmigrate.dicomedit import tags
from xnatmigrate.dicomedit.nodes import (
    Assign,
    BoolCall,
    Call,
    CallStatement,
    Condition,
    Conditional,
    Delete,
    Describe,
    Echo,
    IfElse,
    Initialize,
    ListValue,
    Num,
    RemoveAllPrivateTags,
    Statement,
    Str,
    TagPath,
    TagRef,
    Value,
    Var,
    Version,
)
from xnatmigrate.dicomedit.parser import Refused, discover_variables, parse_path_text, parse_statements
from xnatmigrate.errors import DicomEditError

SECRET_ENV = "XNATMIGRATE_ANON_SECRET"

# What XNAT hands a site or project script: BaseMizerService.createContext sets exactly these elements,
# and BaseScriptApplicator copies the ones the script reads into its variables.
XNAT_VARIABLES = ("project", "subject", "session")

_log = logging.getLogger("xnatmigrate.dicomedit")


class Change(NamedTuple):
    """One effect on the dataset: the attribute's tag, its keyword (or ``(gggg,eeee)``; a path of them
    inside sequences), ``set`` or ``delete``, and the new value as DicomEdit wrote it (None for delete)."""

    tag: int
    name: str
    action: Literal["set", "delete"]
    value: str | None


@dataclass(frozen=True)
class _PathArg:
    """A tag path given to a function: the function reads it (visitTagpathArgument)."""

    path: TagPath


_RV = str | None | _PathArg | list["_RV"]


class _Fail(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _java_int(text: str | None, what: str, line: int) -> int:
    """``Value.asInteger`` → Integer.parseInt: optional sign, decimal digits, 32-bit."""
    if text is None or not re.fullmatch(r"[+-]?[0-9]+", text):
        raise _Fail(line, f"{what} must be an integer, not {text!r}")
    value = int(text)
    if not -(2**31) <= value < 2**31:
        raise _Fail(line, f"{what} {text} is outside Java's int range")
    return value


@dataclass
class _Run:
    script: Script
    ds: Dataset
    variables: dict[str, _RV]
    secret: bytes | None
    sop_uid: str | None
    changes: list[Change] = field(default_factory=list)
    new_uid_calls: int = 0

    # --- values (visitStringValue, visitNumberValue, visitIdValue, visitTagpathValue, visitFunction)
    def value(self, v: Value, as_arg: bool = False) -> _RV:
        match v:
            case Str():
                return v.value
            case Num():
                return v.text
            case Var():
                return self.variables.get(v.name)
            case TagRef():
                if as_arg:
                    return _PathArg(v.path)
                return self.read(v.path, v.line)
            case Call():
                return self.call(v)
            case ListValue():
                return [self.value(x, as_arg=True) for x in v.items]
        raise AssertionError(v)  # pragma: no cover

    def read(self, path: TagPath, line: int) -> str | None:
        try:
            return tags.get_string(self.ds, path)
        except tags.TagError as e:
            raise _Fail(line, str(e)) from None

    def text(self, arg: _RV, line: int) -> str | None:
        """``asString()`` of an argument, or the value at a tag-path argument (``dicomObject.getString``)."""
        if isinstance(arg, _PathArg):
            return self.read(arg.path, line)
        if isinstance(arg, list):
            raise _Fail(line, "a list is not a string")
        return arg

    def required(self, arg: _RV, line: int, what: str) -> str:
        s = self.text(arg, line)
        if s is None:
            # Where Java dereferences the null (String.substring, Joiner.join, …): the file fails in XNAT.
            raise _Fail(line, f"{what} is null (an absent attribute or unset variable)")
        return s

    # --- functions (functions/*.java)
    def call(self, c: Call) -> _RV:
        args = [self.value(a, as_arg=True) for a in c.args]
        line = c.line
        match c.name:
            case "hashUID":  # HashUIDScriptFunction: a tag path is read, anything else is its string
                s = self.text(args[0], line)
                return None if s is None else fn.hash_uid(s)
            case "newUID":  # NewUIDScriptFunction (departure: derived, see module docstring)
                secret = self.need_secret(line, "newUID")
                if self.sop_uid is None:
                    raise _Fail(
                        line,
                        "newUID needs the file's SOP Instance UID (0008,0018) to derive a UID, and it has none",
                    )
                self.new_uid_calls += 1
                return fn.derived_uid(
                    secret, "newUID", self.sop_uid, f"{c.line}:{c.column}", str(self.new_uid_calls)
                )
            case "format":  # FormatScriptFunction: MessageFormat.format(arg0, flattened rest)
                pattern = self.required(args[0], line, "the format pattern")
                strings = [self.text(a, line) for a in _flatten(args[1:])]
                try:
                    return fn.message_format(pattern, strings)
                except ValueError as e:
                    raise _Fail(line, f"format: {e}") from None
            case "concatenate":  # ConcatenateScriptFunction: Joiner.on("").join (a null throws)
                return "".join(
                    self.required(a, line, f"concatenate argument {i + 1}") for i, a in enumerate(args)
                )
            case "lowercase":
                return self.required(args[0], line, "the lowercase argument").lower()
            case "uppercase":
                return self.required(args[0], line, "the uppercase argument").upper()
            case "substring":  # SubstringScriptFunction: String.substring(begin, end)
                s = self.required(args[0], line, "the substring argument")
                begin = _java_int(self.text(args[1], line), "substring begin index", line)
                end = _java_int(self.text(args[2], line), "substring end index", line)
                if not 0 <= begin <= end <= len(s):
                    raise _Fail(
                        line, f"substring[{s!r}, {begin}, {end}]: index out of range (length {len(s)})"
                    )
                return s[begin:end]
            case "replace":  # ReplaceScriptFunction: String.replace(find, replace), literal, every occurrence
                s = self.required(args[0], line, "the replace argument")
                return s.replace(
                    self.required(args[1], line, "the text to find"),
                    self.required(args[2], line, "the replacement"),
                )
            case "shiftDateByIncrement" | "shiftDateTimeByIncrement":
                return self.shift(c.name, args, line)
            case "mapReferencedUIDs":
                self.map_referenced_uids(args, line)
                return None
        raise AssertionError(c.name)  # pragma: no cover - parser.py refuses every other name

    def need_secret(self, line: int, what: str) -> bytes:
        if not self.secret:
            raise _Fail(
                line,
                f"{what} needs a secret to derive UIDs reproducibly (xnatmigrate's departure from XNAT's random "
                f"UIDs); set the environment variable {SECRET_ENV}",
            )
        return self.secret

    def shift(self, name: str, args: list[_RV], line: int) -> str:
        """ShiftDateByIncrementFunction / ShiftDateTimeByIncrementFunction."""
        vrs = ("DA",) if name == "shiftDateByIncrement" else ("DA", "DT")
        first = args[0]
        if isinstance(first, _PathArg):
            vr = tags.get_vr(self.ds, first.path)
            if vr not in vrs:
                raise _Fail(
                    line,
                    f"{name}: {first.path.text} has VR {vr}, and the argument must have VR {' or '.join(vrs)}",
                )
        value = self.text(first, line)
        if not value:
            # The Java logs "Skipping empty dateTime." and then fails to parse it: the file fails in XNAT.
            raise _Fail(line, f"{name}: the date is empty or absent")
        increment = _java_int(self.text(args[1], line), f"{name} increment", line)
        units = (
            self.required(args[2], line, f"{name} units")
            if len(args) == 3
            else ("days" if name == "shiftDateByIncrement" else "seconds")
        )
        try:
            return fn.shift_datetime(value.rstrip(" "), increment, units)
        except ValueError as e:
            raise _Fail(line, f"{name}: {e}") from None

    def map_referenced_uids(self, args: list[_RV], line: int) -> None:
        """MapReferencedUIDsMethod: every attribute a path names gets prefix + a UID mapped from its value."""
        prefix = self.required(args[0], line, "the mapReferencedUIDs prefix")
        secret = self.need_secret(line, "mapReferencedUIDs")
        paths: list[TagPath] = []
        for a in args[1:]:
            if isinstance(a, _PathArg):
                paths.append(a.path)
            else:
                text = self.required(a, line, "a mapReferencedUIDs tag path")
                try:
                    path = parse_path_text(text, line)
                except Refused as e:
                    raise _Fail(line, f"mapReferencedUIDs: {e.message}") from None
                if len(path.steps) > 1:  # checked at parse time for literal paths (parser._check_call)
                    raise _Fail(
                        line, f"mapReferencedUIDs with the nested path {path.text} is not implemented"
                    )
                paths.append(path)
        seen: set[int] = set()
        for path in paths:
            for located in list(tags.find(self.ds, path)):
                if located.tag in seen:
                    continue  # the Java visitor maps each attribute once: the first path that matches
                seen.add(located.tag)
                old = tags.element_string(located.container[located.tag])
                try:
                    new = fn.derived_uid(secret, "mapReferencedUIDs", old, prefix=prefix)
                except ValueError as e:
                    raise _Fail(line, f"mapReferencedUIDs: {e}") from None
                try:
                    tags.overwrite(located, new)
                except tags.TagError as e:
                    raise _Fail(line, str(e)) from None
                if new != old:
                    self.changes.append(Change(located.tag, located.name, "set", new))

    # --- conditions (visitBooleanExpression, visitBooleanFunction)
    def holds(self, c: Condition, line: int) -> bool:
        if isinstance(c, BoolCall):  # pragma: no cover - parser.py refuses boolean functions
            raise AssertionError(c)
        left = self.text(self.value(c.left), line)
        right = self.text(self.value(c.right), line)
        match c.op:
            case "=":
                return left is not None and left == right
            case "!=":
                return left is None or left != right
            case "~" | "!~":
                if left is None:
                    return c.op == "!~"
                if right is None:
                    raise _Fail(line, "the regular expression is null")
                try:
                    matched = re.fullmatch(right, left) is not None  # String.matches: the whole string
                except re.error as e:
                    raise _Fail(line, f"regular expression {right!r}: {e}") from None
                return matched if c.op == "~" else not matched
        raise AssertionError(c.op)  # pragma: no cover

    # --- statements
    def run(self, statements: tuple[Statement, ...]) -> None:
        for s in statements:
            self.statement(s)

    def statement(self, s: Statement) -> None:
        match s:
            case Version() | Describe():
                return  # visitVersion checks the version (parser.py); describe only labels a variable for the UI
            case Assign():  # visitAssign / visitAssign_if_exists
                value = self.value(s.value)
                if isinstance(value, list | _PathArg):
                    raise _Fail(s.line, "a list cannot be assigned to an attribute")
                if value is None:
                    return  # mizer assign: "Failed to assign null value to tag" — nothing is written
                if s.if_exists and tags.find_one(self.ds, s.path) is None:
                    return
                self.write(s.path, value, s.line)
            case Initialize():  # visitInitialize
                self.variables[s.name] = self.value(s.value)
            case Delete():  # visitDelete → mizer delete: every attribute the path matches
                for located in tags.delete(self.ds, s.path):
                    self.changes.append(Change(located.tag, located.name, "delete", None))
            case CallStatement():
                self.call(s.call)
            case Echo():  # visitEcho prints the value; a library logs it
                value = self.text(self.value(s.value), s.line) if s.value is not None else ""
                _log.info("%s:%s: echo %s", self.script.source, s.line, "null" if value is None else value)
            case Conditional():  # visitConditional_statement
                if self.holds(s.condition, s.line):
                    self.statement(s.then)
                elif s.otherwise is not None:
                    self.statement(s.otherwise)
            case IfElse():  # visitIf_elseif_else: the first branch whose condition holds, else the else block
                for cond, body in s.branches:
                    if self.holds(cond, s.line):
                        self.run(body)
                        return
                if s.otherwise is not None:
                    self.run(s.otherwise)
            case RemoveAllPrivateTags():  # visitRemoveAllPrivateTags → deleteAllPrivateTags
                for located in tags.remove_all_private(self.ds):
                    self.changes.append(Change(located.tag, located.name, "delete", None))

    def write(self, path: TagPath, value: str, line: int) -> None:
        try:
            written = tags.assign(self.ds, path, value)
        except tags.TagError as e:
            raise _Fail(line, str(e)) from None
        if written.creator is not None:
            ctag, cname = written.creator
            self.changes.append(Change(ctag, cname, "set", path.steps[-1].creator))
        if written.old != written.new:
            self.changes.append(Change(written.tag, written.name, "set", written.new))


def _flatten(values: list[_RV]) -> list[_RV]:
    out: list[_RV] = []
    for v in values:
        if isinstance(v, list):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _secret(secret: str | None) -> bytes | None:
    value = secret if secret is not None else os.environ.get(SECRET_ENV)
    return value.encode("utf-8") if value else None


@dataclass(frozen=True)
class Script:
    """A parsed, checked DicomEdit 6 script.

    NOTE: invariants — every construct in ``statements`` is implemented (``parse`` refused the rest);
    ``digest`` is the SHA-256 of ``text`` (UTF-8), so it identifies the script a plan used.
    """

    source: str
    text: str
    statements: tuple[Statement, ...]
    known_variables: frozenset[str]
    external_variables: frozenset[str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def apply(self, ds: Dataset, variables: Mapping[str, str], *, secret: str | None = None) -> list[Change]:
        """Edit ``ds`` in place and return what changed, in order.

        ``variables`` are what XNAT would provide (``XNAT_VARIABLES``: project — "Unassigned" when the
        session has none —, subject, session); like BaseScriptApplicator, only the names the script reads
        from outside are taken. ``secret`` overrides ``XNATMIGRATE_ANON_SECRET`` (for newUID and
        mapReferencedUIDs only).

        NOTE: deterministic — the same dataset, script, variables and secret give the same dataset bytes.
        Raises ``DicomEditError`` (source:line) where XNAT would fail the file; ``ds`` may then be half
        edited, as XNAT's would be (use ``preview`` to try without touching it).
        """
        initial: dict[str, _RV] = {name: None for name in self.known_variables}
        for name in self.external_variables:
            if name in variables:
                initial[name] = variables[name]
        sop = ds.get((0x0008, 0x0018))
        run = _Run(
            self, ds, initial, _secret(secret), str(sop.value) if sop is not None and sop.value else None
        )
        try:
            run.run(self.statements)
        except _Fail as e:
            raise DicomEditError(
                self.source, e.line, f"{e.message}; XNAT fails such a file too: fix the script or the file"
            ) from None
        return run.changes


@dataclass(frozen=True)
class ScriptChain:
    """Scripts applied one after another, each with its own variables.

    XNAT runs each script in its own applicator, so variables do not pass between them: the site script
    when a file is received (xnat-web GradualDicomImporter:390, C-STORE and REST import alike), the
    project script when the session is archived (MergePrearcToArchiveSession:206-219; read in NrgXnat/xnat
    1.8, see shared xnat-reference.md §9). A prearchive build applies neither.
    """

    scripts: tuple[Script, ...]

    @property
    def digest(self) -> str:
        """SHA-256 over the scripts' digests in order: a different order is a different chain."""
        return hashlib.sha256("\n".join(s.digest for s in self.scripts).encode("ascii")).hexdigest()

    @property
    def source(self) -> str:
        return " + ".join(s.source for s in self.scripts)

    def apply(self, ds: Dataset, variables: Mapping[str, str], *, secret: str | None = None) -> list[Change]:
        """Apply each script in order (see ``Script.apply``); the changes of all, in order."""
        changes: list[Change] = []
        for s in self.scripts:
            changes.extend(s.apply(ds, variables, secret=secret))
        return changes


def parse(text: str, source: str = "<script>") -> Script:
    """Parse and check a DicomEdit 6 script.

    Raises ``DicomEditError`` ``source:line: …`` for a syntax error, a missing ``version "6.x"`` line, and
    every construct or function xnatmigrate does not implement.
    """
    statements = parse_statements(text, source)
    known, external = discover_variables(statements)
    return Script(source, text, statements, known, external)


def combine(*scripts: Script | ScriptChain) -> ScriptChain:
    """The scripts in the order XNAT applies them: pass the site script, then the project script."""
    flat: list[Script] = []
    for s in scripts:
        flat.extend(s.scripts if isinstance(s, ScriptChain) else (s,))
    return ScriptChain(tuple(flat))


def preview(
    script: Script | ScriptChain, ds: Dataset, variables: Mapping[str, str], *, secret: str | None = None
) -> list[Change]:
    """What ``script.apply`` would change, computed on a copy: ``ds`` is not modified."""
    return script.apply(copy.deepcopy(ds), variables, secret=secret)
