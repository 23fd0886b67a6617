"""Manifest loading: YAML (line numbers kept, duplicate keys refused) → JSON Schema → meaning → Manifest.

Invariants:
- Every problem in a file is reported at once, as ``FILE:LINE: $.path: message``.
- Nothing returned holds a raw dict: the result is a frozen ``Manifest``.
- No source folder, database or XNAT is touched unless ``check_sources`` asks for the folders.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import zoneinfo
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import yaml

from . import dicomedit, labels, lookups
from .errors import DicomEditError, ManifestError, Problem
from .model import (
    Build,
    DatabaseTarget,
    LookupTable,
    Manifest,
    Method,
    PlannedScript,
    Routing,
    ScpTarget,
    SourceSpec,
    Transfer,
    XnatTarget,
)
from .resources import schema_path

_E = TypeVar("_E", bound=StrEnum)


def _is_zone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _enum(kind: type[_E], value: object, default: _E) -> _E | None:
    """``value`` as a member of ``kind``; the default when absent, None when not a member."""
    if value is None:
        return default
    try:
        return kind(str(value))
    except ValueError:
        return None


PathT = tuple[Any, ...]

# Receiver defaults when a manifest names no subject/session: PatientName and PatientID, as XNAT's
# ClassicDicomObjectIdentifier does (xnat-reference.md §5 rows 6, §6 "Default labels").
DEFAULT_SUBJECT = "{{ PatientName }}"
DEFAULT_SESSION = "{{ PatientID }}"

_OPTION_KEYS = (
    "project",
    "subject",
    "session",
    "include",
    "exclude",
    "where",
    "method",
    "transfer",
    "build",
    "build_timeout",
    "archive",
    "routing",
    "hardlink_changes_sources",
    "follow_links",
    "merge_subjects",
    "allow_partial_studies",
    "anonymization",
)


def json_path(path: PathT) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    schema = json.loads(schema_path("manifest.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


class _Doc:
    """Plain data from YAML, plus the line of every node and any duplicate-key problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[PathT, int] = {}
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def convert(self, node: yaml.Node, path: PathT) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    key = str(key)
                if key in out:
                    first = self.lines.get(path + (key,))
                    self.problems.append(
                        Problem(
                            self.file,
                            key_node.start_mark.line + 1,
                            json_path(path + (key,)),
                            f"duplicate key {key!r} (first at line {first}); YAML would keep "
                            "only the last one: remove one of them",
                        )
                    )
                    continue
                out[key] = self.convert(value_node, path + (key,))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(v, path + (i,)) for i, v in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)

    def line(self, path: PathT) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def problem(self, path: PathT, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(self.file, self.line(path), json_path(path), message, severity))


# Aliases may add at most this many values to the ones written out: a "billion laughs" manifest (an
# alias of nine aliases of nine aliases …) is a few hundred bytes that would expand to 10⁹ values.
MAX_ALIAS_EXPANSION = 100_000


