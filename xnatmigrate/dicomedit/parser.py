"""DicomEdit 6 text → syntax tree (``nodes``), then every check that can refuse a script before a file is read.

The grammar is ``grammar.lark`` (from DE6Parser.g4 / DE6Lexer.g4). What xnatmigrate does not implement is
refused here, naming the line and the construct, so that nothing is skipped silently at apply time.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from typing import Any, Literal, cast

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.tree import Meta

from xnatmigrate.dicomedit.nodes import (
    Assign,
    BoolCall,
    Call,
    CallStatement,
    Compare,
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
    TagStep,
    Value,
    Var,
    Version,
)
from xnatmigrate.errors import DicomEditError

# dicomedit/VersionManager: supportedVersionStrings, and the pattern XNAT's mizer service uses to pick the
# DicomEdit 6 engine for a script (a line exactly `version "…"`; without one XNAT runs DicomEdit 4.x).
SUPPORTED_VERSIONS = ("6.0", "6.1", "6.2", "6.3", "6.4", "6.5", "6.6", "6.7")
# Java's MULTILINE "$" also matches before "\r\n", hence the optional "\r".
_VERSION_LINE = re.compile(r'^version "(?P<version>\d[\d.]+)"\r?$', re.MULTILINE)

# The functions xnatmigrate implements: name → (min args, max args or None). Arity from each Java apply().
IMPLEMENTED: dict[str, tuple[int, int | None]] = {
    "hashUID": (1, None),  # HashUIDScriptFunction
    "newUID": (0, None),  # NewUIDScriptFunction (arguments ignored)
    "format": (1, None),  # FormatScriptFunction
    "concatenate": (0, None),  # ConcatenateScriptFunction
    "lowercase": (1, 1),  # LowercaseScriptFunction
    "uppercase": (1, 1),  # UppercaseScriptFunction
    "substring": (3, 3),  # SubstringScriptFunction (reads args 0-2)
    "replace": (3, 3),  # ReplaceScriptFunction (reads args 0-2)
    "shiftDateByIncrement": (2, 3),  # ShiftDateByIncrementFunction
    "shiftDateTimeByIncrement": (2, 3),  # ShiftDateTimeByIncrementFunction
    "mapReferencedUIDs": (2, None),  # MapReferencedUIDsMethod
}

# Registered by dicomedit/functions/FunctionManager but not implemented by xnatmigrate.
NOT_IMPLEMENTED = (
    "hashUIDList",
    "getURL",
    "retainPrivateTags",
    "lookup",
    "shiftDateTimeListByIncrement",
    "shiftDateTimeSequenceByIncrement",
    "mapUID",
    "delete",
    "set",
    "match",
    "isMatch",
    "isPresent",
    "alterPixels",
    "removeTags",
    "normalizeString",
    "scalePatientAgeAndDobFromStudyDate",
    "collectValues",
    "blankValues",
    "reject",
    "true",
    "false",
)

_WHY_NOT = {
    "getURL": "it fetches a URL while anonymising, which a migration must not depend on",
    "alterPixels": "xnatmigrate edits headers only, never pixel data",
    "reject": "rejecting files belongs in the manifest's selection, not in the script",
}


@cache
def _lark() -> Lark:
    grammar = files("xnatmigrate.dicomedit").joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True)


class Refused(Exception):
    """A construct xnatmigrate refuses; becomes ``DicomEditError`` with the script's source."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def unescape(token: str) -> str:
    """DicomEditParseTreeVisitor.extractStringValue: strip the quotes, ``""`` → ``"``, ``\\\\`` → ``\\``.

    NOTE: no other escape is decoded (``\\n`` stays a backslash and an n), as in DicomEdit.
    """
    return token[1:-1].replace('""', '"').replace("\\\\", "\\")


def parse_tag(text: str, line: int, item: int | Literal["%"] | None) -> TagStep:
    """A TAG token → TagStep, enforcing DE6Lexer.g4's group parity (PUBLIC_GROUP / PVT_GROUP)."""
    body = text[1:-1]
    group, element = body[:4].upper(), body[5:]
    last = group[3]
    if last in "02468ACE@":
        if element.startswith("{"):
            raise Refused(line, f"tag {text}: a private creator needs an odd group (DE6Lexer PVT_GROUP)")
        if group == "0002":
            raise Refused(
                line, f"tag {text}: file meta information (group 0002) is not editable by xnatmigrate"
            )
        return TagStep(group, element.upper(), None, item, text)
    if last in "13579BDF#":
        if not element.startswith("{"):
            raise Refused(
                line,
                f"tag {text}: DicomEdit 6 names an element of an odd (private) group by its creator, as "
                f"({body[:4]},{{Creator}}xx) (DE6Lexer PVT_ELEMENT); write it that way",
            )
        close = element.index("}")
        return TagStep(group, element[close + 1 :].upper(), element[1:close], item, text)
    raise Refused(
        line, f"tag {text}: the last digit of a group must be a hex digit, @ or # (DE6Lexer HEXDIGIT)"
    )


