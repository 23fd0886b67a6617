"""Frozen data that flows between the stages: Manifest → headers → Plan.

Invariants:
- Everything here is immutable; nothing past ``manifest.py`` sees a raw dict from YAML.
- ``Plan`` round-trips through JSON (``plan_to_dict`` / ``plan_from_dict``) without loss, and its
  ``plan_id`` is the SHA-256 of that JSON without ``plan_id`` and ``created``: two plans with the same
  content have the same id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import os
import re
import tempfile
import weakref
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import Enum
from typing import Any, BinaryIO, ClassVar, TypeAlias, TypeVar, overload

from .errors import PlanError
from .targetfacts import ExistingRow as ExistingRow
from .targetfacts import Receiver as Receiver
from .targetfacts import SiteFacts as SiteFacts
from .targetfacts import XnatFacts as XnatFacts
from .vocabulary import APPLY_STEPS as APPLY_STEPS
from .vocabulary import Build as Build
from .vocabulary import Check as Check

# The vocabularies live in vocabulary.py; re-exported here, where the rest of the domain is.
from .vocabulary import Method as Method
from .vocabulary import Outcome as Outcome
from .vocabulary import Result as Result
from .vocabulary import RevertOutcome as RevertOutcome
from .vocabulary import Routing as Routing
from .vocabulary import Seen as Seen
from .vocabulary import SessionState as SessionState
from .vocabulary import Step as Step
from .vocabulary import Transfer as Transfer
from .vocabulary import unreachable as unreachable

# 3: lookup tables (Plan.lookups, checked for staleness at apply; PlannedSession.mapped_by).
PLAN_FORMAT = 3

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
    timezone: str | None = None  # XNAT's JVM zone (IANA); None: this machine's, found at plan time
    inbox: str | None = None  # XNAT's inboxPath as mounted here (method: inbox)
    inbox_url_root: str | None = None  # the same root as XNAT sees it (the import's ``path``)

    @property
    def url_root(self) -> str | None:
        """The prearchive root as XNAT sees it (the ``url`` column); defaults to ``prearchive``."""
        return self.prearchive_url_root or self.prearchive

    @property
    def inbox_root_for_xnat(self) -> str | None:
        """The inbox root as XNAT sees it (site preference ``inboxPath``); defaults to ``inbox``."""
        return self.inbox_url_root or self.inbox


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
    # ``where: {Keyword: {in_lookup: table}}``: (keyword, table); the value must be a key of the table.
    where_lookups: tuple[tuple[str, str], ...] = ()
    method: Method = Method.PREARCHIVE
    transfer: Transfer = Transfer.COPY
    build: Build = Build.REST
    archive: bool = False
    routing: Routing = Routing.PATIENT_COMMENTS
    build_timeout: float = 900.0
    # The manifest acknowledges that hard links plus xnat.file_mode/file_owner change the sources.
    hardlink_changes_sources: bool = False
    # Follow symbolic links leading outside the source folder (otherwise they are rejects).
    follow_links: bool = False
    merge_subjects: bool = False  # distinct raw values rendering to one subject label are one person
    allow_partial_studies: bool = False  # migrate a study even with an unreadable file in its folders
    anonymization: str | None = None  # "none": files written by the tool knowingly skip XNAT's site script
    # The DicomEdit scripts the tool applies to every file it writes, in order: "site" (XNAT's site
    # script, read at plan) or a script file's absolute path (``Manifest.scripts``).
    scripts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Callers may spell the vocabularies as strings; inside, they are always members.
        for name, kind in (
            ("method", Method),
            ("transfer", Transfer),
            ("build", Build),
            ("routing", Routing),
        ):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def where_map(self) -> dict[str, tuple[str, ...]]:
        return dict(self.where)

    @property
    def where_keywords(self) -> frozenset[str]:
        """Every keyword ``where`` reads: value lists and lookup-table membership."""
        return frozenset(k for k, _ in self.where) | frozenset(k for k, _ in self.where_lookups)


@dataclass(frozen=True)
class LookupRow:
    """One data row of a lookup table: its line in the file (where the row starts) and its cells."""

    line: int
    values: Mapping[str, str]


@dataclass(frozen=True)
class LookupTable:
    """A table of ``lookups:``, read from its CSV/TSV file when the manifest was loaded.

    ``file`` is absolute; ``sha256`` is that of the file's bytes (the plan keeps it, and apply
    refuses the plan once the file differs); ``rows`` maps each key-column value to its row.
    """

    name: str
    file: str
    key: str
    sha256: str
    columns: tuple[str, ...]
    rows: Mapping[str, LookupRow]

    @property
    def digest(self) -> LookupDigest:
        return LookupDigest(self.name, self.file, self.key, self.sha256, len(self.rows))


@dataclass(frozen=True)
class PlannedScript:
    """A DicomEdit 6 script as the plan applies it: ``name`` is ``site`` (XNAT's site script, read
    over REST at plan) or the script file's absolute path; ``text`` is pinned, ``sha256`` is of it."""

    name: str
    sha256: str
    text: str


