"""Labels the way XNAT makes them: templates, sanitising, scan folders and file names.

Every rule cites where XNAT does it (xnat-reference.md §2 and §6).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

from .errors import XnatMigrateError
from .model import LookupMatch, LookupTable

# XftStringUtils.isValidId / Patterns.ALPHANUMERIC_AND_DASHES (xnat-reference.md §6).
VALID_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
# org.nrg.xnat.Labels.toLabelChars: every char outside Java's [\w-] becomes '_'. Java's \w is ASCII
# only (no UNICODE_CHARACTER_CLASS flag), hence the explicit class.
_NOT_LABEL_CHAR = re.compile(r"[^A-Za-z0-9_-]")
# org.nrg.xnat.Files.isValidFilename, used by Restructurer.determineScanSubdir (§2).
_VALID_FILENAME = re.compile(r"^[A-Za-z0-9_.-]+$")

# XNAT's default dicomFileNameTemplate (SiteConfigPreferences; TemplatizedDicomFileNamer, §2).
XNAT_FILE_NAME_TEMPLATE = (
    "${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}"
)
_TEMPLATE_VAR = re.compile(r"\$\{([A-Za-z0-9]+)\}")
_HASH_VAR = re.compile(r"^Hash([A-Za-z0-9]+?)With([A-Za-z0-9]+)$")
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"

# Labels become folder and file names (prearchive/<project>/<timestamp>/<session>/ and <session>.xml
# next to it, §2): a path component has at most 255 bytes (NAME_MAX), less the ".xml" XNAT appends.
# A sanitised label is ASCII, one byte per character of the raw one.
MAX_LABEL_BYTES = 251
# While rendering, no value a template builds (text, list, number's digits) nor its output may grow
# past this: far more than any label, small enough that nothing large is ever built.
_RENDER_CAP = 4096


class TemplateError(XnatMigrateError):
    """A label template is malformed or uses a name that is not a DICOM keyword."""


class MissingValue(XnatMigrateError):
    """A template needs a DICOM attribute the file does not have."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"template variable {keyword} is missing from the header")


class LabelTooLong(MissingValue):
    """A template renders a label longer than MAX_LABEL_BYTES for this file's values.

    A MissingValue for its callers: the file's values give no usable label, so the planner rejects
    the file with this message, as it does for a missing attribute.
    """

    def __init__(self, template: str, values: Mapping[str, str], length: int | None) -> None:
        self.keyword = ""
        shown = template if len(template) <= 60 else template[:57] + "..."
        size = f"{length} characters" if length is not None else f"more than {_RENDER_CAP:,} characters"
        XnatMigrateError.__init__(
            self,
            f"template {shown!r} renders a label of {size} for study "
            f"{values.get('StudyInstanceUID') or '?'}, longer than the {MAX_LABEL_BYTES} a folder "
            "name allows (255 bytes less the '.xml' XNAT appends): shorten the template",
        )


class LookupMiss(XnatMigrateError):
    """A template picks a column of a lookup table by a header value that is not one of its keys.

    Not a MissingValue: the file is fine, the table lacks a row, so the planner holds the whole
    study back (naming table, column and value) instead of rejecting the file.
    """

    def __init__(self, ref: LookupRef, table: LookupTable, value: str) -> None:
        self.ref = ref
        self.value = value
        super().__init__(
            f"{ref.keyword} {value!r} is not in lookup table {ref.table} ({table.file}, key column "
            f"{table.key}), whose column {ref.column} the labels need: add a row for it, or admit only "
            f"listed studies with where: {{{ref.keyword}: {{in_lookup: {ref.table}}}}}"
        )


# The name templates reach lookup tables by: ``{{ lookups.TABLE[Keyword].column }}``.
LOOKUPS = "lookups"


@dataclass(frozen=True, order=True)
class LookupRef:
    """One use of a lookup table in a template: ``lookups.<table>[<keyword>].<column>``."""

    table: str
    keyword: str
    column: str