def _line(meta: Meta) -> int:
    return int(getattr(meta, "line", 0) or 0)


@v_args(meta=True)
class _Build(Transformer[Token, Any]):
    """Parse tree → nodes. Refusals that need only one construct are raised here."""

    # --- statements
    def start(self, meta: Meta, children: list[Any]) -> tuple[Statement, ...]:
        return tuple(_as_statement(x, meta) for x in children)

    def assign(self, meta: Meta, c: list[Any]) -> Assign:
        return Assign(c[0].path, c[1], False, _line(meta))

    def assign_if_exists(self, meta: Meta, c: list[Any]) -> Assign:
        return Assign(c[0].path, c[1], True, _line(meta))

    def initialize(self, meta: Meta, c: list[Any]) -> Initialize:
        return Initialize(str(c[0]), c[1], _line(meta))

    def delete(self, meta: Meta, c: list[Any]) -> Delete:
        return Delete(c[0].path, _line(meta))

    def echo(self, meta: Meta, c: list[Any]) -> Echo:
        return Echo(c[0] if c else None, _line(meta))

    def conditional_statement(self, meta: Meta, c: list[Any]) -> Conditional:
        then, otherwise = c[1], c[2] if len(c) > 2 else None
        return Conditional(c[0], _as_statement(then, meta), _as_statement(otherwise, meta), _line(meta))

    def if_elseif_else(self, meta: Meta, c: list[Any]) -> IfElse:
        branches: list[tuple[Condition, tuple[Statement, ...]]] = []
        otherwise: tuple[Statement, ...] | None = None
        items = [x for x in c if not (isinstance(x, Token) and x.type == "ELSEIF")]
        i = 0
        while i < len(items):
            if isinstance(items[i], Token) and items[i].type == "ELSE":
                otherwise = items[i + 1]
                break
            branches.append((items[i], items[i + 1]))
            i += 2
        return IfElse(tuple(branches), otherwise, _line(meta))

    def block(self, meta: Meta, c: list[Any]) -> tuple[Statement, ...]:
        return tuple(_as_statement(x, meta) for x in c)

    def describe_named(self, meta: Meta, c: list[Any]) -> Describe:
        return Describe(str(c[0]), "named", _line(meta))

    def describe_hidden(self, meta: Meta, c: list[Any]) -> Describe:
        return Describe(str(c[0]), "hidden", _line(meta))

    def describe_constant(self, meta: Meta, c: list[Any]) -> Describe:
        return Describe(str(c[0]), "const", _line(meta))

    def describe_immutable(self, meta: Meta, c: list[Any]) -> Describe:
        return Describe(str(c[0]), "immutable", _line(meta))

    def export_stmt(self, meta: Meta, c: list[Any]) -> Statement:
        raise Refused(
            _line(meta),
            f"DicomEdit statement `export {c[0]} {c[1]}` is not implemented by xnatmigrate (it hands a variable "
            "to an XNAT field); set that field in the manifest instead",
        )

    def remove_all_private_tags(self, meta: Meta, c: list[Any]) -> RemoveAllPrivateTags:
        return RemoveAllPrivateTags(_line(meta))

    def version(self, meta: Meta, c: list[Any]) -> Version:
        version = unescape(str(c[0]))
        if version not in SUPPORTED_VERSIONS:
            raise Refused(
                _line(meta),
                f'unsupported DicomEdit version "{version}"; DicomEdit 6 knows {", ".join(SUPPORTED_VERSIONS)}',
            )
        return Version(version, _line(meta))

    # --- conditions
    def boolean_expression(self, meta: Meta, c: list[Any]) -> Compare:
        op = cast(Literal["=", "!=", "~", "!~"], str(c[1]))
        if op in ("~", "!~") and isinstance(c[2], Str):
            _check_regex(c[2].value, _line(meta))
        return Compare(c[0], op, c[2])

    def boolean_function(self, meta: Meta, c: list[Any]) -> BoolCall:
        call: Call = c[0]
        _check_call(call)  # an unimplemented function is refused with its own message
        raise Refused(
            call.line,
            f"{call.name}[…] used as a condition: it returns a string, and DicomEdit's string-to-boolean "
            "conversion is not implemented by xnatmigrate; compare it with = or ~ instead",
        )

    # --- values
    def function(self, meta: Meta, c: list[Any]) -> Call:
        args = tuple(x for x in c[1:] if x is not None)
        return Call(str(c[0]), args, _line(meta), int(getattr(meta, "column", 0) or 0))

    def integer(self, meta: Meta, c: list[Any]) -> Num:
        return Num(str(c[0]))

    def float_value(self, meta: Meta, c: list[Any]) -> Num:
        return Num(str(c[0]))

    def string(self, meta: Meta, c: list[Any]) -> Str:
        return Str(unescape(str(c[0])))

    def variable(self, meta: Meta, c: list[Any]) -> Var:
        return Var(str(c[0]), _line(meta))

    def list_value(self, meta: Meta, c: list[Any]) -> ListValue:
        return ListValue(tuple(x for x in c if x is not None))

    def list_entry(self, meta: Meta, c: list[Any]) -> Value:
        return cast(Value, c[0])

    # --- tag paths
    def tagpath(self, meta: Meta, c: list[Any]) -> TagRef:
        steps = tuple(c)
        text = "/".join(_step_text(s) for s in steps)
        line = _line(meta)
        for s in steps[:-1]:
            if s.item is None:
                raise Refused(
                    line,
                    f"tag path {text}: sequence step {s.text} has no item number; write {s.text}[%] for every "
                    f"item or {s.text}[n] for item n (xnatmigrate does not guess which DicomEdit means)",
                )
        if steps[-1].item is not None:
            raise Refused(
                line, f"tag path {text}: addressing a whole sequence item is not implemented by xnatmigrate"
            )
        return TagRef(TagPath(steps, text), line)

    def tag_step(self, meta: Meta, c: list[Any]) -> TagStep:
        item = c[1] if len(c) > 1 else None
        return parse_tag(str(c[0]), _line(meta), item)

    def wildcard_step(self, meta: Meta, c: list[Any]) -> TagStep:
        raise Refused(
            _line(meta),
            f"sequence wildcard `{c[0]}` in a tag path is not implemented by xnatmigrate; name the sequences "
            "with (gggg,eeee)[%] steps",
        )

    def itemnumber(self, meta: Meta, c: list[Any]) -> int | str:
        token = str(c[0])
        if token == "%":
            return "%"
        if token.startswith("-"):
            raise Refused(_line(meta), f"sequence item [{token}] is negative")
        return int(token)


