"""Labels the way XNAT makes them: templates, sanitising, scan folders and file names.

Every rule cites where XNAT does it (xnat-reference.md §2 and §6).
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Mapping

import jinja2
import jinja2.meta
import jinja2.sandbox

from .errors import XnatMigrateError

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


class TemplateError(XnatMigrateError):
    """A label template is malformed or uses a name that is not a DICOM keyword."""


class MissingValue(XnatMigrateError):
    """A template needs a DICOM attribute the file does not have."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"template variable {keyword} is missing from the header")


def is_valid_label(text: str) -> bool:
    return bool(VALID_LABEL.fullmatch(text))  # fullmatch: `$` would accept a trailing newline


def sanitize(text: str) -> str:
    """Labels.toLabelChars: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    return _NOT_LABEL_CHAR.sub("_", text.strip())


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.sandbox.SandboxedEnvironment:
    # Sandboxed: manifests come from users' git repositories, not from us. StrictUndefined: a
    # missing header value must be an error, never an empty label.
    return jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


@functools.lru_cache(maxsize=4096)
def template_keywords(template: str) -> frozenset[str]:
    """The variables a template reads. Raises TemplateError on a syntax error."""
    try:
        ast = _env().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from exc
    return frozenset(jinja2.meta.find_undeclared_variables(ast))


def unknown_keywords(names: frozenset[str] | set[str]) -> list[str]:
    """Names that are not DICOM keywords in pydicom's data dictionary."""
    from pydicom.datadict import keyword_dict

    return sorted(n for n in names if n not in keyword_dict)


@functools.lru_cache(maxsize=4096)
def _compiled(template: str) -> jinja2.Template:
    return _env().from_string(template)


def render(template: str, values: Mapping[str, str]) -> str:
    """Render a label template over header values (raw, before sanitising).

    Raises MissingValue when a variable has no value in ``values``. Results are memoised by the
    values the template reads (all files of a series share them), so large plans render each
    distinct label once.
    """
    if not is_template(template):
        return template
    names = _sorted_keywords(template)
    key = (template, tuple(values.get(k) for k in names))
    hit = _RENDERED.get(key)
    if hit is not None:
        return hit
    try:
        out = _compiled(template).render(**{k: values[k] for k in names if k in values}).strip()
    except jinja2.UndefinedError:
        missing = [k for k in names if k not in values]
        raise MissingValue(missing[0] if missing else "?") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"template {template!r} failed: {exc}") from exc
    if len(_RENDERED) > 100_000:
        _RENDERED.clear()
    _RENDERED[key] = out
    return out


_RENDERED: dict[tuple[str, tuple[str | None, ...]], str] = {}


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
    return sum(map(operator.mul, units, _POW31[len(_POW31) - n :])) & 0xFFFFFFFF


_POW31 = tuple(pow(31, k, 1 << 32) for k in range(255, -1, -1))


def xnat_hash(*values: str) -> str:
    """``List.of(values).hashCode() & 0xffffffffL`` in base 36 (TemplatizedDicomFileNamer, §2)."""
    h = 1
    for v in values:
        h = (31 * h + java_string_hash(v)) & 0xFFFFFFFF
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


def file_name(values: Mapping[str, str], template: str = XNAT_FILE_NAME_TEMPLATE) -> str:
    """The name XNAT's TemplatizedDicomFileNamer gives a file (§2).

    A missing value becomes ``no-value-for-<Tag>``; ``.dcm`` is appended when the template has no
    extension; leading dots are stripped.
    """

    def value_of(var: str) -> str:
        m = _HASH_VAR.match(var)
        if m:
            a, b = m.groups()
            return xnat_hash(values.get(a) or "", values.get(b) or "")
        return values.get(var) or f"no-value-for-{var}"

    name = _TEMPLATE_VAR.sub(lambda m: value_of(m.group(1)), template)
    if "." not in template.rsplit("}", 1)[-1]:
        name += ".dcm"
    return name.lstrip(".")


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