@dataclass(frozen=True)
class ScriptEdit:
    """What a session's scripts do to its first file, for review: the attribute, ``set`` or
    ``delete``, the new value (None for delete)."""

    name: str
    action: str
    value: str | None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``digest`` is the SHA-256 of the file's bytes."""

    path: str
    digest: str
    version: int
    xnat: XnatTarget
    sources: tuple[SourceSpec, ...]
    warnings: tuple[str, ...] = ()
    lookups: tuple[LookupTable, ...] = ()
    scripts: tuple[PlannedScript, ...] = ()  # the script files the sources name, read and checked

    @property
    def lookup_tables(self) -> dict[str, LookupTable]:
        return {t.name: t for t in self.lookups}


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
    ctime_ns: int = -1  # with ino: a file rewritten in place keeps size and mtime, never its ctime
    ino: int = -1
    digest: str = ""  # header_digest(values), when the scan knew it ("": not known, compute it)
    head_digest: str = ""  # head_digest() of the bytes before Pixel Data ("": not known)

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
    """A scan-cache entry: valid while (size, mtime_ns, ctime_ns, ino) match and ``keywords`` covers
    the need (-1: not recorded, never valid). ``digest`` is ``header_digest(header)`` ("": not
    recorded), so that a warm plan does not compute it again for every file."""

    path: str
    size: int
    mtime_ns: int
    keywords: frozenset[str]
    transfer_syntax: str | None
    header: Mapping[str, str] | None
    reject: str | None
    ctime_ns: int = -1
    ino: int = -1
    digest: str = ""
    head_digest: str = ""
    # The header as the cache holds it (JSON text of ``plain_header(header)``), when read from the
    # cache: a warm scan stores it in its working set as it is instead of encoding it again.
    header_json: str = field(default="", compare=False, repr=False)


_T = TypeVar("_T")


class HeaderValues(Mapping[str, str]):
    """One file's header values, read-only: a tuple of the values and a key → position index that
    every header with the same keys in the same order shares (``ValuePool.header``).

    A scan holds one per file for the whole plan (``FileHeader.values``, ``CachedHeader.header``): a
    dict of 13–21 keys is 464 bytes, this 48 plus the tuple's 8 per value. It is equal to the dict of
    the same items (``Mapping.__eq__``) and iterates in the same order; ``plain_header`` gives that
    dict where a real one is needed (JSON).
    """

    __slots__ = ("_index", "_values")

    def __init__(self, index: Mapping[str, int], values: tuple[str, ...]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: str) -> str:
        return self._values[self._index[key]]

    @overload
    def get(self, key: str, /) -> str | None: ...

    @overload
    def get(self, key: str, /, default: str | _T) -> str | _T: ...

    def get(self, key: str, /, default: object = None) -> object:
        i = self._index.get(key)
        return default if i is None else self._values[i]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"HeaderValues({plain_header(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (HeaderValues, (dict(self._index), self._values))

    def as_dict(self) -> dict[str, str]:
        return dict(zip(self._index, self._values, strict=True))