class _TooBig(Exception):
    """Raised inside a render when a value would grow past _RENDER_CAP."""


def is_valid_label(text: str) -> bool:
    return bool(VALID_LABEL.fullmatch(text))  # fullmatch: `$` would accept a trailing newline


def sanitize(text: str) -> str:
    """Labels.toLabelChars: characters outside ``[A-Za-z0-9_-]`` become ``_``.

    NOTE: no trimming: toLabelChars does not trim (§9), so a space left in a value is a ``_``.
    """
    return _NOT_LABEL_CHAR.sub("_", text)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def _sized(value: object) -> object:
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) and len(value) > _RENDER_CAP:
        raise _TooBig
    if isinstance(value, int) and value.bit_length() > 3 * _RENDER_CAP:  # ~3,700 digits
        raise _TooBig
    return value


def _small_ints(args: tuple[object, ...], kwargs: Mapping[str, object]) -> None:
    """A width, count or repeat bigger than any label is refused before it allocates anything."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _RENDER_CAP:
            raise _TooBig


_FORMAT_NUMBER = re.compile(r"\d+|\*")


def _small_format(fmt: object) -> None:
    """``'%300000000s' % x`` or ``'{:>300000000}'.format(x)``: a huge (or argument-given) width."""
    if isinstance(fmt, str):
        for n in _FORMAT_NUMBER.findall(fmt):
            if n == "*" or int(n) > _RENDER_CAP:
                raise _TooBig


def _small_replace(s: object, old: object, new: object, count: object = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        n = s.count(old) if old else len(s) + 1
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        if len(s) + n * (len(new) - len(old)) > _RENDER_CAP:
            raise _TooBig


def _bounded_filter(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # context/env comes first

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _small_ints(args, kwargs)
        if name == "replace":
            _small_replace(*args[skip:])
        elif name == "format" and len(args) > skip:
            _small_format(args[skip])
        return _sized(f(*args, **kwargs))

    return bounded


class _BoundedSandbox(jinja2.sandbox.SandboxedEnvironment):
    """The sandbox, plus: nothing a template builds grows past _RENDER_CAP (repeats, powers,
    padding, formatting, replace), so ``{{ PatientID * 300000000 }}`` fails fast instead of
    allocating gigabytes. Loops and macros are refused when parsed (template_keywords)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {k: _bounded_filter(f, k) for k, f in self.filters.items()}

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _RENDER_CAP:
                    raise _TooBig
        elif operator == "**":
            ints = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
            if ints and abs(left).bit_length() * right > 3 * _RENDER_CAP:
                raise _TooBig
        elif operator == "%":
            _small_format(left)
        return _sized(super().call_binop(context, operator, left, right))

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _small_ints(args, kwargs)
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map"):
                _small_format(owner)
            elif name == "replace":
                _small_replace(owner, *args)
        return _sized(super().call(context, obj, *args, **kwargs))


@functools.lru_cache(maxsize=1)
def _env() -> _BoundedSandbox:
    # Sandboxed: manifests come from users' git repositories, not from us. StrictUndefined: a
    # missing header value must be an error, never an empty label.
    return _BoundedSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


