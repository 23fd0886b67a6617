"""Frozen data that flows between the stages: Manifest → headers → Plan.

Invariants:
- Everything here is immutable; nothing past ``manifest.py`` sees a raw dict from YAML.
- ``Plan`` round-trips through JSON (``plan_to_dict`` / ``plan_from_dict``) without loss, and its
  ``plan_id`` is the SHA-256 of that JSON without ``plan_id`` and ``created``: two plans with the same
  content have the same id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from .errors import PlanError

METHODS = ("prearchive", "cstore")
TRANSFERS = ("copy", "hardlink")
BUILDS = ("rest", "scheduler", "none")
ROUTINGS = ("patient_comments", "study_comments", "none")

PLAN_FORMAT = 1

# The DICOM attributes every scan reads, whatever the manifest asks for: identity, XNAT naming
# (xnat-reference.md §2), routing (§5) and the prearchive row (§1).
BASE_KEYWORDS: tuple[str, ...] = (
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "Modality",
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "SeriesDescription",
    "AccessionNumber",
    "PatientComments",
    "StudyComments",
    "AdditionalPatientHistory",
)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScpTarget:
    """XNAT's DICOM C-STORE receiver (xnat-reference.md §5: AE ``XNAT``, port 8104 by default)."""

    host: str
    port: int = 8104
    called_aet: str = "XNAT"
    calling_aet: str = "XNATMIGRATE"


@dataclass(frozen=True)
class DatabaseTarget:
    """Where XNAT's PostgreSQL is. NOTE: never holds a password (the manifest refuses one)."""

    dsn: str | None = None
    dsn_env: str | None = None


@dataclass(frozen=True)
class XnatTarget:
    """The XNAT installation a manifest migrates into."""

    prearchive: str | None = None
    prearchive_url_root: str | None = None
    database: DatabaseTarget | None = None
    url: str | None = None
    scp: ScpTarget | None = None
    file_owner: str | None = None
    file_mode: int | None = None

    @property
    def url_root(self) -> str | None:
        """The prearchive root as XNAT sees it (the ``url`` column); defaults to ``prearchive``."""
        return self.prearchive_url_root or self.prearchive


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``sources:`` with its defaults applied.

    ``project``/``subject``/``session`` are fixed labels or Jinja templates over DICOM keywords;
    ``project`` None means XNAT's Unassigned area.
    """

    index: int
    line: int | None
    source: str
    project: str | None
    subject: str | None
    session: str
    include: tuple[str, ...] = ("**/*",)
    exclude: tuple[str, ...] = ()
    where: tuple[tuple[str, tuple[str, ...]], ...] = ()
    method: str = "prearchive"
    transfer: str = "copy"
    build: str = "rest"
    archive: bool = False
    routing: str = "patient_comments"
    build_timeout: float = 900.0
    # The manifest acknowledges that hard links plus xnat.file_mode/file_owner change the sources.
    hardlink_changes_sources: bool = False
    # Follow symbolic links leading outside the source folder (otherwise they are rejects).
    follow_links: bool = False

    @property
    def where_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.where)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``digest`` is the SHA-256 of the file's bytes."""

    path: str
    digest: str
    version: int
    xnat: XnatTarget
    sources: tuple[SourceSpec, ...]
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Scan results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # 100,000s of these in a large plan
class FileHeader:
    """What the scan learnt from one DICOM file (headers only, never pixels).

    ``values`` holds the string value of every keyword read (``BASE_KEYWORDS`` plus those the
    manifest's templates and filters use); a keyword absent from the header is absent here.
    """

    path: str
    size: int
    mtime_ns: int
    transfer_syntax: str
    values: Mapping[str, str]

    def get(self, keyword: str) -> str | None:
        return self.values.get(keyword)

    @property
    def sop_instance_uid(self) -> str:
        return self.values.get("SOPInstanceUID", "")

    @property
    def sop_class_uid(self) -> str:
        return self.values.get("SOPClassUID", "")

    @property
    def study_uid(self) -> str:
        return self.values.get("StudyInstanceUID", "")

    @property
    def series_uid(self) -> str:
        return self.values.get("SeriesInstanceUID", "")