class JsonHeader(Mapping[str, str]):
    """Header values kept as the JSON text they were stored as, decoded on first use.

    A warm scan checks a cached entry by its columns (size, times, inode, keywords) and stores the
    text in its working set as it is: most cached headers are never decoded by the scan at all.
    """

    __slots__ = ("_values", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._values: dict[str, str] | None = None

    def _decoded(self) -> dict[str, str]:
        if self._values is None:
            self._values = json.loads(self.text)
        return self._values

    def __getitem__(self, key: str) -> str:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"JsonHeader({self.text!r})"


def plain_header(values: Mapping[str, str]) -> dict[str, str]:
    """``values`` as a dict (itself when it is one)."""
    if type(values) is dict:
        return values
    if isinstance(values, HeaderValues):
        return values.as_dict()
    return dict(values)


class ValuePool:
    """One str object per distinct header key and value, for the 100,000s of headers of a scan.

    Decoding a header (JSON from the scan cache, a pickle from a scan worker) makes new strings for
    every key and value, but most of them (keywords, study and series values, the transfer syntax)
    repeat from file to file: sharing them saves about two thirds of a header's memory. The headers
    it makes are ``HeaderValues``, one key index per distinct key order.
    """

    __slots__ = ("_layouts", "_memo")

    def __init__(self) -> None:
        # Every distinct string seen, the per-file ones too (cheaper than telling them apart): a
        # pool lives only as long as one scan or one read of the cache.
        self._memo: dict[str, str] = {}
        self._layouts: dict[tuple[str, ...], dict[str, int]] = {}

    def text(self, value: str) -> str:
        return self._memo.setdefault(value, value)

    def header(self, header: Mapping[str, str]) -> HeaderValues:
        """``header``'s items as ``HeaderValues`` whose keys and values are the pool's."""
        share = self._memo.setdefault
        keys, values = header.keys(), header.values()
        # map/tuple: the copies run in C.
        layout = tuple(map(share, keys, keys))
        index = self._layouts.get(layout)
        if index is None:
            index = self._layouts[layout] = {k: i for i, k in enumerate(layout)}
        return HeaderValues(index, tuple(map(share, values, values)))

    def values(self, header: Mapping[str, str]) -> HeaderValues:
        """``header`` as the pool's (its keys already shared, e.g. by one JSON decoder call)."""
        return self.header(header)


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
    """One source file and where it goes. ``dest`` is relative to the session folder.

    ``ctime_ns``/``ino`` bind it to the very file the scan read (-1: not bound, for hand-made
    sessions); ``header_digest`` is ``header_digest(values)`` of the header the plan relied on, checked
    again from the bytes staged or about to be sent ("" : not checked). ``head_digest`` is
    ``head_digest(bytes)`` of the bytes before Pixel Data ("": not known): the same bytes again prove
    the same header without parsing it (``execute.recheck``).
    """

    source: str
    size: int
    mtime_ns: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    dest: str
    ctime_ns: int = -1
    ino: int = -1
    header_digest: str = ""
    head_digest: str = ""


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
class LookupDigest:
    """A lookup table as a plan saw it: apply refuses the plan once the file's SHA-256 differs."""

    name: str
    file: str
    key: str
    sha256: str
    rows: int


@dataclass(frozen=True, order=True)
class LookupMatch:
    """The row of a lookup table that gave a session's labels a value: ``table[keyword=key]``."""

    table: str
    keyword: str
    key: str
    line: int


@dataclass(frozen=True, kw_only=True)
class _SessionBase:
    """What every planned session has, whatever its route: one study becoming one XNAT session."""

    action_id: str
    source_index: int
    project: str | None
    subject: str | None
    session: str
    study_uid: str
    build: Build
    archive: bool
    build_timeout: float
    prearchive_uri: str
    scans: tuple[PlannedScan, ...]
    raw_labels: Mapping[str, str] = field(default_factory=dict)
    mapped_by: tuple[LookupMatch, ...] = ()  # the lookup rows the label templates used

    def __post_init__(self) -> None:
        object.__setattr__(self, "build", Build(self.build))

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

    @property
    def label(self) -> str:
        """``project/session`` as messages name a session."""
        return f"{self.project_label}/{self.session}"


@dataclass(frozen=True, kw_only=True)
class PrearchiveSession(_SessionBase):
    """Files staged and renamed into ``prearchive/<project>/<timestamp>/<session>`` plus one row.

    ``row`` holds the prearchive columns as JSON values (timestamps as ``YYYY-MM-DD HH:MM:SS.fff``
    strings), exactly what plan.sql inserts.
    """

    method: ClassVar[Method] = Method.PREARCHIVE
    timestamp: str
    transfer: Transfer
    session_dir: str
    url: str
    row: Mapping[str, Any]
    # lastmod is written as now() in XNAT's zone (SessionXMLRebuilder compares it with the JVM's
    # clock, §9); "" writes LOCALTIMESTAMP, the database session's zone (hand-made sessions only).
    lastmod_zone: str = ""
    # The DicomEdit scripts (``Plan.scripts`` names) applied to every file as it is staged, in order,
    # and what they do to the first file (for review).
    anonymize: tuple[str, ...] = ()
    anonymized: tuple[ScriptEdit, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "transfer", Transfer(self.transfer))


@dataclass(frozen=True, kw_only=True)
class CstoreSession(_SessionBase):
    """Files sent to XNAT's receiver, which writes the prearchive row itself.

    ``routing_line`` is what the sender writes into the ``routing`` element (None: XNAT's own rules).
    """

    method: ClassVar[Method] = Method.CSTORE
    routing: Routing
    routing_line: str | None = None
    contexts: tuple[PresentationContext, ...] = ()
    direct_archive: bool = False  # the receiver archives straight away: no prearchive row (XNAT-6812)
    # As on the prearchive route: the scripts applied to every file in memory before it is sent (the
    # routing element written after them), in order, and what they do to the first file (for review).
    anonymize: tuple[str, ...] = ()
    anonymized: tuple[ScriptEdit, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "routing", Routing(self.routing))


#: Prefix of the folders the inbox route stages into ``<inbox>/<project>/`` (one per session and plan).
INBOX_FOLDER_PREFIX = "xnatmigrate-"


@dataclass(frozen=True, kw_only=True)
class InboxSession(_SessionBase):
    """Files staged into XNAT's inbox, then imported by XNAT's own inbox importer (§4.6).

    XNAT's ``DicomInboxImportRequestListener`` feeds each staged file to GradualDicomImporter (copied into
    the prearchive, named and anonymised as a received file, merged by (project, tag, label)), then commits
    the session (build, and archive when the project auto-archives). ``inbox_parent`` is
    ``<inbox>/<project>`` as mounted here, ``inbox_url_parent`` the same folder as XNAT sees it; the session's
    own folder below them is ``xnatmigrate-<plan_id[:12]>-<session>`` (``folder_name``).

    NOTE: the folder name holds the plan id, which is a hash of the plan and so cannot be part of it: it is
    derived at apply time from the plan being applied, and recorded in the ledger with the session's
    first attempt (a later plan of the same session reuses the recorded folder).
    """

    method: ClassVar[Method] = Method.INBOX
    transfer: Transfer
    inbox_parent: str
    inbox_url_parent: str

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "transfer", Transfer(self.transfer))

    def folder_name(self, plan_id: str) -> str:
        return f"{INBOX_FOLDER_PREFIX}{plan_id[:12]}-{self.session}"

    def inbox_dir(self, plan_id: str) -> str:
        """The staging folder as mounted here."""
        return f"{self.inbox_parent.rstrip('/')}/{self.folder_name(plan_id)}"

    def inbox_path(self, plan_id: str) -> str:
        """The staging folder as XNAT sees it: the import's ``path`` parameter."""
        return f"{self.inbox_url_parent.rstrip('/')}/{self.folder_name(plan_id)}"