def _step_text(step: TagStep) -> str:
    if step.item is None:
        return step.text
    return f"{step.text}[{step.item}]"


def _as_statement(x: Any, meta: Meta) -> Any:
    """A function used as an action is a statement; a TagRef as a statement cannot occur (grammar)."""
    if isinstance(x, Call):
        return CallStatement(x, x.line)
    return x


def _check_regex(pattern: str, line: int) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise Refused(
            line,
            f"regular expression {pattern!r} is not one xnatmigrate can evaluate like Java's String.matches ({e})",
        ) from None


def _syntax_message(e: UnexpectedInput, text: str) -> tuple[int | None, str]:
    line = getattr(e, "line", None)
    col = getattr(e, "column", None)
    src_line = text.splitlines()[line - 1] if line and 0 < line <= len(text.splitlines()) else ""
    if isinstance(e, UnexpectedCharacters):
        what = f"unexpected character {src_line[col - 1 : col]!r}" if col else "unexpected character"
    elif isinstance(e, UnexpectedEOF):
        what = "unexpected end of script"
    elif isinstance(e, UnexpectedToken):
        what = "unexpected end of line" if e.token.type == "_NL" else f"unexpected {str(e.token)!r}"
    else:
        what = "syntax error"
    hint = ""
    if re.search(r"\bnew\s+UID\b", src_line):
        hint = "; DicomEdit 6 writes newUID[] (`new UID` is DicomEdit 4)"
    return (
        line,
        f"DicomEdit syntax error at column {col}: {what} in `{src_line.strip()}`{hint}; fix the script",
    )


# --- whole-script checks ---------------------------------------------------------------------------


def _walk_values(v: Value) -> Any:
    yield v
    if isinstance(v, Call):
        for a in v.args:
            yield from _walk_values(a)
    elif isinstance(v, ListValue):
        for a in v.items:
            yield from _walk_values(a)