@dataclass(frozen=True, slots=True)  # 100,000s of these in a large plan
class CachedHeader:
    """A scan-cache entry: valid while (size, mtime_ns) match and ``keywords`` covers the need."""

    path: str
    size: int
    mtime_ns: int
    keywords: frozenset[str]
    transfer_syntax: str | None
    header: Mapping[str, str] | None
    reject: str | None


@dataclass(frozen=True, slots=True)  # 100,000s of these in a large plan
class Reject:
    """A file that will not be migrated, and why."""

    path: str
    reason: str


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)  # 100,000s of these in a large plan
class PlannedFile:
    """One source file and where it goes. ``dest`` is relative to the session folder."""

    source: str
    size: int
    mtime_ns: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dest: str


@dataclass(frozen=True)
class PlannedScan:
    scan_id: str
    series_uid: str
    series_number: str | None
    modality: str | None
    files: tuple[PlannedFile, ...]


@dataclass(frozen=True)
class PresentationContext:
    """A SOP class and the transfer syntaxes its files are stored in (C-STORE sessions)."""

    sop_class_uid: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PlannedSession:
    """One study becoming one XNAT prearchive session.

    ``row`` holds the prearchive columns as JSON values (timestamps as ``YYYY-MM-DD HH:MM:SS.fff``
    strings); it is None for C-STORE sessions, whose row XNAT's receiver writes itself.
    """

    action_id: str
    source_index: int
    method: str
    project: str | None
    subject: str | None
    session: str
    study_uid: str
    timestamp: str
    build: str
    archive: bool
    transfer: str
    routing: str
    build_timeout: float
    prearchive_uri: str
    session_dir: str | None
    url: str | None
    row: Mapping[str, Any] | None
    scans: tuple[PlannedScan, ...]
    raw_labels: Mapping[str, str] = field(default_factory=dict)
    routing_line: str | None = None
    contexts: tuple[PresentationContext, ...] = ()

    @property
    def files(self) -> tuple[PlannedFile, ...]:
        return tuple(f for s in self.scans for f in s.files)

    @property
    def file_count(self) -> int:
        return sum(len(s.files) for s in self.scans)

    @property
    def bytes(self) -> int:
        return sum(f.size for s in self.scans for f in s.files)

    @property
    def project_label(self) -> str:
        """The project as XNAT's REST shows it: ``Unassigned`` for NULL (xnat-reference.md §1)."""
        return self.project or "Unassigned"


@dataclass(frozen=True)
class UnchangedSession:
    """A study already migrated by an earlier apply: nothing to do."""

    project: str | None
    session: str
    study_uid: str
    reason: str


@dataclass(frozen=True)
class HeldBack:
    """A study a preflight check held back; its files count as rejected."""

    project: str | None
    session: str | None
    study_uid: str
    reason: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Everything apply will do, frozen. ``plan_id`` is a content hash (see module docstring)."""

    plan_id: str
    created: str
    manifest_path: str
    manifest_digest: str
    state_serial: int
    table_profile: str | None
    xnat: XnatTarget
    sessions: tuple[PlannedSession, ...]
    unchanged: tuple[UnchangedSession, ...] = ()
    held_back: tuple[HeldBack, ...] = ()
    rejected: tuple[Reject, ...] = ()
    warnings: tuple[str, ...] = ()
    skipped_checks: tuple[str, ...] = ()
    format: int = PLAN_FORMAT

    @property
    def has_changes(self) -> bool:
        return bool(self.sessions)

    def session(self, action_id: str) -> PlannedSession:
        for s in self.sessions:
            if s.action_id == action_id:
                return s
        raise KeyError(action_id)


# --------------------------------------------------------------------------------------------
# JSON round trip
# --------------------------------------------------------------------------------------------

_HASH_EXCLUDED = ("plan_id", "created")


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (the shape ``schemas/plan.schema.json`` describes)."""
    return _plain(plan)