# The closed union of routes: dispatch on it with ``match`` and ``unreachable`` as the last case.
PlannedSession: TypeAlias = PrearchiveSession | CstoreSession | InboxSession
SESSION_TYPES: Mapping[Method, type[PrearchiveSession] | type[CstoreSession] | type[InboxSession]] = {
    Method.PREARCHIVE: PrearchiveSession,
    Method.CSTORE: CstoreSession,
    Method.INBOX: InboxSession,
}


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
    # A tuple when planned; ``PlanSessions`` (read from plan.json when asked for) when loaded.
    sessions: Sequence[PlannedSession]
    unchanged: tuple[UnchangedSession, ...] = ()
    held_back: tuple[HeldBack, ...] = ()
    rejected: tuple[Reject, ...] = ()
    warnings: tuple[str, ...] = ()
    skipped_checks: tuple[str, ...] = ()
    format: int = PLAN_FORMAT
    # The keywords the scan read: apply re-reads these to compare against each file's header_digest.
    scan_keywords: tuple[str, ...] = ()
    # The manifest's lookup tables as planned on: a table edited since makes the plan stale.
    lookups: tuple[LookupDigest, ...] = ()
    # The DicomEdit scripts sessions name in ``anonymize``, pinned with their text.
    scripts: tuple[PlannedScript, ...] = ()

    @property
    def has_changes(self) -> bool:
        return bool(self.sessions)


# --------------------------------------------------------------------------------------------
# JSON round trip
# --------------------------------------------------------------------------------------------

_HASH_EXCLUDED = ("plan_id", "created")


def header_digest(values: Mapping[str, str]) -> str:
    """A short digest of the header values a file was planned on (every keyword the scan read)."""
    canonical = _DIGEST_JSON.encode(plain_header(values))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def head_digest(head: bytes) -> str:
    """``<length>:<digest>`` of a file's bytes before Pixel Data (file meta and data set header).

    Equal bytes parse to equal values, so a file whose first ``length`` bytes give this digest again
    has the header planned; a different digest only means the values must be compared.
    """
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()[:32]}"