def _statement_values(s: Statement) -> Any:
    """The values a statement itself evaluates (a conditional's actions are statements of their own)."""
    match s:
        case Assign():
            yield s.value
        case Initialize():
            yield s.value
        case CallStatement():
            yield s.call
        case Echo():
            if s.value is not None:
                yield s.value
        case Conditional():
            yield from _condition_values(s.condition)
        case IfElse():
            for cond, _ in s.branches:
                yield from _condition_values(cond)
        case _:
            return


def _condition_values(c: Condition) -> Any:
    if isinstance(c, Compare):
        yield c.left
        yield c.right
    else:
        yield c.call


def _all_statements(stmts: tuple[Statement, ...]) -> Any:
    for s in stmts:
        yield s
        if isinstance(s, Conditional):
            yield from _all_statements((s.then,) if s.otherwise is None else (s.then, s.otherwise))
        elif isinstance(s, IfElse):
            for _, body in s.branches:
                yield from _all_statements(body)
            yield from _all_statements(s.otherwise or ())


def _check_call(call: Call) -> None:
    name = call.name
    if name in IMPLEMENTED:
        low, high = IMPLEMENTED[name]
        n = len(call.args)
        if n < low or (high is not None and n > high):
            want = f"{low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            raise Refused(
                call.line, f"DicomEdit function {name} takes {want} arguments, not {n}; fix the call"
            )
        for i, a in enumerate(call.args):
            if isinstance(a, ListValue) and name != "format":
                raise Refused(
                    call.line, f"a list as argument {i + 1} of {name} is not implemented by xnatmigrate"
                )
        if name == "mapReferencedUIDs":
            for a in call.args[1:]:
                path = parse_path_text(a.value, call.line) if isinstance(a, Str) else None
                path = a.path if isinstance(a, TagRef) else path
                if path is not None and len(path.steps) > 1:
                    raise Refused(
                        call.line,
                        f"mapReferencedUIDs with the nested path {path.text} is not implemented by xnatmigrate: "
                        "XNAT's MapReferencedUIDsMethod reads and writes the top-level attribute of a nested match",
                    )
        return
    if name in NOT_IMPLEMENTED:
        why = _WHY_NOT.get(name, "")
        raise Refused(
            call.line,
            f"DicomEdit function {name} is not implemented by xnatmigrate"
            + (f" ({why})" if why else "")
            + "; remove it from the script, or apply the script in XNAT after the migration",
        )
    raise Refused(
        call.line,
        f"{name}[…] is not a DicomEdit 6 function (dicomedit FunctionManager registers no such name); fix the script",
    )


def parse_path_text(text: str, line: int) -> TagPath:
    """A tag path written as a string (mapReferencedUIDs arguments, TagPathFactory.createDE6Instance)."""
    try:
        tree = _lark().parse(f'{text} := ""\n')
        stmts = _Build().transform(tree)
    except LarkError as e:
        inner = getattr(e, "orig_exc", None)
        if isinstance(inner, Refused):
            raise Refused(line, f"argument {text!r}: {inner.message}") from None
        raise Refused(line, f"{text!r} is not a DicomEdit tag path") from None
    first = stmts[0] if stmts else None
    if not isinstance(first, Assign):
        raise Refused(line, f"{text!r} is not a DicomEdit tag path")
    return first.path


def discover_variables(stmts: tuple[Statement, ...]) -> tuple[frozenset[str], frozenset[str]]:
    """(every variable the script knows, those set from outside), in DiscoverVariablesTreeVisitor's order.

    A name is external when it is read as a plain value (visitIdValue) or described hidden/const/immutable
    (initVariable) before any ``name := …`` defines it; function arguments are not visited (visitFunction).
    """
    known: set[str] = set()
    external: set[str] = set()

    def see(v: Value | None) -> None:
        if isinstance(v, Var) and v.name not in known:
            known.add(v.name)
            external.add(v.name)

    def walk(s: Statement) -> None:
        match s:
            case Initialize():
                see(s.value)
                known.add(s.name)
            case Assign():
                see(s.value)
            case Echo():
                see(s.value)
            case Describe() if s.kind != "named":
                if s.name not in known:
                    known.add(s.name)
                    external.add(s.name)
            case Conditional():
                if isinstance(s.condition, Compare):
                    see(s.condition.left)
                    see(s.condition.right)
                walk(s.then)
                if s.otherwise is not None:
                    walk(s.otherwise)
            case IfElse():
                for cond, body in s.branches:
                    if isinstance(cond, Compare):
                        see(cond.left)
                        see(cond.right)
                    for b in body:
                        walk(b)
                for b in s.otherwise or ():
                    walk(b)
            case _:
                return

    for s in stmts:
        walk(s)
    return frozenset(known), frozenset(external)