class _AliasLoader(yaml.SafeLoader):
    """SafeLoader that notes where each alias is used (the composed graph keeps only the anchor)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases: list[tuple[int, yaml.Node]] = []  # (line, node it refers to)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        alias = self.check_event(yaml.AliasEvent)
        line = self.peek_event().start_mark.line + 1 if alias else None  # type: ignore[no-untyped-call]
        node: yaml.Node | None = super().compose_node(parent, index)
        if line is not None and node is not None:
            self.aliases.append((line, node))
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _alias_problem(root: yaml.Node, aliases: list[tuple[int, yaml.Node]], file: str) -> Problem | None:
    """A recursive alias, or aliases adding more than MAX_ALIAS_EXPANSION values; None when fine.

    Counts the values the document has with every alias written out, in one pass over the distinct
    nodes (each node's count is kept), so nothing is expanded to find out.
    """
    sizes: dict[int, int] = {}
    entered: set[int] = set()  # nodes whose children are being counted: the current node's ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            entered.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            continue
        if key in sizes:
            continue
        if key in entered:
            line = next((ln for ln, target in aliases if target is node), None)
            return Problem(
                file,
                line,
                "$",
                "this alias refers to a value that contains it (a recursive alias), which has no end: "
                "write out the values it should repeat",
            )
        entered.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node))
    limit = len(sizes) + MAX_ALIAS_EXPANSION
    if sizes[id(root)] <= limit:
        return None
    line = max(aliases, key=lambda a: sizes[id(a[1])])[0] if aliases else None
    return Problem(
        file,
        line,
        "$",
        f"YAML aliases expand this manifest to more than {limit:,} values (an alias bomb?); a "
        "manifest needs far fewer: write the repeated values out, or nest fewer aliases",
    )


def _parse_yaml(text: str, file: str) -> tuple[Any, _Doc]:
    doc = _Doc(file)
    loader = _AliasLoader(text)
    try:
        node = loader.get_single_node()
        bomb = _alias_problem(node, loader.aliases, file) if node is not None else None
        if bomb is not None:
            raise ManifestError([bomb])
    except RecursionError:
        raise ManifestError(
            [Problem(file, None, "$", "the YAML is nested too deeply to read; flatten the manifest")]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or str(exc)
        raise ManifestError(
            [Problem(file, line, "$", f"YAML syntax error: {what}; fix the YAML at this line")]
        ) from None
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(file, None, "$", f"YAML error: {exc}")]) from None
    finally:
        loader.dispose()
    if node is None:
        raise ManifestError([Problem(file, 1, "$", "the manifest is empty; start with `version: 1`")])
    return doc.convert(node, ()), doc


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _schema_problems(data: Any, doc: _Doc) -> None:
    for err in sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        path = tuple(err.absolute_path)
        message = err.message
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            allowed = ", ".join(sorted(err.schema.get("properties", {})))
            for key in extra:
                doc.problem(path + (key,), f"unknown key {key!r}; allowed here: {allowed}")
            continue
        if err.validator == "required":
            message = f"{message}; add it"
        elif err.validator == "enum":
            message = (
                f"{err.instance!r} is not allowed; use one of {', '.join(map(str, err.validator_value))}"
            )
        elif err.validator == "pattern" and path and path[-1] in ("called_aet", "calling_aet"):
            message = "an AE title has 1-16 characters, no backslash or control characters"
        elif err.validator == "maxLength" and path and path[-1] in ("called_aet", "calling_aet"):
            message = f"AE title {err.instance!r} is longer than 16 characters"
        elif err.validator == "const" and path == ("version",):
            message = f"version {err.instance!r} is not supported; this xnatmigrate reads version 1"
        elif err.validator == "oneOf" and len(path) >= 2 and path[-2] == "where":
            message = (
                f"{err.instance!r} is not a where condition: give a value, a list of values, or "
                "{in_lookup: TABLE} (the value must be a key of that lookup table)"
            )
        elif err.validator == "pattern" and path and path[-1] == "file_mode":
            message = f'{err.instance!r} is not an octal mode; write it quoted, e.g. "0664"'
        doc.problem(path, message)


def _dsn_has_password(dsn: str) -> bool:
    if re.match(r"^postgres(ql)?://", dsn):
        parts = urlsplit(dsn)
        if parts.password:
            return True
        return "password" in parse_qs(parts.query)
    return bool(re.search(r"(^|\s)password\s*=", dsn))


def _url_has_password(url: str) -> bool:
    """``https://user:secret@host``: the password would be printed and stored in plan.json."""
    try:
        return bool(urlsplit(url).password)
    except ValueError:  # a malformed port or IPv6 host; the URL's other checks report it
        return False


class _Lookups:
    """The manifest's lookup tables as read, and what its templates and filters use of them."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.tables: dict[str, LookupTable] = {}
        self.declared: set[str] = set()  # every name under lookups:, read or not
        self.shown: dict[str, str] = {}  # table → its file as messages name it
        self.picked: dict[tuple[str, str], tuple[PathT, labels.LookupRef]] = {}  # first use of each column
        self.used: set[str] = set()


def _read_lookups(data: dict[str, Any], doc: _Doc, manifest_dir: Path, file: str) -> _Lookups:
    out = _Lookups(file)
    entries = data.get("lookups")
    if not isinstance(entries, dict):
        return out
    for name, entry in entries.items():
        out.declared.add(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            continue  # the schema reports it
        key, delimiter = entry.get("key"), entry.get("delimiter")
        if not isinstance(key, str) or not (delimiter is None or isinstance(delimiter, str)):
            continue
        written = entry["file"]
        target = _resolve(manifest_dir, written)
        expanded = os.path.expanduser(written)
        shown = expanded if os.path.isabs(expanded) else os.path.join(os.path.dirname(file), expanded)
        out.shown[name] = shown
        try:
            table, problems = lookups.read_table(
                name, target, shown, key, delimiter, json_path(("lookups", name))
            )
        except OSError as exc:
            doc.problem(
                ("lookups", name, "file"),
                f"cannot read lookup table {name} from {target}: {exc.strerror or exc}; fix the path "
                "(relative paths are relative to the manifest)",
            )
            continue
        doc.problems.extend(problems)
        if table is not None:
            out.tables[name] = table
    return out


def _check_label(doc: _Doc, path: PathT, value: str, tables: _Lookups) -> None:
    if labels.is_template(value):
        try:
            names = labels.template_keywords(value)
            refs = labels.template_lookups(value)
        except labels.TemplateError as exc:
            doc.problem(path, str(exc))
            return
        unknown = labels.unknown_keywords(set(names))
        if unknown:
            doc.problem(
                path,
                f"template uses {', '.join(unknown)}, which is not a DICOM keyword "
                "(spell it as pydicom's dictionary does, e.g. PatientID, StudyDate)",
            )
        for ref in refs:
            tables.used.add(ref.table)
            if ref.table not in tables.declared:
                doc.problem(path, _no_table(ref.table, tables))
            else:
                tables.picked.setdefault((ref.table, ref.column), (path, ref))
    elif not labels.is_valid_label(value):
        doc.problem(
            path,
            f"{value!r} is not a valid XNAT label: use only letters, digits, '_' and '-' "
            "(XNAT's XftStringUtils.isValidId), or a {{ template }}",
        )
    elif len(value) > labels.MAX_LABEL_BYTES:
        doc.problem(
            path,
            f"the label is {len(value)} characters long; XNAT makes it a folder name, which may have "
            f"at most {labels.MAX_LABEL_BYTES} (255 bytes less the '.xml' XNAT appends): shorten it",
        )


def _no_table(name: str, tables: _Lookups) -> str:
    known = ", ".join(sorted(tables.declared)) or "none"
    return f"there is no lookup table {name!r} (lookups: defines {known}); define it under lookups: or fix the name"


def _check_meaning(
    data: dict[str, Any],
    doc: _Doc,
    manifest_dir: Path,
    check_sources: bool,
    tables: _Lookups,
    file: str,
    scripts: dict[str, PlannedScript],
) -> None:
    xnat = data.get("xnat") or {}
    defaults = data.get("defaults") or {}
    db = xnat.get("database") or {}
    if "dsn" in db and _dsn_has_password(db["dsn"]):
        doc.problem(
            ("xnat", "database", "dsn"),
            "the DSN holds a password; keep passwords out of manifests: use PGPASSWORD, "
            "~/.pgpass, or `dsn_env` naming an environment variable",
        )
    if isinstance(xnat.get("url"), str) and _url_has_password(xnat["url"]):
        doc.problem(
            ("xnat", "url"),
            "the URL holds a password (user:password@); keep passwords out of manifests: remove it "
            "and use XNAT_USER/XNAT_PASSWORD, an alias token (XNAT_ALIAS/XNAT_SECRET) or ~/.netrc",
        )
    tz = xnat.get("timezone")
    if isinstance(tz, str) and not _is_zone(tz):
        doc.problem(
            ("xnat", "timezone"),
            f"{tz!r} is not a time zone this machine knows (an IANA name such as Europe/Berlin, "
            "as XNAT's JVM reports it in its Site Administration page)",
        )
    fixed: dict[tuple[str | None, str], int] = {}
    for where_path in [("defaults",)]:
        for key in ("project", "subject", "session"):
            if isinstance(defaults.get(key), str):
                _check_label(doc, where_path + (key,), defaults[key], tables)
        _check_where(doc, where_path + ("where",), defaults.get("where"), tables)
    for i, src in enumerate(data.get("sources") or []):
        if not isinstance(src, dict):
            continue
        base: PathT = ("sources", i)
        opts = {**defaults, **src}
        for key in ("project", "subject", "session"):
            if isinstance(src.get(key), str):
                _check_label(doc, base + (key,), src[key], tables)
        _check_where(doc, base + ("where",), src.get("where"), tables)
        # The schema has already checked the spellings; unknown ones only reach here as None.
        method = _enum(Method, opts.get("method"), Method.PREARCHIVE)
        build = _enum(Build, opts.get("build"), Build.REST)
        if method is Method.CSTORE and "scp" not in xnat:
            doc.problem(base, "method cstore needs xnat.scp (host, port, called_aet) to send to")
        if method is Method.PREARCHIVE:
            for need in ("prearchive", "database"):
                if need not in xnat:
                    doc.problem(base, f"method prearchive needs xnat.{need}")
        if method is Method.INBOX:
            for need, why in (("inbox", "to stage into"), ("url", "to ask XNAT's inbox importer over REST")):
                if need not in xnat:
                    doc.problem(base, f"method inbox needs xnat.{need} ({why})")
            if opts.get("project") is None:
                doc.problem(
                    base,
                    "method inbox needs a project: XNAT's inbox importer takes only a path below "
                    "<inbox>/<project>/ and a PROJECT_ID the user can edit (DicomInboxImporter), never "
                    "the Unassigned area",
                )
        if build is Build.REST and "url" not in xnat:
            doc.problem(base, "build: rest needs xnat.url (or set build: scheduler or none)")
        if opts.get("archive") and "url" not in xnat:
            doc.problem(base, "archive: true needs xnat.url")
        # One inode: chmod/chown of the prearchive's hard link is a chmod/chown of the source file.
        changes = [k for k in ("file_mode", "file_owner") if xnat.get(k)]
        if (
            _enum(Transfer, opts.get("transfer"), Transfer.COPY) is Transfer.HARDLINK
            and changes
            and opts.get("hardlink_changes_sources") is not True
        ):
            doc.problem(
                base + ("transfer",)
                if "transfer" in src
                else (("defaults", "transfer") if "transfer" in defaults else base),
                f"transfer: hardlink with xnat.{' and xnat.'.join(changes)} changes the source files "
                "too (a hard link is the same file): use transfer: copy, drop "
                f"xnat.{'/'.join(changes)}, or set hardlink_changes_sources: true to accept it",
            )
        _check_anonymization(
            doc, base if "anonymization" in src else ("defaults",), opts, method, manifest_dir, file, scripts
        )
        project = opts.get("project")
        if project is None:
            if opts.get("archive"):
                doc.problem(
                    base,
                    "archive: true needs a project: XNAT refuses to archive Unassigned sessions "
                    "(Archiver: 'Cannot archive sessions from the Unassigned folder')",
                )
            else:
                doc.problem(
                    base,
                    "no project: sessions go to XNAT's Unassigned prearchive area and cannot be "
                    "archived until moved to a project (xnat-reference.md §5)",
                    severity="warning",
                )
        session = opts.get("session")
        if (
            isinstance(session, str)
            and not labels.is_template(session)
            and (project is None or (isinstance(project, str) and not labels.is_template(project)))
        ):
            label_key = (project, session)
            if label_key in fixed:
                doc.problem(
                    (*base, "session"),
                    f"sources[{fixed[label_key]}] already names project {project or 'Unassigned'} "
                    f"session {session}; two sources may not fill one session",
                )
            else:
                fixed[label_key] = i
        if check_sources and method is Method.INBOX and isinstance(xnat.get("inbox"), str):
            inbox = _resolve(manifest_dir, xnat["inbox"])
            if not inbox.is_dir():
                doc.problem(("xnat", "inbox"), f"{inbox} is not a folder; fix xnat.inbox (XNAT's inboxPath)")
            elif not os.access(inbox, os.R_OK | os.W_OK | os.X_OK):
                doc.problem(("xnat", "inbox"), f"{inbox} is not readable and writable by this user")
        if check_sources and isinstance(src.get("source"), str):
            folder = _resolve(manifest_dir, src["source"])
            if not folder.is_dir():
                doc.problem(base + ("source",), f"{folder} is not a folder; fix the path")
            elif not os.access(folder, os.R_OK | os.X_OK):
                doc.problem(base + ("source",), f"{folder} is not readable by this user")
    _check_lookup_use(doc, tables)


# What ``anonymization:`` may name besides a script file.
SITE_SCRIPT = "site"
NO_SCRIPT = "none"


def anonymization_refs(value: Any) -> tuple[str, ...]:
    """The entries of an ``anonymization:`` value, in order (a string is a list of one)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _check_anonymization(
    doc: _Doc,
    base: PathT,
    opts: dict[str, Any],
    method: Method | None,
    manifest_dir: Path,
    file: str,
    scripts: dict[str, PlannedScript],
) -> None:
    """``anonymization:``: none alone, or site and script files (read and parsed here, so a construct
    the interpreter lacks is refused at validate with the script's line)."""
    refs = anonymization_refs(opts.get("anonymization"))
    path = base + ("anonymization",)
    if not refs or refs == (NO_SCRIPT,):
        return
    if NO_SCRIPT in refs:
        doc.problem(
            path, "anonymization: none cannot be combined with scripts; give none alone, or the scripts"
        )
        return
    if method is Method.INBOX:
        # XNAT's inbox importer reads the staged files itself and applies its own site script to them
        # (DicomInboxImportRequestListener → GradualDicomImporter:390); C-STORE edits each file in memory
        # before it is sent, the prearchive route each file it stages.
        doc.problem(
            path,
            f"method {method}: XNAT applies its own site script to every file it receives "
            "(GradualDicomImporter:390); editing files before XNAT's inbox importer reads them is not "
            "implemented: drop anonymization here, or use method: cstore or prearchive",
        )
        return
    if (
        method is not Method.CSTORE
        and _enum(Transfer, opts.get("transfer"), Transfer.COPY) is Transfer.HARDLINK
    ):
        doc.problem(
            path,
            "anonymization with transfer: hardlink would edit the source files (a hard link is the same "
            "file): use transfer: copy",
        )
        return
    for ref in refs:
        if ref == SITE_SCRIPT:
            continue
        if ref == "project":
            doc.problem(
                path,
                "anonymization: project — XNAT applies the project's script itself when the session is "
                "archived (MergePrearcToArchiveSession:206-219); applying it here as well would apply it "
                "twice: leave it to XNAT",
            )
            continue
        target = _resolve(manifest_dir, ref)
        key = str(target)
        if key in scripts:
            continue
        expanded = os.path.expanduser(ref)
        shown = expanded if os.path.isabs(expanded) else os.path.join(os.path.dirname(file), expanded)
        try:
            text = target.read_bytes().decode("utf-8")  # no newline translation: hashed as on disk
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            doc.problem(
                path,
                f"cannot read the DicomEdit script {target}: {why}; fix the path (relative paths are "
                "relative to the manifest)",
            )
            continue
        try:
            dicomedit.parse(text, shown)
        except DicomEditError as exc:
            doc.problems.append(Problem(shown, exc.line, json_path(path), str(exc).split(": ", 1)[-1]))
            continue
        scripts[key] = PlannedScript(key, hashlib.sha256(text.encode("utf-8")).hexdigest(), text)


def _check_lookup_use(doc: _Doc, tables: _Lookups) -> None:
    """The columns templates pick exist and hold valid labels; a table nothing uses is a warning."""
    for (name, _column), (path, ref) in sorted(tables.picked.items()):
        table = tables.tables.get(name)
        if table is not None:
            doc.problems.extend(lookups.check_columns(table, tables.shown[name], json_path(path), (ref,)))
    for name in sorted(tables.declared - tables.used):
        doc.problem(
            ("lookups", name),
            f"lookup table {name} is used by no template and no where: drop it, or use it as "
            f"{{{{ lookups.{name}[Keyword].column }}}} or where: {{Keyword: {{in_lookup: {name}}}}}",
            severity="warning",
        )


def _check_where(doc: _Doc, path: PathT, where: Any, tables: _Lookups) -> None:
    if not isinstance(where, dict):
        return
    unknown = labels.unknown_keywords(set(where))
    for key in unknown:
        doc.problem(path + (key,), f"{key!r} is not a DICOM keyword")
    for key, value in where.items():
        if isinstance(value, dict) and isinstance(value.get("in_lookup"), str):
            tables.used.add(value["in_lookup"])
            if value["in_lookup"] not in tables.declared:
                doc.problem(path + (key, "in_lookup"), _no_table(value["in_lookup"], tables))


def _resolve(manifest_dir: Path, source: str) -> Path:
    p = Path(os.path.expanduser(source))
    return p if p.is_absolute() else (manifest_dir / p)


# --------------------------------------------------------------------------------------------
# Freeze
# --------------------------------------------------------------------------------------------


def _freeze(
    data: dict[str, Any],
    doc: _Doc,
    manifest_dir: Path,
    digest: str,
    file: str,
    tables: _Lookups,
    scripts: dict[str, PlannedScript],
) -> Manifest:
    x = data["xnat"]
    db = x.get("database")
    scp = x.get("scp")
    mode = x.get("file_mode")
    xnat = XnatTarget(
        prearchive=_abs(manifest_dir, x.get("prearchive")),
        prearchive_url_root=x.get("prearchive_url_root"),
        database=DatabaseTarget(dsn=db.get("dsn"), dsn_env=db.get("dsn_env")) if db else None,
        url=x["url"].rstrip("/") if x.get("url") else None,
        scp=ScpTarget(**scp) if scp else None,
        file_owner=x.get("file_owner"),
        file_mode=int(mode, 8) if mode else None,
        timezone=x.get("timezone"),
        inbox=_abs(manifest_dir, x.get("inbox")),
        inbox_url_root=x["inbox_url_root"].rstrip("/") or "/" if x.get("inbox_url_root") else None,
    )
    defaults = data.get("defaults") or {}
    sources = []
    for i, src in enumerate(data["sources"]):
        opts = {k: v for k, v in {**defaults, **src}.items() if k in _OPTION_KEYS}
        where = opts.get("where") or {}
        values = {k: v for k, v in where.items() if not isinstance(v, dict)}
        in_lookup = {k: v["in_lookup"] for k, v in where.items() if isinstance(v, dict)}
        refs = anonymization_refs(opts.get("anonymization"))
        sources.append(
            SourceSpec(
                index=i,
                line=doc.line(("sources", i)),
                source=str(_resolve(manifest_dir, src["source"]).resolve()),
                project=opts.get("project"),
                subject=opts.get("subject", DEFAULT_SUBJECT),
                session=opts.get("session", DEFAULT_SESSION),
                include=tuple(opts.get("include") or ("**/*",)),
                exclude=tuple(opts.get("exclude") or ()),
                where=tuple(sorted((k, (v,) if isinstance(v, str) else tuple(v)) for k, v in values.items())),
                where_lookups=tuple(sorted(in_lookup.items())),
                method=Method(opts.get("method", Method.PREARCHIVE)),
                transfer=Transfer(opts.get("transfer", Transfer.COPY)),
                build=Build(opts.get("build", Build.REST)),
                archive=bool(opts.get("archive", False)),
                routing=Routing(opts.get("routing", Routing.PATIENT_COMMENTS)),
                build_timeout=float(opts.get("build_timeout", 900.0)),
                hardlink_changes_sources=bool(opts.get("hardlink_changes_sources", False)),
                follow_links=bool(opts.get("follow_links", False)),
                merge_subjects=bool(opts.get("merge_subjects", False)),
                allow_partial_studies=bool(opts.get("allow_partial_studies", False)),
                anonymization=NO_SCRIPT if refs == (NO_SCRIPT,) else None,
                scripts=tuple(
                    SITE_SCRIPT if r == SITE_SCRIPT else str(_resolve(manifest_dir, r))
                    for r in refs
                    if r != NO_SCRIPT
                ),
            )
        )
    warnings = tuple(p.render() for p in doc.problems if p.severity == "warning")
    # Absolute: a plan is applied, verified and reverted from wherever its user stands.
    path = str(Path(file).resolve())
    return Manifest(
        path=path,
        digest=digest,
        version=1,
        xnat=xnat,
        sources=tuple(sources),
        warnings=warnings,
        lookups=tuple(tables.tables[name] for name in sorted(tables.tables)),
        scripts=tuple(scripts[k] for k in sorted(scripts)),
    )


def _abs(manifest_dir: Path, path: str | None) -> str | None:
    return str(_resolve(manifest_dir, path).resolve()) if path else None


def check_manifest(path: str | Path, check_sources: bool = False) -> tuple[Manifest | None, list[Problem]]:
    """Load and check one manifest; returns (manifest or None, every problem incl. warnings)."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return None, [Problem(file, None, "$", f"cannot read the manifest: {exc.strerror}")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, [Problem(file, None, "$", "the manifest is not UTF-8 text")]
    try:
        data, doc = _parse_yaml(text, file)
    except ManifestError as exc:
        return None, exc.problems
    if not isinstance(data, dict):
        doc.problem((), "a manifest is a mapping with version, xnat and sources")
        return None, doc.problems
    _schema_problems(data, doc)
    manifest_dir = Path(path).resolve().parent
    tables = _read_lookups(data, doc, manifest_dir, file)
    scripts: dict[str, PlannedScript] = {}
    _check_meaning(data, doc, manifest_dir, check_sources, tables, file, scripts)
    errors = [p for p in doc.problems if p.severity == "error"]
    # The manifest's own problems first, then each lookup table's, each by line.
    problems = sorted(doc.problems, key=lambda p: (p.file != file, p.file, p.line or 0, p.path))
    if errors:
        return None, problems
    digest = hashlib.sha256(raw).hexdigest()
    return _freeze(data, doc, manifest_dir, digest, file, tables, scripts), problems


def load_manifest(path: str | Path, check_sources: bool = False) -> Manifest:
    """Load a valid manifest or raise ManifestError listing every problem."""
    manifest, problems = check_manifest(path, check_sources)
    if manifest is None:
        raise ManifestError([p for p in problems if p.severity == "error"])
    return manifest


def template_keywords_of(manifest: Manifest) -> frozenset[str]:
    """Every DICOM keyword the manifest's templates and filters read."""
    names: set[str] = set()
    for src in manifest.sources:
        for value in (src.project, src.subject, src.session):
            if value and labels.is_template(value):
                names |= labels.template_keywords(value)
        names |= src.where_keywords
    return frozenset(names)