# ``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` without building an
# encoder per call (one call per planned file).
_DIGEST_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (the shape ``schemas/plan.schema.json`` describes)."""
    data: dict[str, Any] = _plain(plan)
    return data


def compute_plan_id(plan: Plan) -> str:
    """SHA-256 over the canonical JSON of the plan, without its id and creation time.

    Computed piece by piece (``_canonical_pieces``): the plan's JSON is never held whole.
    """
    h = hashlib.sha256()
    for piece, hashed, _ in _canonical_pieces(plan):
        if hashed:
            h.update(piece)
    return h.hexdigest()


def write_plan_json(plan: Plan, fh: BinaryIO) -> str:
    """Write ``plan`` to ``fh`` (binary, seekable) as its canonical JSON, and return its plan_id.

    One pass, one conversion and one encoding per session: the id is the SHA-256 of the very bytes
    written, ``plan_id`` and ``created`` left out (what ``plan_from_dict`` checks), and is written
    over a placeholder once every piece has been hashed. The file is ``json.dumps(plan_to_dict(p),
    sort_keys=True, separators=(",", ":"))`` of the plan with that id (``json_text`` spelling), one
    session per line (``PLAN_LAYOUT``), without a trailing newline. ``plan.plan_id`` is ignored.
    """
    h = hashlib.sha256()
    slot = -1
    for piece, hashed, is_id in _canonical_pieces(plan):
        if is_id:
            slot = fh.tell() + len(piece) - len(_ID_SLOT) - 1  # the placeholder, inside the quotes
        elif hashed:
            h.update(piece)
        fh.write(piece)
    plan_id = h.hexdigest()
    end = fh.tell()
    fh.seek(slot)
    fh.write(plan_id.encode("ascii"))
    fh.seek(end)
    return plan_id


_ID_SLOT = b"0" * 64
# Big lists are encoded this many items at a time: bounded memory, few encoder calls.
_BATCH = 512


def _canonical_pieces(plan: Plan) -> Iterator[tuple[bytes, bool, bool]]:
    """The canonical JSON of ``plan`` in pieces: (UTF-8 bytes, part of the content hash, the id).

    Concatenated, the pieces are ``json_text(plan_to_dict(plan), sort_keys=True, separators=(",",
    ":"))`` with ``plan_id`` as 64 zeros and a newline before each session and before the ``]`` that
    ends them (``PLAN_LAYOUT``); the hashed ones alone are that of the plan without its ``plan_id``,
    ``created`` and those newlines (``_content_hash``). Sessions are converted and encoded one at a
    time, other big lists ``_BATCH`` items at a time.
    """
    names = sorted(_plan_field_names())
    first_hashed = True
    yield b"{", True, False
    for i, name in enumerate(names):
        hashed = name not in _HASH_EXCLUDED
        if i:
            # The comma before a key belongs to the hashed text only between two hashed keys.
            yield b",", hashed and not first_hashed, False
        if name == "plan_id":
            yield b'"plan_id":"' + _ID_SLOT + b'"', False, True
            continue
        value = getattr(plan, name)
        key = _encoded(json.dumps(name) + ":")
        if isinstance(value, (tuple, PlanSessions)) and value:
            yield key + b"[", hashed, False
            if name == "sessions":
                # One session per line (the newlines are not hashed: the id is that of the compact
                # JSON), so ``open_plan`` finds each session without parsing the others.
                # A plan's own lines (spooled or loaded) are already canonical: copied, not re-encoded.
                bodies = value.bodies() if isinstance(value, PlanSessions) else None
                if bodies is None:
                    bodies = (_encoded(_canonical(_plain(s))) for s in value)
                for j, body in enumerate(bodies):
                    if j:
                        yield b",", hashed, False
                    yield b"\n", False, False
                    yield body, hashed, False
                yield b"\n", False, False
            else:
                for j in range(0, len(value), _BATCH):
                    text = _canonical([_plain(v) for v in value[j : j + _BATCH]])[1:-1]
                    yield (b"," if j else b"") + _encoded(text), hashed, False
            yield b"]", hashed, False
        else:
            yield key + _encoded(_canonical(_plain(value))), hashed, False
        if hashed:
            first_hashed = False
    yield b"}", True, False


def _canonical(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _encoded(text: str) -> bytes:
    """UTF-8 of JSON text, lone surrogates written as JSON escapes (see ``json_text``)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")


@functools.cache
def _plan_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Plan))