def compute_plan_id(plan: Plan) -> str:
    """SHA-256 over the canonical JSON of the plan, without its id and creation time."""
    data = plan_to_dict(plan)
    for key in _HASH_EXCLUDED:
        data.pop(key, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_plan_id(plan: Plan) -> Plan:
    return replace(plan, plan_id=compute_plan_id(plan))


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from ``plan_to_dict`` output; raises PlanError on a foreign format."""
    if data.get("format") != PLAN_FORMAT:
        raise PlanError(
            f"plan format {data.get('format')!r} is not {PLAN_FORMAT}; re-run `xnatmigrate plan` "
            "with this version of xnatmigrate"
        )
    try:
        xnat = _xnat_from(data["xnat"])
        sessions = tuple(_session_from(s) for s in data["sessions"])
        return Plan(
            plan_id=data["plan_id"],
            created=data["created"],
            manifest_path=data["manifest_path"],
            manifest_digest=data["manifest_digest"],
            state_serial=int(data["state_serial"]),
            table_profile=data.get("table_profile"),
            xnat=xnat,
            sessions=sessions,
            unchanged=tuple(UnchangedSession(**u) for u in data.get("unchanged", ())),
            held_back=tuple(HeldBack(**{**h, "files": tuple(h["files"])}) for h in data.get("held_back", ())),
            rejected=tuple(Reject(**r) for r in data.get("rejected", ())),
            warnings=tuple(data.get("warnings", ())),
            skipped_checks=tuple(data.get("skipped_checks", ())),
            format=data["format"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"the plan file is damaged ({exc!r}); re-run `xnatmigrate plan`") from exc


def _xnat_from(d: Mapping[str, Any]) -> XnatTarget:
    db = d.get("database")
    scp = d.get("scp")
    return XnatTarget(
        prearchive=d.get("prearchive"),
        prearchive_url_root=d.get("prearchive_url_root"),
        database=DatabaseTarget(**db) if db else None,
        url=d.get("url"),
        scp=ScpTarget(**scp) if scp else None,
        file_owner=d.get("file_owner"),
        file_mode=d.get("file_mode"),
    )


def _session_from(d: Mapping[str, Any]) -> PlannedSession:
    scans = tuple(
        PlannedScan(
            scan_id=s["scan_id"],
            series_uid=s["series_uid"],
            series_number=s["series_number"],
            modality=s["modality"],
            files=tuple(PlannedFile(**f) for f in s["files"]),
        )
        for s in d["scans"]
    )
    contexts = tuple(
        PresentationContext(c["sop_class_uid"], tuple(c["transfer_syntaxes"])) for c in d.get("contexts", ())
    )
    known = {f.name for f in fields(PlannedSession)}
    plain = {k: v for k, v in d.items() if k in known and k not in ("scans", "contexts")}
    return PlannedSession(**plain, scans=scans, contexts=contexts)


def _plain(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, recursively: exactly what json.loads gives back.

    NOTE: not ``dataclasses.asdict``, which deep-copies every leaf and dominated planning time on
    large plans (4 s of a 10,000-file warm plan).
    """
    names = _FIELD_NAMES.get(type(obj))
    if names is not None:
        return {n: _plain(getattr(obj, n)) for n in names}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if is_dataclass(obj):
        _FIELD_NAMES[type(obj)] = tuple(f.name for f in fields(obj))
        return _plain(obj)
    return obj


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


# --------------------------------------------------------------------------------------------
# What the planner is told about the target (gathered by api.py; the planner itself reads nothing)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExistingRow:
    """A row already in ``xdat_search.prearchive`` that concerns a study being planned."""

    project: str | None
    timestamp: str
    foldername: str
    name: str | None
    tag: str | None
    status: str
    source: str | None


@dataclass(frozen=True)
class XnatFacts:
    """Facts about the target XNAT, each None when its check could not run (listed in ``skipped``).

    ``refusals`` are target-wide findings that refuse the whole plan (e.g. the table matches no
    known profile, the prearchive root is not writable).
    """

    table_profile: str | None = None
    existing_rows: tuple[ExistingRow, ...] | None = None
    archived: frozenset[tuple[str, str]] | None = None  # (project, session label)
    taken_timestamps: frozenset[str] = frozenset()
    prearchive_writable: bool | None = None
    free_bytes: int | None = None
    same_filesystem: Mapping[str, bool] | None = None  # source folder -> same fs as prearchive
    refusals: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