def _check(stmts: tuple[Statement, ...], text: str) -> None:
    if not _VERSION_LINE.search(text):
        raise Refused(
            None,
            'no line reads exactly `version "6.x"`: XNAT would run this script as DicomEdit 4.x, which '
            'xnatmigrate does not implement; add the line version "6.1" if the script is DicomEdit 6',
        )
    known, _ = discover_variables(stmts)
    first_use_in_args: dict[str, int] = {}
    for s in _all_statements(stmts):
        if isinstance(s, Describe):
            known = known | {s.name}  # visitDescribe… defines the variable when the statement runs
        if isinstance(s, Assign) and not s.path.singular:
            raise Refused(
                s.line,
                f"assignment to {s.path.text}, which names several attributes: DicomEdit refuses it "
                "(mizer assign: a tag path that maps to multiple attributes); name one attribute",
            )
        statement_call = s.call if isinstance(s, CallStatement) else None
        for top in _statement_values(s):
            if isinstance(top, ListValue):
                raise Refused(
                    s.line, "a list value outside a function argument is not implemented by xnatmigrate"
                )
            if isinstance(top, TagRef) and not top.path.singular:
                raise Refused(
                    top.line,
                    f"{top.path.text} names several attributes and cannot be a value "
                    "(DicomEditParseTreeVisitor.visitTagpathValue); name one attribute",
                )
            for v in _walk_values(top):
                if not isinstance(v, Call):
                    continue
                _check_call(v)
                if v.name == "mapReferencedUIDs" and v is not statement_call:
                    raise Refused(
                        v.line,
                        "mapReferencedUIDs[…] returns nothing (AbstractMizerValue.VOID) and can only be a "
                        "statement of its own; call it on a line by itself",
                    )
                for a in v.args:
                    if isinstance(a, Var):
                        first_use_in_args.setdefault(a.name, a.line)
                    if isinstance(a, TagRef) and not a.path.singular and v.name != "mapReferencedUIDs":
                        raise Refused(a.line, f"{a.path.text} names several attributes; {v.name} reads one")
    # DiscoverVariablesTreeVisitor.visitFunction does not visit the arguments, so a variable used only there
    # is never defined and DicomEditParseTreeVisitor.visitVariable fails on every file in XNAT.
    for name, line in sorted(first_use_in_args.items(), key=lambda kv: kv[1]):
        if name not in known:
            raise Refused(
                line,
                f"variable {name} is used only inside a function's arguments, where XNAT never defines it "
                f"(DicomEdit's DiscoverVariablesTreeVisitor skips function arguments) and fails every file; "
                f"add the line `{name} := {name}` before its first use",
            )


def join_escaped_newlines(text: str) -> str:
    """EscNewlineRemover (DE6ScriptParser's first processor): a line ending in ``\\`` continues on the next.

    The joined statement keeps its first line's number; blank lines are added after it so that every
    later statement keeps the line number it has in the file.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line, extra = lines[i], 0
        while line.rstrip("\r").endswith("\\") and i + 1 < len(lines):
            line = line.rstrip("\r")[:-1] + lines[i + 1]
            i += 1
            extra += 1
        if line.rstrip("\r").endswith("\\"):  # the last line: the backslash is dropped
            line = line.rstrip("\r")[:-1]
        out.append(line)
        out.extend([""] * extra)
        i += 1
    return "\n".join(out)


def parse_statements(text: str, source: str) -> tuple[Statement, ...]:
    """Parse and check a DicomEdit 6 script. Raises ``DicomEditError`` naming ``source:line`` and the construct."""
    text = join_escaped_newlines(text)
    try:
        tree = _lark().parse(text if text.endswith("\n") else text + "\n")
        stmts = cast(tuple[Statement, ...], _Build().transform(tree))
        _check(stmts, text)
    except Refused as e:
        raise DicomEditError(source, e.line, e.message) from None
    except UnexpectedInput as e:
        line, message = _syntax_message(e, text)
        raise DicomEditError(source, line, message) from None
    except LarkError as e:
        inner = getattr(e, "orig_exc", None)
        if isinstance(inner, Refused):
            raise DicomEditError(source, inner.line, inner.message) from None
        raise DicomEditError(source, None, f"DicomEdit script cannot be parsed: {e}") from None
    return stmts