def _check_bounded(ast: jinja2.nodes.Template) -> None:
    """Refuse what could run or grow without bound: loops, macros, and literal numbers that make
    a label longer than any folder name (``PatientID * 300000000``)."""
    for node in ast.find_all((jinja2.nodes.For, jinja2.nodes.Macro, jinja2.nodes.CallBlock)):
        kind = "{% for %} loops" if isinstance(node, jinja2.nodes.For) else "macros"
        raise TemplateError(f"a label template may not use {kind}; use expressions and filters")
    for op in ast.find_all((jinja2.nodes.Mul, jinja2.nodes.Pow)):
        for side in (op.left, op.right):
            n = side.value if isinstance(side, jinja2.nodes.Const) else None
            if isinstance(n, int) and not isinstance(n, bool) and n > MAX_LABEL_BYTES:
                raise TemplateError(
                    f"the template {'repeats by' if isinstance(op, jinja2.nodes.Mul) else 'raises to'} "
                    f"{n}, which makes a label longer than the {MAX_LABEL_BYTES} characters a folder "
                    "name allows; use a smaller number"
                )
    calls: Iterator[jinja2.nodes.Filter | jinja2.nodes.Call | jinja2.nodes.Test]
    calls = ast.find_all((jinja2.nodes.Filter, jinja2.nodes.Call, jinja2.nodes.Test))
    for call in calls:
        for arg in (*call.args, *(kw.value for kw in call.kwargs)):
            n = arg.value if isinstance(arg, jinja2.nodes.Const) else None
            if isinstance(n, int) and not isinstance(n, bool) and abs(n) > _RENDER_CAP:
                raise TemplateError(
                    f"the template passes {n} as a width or count, larger than any label "
                    f"({MAX_LABEL_BYTES} characters at most); use a smaller number"
                )


@functools.lru_cache(maxsize=4096)
def _parsed(template: str) -> tuple[frozenset[str], tuple[LookupRef, ...]]:
    try:
        ast = _env().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from exc
    _check_bounded(ast)
    refs = _lookup_refs(ast)
    return frozenset(jinja2.meta.find_undeclared_variables(ast)) - {LOOKUPS}, refs


def template_keywords(template: str) -> frozenset[str]:
    """The DICOM keywords a template reads (the keys of its lookups included). Raises
    TemplateError on a syntax error, when the template could loop or grow without bound
    (``_check_bounded``), or uses ``lookups`` other than as ``lookups.TABLE[Keyword].column``."""
    return _parsed(template)[0]


def template_lookups(template: str) -> tuple[LookupRef, ...]:
    """The lookup-table columns a template picks, sorted (TemplateError as ``template_keywords``)."""
    return _parsed(template)[1] if is_template(template) else ()


def _picked_name(node: jinja2.nodes.Node) -> str | None:
    """``x.name`` or ``x["name"]``: the name; else None."""
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
        return node.arg.value if isinstance(node.arg.value, str) else None
    return None


def _lookup_refs(ast: jinja2.nodes.Template) -> tuple[LookupRef, ...]:
    """Every ``lookups.TABLE[Keyword].column`` of a template; any other use of ``lookups`` (a whole
    row, a computed key, the name reassigned) is a TemplateError."""
    refs: set[LookupRef] = set()
    used: set[int] = set()
    for node in ast.find_all((jinja2.nodes.Getattr, jinja2.nodes.Getitem)):
        column = _picked_name(node)
        row = getattr(node, "node", None)
        if column is None or not isinstance(row, jinja2.nodes.Getitem):
            continue
        if not isinstance(row.arg, jinja2.nodes.Name):
            continue
        table_node = row.node
        table = _picked_name(table_node)
        root = getattr(table_node, "node", None)
        if table is None or not isinstance(root, jinja2.nodes.Name) or root.name != LOOKUPS:
            continue
        if column.startswith("_") and isinstance(node, jinja2.nodes.Getattr):
            raise TemplateError(
                f"lookups.{table}[{row.arg.name}].{column}: a column whose name starts with '_' is "
                f'picked as lookups.{table}[{row.arg.name}]["{column}"]'
            )
        refs.add(LookupRef(table, row.arg.name, column))
        used.add(id(root))
    for name in ast.find_all(jinja2.nodes.Name):
        if name.name == LOOKUPS and id(name) not in used:
            raise TemplateError(
                "a template reads a lookup table as {{ lookups.TABLE[Keyword].column }} (a DICOM "
                'keyword as the key, one column picked by name or as ["column"]); write it that way'
            )
    return tuple(sorted(refs))