def _content_hash(data: Mapping[str, Any]) -> str:
    body = {k: v for k, v in data.items() if k not in _HASH_EXCLUDED}
    canonical = json_text(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def json_text(data: Any, **options: Any) -> str:
    """``json.dumps(data, ensure_ascii=False)`` that stays valid UTF-8 for any path.

    A file name that is not UTF-8 reaches us as a str with lone surrogates (os.fsdecode's
    surrogateescape, e.g. b"\\xff" → "\\udcff"), which no UTF-8 text can hold: those alone are
    written as JSON escapes (``\\udcff``), which json.loads turns back into the same str, so the
    path round-trips without loss. Any other text is written as it is.
    """
    text = json.dumps(data, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def with_plan_id(plan: Plan) -> Plan:
    return replace(plan, plan_id=compute_plan_id(plan))


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Rebuild a Plan from ``plan_to_dict`` output.

    Raises PlanError on a foreign format and on content that does not hash to its ``plan_id``
    (a hand-edited plan: what was reviewed is not what would be applied).
    """
    _check_format(data)
    if data.get("plan_id") != _content_hash(data):
        raise _edited()
    try:
        sessions = tuple(_session_from(s) for s in data["sessions"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(exc) from exc
    return _plan_from(data, sessions)


def _check_format(data: Any) -> None:
    fmt = data.get("format") if isinstance(data, Mapping) else None
    if fmt != PLAN_FORMAT:
        raise PlanError(
            f"the plan was written in plan format {fmt!r}, this xnatmigrate reads format {PLAN_FORMAT}; "
            "re-run `xnatmigrate plan` with this version of xnatmigrate"
        )


def _edited() -> PlanError:
    return PlanError(
        "the plan's content does not match its plan_id: it was edited after `xnatmigrate plan` "
        "wrote it; re-run `xnatmigrate plan` (change the manifest, never plan.json)"
    )


def _damaged(exc: BaseException) -> PlanError:
    return PlanError(f"the plan file is damaged ({exc!r}); re-run `xnatmigrate plan`")


def _plan_from(data: Mapping[str, Any], sessions: Sequence[PlannedSession]) -> Plan:
    """The Plan of checked ``data`` whose sessions are already rebuilt (``sessions``)."""
    try:
        xnat = _xnat_from(data["xnat"])
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
            scan_keywords=tuple(data.get("scan_keywords", ())),
            lookups=tuple(LookupDigest(**t) for t in data.get("lookups", ())),
            scripts=tuple(PlannedScript(**t) for t in data.get("scripts", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(exc) from exc


# --------------------------------------------------------------------------------------------
# plan.json read session by session
# --------------------------------------------------------------------------------------------

#: How ``write_plan_json`` lays the sessions out: the first line ends with this, each session is
#: one line (ending ``,`` but the last), and the line after the last starts with ``]``.
PLAN_LAYOUT = b',"sessions":[\n'


def open_plan(fh: BinaryIO) -> Plan:
    """The plan in ``fh`` (binary, readable, seekable; the caller closes it), its sessions read from
    the file when asked for (``PlanSessions``): memory does not grow with the plan.

    Checked as ``plan_from_dict`` checks it, in one pass that holds one session's line at a time: the
    format, and the content hash over the bytes as written. A file not in ``write_plan_json``'s
    layout (one line per session) is read whole, as JSON, and checked the same way. Raises
    ValueError where the file is not JSON at all, PlanError where it is not this plan.
    """
    first = fh.readline()
    if not first.endswith(PLAN_LAYOUT):
        fh.seek(0)
        return plan_from_dict(json.loads(fh.read()))
    head = json.loads(first[: -len(PLAN_LAYOUT)] + b"}")
    _check_format(head)
    h = hashlib.sha256(b"{")
    n_hashed = _hash_fields(h, head, first_field=True)
    h.update(b',"sessions":[' if n_hashed else b'"sessions":[')
    offsets, lengths, digests = array("q"), array("q"), bytearray()
    while True:
        at = fh.tell()
        line = fh.readline()
        if not line:
            raise _damaged(EOFError("the plan ends inside its sessions"))
        if line.startswith(b"]"):
            break
        body = line.rstrip(b"\n")
        body = body[:-1] if body.endswith(b",") else body
        if offsets:
            h.update(b",")
        h.update(body)
        offsets.append(at)
        lengths.append(len(body))
        digests += _session_digest(body)
    h.update(b"]")
    rest = line.rstrip(b"\n")[1:]
    tail = json.loads(b"{" + rest[1:]) if rest != b"}" else {}
    _hash_fields(h, tail, first_field=False)
    h.update(b"}")
    if head.get("plan_id") != h.hexdigest() or "sessions" in tail or "sessions" in head:
        raise _edited()
    return _plan_from({**head, **tail}, PlanSessions(fh, offsets, lengths, bytes(digests)))


def _hash_fields(h: Any, data: Mapping[str, Any], *, first_field: bool) -> int:
    """Feed ``h`` the canonical JSON of ``data``'s hashed fields (sorted), each after a comma unless
    it is the plan's first; returns how many."""
    n = 0
    for name in sorted(data):
        if name in _HASH_EXCLUDED:
            continue
        if n or not first_field:
            h.update(b",")
        h.update(_encoded(json.dumps(name) + ":" + _canonical(data[name])))
        n += 1
    return n


def _session_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


class PlanSessions(Sequence["PlannedSession"]):
    """A plan's sessions, each parsed from its line of plan.json when asked for.

    Invariant: a session is only ever built from bytes whose digest equals the one taken while the
    whole file's content hash was checked (``open_plan``), so a file changed under a running apply is
    refused, never half-applied. Reads use ``os.pread``: safe from several threads. The last session
    read is kept, so walking the plan and then its groups parses each session about once.
    """

    __slots__ = ("__weakref__", "_digests", "_fd", "_last", "_lengths", "_offsets", "shells")

    def __init__(self, fh: BinaryIO, offsets: array[int], lengths: array[int], digests: bytes) -> None:
        # Its own descriptor, closed with it: the caller may close ``fh``, and a plan written again
        # meanwhile is another file (atomic rename), so this one keeps reading what was checked.
        self._fd = os.dup(fh.fileno())
        weakref.finalize(self, os.close, self._fd)
        self._offsets, self._lengths, self._digests = offsets, lengths, digests
        self._last: tuple[int, PlannedSession] | None = None
        # The sessions without their files, when whoever made the file kept them (``SessionSpool``).
        self.shells: tuple[PlannedSession, ...] | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    @overload
    def __getitem__(self, i: int) -> PlannedSession: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[PlannedSession, ...]: ...
    def __getitem__(self, i: int | slice) -> PlannedSession | tuple[PlannedSession, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self._offsets)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(i)
        last = self._last
        if last is not None and last[0] == j:
            return last[1]
        body = self._body(j)
        try:
            s = _session_from(json.loads(body))
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(exc) from exc
        self._last = (j, s)
        return s

    def __iter__(self) -> Iterator[PlannedSession]:
        for j in range(len(self._offsets)):
            yield self[j]

    def bodies(self) -> Iterator[bytes]:
        """Each session's canonical JSON bytes, checked against its digest as ``__getitem__`` does."""
        for j in range(len(self._offsets)):
            yield self._body(j)

    def _body(self, j: int) -> bytes:
        body = os.pread(self._fd, self._lengths[j], self._offsets[j])
        if _session_digest(body) != self._digests[16 * j : 16 * j + 16]:
            raise PlanError(
                "plan.json changed while this plan was being applied (a session's bytes differ from "
                "those checked when it was loaded); re-run `xnatmigrate plan`, then apply"
            )
        return body

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PlanSessions({len(self)} sessions)"


def session_shell(s: PlannedSession) -> PlannedSession:
    """``s`` with its scans but without their files: what the reads of a whole plan that need no
    file (checks, statements, timestamps) hold per session."""
    return replace(s, scans=tuple(replace(sc, files=()) for sc in s.scans))


def shells_of(sessions: Sequence[PlannedSession]) -> Sequence[PlannedSession]:
    """The sessions without their files (``session_shell``) when the plan holds them so (a plan just
    spooled), else the sessions: for a pass that reads no file, file_count or bytes."""
    shells = sessions.shells if isinstance(sessions, PlanSessions) else None
    return shells if shells is not None else sessions


class SessionSpool:
    """A plan's sessions as they are made, each written at once as its canonical JSON line to an
    unnamed temporary file (gone when the last reader closes): planning holds one session at a time.

    Invariant: ``sessions()`` reads back exactly what was appended, in order, each line under the
    digest ``PlanSessions`` checks; the lines are what ``write_plan_json`` writes for those sessions.
    """

    def __init__(self, dir: str | None = None) -> None:
        self._fh: BinaryIO = tempfile.TemporaryFile(dir=dir)  # noqa: SIM115 -- closed by sessions()
        self._offsets, self._lengths, self._digests = array("q"), array("q"), bytearray()
        self._shells: list[PlannedSession] = []

    def shells(self) -> list[PlannedSession]:
        return self._shells

    def append(self, session: PlannedSession) -> None:
        self._shells.append(session_shell(session))
        body = _encoded(_canonical(_plain(session)))
        self._offsets.append(self._fh.tell())
        self._lengths.append(len(body))
        self._digests += _session_digest(body)
        self._fh.write(body)
        self._fh.write(b"\n")

    def sessions(self) -> PlanSessions:
        """The sessions appended, read from the file when asked for; the spool is closed."""
        self._fh.flush()
        out = PlanSessions(self._fh, self._offsets, self._lengths, bytes(self._digests))
        out.shells = tuple(self._shells)
        self._fh.close()  # PlanSessions keeps a descriptor of its own
        return out


def xnat_from_dict(d: Mapping[str, Any]) -> XnatTarget:
    """An ``XnatTarget`` from its JSON form (plan.json, the ledger's recorded targets)."""
    return _xnat_from(d)


def xnat_to_dict(x: XnatTarget) -> dict[str, Any]:
    result: dict[str, Any] = _plain(x)
    return result


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
        timezone=d.get("timezone"),
        inbox=d.get("inbox"),
        inbox_url_root=d.get("inbox_url_root"),
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
    common: dict[str, Any] = dict(
        action_id=d["action_id"],
        source_index=d["source_index"],
        project=d["project"],
        subject=d["subject"],
        session=d["session"],
        study_uid=d["study_uid"],
        build=Build(d["build"]),
        archive=d["archive"],
        build_timeout=d["build_timeout"],
        prearchive_uri=d["prearchive_uri"],
        scans=scans,
        raw_labels=d.get("raw_labels", {}),
        mapped_by=tuple(LookupMatch(**m) for m in d.get("mapped_by", ())),
    )
    method = Method(d["method"])
    match method:
        case Method.PREARCHIVE:
            return PrearchiveSession(
                **common,
                timestamp=d["timestamp"],
                transfer=Transfer(d["transfer"]),
                session_dir=d["session_dir"],
                url=d["url"],
                row=d["row"],
                lastmod_zone=d.get("lastmod_zone", ""),
                anonymize=tuple(d.get("anonymize", ())),
                anonymized=tuple(ScriptEdit(**e) for e in d.get("anonymized", ())),
            )
        case Method.CSTORE:
            contexts = tuple(
                PresentationContext(c["sop_class_uid"], tuple(c["transfer_syntaxes"]))
                for c in d.get("contexts", ())
            )
            return CstoreSession(
                **common,
                routing=Routing(d["routing"]),
                routing_line=d.get("routing_line"),
                contexts=contexts,
                direct_archive=bool(d.get("direct_archive", False)),
                anonymize=tuple(d.get("anonymize", ())),
                anonymized=tuple(ScriptEdit(**e) for e in d.get("anonymized", ())),
            )
        case Method.INBOX:
            return InboxSession(
                **common,
                transfer=Transfer(d["transfer"]),
                inbox_parent=d["inbox_parent"],
                inbox_url_parent=d["inbox_url_parent"],
            )
        case _:
            unreachable(method)


def _plain(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, recursively: exactly what json.loads gives back.

    NOTE: not ``dataclasses.asdict``, which deep-copies every leaf and dominated planning time on
    large plans (4 s of a 10,000-file warm plan). A scan's files, 100,000s in a large plan, take the
    flat path (``_scan_plain``).
    """
    fast = _FAST_PLAIN.get(type(obj))
    if fast is not None:
        return fast(obj)
    names = _FIELD_NAMES.get(type(obj))
    if names is not None:
        return {n: _plain(getattr(obj, n)) for n in names}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, PlanSessions)):
        return [_plain(v) for v in obj]
    if is_dataclass(obj):
        # The route is a ClassVar of each planned-session type; plan.json names it as ``method``.
        extra = ("method",) if isinstance(obj, _SessionBase) else ()
        _FIELD_NAMES[type(obj)] = extra + tuple(f.name for f in fields(obj))
        return _plain(obj)
    return obj


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}

# Every field of a PlannedFile is a str or an int, which _plain leaves as they are: one C call
# gathers them (``tests/unit/test_model.py`` holds this path equal to the generic one).
_FILE_FIELDS = tuple(f.name for f in fields(PlannedFile))
_file_values = operator.attrgetter(*_FILE_FIELDS)


_SCAN_FIELDS = tuple(f.name for f in fields(PlannedScan))


def _scan_plain(scan: PlannedScan) -> dict[str, Any]:
    return {
        n: [dict(zip(_FILE_FIELDS, _file_values(f), strict=True)) for f in scan.files]
        if n == "files"
        else _plain(getattr(scan, n))
        for n in _SCAN_FIELDS
    }


_FAST_PLAIN: dict[type, Callable[[Any], Any]] = {PlannedScan: _scan_plain}