def unknown_keywords(names: frozenset[str] | set[str]) -> list[str]:
    """Names that are not DICOM keywords in pydicom's data dictionary."""
    from pydicom.datadict import keyword_dict

    return sorted(n for n in names if n not in keyword_dict)


@functools.lru_cache(maxsize=4096)
def _compiled(template: str) -> jinja2.Template:
    return _env().from_string(template)


class _Picks:
    """What a template sees of ``lookups``: names reached as attributes or items alike (a column
    named ``items`` or ``keys`` is a column, not a dict method), and only the rows it picks."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = items

    def __getattr__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._items[name]


def lookup_matches(
    template: str, values: Mapping[str, str], lookups: Mapping[str, LookupTable]
) -> tuple[LookupMatch, ...]:
    """The rows of ``lookups`` the template picks for these header values, sorted.

    Raises MissingValue when a key keyword has no value, LookupMiss when its value is not a key of
    the table. NOTE: the manifest checked that every table and column named exists.
    """
    out = []
    for ref in template_lookups(template):
        value = values.get(ref.keyword)
        if value is None:
            raise MissingValue(ref.keyword)
        table = lookups.get(ref.table)
        if table is None:
            raise TemplateError(f"the template uses lookup table {ref.table}, which the manifest lacks (bug)")
        row = table.rows.get(value)
        if row is None:
            raise LookupMiss(ref, table, value)
        out.append(LookupMatch(ref.table, ref.keyword, value, row.line))
    return tuple(sorted(set(out)))


def render(template: str, values: Mapping[str, str], lookups: Mapping[str, LookupTable] | None = None) -> str:
    """Render a label template over header values (raw, before sanitising) and lookup tables.

    Raises MissingValue when a variable has no value in ``values``, LabelTooLong (a MissingValue)
    when the label would be longer than MAX_LABEL_BYTES, LookupMiss when a header value is not a
    key of a table the template picks from; the output is built piece by piece and abandoned past
    _RENDER_CAP characters, and no value inside grows past it (_BoundedSandbox). Results are
    memoised by the values the template reads, picked cells included (all files of a series share
    them), so large plans render each distinct label once.
    """
    if not is_template(template):
        return template
    names = _sorted_keywords(template)
    refs = template_lookups(template)
    picked: dict[str, dict[str, dict[str, str]]] = {}
    cells: tuple[str, ...] = ()
    if refs:
        tables = lookups or {}
        for m in lookup_matches(template, values, tables):
            picked.setdefault(m.table, {})[m.key] = dict(tables[m.table].rows[m.key].values)
        cells = tuple(picked[r.table][values[r.keyword]].get(r.column, "") for r in refs)
    key = (template, tuple(map(values.get, names)), cells)
    hit = _RENDERED.get(key)
    if hit is not None:
        return hit
    context: dict[str, Any] = {k: values[k] for k in names if k in values}
    if refs:
        context[LOOKUPS] = _Picks(
            {t: _Picks({k: _Picks(r) for k, r in rows.items()}) for t, rows in picked.items()}
        )
    parts: list[str] = []
    size = 0
    try:
        for part in _compiled(template).generate(**context):
            size += len(part)
            if size > _RENDER_CAP:
                raise _TooBig
            parts.append(part)
    except jinja2.UndefinedError:
        missing = [k for k in names if k not in values]
        raise MissingValue(missing[0] if missing else "?") from None
    except _TooBig:
        raise LabelTooLong(template, values, None) from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {template!r} failed: {exc}") from exc
    except (ArithmeticError, ValueError, TypeError, LookupError) as exc:
        raise TemplateError(
            f"template {template!r} failed for study {values.get('StudyInstanceUID') or '?'}: {exc}; "
            "fix the template"
        ) from None
    out = "".join(parts).strip()
    if len(out) > MAX_LABEL_BYTES:
        raise LabelTooLong(template, values, len(out))
    if len(_RENDERED) > 100_000:
        _RENDERED.clear()
    _RENDERED[key] = out
    return out


_RENDERED: dict[tuple[str, tuple[str | None, ...], tuple[str, ...]], str] = {}


@functools.lru_cache(maxsize=4096)
def _sorted_keywords(template: str) -> tuple[str, ...]:
    return tuple(sorted(template_keywords(template)))


def scan_folder(series_number: str | None, series_uid: str | None) -> str:
    """Restructurer.determineScanSubdir: SeriesNumber if a valid file name, else the sanitised
    SeriesInstanceUID, else ``NA`` (xnat-reference.md §2)."""
    if series_number and _VALID_FILENAME.match(series_number):
        return series_number
    if series_uid:
        return _NOT_LABEL_CHAR.sub("_", series_uid)
    return "NA"


def java_string_hash(text: str) -> int:
    """java.lang.String.hashCode as an unsigned 32-bit value (over UTF-16 code units)."""
    try:
        units: bytes | list[int] = text.encode("ascii")  # UIDs: one code unit per byte
    except UnicodeEncodeError:
        data = text.encode("utf-16-be")
        units = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    n = len(units)
    if n > len(_POW31):
        h = 0
        for u in units:
            h = (31 * h + u) & 0xFFFFFFFF
        return h
    # sum(u_i * 31^(n-1-i)) mod 2^32, with the products done by map() in C: ~4× the plain loop.
    total: int = sum(map(operator.mul, units, _POW31[len(_POW31) - n :]))
    return total & 0xFFFFFFFF


_POW31 = tuple(pow(31, k, 1 << 32) for k in range(255, -1, -1))


def xnat_hash(*values: str) -> str:
    """``List.of(values).hashCode() & 0xffffffffL`` in base 36 (TemplatizedDicomFileNamer, §2)."""
    h = 1
    for v in values:
        h = (31 * h + java_string_hash(v)) & 0xFFFFFFFF
    return _base36(h)


# Memoised for file names: the per-series operand repeats, the per-file one costs a miss only.
_java_hash = functools.lru_cache(maxsize=4096)(java_string_hash)


def _base36(h: int) -> str:
    out = ""
    while True:
        h, r = divmod(h, 36)
        out = _BASE36[r] + out
        if h == 0:
            return out


def template_file_keywords(template: str = XNAT_FILE_NAME_TEMPLATE) -> frozenset[str]:
    """DICOM keywords a file-name template reads (the Hash operands included)."""
    names: set[str] = set()
    for var in _TEMPLATE_VAR.findall(template):
        m = _HASH_VAR.match(var)
        names.update(m.groups() if m else (var,))
    return frozenset(names)


def strip_template_vars(template: str) -> str:
    """The template without its ``${Var}`` parts (what is left must be plain text)."""
    return _TEMPLATE_VAR.sub("", template)


def file_name(values: Mapping[str, str], template: str = XNAT_FILE_NAME_TEMPLATE) -> str:
    """The name XNAT's TemplatizedDicomFileNamer gives a file (§2).

    A missing value becomes ``no-value-for-<Tag>``; ``.dcm`` is appended when the template has no
    extension; leading dots are stripped.
    """
    return file_namer(template)(values)


@functools.lru_cache(maxsize=64)
def file_namer(template: str = XNAT_FILE_NAME_TEMPLATE) -> Callable[[Mapping[str, str]], str]:
    """``file_name`` with its template parsed once: a plan names 100,000s of files with one template.

    The hash operands' Java hashes are memoised (``_java_hash``): in XNAT's default template one of
    them (SOPClassUID) is the same for every file of a series.
    """
    # (literal text, variable, second hash operand): variable None ends with the literal alone;
    # a second operand makes it ``Hash<variable>With<operand>``.
    parts: list[tuple[str, str | None, str | None]] = []
    pos = 0
    for m in _TEMPLATE_VAR.finditer(template):
        var = m.group(1)
        h = _HASH_VAR.match(var)
        parts.append((template[pos : m.start()], *(h.groups() if h else (var, None))))
        pos = m.end()
    parts.append((template[pos:], None, None))
    suffix = "" if "." in template.rsplit("}", 1)[-1] else ".dcm"

    def name(values: Mapping[str, str]) -> str:
        out: list[str] = []
        for text, var, other in parts:
            out.append(text)
            if var is None:
                continue
            value = values.get(var) or f"no-value-for-{var}"
            if other is None:
                out.append(value)
            else:
                # TemplatizedDicomFileNamer:93-96 hashes a missing operand as its placeholder text too (§9).
                second = values.get(other) or f"no-value-for-{other}"
                out.append(_base36((31 * (31 + _java_hash(value)) + _java_hash(second)) & 0xFFFFFFFF))
        return ("".join(out) + suffix).lstrip(".")

    return name


def routing_line(project: str | None, subject: str | None, session: str) -> str:
    """``Project: P Subject: S Session: E`` for XNAT's comment convention (§5).

    XNAT's ContainedAssignmentExtractor reads values of ``[\\w-]*`` only and fails on a newline, so
    every value must be a valid label; a None part is left out.
    """
    parts = []
    for key, value in (("Project", project), ("Subject", subject), ("Session", session)):
        if value is None and key != "Session":
            continue
        if value is None or not is_valid_label(value):
            raise ValueError(f"{key} {value!r} is not a valid XNAT label for routing")
        parts.append(f"{key}: {value}")
    return " ".join(parts)


# ContainedAssignmentExtractor's pattern, applied with Java's matches() (= fullmatch); Java's \w is
# ASCII-only, hence re.ASCII. Without DOTALL, `.` stops at a newline: a key two or more lines
# below the start is never found (a single newline is still crossed by the [\s,;] class).
_ANY = r"[^\n\r\u0085\u2028\u2029]"  # Java's `.` without DOTALL: any char but a line terminator
_ASSIGNMENT = {
    key: re.compile(
        rf"(?:\A|{_ANY}*[\s,;]){key}\s*:\s*([\w\-]*)(?:[\s,;]{_ANY}*\Z|\Z)", re.IGNORECASE | re.ASCII
    )
    for key in ("Project", "Subject", "Session")
}
# ClassicDicomObjectIdentifier's comment fields, in order (§5 rows 3-5).
_COMMENT_FIELDS = ("PatientComments", "StudyComments", "AdditionalPatientHistory")


def comment_assignments(text: str | None) -> dict[str, str]:
    """The ``Project:``/``Subject:``/``Session:`` values XNAT would read from one comment field (§5)."""
    out: dict[str, str] = {}
    for key, pattern in _ASSIGNMENT.items():
        m = pattern.fullmatch(text or "")
        if m and m.group(1):
            out[key] = m.group(1)
    return out


def predict_route(values: Mapping[str, str]) -> tuple[str | None, str | None, str]:
    """Where XNAT's default identifier would route a study by its headers alone (§5).

    Returns (project candidate or None, subject, session). NOTE: site routing rules and whether a
    project candidate names an existing project cannot be known offline; the caller says so.
    """

    def from_comments(key: str) -> str | None:
        for fld in _COMMENT_FIELDS:
            text = values.get(fld)
            if text:
                m = _ASSIGNMENT[key].fullmatch(text)
                if m and m.group(1):
                    return m.group(1)
        return None

    project = from_comments("Project") or values.get("StudyDescription") or values.get("AccessionNumber")
    subject = from_comments("Subject") or sanitize(values.get("PatientName", "")) or None
    # GradualDicomImporter: an empty session label becomes dicom_upload (§5 "Unroutable data").
    session = from_comments("Session") or sanitize(values.get("PatientID", "")) or "dicom_upload"
    return project, subject, session
