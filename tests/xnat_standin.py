"""A strict stand-in for XNAT's REST side, for tests, that follows XNAT 1.8's source line by line.

XNAT cannot run here. This server does what xnat-reference.md §3, §4 and §9 say XNAT does, backed, as XNAT
is, by the real PostgreSQL table ``xdat_search.prearchive`` (§1) and the real prearchive and archive folders
(§2). Each behaviour cites the XNAT class and line it reproduces, in NrgXnat/xnat at 93d33cbf6
(1.8.11-SNAPSHOT; paths under ``web/src/main/java/org/nrg/``); ``GDI`` is GradualDicomImporter.

Invariants:
- Never kinder than XNAT. Where XNAT's answer is known the stand-in gives it (status, the text that matters,
  side effects on the row and the folders); where it is not known, the stand-in refuses rather than accepts.
  What it does not implement answers 501, so a test that strays outside fails loudly.
- Rows are read with ``SELECT *`` by ordinal, as XNAT does (§1); a status outside the PrearcStatus enum breaks
  every read with 500, as ``valueOf`` does (§1 column ``status``).
- Table answers are ``{"ResultSet":{"Result":[...],"totalRecords":"N"}}``, every value a string (§4).
- XNAT's clock is this process's local clock, naive (the JVM's ``Calendar.getInstance()``, DatabaseSession:152):
  ``lastmod`` is written and compared that way, so a ``LOCALTIMESTAMP`` written by a PostgreSQL session in
  another zone is early or late by the offset, as in XNAT (§9 "lastmod and time zones").
- Every request is recorded in ``calls`` (never a password); unexpected exceptions inside land in ``errors``.

Departures from XNAT (the one place they are listed; each with its reason):
1. Not implemented (501): multi-src archive (Archiver.finishNonSingleSessionUpload, asynchronous), archive by
   ``project``/``PREARC_TIMESTAMP``/``PREARC_SESSION_FOLDER``, ``dest`` in another project, PET/MR separation,
   ``/services/prearchive/move|delete``, ``/services/import`` other than ``import-handler=inbox``,
   ``action=commit|reset|move|set``. The tool uses none.
2. Archive onto an existing experiment: ``overwrite=none`` fails with the conflict "Session already exists, retry
   with overwrite enabled" (row CONFLICT, answer 500 as below), ``append`` merges, ``delete`` replaces. XNAT's REST
   archive passes allowSessionMerge=true (Archiver:124), so it merges even with ``none`` unless label, subject,
   modality, UID or scan numbers clash (PrearcSessionArchiver.checkForConflicts:359-431). Stricter: the merge
   rules are not modelled.
3. The REST archive takes only READY, CONFLICT and ERROR rows; any other unlocked status (RECEIVING, BUILDING,
   QUEUED_*) answers 403 and leaves the row alone. XNAT sets ARCHIVING on any unlocked row (Archiver:166-171) and
   archives what the session XML lists; the stand-in moves the whole folder, so following XNAT there would be kinder.
4. The archive moves the whole session folder (XNAT: MergePrearcToArchiveSession copies what the catalogs list);
   labels go through a port of ``cleanValue`` (§6, UNCONFIRMED for 1.8); no project anonymisation script runs at
   archive (MergePrearcToArchiveSession:206-219) because none can be configured here.
5. The session builder is a minimal XNATSessionBuilder: one scan per ``SCANS/<id>`` folder holding files, the
   session fields from the first readable header, one catalog per scan listing the files present, the modality
   choosing MR/CT/PET/other. XNATSessionBuilder's exact XML is not reproduced.
6. Time: XNAT polls an archive's completion every 500 ms (QueueBasedImageCommit:149), the stand-in every
   ``archive_poll`` seconds (0.05); the rebuild handler's 5 s wait for an NFS-late timestamp folder
   (PrearchiveRebuildHandler:72-77) is not made; the scheduler's minutes and milliseconds (rebuilder interval and
   repeat, receiver lastmod refresh) are multiplied by ``time_scale`` (1.0 = XNAT's) so tests can be quick.
7. No prearchive lock files (PrearcUtils.isSessionReceiving): the emulated receiver files each instance
   synchronously, so the rebuilder and the direct-archive trigger never see a session "still receiving".
8. Two rows for one (project, timestamp, folder) answer 500 (XNAT 1.7 has no unique key; its getSession
   behaviour with duplicates was not read).
9. ``format=`` must be given (json, or xml for a session) where XNAT would fall back to HTML by ``Accept``: 406.
10. A rebuild without ``src`` answers 400; XNAT answers 200 with an empty table (PrearchiveBatchRebuild:54-77).
11. Every user is a site administrator with data access: permission refusals (403 for other users, the admin
    check on Unassigned rebuilds) are not emulated.
12. ``/xapi/direct-archive/{project}/{tag}/{name}`` answers SessionData as Jackson writes it with NON_NULL
    inclusion (framework SerializerConfig:62), dates as epoch milliseconds (Jackson's default): UNCONFIRMED live.
13. ``/xapi/siteConfig/{key}`` answers the stored value as the body, unquoted (a String through Spring's string
    converter) and only for the keys in ``site_config`` (others 404, SiteConfigApi:206-207): UNCONFIRMED live.
14. ``/xapi/dicomscp`` lists each receiver with DicomSCPInstance's getter names (Jackson, NON_NULL); ``created``
    and ``timestamp`` are left out: UNCONFIRMED live.
15. Site anonymisation on receipt (GDI:390) is applied by the emulated receiver (tests/xnat_receiver.py) only
    for the DicomEdit it understands: ``version``, ``(gggg,eeee) := project|subject|session|"text"``,
    ``-(gggg,eeee)`` and the ``project != "Unassigned" ?`` condition (enough for XNAT's default id.das, which
    is on by default: SiteConfigPreferences:578); an Unassigned session's ``project`` is taken to be
    "Unassigned" (MizerService's value for a null project was not read). Any other script makes the receiver
    refuse the instance (0xA700) before storing it, never store it unanonymised.
16. Direct archive: the trigger runs on the rebuilder's schedule (TriggerDirectArchiveRequests' own schedule was
    not read); its archive step runs no project anonymisation and no PET/MR split, and cannot fail after the
    build (a failed build does go to the prearchive, doPrearchiveMove:416-482).
17. ``logs/last`` of a missing row answers 404 (PrearcUtils.getLastLog with no log was not read).
18. Emulated receiver: routing expressions are Python ``re`` (Java syntax assumed compatible; ``$n`` in
    ``r:`` replacements translated); site routing rules (``dicom/projectRules``…) and ``dicom-project.rules``
    are not emulated; AA only from the comment fields; Unassigned folder de-duplication (``_1``…``_3``,
    PrearcDatabase.eitherGetOrCreateSession:2012-2028), the calling-AE whitelist and custom processing are
    not emulated; files are stored in explicit VR little endian whatever the transfer syntax.
20. The inbox importer (tests/xnat_inbox.py, which lists what it reads and where it departs): files copied
    byte for byte, no archives in the inbox, no ``identifier``/``namer`` parameters, ``commitPrearcSession``
    taken to be ``action=commit``. Editing rights: ``editable`` (user → projects) narrows what a user may
    edit for ``?restrict=edit`` and the inbox importer only; everything else still treats every user as a
    site administrator (departure 11).
19. Archived experiments (``/data/archive/projects/…/experiments/…``, ``…/scans``, ``…/resources``, DELETE with
    ``removeFiles``) answer a fixed subset of XNAT's fields, read from the stand-in's own record, not from
    XNAT's source.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape, quoteattr

import psycopg

__all__ = [
    "COLUMNS",
    "DEFAULT_ANON_SCRIPT",
    "PREARCHIVE_CODES",
    "SITE_CONFIG_DEFAULTS",
    "STATUSES",
    "ArchivedSession",
    "Call",
    "DirectArchiveSession",
    "XnatStandIn",
    "java_timestamp",
]

#: Columns in DatabaseSession enum order, REST spelling (§1, §4.4).
COLUMNS: tuple[str, ...] = (
    "project",
    "timestamp",
    "lastmod",
    "uploaded",
    "scan_date",
    "scan_time",
    "subject",
    "folderName",
    "name",
    "tag",
    "status",
    "url",
    "autoarchive",
    "prevent_anon",
    "prevent_auto_commit",
    "SOURCE",
    "VISIT",
    "PROTOCOL",
    "TIMEZONE",
)
_PLAIN: tuple[str, ...] = (
    "ARCHIVING",
    "BUILDING",
    "CONFLICT",
    "DELETING",
    "ERROR",
    "MOVING",
    "READY",
    "RECEIVING",
)
_PLAIN += ("RECEIVING_INTERRUPT", "SEPARATING")
_QUEUED = ("ARCHIVING", "BUILDING", "DELETING", "MOVING", "SEPARATING")
_LOCKED = (
    "ARCHIVING",
    "BUILDING",
    "CONFLICT",
    "DELETING",
    "MOVING",
    "RECEIVING",
    "RECEIVING_INTERRUPT",
    "SEPARATING",
)
#: PrearcUtils.PrearcStatus:91-116 (§3): plain, QUEUED_*, and locked _* statuses.
STATUSES: frozenset[str] = frozenset(
    [*_PLAIN, *(f"QUEUED_{s}" for s in _QUEUED), *(f"_{s}" for s in _LOCKED)]
)
#: framework PrearchiveCode: project prearchive code → the name a row's ``autoarchive`` holds (§1 col 13).
PREARCHIVE_CODES: dict[int, str] = {0: "Manual", 4: "AutoArchive", 5: "AutoArchiveOverwrite"}
UNASSIGNED = "Unassigned"
#: web/src/main/resources/META-INF/xnat/defaults/id.das, installed as the site script at first start
#: (initialization/tasks/GetSiteWideAnonScript:43-46).
DEFAULT_ANON_SCRIPT = "\n".join(
    [
        "//",
        "// Default XNAT anonymization script",
        "// XNAT http://www.xnat.org",
        "// Copyright (c) 2005-2017, Washington University School of Medicine and Howard Hughes Medical Institute",
        "// All Rights Reserved",
        "//",
        "// Released under the Simplified BSD.",
        "//",
        'version "6.1"',
        'project != "Unassigned" ? (0008,1030) := project',
        "(0010,0010) := subject",
        "(0010,0020) := session",
    ]
)
#: Site preferences the stand-in serves, with XNAT's defaults (xdat SiteConfigPreferences, line cited).
SITE_CONFIG_DEFAULTS: dict[str, str] = {
    "enableSitewideAnonymizationScript": "true",  # :578
    "sitewideAnonymizationScript": DEFAULT_ANON_SCRIPT,  # :591, set by GetSiteWideAnonScript
    "dicomFileNameTemplate": (  # :773
        "${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}"
    ),
    "sessionXmlRebuilderRepeat": "60000",  # :1651, milliseconds
    "sessionXmlRebuilderInterval": "5",  # :1664, minutes
    "sessionArchiveTimeoutInterval": "600",  # :1677, seconds
    "enableDicomReceiver": "true",
    "receivedFileUser": "admin",
    "inboxPath": "/data/xnat/inbox",  # inboxPath's default (§4.6)
    "preventCrossModalityMerge": "true",
}
_NS = "http://nrg.wustl.edu/xnat"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_CAT_NS = "http://nrg.wustl.edu/catalog"
# §4.5 common behaviour: src = /prearchive/projects/<P|Unassigned>/<ts>/<folder>, /data prefix optional.
_SRC = re.compile(r"^(?:/data|/REST)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$")
_DEST = re.compile(
    r"^(?:/data|/REST)?/archive/projects/([^/]+)(?:/subjects/([^/]+)(?:/experiments/([^/]+))?)?/?$"
)
# PrearcUtils.isSessionGeneratedFileFilter:462-470 / CatalogUtils.Stats:1386: catalogs are not data files.
_CATALOG = re.compile(r"scan_.*_catalog\.xml")
# §6: XnatImagesessiondata.cleanValue turns these (and space) into '_'.
_CLEAN = re.compile(r"[ `~@#$%^&*()+=\[\]{}|\\/?:;\"',.<>]")
# PrearcSession.AUTO_ARCHIVE_KEYS:190, matched with Predicates.contains (a find, not a full match).
_AUTO_ARCHIVE_KEY = re.compile("(AA|auto-archive)")
# Modality → (session root element, session xsi:type, scan xsi:type).
_SESSION_TYPES = {
    "MR": ("MRSession", "xnat:mrSessionData", "xnat:mrScanData"),
    "CT": ("CTSession", "xnat:ctSessionData", "xnat:ctScanData"),
    "PT": ("PETSession", "xnat:petSessionData", "xnat:petScanData"),
}
_OTHER_TYPES = ("OtherDicomSession", "xnat:otherDicomSessionData", "xnat:otherDicomScanData")
_XSI_BY_ROOT = {root: xsi for root, xsi, _ in (*_SESSION_TYPES.values(), _OTHER_TYPES)}

Key = tuple[str | None, str, str]  # (project or None, timestamp, folderName)


@dataclass(frozen=True)
class Call:
    """One request as the stand-in saw it. ``auth`` is "basic", "session" or None."""

    method: str
    path: str
    params: dict[str, list[str]]
    status: int
    user: str | None
    auth: str | None = None


@dataclass
class ArchivedSession:
    """An experiment the stand-in archived: where its files went and what it holds."""

    project: str
    subject: str
    subject_id: str
    label: str
    id: str
    xsi_type: str
    path: Path
    xml_path: Path
    scans: dict[str, int] = field(default_factory=dict)  # scan ID → number of files (catalogs excluded)
    date: str = ""
    time: str = ""


@dataclass
class DirectArchiveSession:
    """A row of XNAT's direct-archive table (archive/entities/DirectArchiveSession:14-43)."""

    id: int
    project: str
    subject: str | None
    name: str
    folder_name: str
    timestamp: str
    tag: str
    location: str  # the archive folder the receiver writes to (GDI:276-278)
    status: str = "RECEIVING"
    last_built: datetime = field(default_factory=datetime.now)
    upload_date: datetime | None = None
    scan_date: datetime | None = None
    scan_time: str | None = None
    prevent_anon: bool = False
    source: str | None = None
    visit: str | None = None
    protocol: str | None = None
    timezone: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """DirectArchiveSession.toSessionData:193-215 as Jackson writes SessionData (NON_NULL, epoch ms)."""

        def ms(value: datetime | None) -> int | None:
            return None if value is None else int(value.timestamp() * 1000)

        out: dict[str, Any] = {
            "id": self.id,
            "folderName": self.folder_name,
            "name": self.name,
            "preventAnon": self.prevent_anon,
            "preventAutoCommit": False,  # toSessionData:212
            "source": self.source,
            "tag": self.tag,
            "timestamp": self.timestamp,
            "uploadDate": ms(self.upload_date),
            "lastBuiltDate": ms(self.last_built),
            "status": self.status,
            "project": self.project,
            "scan_date": ms(self.scan_date),
            "scan_time": self.scan_time,
            "subject": self.subject,
            "externalUrl": f"/prearchive/projects/{self.project}/{self.timestamp}/{self.folder_name}",
            "url": self.location,
            "visit": self.visit,
            "protocol": self.protocol,
            "timeZone": self.timezone,
            "sessionDataTriple": {
                "folderName": self.folder_name,
                "timestamp": self.timestamp,
                "project": self.project,
            },
            "message": self.message,
        }
        return {k: v for k, v in out.items() if v is not None}


class DirectArchiveRefused(Exception):
    """DirectArchiveSessionServiceImpl.getOrCreate / create refused: GDI falls back to the prearchive."""


class _Reply(Exception):
    """Raised by a route to answer; ``body`` str is sent as text/plain unless a content type is given."""

    def __init__(
        self,
        status: int,
        body: str | bytes = "",
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body.encode("utf-8") if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers or {}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _BuildFailure(Exception):
    pass


class _ArchiveFailure(Exception):
    """PrearcSessionArchiver raised: ``conflict`` is a 409-type ClientException (LockAndSync:1650-1662)."""

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass
class _ArchiveJob:
    """One queued archive operation and what QueueBasedImageCommit polls for (:142-155)."""

    key: Key
    done: threading.Event = field(default_factory=threading.Event)
    uri: str | None = None
    failure: str | None = None


def java_timestamp(value: datetime) -> str:
    """``java.sql.Timestamp.toString()``: nanoseconds with trailing zeros cut, at least one digit (§4)."""
    frac = f"{value.microsecond * 1000:09d}".rstrip("0") or "0"
    return value.strftime("%Y-%m-%d %H:%M:%S") + "." + frac


def parse_timestamp_folder(name: str) -> datetime | None:
    """PrearcUtils.parseTimestampDirectory:346-357 (``yyyyMMdd_HHmmssSSS`` or ``yyyyMMdd_HHmmss``); None if not."""
    try:
        if len(name) == 18:
            return datetime.strptime(name[:15], "%Y%m%d_%H%M%S").replace(microsecond=int(name[15:]) * 1000)
        return datetime.strptime(name, "%Y%m%d_%H%M%S")
    except ValueError:
        return None  # PrearcTableBuilder.Session:69-72 logs and leaves the upload date null


def make_timestamp(when: datetime | None = None) -> str:
    """PrearcUtils.makeTimestamp:365-368: ``yyyyMMdd_HHmmssSSS`` in the JVM's local time."""
    when = when or datetime.now()
    return when.strftime("%Y%m%d_%H%M%S") + f"{when.microsecond // 1000:03d}"


def _table(rows: list[dict[str, str]]) -> _Reply:
    result: dict[str, Any] = {"Result": rows, "totalRecords": str(len(rows))}
    return _Reply(200, json.dumps({"ResultSet": result}), "application/json")


def _clean(value: str) -> str:
    return _CLEAN.sub("_", value)


def _scan_files(scan: Path) -> list[Path]:
    """The files of a scan folder, without the catalogs a build writes (§2 scan_<id>_catalog.xml)."""
    if not scan.is_dir():
        return []
    return sorted(p for p in scan.rglob("*") if p.is_file() and not _CATALOG.fullmatch(p.name))


def _to_boolean_object(value: object) -> bool | None:
    """commons-lang BooleanUtils.toBooleanObject(String): true/on/yes/y/t, false/off/no/n/f, else null."""
    text = str(value).lower() if value is not None else ""  # no trimming, as commons-lang
    if text in ("true", "on", "yes", "y", "t"):
        return True
    if text in ("false", "off", "no", "n", "f"):
        return False
    return None


class _NoSuchSession(Exception):
    """PrearcDatabase.getSession threw SessionException(DoesntExist)."""


class _Pool:
    """Autocommit connections for the request threads: one per request in flight, at most ``most``,
    kept for the next request (psycopg's own pool is a package of its own)."""

    def __init__(self, dsn: str, most: int) -> None:
        self.dsn, self.most = dsn, most
        self._idle: list[psycopg.Connection[Any]] = []
        self._open: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def get(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if len(self._open) >= self.most:
                raise RuntimeError(f"all {self.most} database connections are in use")
        conn = psycopg.connect(self.dsn, autocommit=True)
        with self._lock:
            self._open.append(conn)
        return conn

    def put(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if conn.closed:  # the server ended it: the next request opens another
                self._open.remove(conn)
            else:
                self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            conns, self._open, self._idle = self._open, [], []
        for conn in conns:
            conn.close()


def default_receiver() -> dict[str, Any]:
    """DicomSCPInstance.createDefault:101-113 with the field defaults of :19-32 (AE XNAT, port 8104)."""
    return {
        "aeTitle": "XNAT",
        "port": 8104,
        "identifier": "dicomObjectIdentifier",
        "enabled": True,
        "customProcessing": False,
        "directArchive": False,
        "anonymizationEnabled": True,
        "whitelistEnabled": False,
        "whitelist": [],
        "routingExpressionsEnabled": False,
    }


class XnatStandIn:
    """XNAT's REST side for tests; a context manager serving on ``127.0.0.1:<free port>``.

    Args:
        dsn: database holding ``xdat_search.prearchive`` (any §1 profile).
        prearchive: the prearchive root (``prearchivePath``, §2).
        archive: the archive root; experiments go to ``<archive>/<P>/arc001/<label>``.
        users: user → password; every user is a site administrator (departure 11).
        projects: project ID → prearchive code 0, 4 or 5 (§4.3, ``GET /data/projects/{P}/prearchive_code``).
        version: ``buildInfo`` version; None answers 404 as XNAT 1.6 does (§4.2).
        site_config: site preferences over ``SITE_CONFIG_DEFAULTS`` (strings, as XNAT stores them).
        receivers: the DICOM receivers ``/xapi/dicomscp`` lists (default: XNAT's default instance XNAT:8104);
            an emulated receiver given this stand-in adds its own on start.
        scheduler: run XNAT's scheduled tasks (SessionXMLRebuilder, TriggerDirectArchiveRequests) in a thread
            every ``sessionXmlRebuilderRepeat`` ms; ``run_scheduled_tasks()`` runs one pass by hand.

    Test knobs: ``build_delay`` (seconds a build holds ``_BUILDING``), ``archive_delay`` (seconds an archive
    holds ``_ARCHIVING``), ``archive_poll``, ``time_scale`` (departure 6), ``fail_next``, ``fail_builds``.
    """

    def __init__(
        self,
        dsn: str,
        prearchive: Path,
        archive: Path,
        users: dict[str, str] | None = None,
        projects: dict[str, int] | None = None,
        version: str | None = "1.8.10",
        *,
        site_config: dict[str, str] | None = None,
        receivers: list[dict[str, Any]] | None = None,
        scheduler: bool = True,
        inbox: Path | None = None,
        editable: dict[str, set[str]] | None = None,
    ) -> None:
        self.dsn = dsn
        self.prearchive = Path(prearchive)
        self.archive = Path(archive)
        self.users = dict(users if users is not None else {"admin": "admin"})
        self.projects = dict(projects if projects is not None else {"prj001": 0})
        for code in self.projects.values():
            if code not in PREARCHIVE_CODES:
                raise ValueError(f"prearchive code {code} is not 0, 4 or 5 (§4.3)")
        self.version = version
        self.site_config: dict[str, str] = {**SITE_CONFIG_DEFAULTS, **(site_config or {})}
        if inbox is not None:
            self.site_config["inboxPath"] = str(inbox)  # SiteConfigPreferences.getInboxPath
        self.editable = editable  # user → projects they may edit; None: every project (departure 20)
        from tests.xnat_inbox import InboxImporter  # it imports the receiver, which imports this module

        self.inbox = InboxImporter(self)
        self.scheduler = scheduler
        self.calls: list[Call] = []
        self.errors: list[str] = []  # unexpected exceptions inside the stand-in (tests assert it is empty)
        self.task_log: list[str] = []  # what XNAT's scheduled tasks would log (errors they swallow)
        self.build_delay = 0.05
        self.archive_delay = 0.0
        self.archive_poll = 0.05
        self.time_scale = 1.0
        self.experiments: dict[tuple[str, str], ArchivedSession] = {}  # (project, label) → experiment
        self.direct_archives: dict[int, DirectArchiveSession] = {}
        self._sessions: dict[str, str] = {}  # JSESSIONID → user
        self._faults: list[list[Any]] = []  # [remaining, status, path_prefix]
        self._failing_builds: dict[str, str] = {}
        self._logs: dict[Key, list[str]] = {}
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._da_ids = itertools.count(1)
        self._subject_ids: dict[tuple[str, str], str] = {}
        self._pool: _Pool | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.url = ""
        self.receivers: list[dict[str, Any]] = []
        for receiver in receivers if receivers is not None else [default_receiver()]:
            self.register_receiver(receiver)

    # --- lifecycle and test controls ---------------------------------------------------------------

    def __enter__(self) -> XnatStandIn:
        self._pool = _Pool(self.dsn, 16)
        try:
            self._check_table()
        except BaseException:
            self._pool.close()
            self._pool = None
            raise
        standin = self

        class Handler(_Handler):
            owner = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="xnat-standin",
            daemon=True,
        )
        self._thread.start()
        if self.scheduler:
            self._spawn(self._scheduler_loop, name="xnat-standin-scheduler")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def fail_next(self, n: int, status: int = 500, path_prefix: str = "") -> None:
        """Answer the next ``n`` requests whose path starts with ``path_prefix`` with ``status``."""
        with self._lock:
            self._faults.append([n, status, path_prefix])

    def clear_faults(self) -> None:
        """Forget every pending injected failure (the outage is over)."""
        with self._lock:
            self._faults.clear()

    def fail_builds(self, folder: str, message: str) -> None:
        """Builds of sessions in folder ``folder`` end in ERROR with ``message`` as their last log line."""
        with self._lock:
            self._failing_builds[folder] = message

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every asynchronous build and archive has finished (not the scheduler)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = [t for t in self._threads if t.is_alive() and t.name != "xnat-standin-scheduler"]
            if not busy or time.monotonic() > end:
                return
            for thread in busy:
                thread.join(timeout=max(0.0, end - time.monotonic()))

    def session_dir(self, project: str | None, timestamp: str, folder: str) -> Path:
        """Where XNAT looks for a session (§2 PrearcUtils.getPrearcDir: Unassigned has no project level)."""
        base = self.prearchive / project if project else self.prearchive
        return base / timestamp / folder

    @property
    def anonymize_site_enabled(self) -> bool:
        """Site preference ``enableSitewideAnonymizationScript`` (SiteConfigPreferences:578, default true)."""
        return self.site_config["enableSitewideAnonymizationScript"].lower() == "true"

    @anonymize_site_enabled.setter
    def anonymize_site_enabled(self, value: bool) -> None:
        self.site_config["enableSitewideAnonymizationScript"] = "true" if value else "false"

    @property
    def anonymize_site_script(self) -> str:
        return self.site_config.get("sitewideAnonymizationScript", "")

    @anonymize_site_script.setter
    def anonymize_site_script(self, script: str) -> None:
        self.site_config["sitewideAnonymizationScript"] = script

    def register_receiver(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Add a DICOM receiver to ``/xapi/dicomscp`` (DicomSCPInstance fields; missing ones take the defaults).

        Returns the stored entry; the emulated receiver reads its settings from it at every instance, so a
        test may change ``directArchive`` or the routing expressions on the fly.
        """
        with self._lock:
            entry = {**default_receiver(), **settings}
            entry["id"] = max((r["id"] for r in self.receivers), default=0) + 1
            self.receivers.append(entry)
            return entry

    def can_edit(self, user: str, project: str) -> bool:
        """Permissions.canEditProject for an existing project (departures 11, 20)."""
        if project not in self.projects:
            return False
        return self.editable is None or project in self.editable.get(user, set())

    def experiment_exists(self, project: str, label: str) -> bool:
        """SessionImporter.getExperimentByIdOrLabel: an archived experiment of the project by ID or label."""
        with self._lock:
            return any(e.project == project and label in (e.label, e.id) for e in self.experiments.values())

    def spawn(self, target: Callable[..., None], *args: Any, name: str = "xnat-standin-job") -> None:
        self._spawn(target, *args, name=name)

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def commit_session(self, key: Key, params: dict[str, Any]) -> bool:
        """``action=commit`` (PrearcSessionResource, §4.4): a synchronous build, then the archive when
        ``isAutoArchive``; False when the build failed (the row is ERROR)."""
        with self._lock:
            if not self._set_status_guarded(key, "BUILDING"):
                return False
        if not self._build_locked(key):
            return False
        with self._lock:
            self._reset_status(key)
            auto = self._is_auto_archive(key, params)
        if auto:
            self._auto_archive_job(key)
        return True

    def minutes(self, value: float) -> float:
        """XNAT minutes as seconds of this stand-in's clock (departure 6)."""
        return value * 60.0 * self.time_scale

    def _spawn(self, target: Callable[..., None], *args: Any, name: str = "xnat-standin-job") -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    # --- database (§1) -----------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        assert self._pool is not None, "use XnatStandIn as a context manager"
        conn = self._pool.get()
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            self._pool.put(conn)

    def _check_table(self) -> None:
        # PrearcDatabase.initDatabase/correctTable (§1): XNAT would rebuild a table whose column *set*
        # differs, losing rows; refuse to start instead of silently diverging from XNAT.
        with self._cursor() as cur:
            cur.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'xdat_search' AND table_name = 'prearchive'"
            )
            found = {r[0] for r in cur.fetchall()}
        expected = {c.lower() for c in COLUMNS}
        if found != expected:
            raise RuntimeError(
                f"xdat_search.prearchive does not have XNAT's 19 columns (§1): {sorted(found)}"
            )

    @staticmethod
    def _where(key: Key) -> tuple[str, list[Any]]:
        project, ts, folder = key
        # DatabaseSession.sessionSql (§7): Unassigned is project IS NULL.
        cond = "project IS NULL" if project is None else "project = %s"
        params = [] if project is None else [project]
        return f"{cond} AND timestamp = %s AND foldername = %s", [*params, ts, folder]

    def _select(self, where: str = "TRUE", params: list[Any] | None = None) -> list[dict[str, Any]]:
        with self._cursor() as cur:
            cur.execute(f"SELECT * FROM xdat_search.prearchive WHERE {where}", params or [])
            # XNAT reads SELECT * by ordinal (§1 "Rules for a tool that INSERTs").
            return [dict(zip(COLUMNS, r)) for r in cur.fetchall()]

    def _row(self, key: Key) -> dict[str, Any] | None:
        where, params = self._where(key)
        rows = self._select(where, params)
        if len(rows) > 1:
            raise _Reply(500, f"{len(rows)} prearchive rows for {key}")  # departure 8
        if rows:
            self._check_status(rows[0])
        return rows[0] if rows else None

    def _get_session(self, key: Key) -> dict[str, Any]:
        """PrearcDatabase.getSession: the row, or SessionException(DoesntExist)."""
        row = self._row(key)
        if row is None:
            raise _NoSuchSession(f"No session found for {self._uri(key)}")
        return row

    @staticmethod
    def _check_status(row: dict[str, Any]) -> None:
        if row["status"] not in STATUSES:
            # PrearcStatus.valueOf (§1): a value outside the enum breaks the read.
            raise _Reply(
                500,
                f"No enum constant org.nrg.xnat.helpers.prearchive.PrearcUtils.PrearcStatus.{row['status']}",
            )

    def _set_status(self, key: Key, status: str, **columns: Any) -> None:
        """PrearcDatabase.unsafeSetStatus / STATUS.updateSessionSql:149-155: status and lastmod (JVM clock)."""
        assert status in STATUSES
        sets = ["status = %s", "lastmod = %s"] + [f"{c} = %s" for c in columns]
        where, params = self._where(key)
        with self._cursor() as cur:
            cur.execute(
                f"UPDATE xdat_search.prearchive SET {', '.join(sets)} WHERE {where}",
                [status, datetime.now(), *columns.values(), *params],
            )

    def _set_status_guarded(self, key: Key, status: str, override_lock: bool = False) -> bool:
        """PrearcDatabase.setStatus:1219-1226: refuses a locked (``_X``) row unless overrideLock.

        isLocked (:1701-1704) reads the row with getSession: a missing row raises ``_NoSuchSession``.
        """
        row = self._get_session(key)
        if not override_lock and row["status"].startswith("_"):
            return False
        self._set_status(key, status)
        return True

    def _queue(self, key: Key, queued_status: str) -> bool:
        """PrearcUtils.queuePrearchiveOperation:1112-1131: set QUEUED_X without overrideLock, else not queued."""
        return self._set_status_guarded(key, queued_status)

    def _delete_row(self, key: Key) -> None:
        where, params = self._where(key)
        with self._cursor() as cur:
            cur.execute(f"DELETE FROM xdat_search.prearchive WHERE {where}", params)

    @staticmethod
    def _render(row: dict[str, Any]) -> dict[str, str]:
        """A row as REST shows it (§4 table responses, §4.4 PrearcDatabase.convertRStoList)."""
        out: dict[str, str] = {}
        for col in COLUMNS:
            value = row[col]
            if value is None:
                out[col] = ""
            elif isinstance(value, datetime):
                out[col] = java_timestamp(value)
            elif isinstance(value, bool):
                out[col] = "true" if value else "false"
            else:
                out[col] = str(value)
        project = row["project"] or UNASSIGNED
        out["project"] = project
        out["url"] = f"/prearchive/projects/{project}/{row['timestamp']}/{row['folderName']}"
        return out

    def _log(self, key: Key, line: str) -> None:
        with self._lock:
            self._logs.setdefault(key, []).append(line)

    # --- request entry -----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> _Reply:
        parts = urlsplit(raw_path)
        path = parts.path
        params = parse_qs(parts.query, keep_blank_values=True)
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if body and ctype == "application/x-www-form-urlencoded":
            for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items():
                params.setdefault(k, []).extend(v)  # §4: query and form parameters are interchangeable
        user: str | None = None
        how: str | None = None
        try:
            with self._lock:
                for fault in self._faults:
                    if fault[0] > 0 and path.startswith(fault[2]):
                        fault[0] -= 1
                        raise _Reply(fault[1], f"injected failure {fault[1]}")
            user, how = self._authenticate(headers, path)
            reply = self._route(method, path, params, headers, user, body)
        except _Reply as r:
            reply = r
        except Exception as exc:  # a stand-in bug or an unexpected DB error: answer 500 as XNAT would
            reply = _Reply(500, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.errors.append(f"{method} {path}: {traceback.format_exc()}")
        with self._lock:
            self.calls.append(Call(method, path, params, reply.status, user, how))
        return reply

    def _authenticate(self, headers: Any, path: str) -> tuple[str, str]:
        """HTTP Basic or the JSESSIONID cookie (§4.1); anything else is 401, on /data and /xapi alike."""
        challenge = {"WWW-Authenticate": 'Basic realm="XNAT"'}
        auth = headers.get("Authorization") or ""
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:], validate=True).decode("utf-8").partition(":")
            except ValueError:
                raise _Reply(401, "Bad credentials", headers=challenge) from None
            if user in self.users and self.users[user] == password:
                return user, "basic"
            raise _Reply(401, "Bad credentials", headers=challenge)
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("Cookie") or "")
        except Exception:
            raise _Reply(401, "Authentication required", headers=challenge) from None
        morsel = cookie.get("JSESSIONID")
        with self._lock:
            session_user = self._sessions.get(morsel.value) if morsel else None
        if session_user is None:
            raise _Reply(401, "Authentication required", headers=challenge)
        return session_user, "session"

    # --- routing -----------------------------------------------------------------------------------

    def _route(
        self, method: str, path: str, params: dict[str, list[str]], headers: Any, user: str, body: bytes
    ) -> _Reply:
        segs = [unquote(s) for s in path.split("/")[1:]]
        if segs and segs[-1] == "":
            segs.pop()
        if segs[:1] == ["xapi"]:
            return self._xapi(method, segs[1:], params, body)
        if segs[:1] not in (["data"], ["REST"]):  # §4: base path /data, alias /REST
            raise _Reply(404, "Not Found")
        s = segs[1:]
        n = len(s)
        if s == ["JSESSION"]:
            return self._jsession(method, headers, user)
        if s[:1] == ["projects"] and n >= 6 and s[2] == "subjects" and s[4] == "experiments":
            return self._archive_get(method, s[1:], params)
        if s[:2] == ["archive", "projects"] and n >= 7 and s[3] == "subjects" and s[5] == "experiments":
            return self._archive_get(method, s[2:], params)
        if s[:1] == ["projects"]:
            return self._projects(method, s[1:], params, user)
        if s[:2] == ["prearchive", "projects"] and n == 3:
            # XNATApplication:291 PREARC_PROJECT_URI → PrearcSessionListResource
            self._only(method, "GET")
            return self._prearchive_list(re.split(r"\s*,\s*", s[2]), params)
        if s == ["prearchive"]:
            self._only(method, "GET")  # XNATApplication:289 (PUT = refresh: not implemented)
            return self._prearchive_list(None, params)
        if s[:2] == ["prearchive", "projects"] and n == 5:
            return self._prearchive_session(method, s[2], s[3], s[4], params)
        if s[:2] == ["prearchive", "projects"] and n == 6 and s[5] in ("scans", "resources"):
            # XNATApplication:293 and :296
            self._only(method, "GET")
            self._format(params, "json")
            key = self._session_key(s[2], s[3], s[4])
            return self._scans(key) if s[5] == "scans" else self._resources(key)
        if s[:2] == ["prearchive", "projects"] and n == 7 and s[5:] == ["logs", "last"]:
            self._only(method, "GET")
            key = self._session_key(s[2], s[3], s[4])
            if self._row(key) is None:
                raise _Reply(404, f"{self._uri(key)} not found")  # departure 17
            with self._lock:
                lines = self._logs.get(key, [])
            return _Reply(200, lines[-1] if lines else "")
        if s == ["services", "prearchive", "rebuild"]:
            self._only(method, "POST")  # BatchPrearchiveActionsA.allowGet:81-83 is false
            return self._rebuild(params)
        if s == ["services", "archive"]:
            self._only(method, "POST")
            return self._archive(params)
        if s == ["services", "import"]:
            self._only(method, "POST")
            return self._import(params, user)
        if s[:2] == ["services", "prearchive"]:
            raise _Reply(501, "stand-in: not implemented (move/delete services)")  # departure 1
        raise _Reply(404, "Not Found")

    def _import(self, params: dict[str, list[str]], user: str) -> _Reply:
        """Importer.handlePost → the handler ``import-handler`` names (§4.6); only ``inbox`` here."""
        from tests.xnat_inbox import InboxRefused

        handler = (params.get("import-handler") or [""])[-1]
        if handler != "inbox":
            raise _Reply(
                501, f"stand-in: import-handler={handler or '(default)'} is not implemented"
            )  # dep. 1
        flat = {k: v[-1] for k, v in params.items()}
        try:
            request = self.inbox.submit(flat, user)
        except InboxRefused as exc:
            raise _Reply(exc.status, str(exc)) from None
        # DicomInboxImporter.call: the URL path of siteUrl + /xapi/dicom/<id>, as text (callPartialUriWrap false)
        return _Reply(200, f"/xapi/dicom/{request.id}\r\n", "text/uri-list")

    @staticmethod
    def _only(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _Reply(405, "Method Not Allowed", headers={"Allow": ", ".join(allowed)})

    @staticmethod
    def _format(params: dict[str, list[str]], *allowed: str) -> str:
        fmt = (params.get("format") or [""])[-1].lower()
        if fmt not in allowed:
            # Departure 9: XNAT would pick HTML (or by Accept); a client parsing that would break anyway.
            raise _Reply(
                406, f"stand-in: format={fmt or '(none)'} not implemented here; use {'|'.join(allowed)}"
            )
        return fmt

    def _session_key(self, project: str, ts: str, folder: str) -> Key:
        """A session URI's key, as PrearcSessionResource:66-67 reads it (Unassigned in any case is NULL).

        An unknown project fails in PrearcUtils.getPrearcDir:274-276 ("No project named …"), which every
        session resource answers with 500 (PrearcSessionResource:109-111, :301-304; PrearcSessionResourceA:79-81).
        """
        if project.lower() == UNASSIGNED.lower():
            return (None, ts, folder)
        if project not in self.projects:
            raise _Reply(500, f"No project named {project}")
        return (project, ts, folder)

    @staticmethod
    def _uri(key: Key) -> str:
        """PrearcUtils.buildURI:556-558."""
        return f"/prearchive/projects/{key[0] or UNASSIGNED}/{key[1]}/{key[2]}"

    # --- §4.1, §4.2, §4.3 --------------------------------------------------------------------------

    def _jsession(self, method: str, headers: Any, user: str) -> _Reply:
        self._only(method, "GET", "POST", "DELETE")
        cookie = SimpleCookie()
        cookie.load(headers.get("Cookie") or "")
        current = cookie["JSESSIONID"].value if "JSESSIONID" in cookie else None
        with self._lock:
            if method == "DELETE":  # UserSession: DELETE invalidates the session
                if current:
                    self._sessions.pop(current, None)
                return _Reply(200, "")
            sid = current if current in self._sessions else uuid.uuid4().hex.upper()
            self._sessions[sid] = user
        return _Reply(200, sid, headers={"Set-Cookie": f"JSESSIONID={sid}; Path=/; HttpOnly"})

    def _projects(self, method: str, s: list[str], params: dict[str, list[str]], user: str = "") -> _Reply:
        if not s:
            self._only(method, "GET")
            self._format(params, "json")
            # §4.3: ?restrict=edit narrows the listing to the projects the user may edit (departure 20).
            edit_only = (params.get("restrict") or [""])[-1] == "edit"
            rows = [
                {
                    "ID": p,
                    "secondary_ID": p,
                    "name": p,
                    "description": "",
                    "pi_firstname": "",
                    "pi_lastname": "",
                    "URI": f"/data/projects/{p}",
                }
                for p in sorted(self.projects)
                if not edit_only or self.can_edit(user, p)
            ]
            return _table(rows)
        project = s[0]
        if project not in self.projects:
            raise _Reply(404, f"Unable to find project {project}")
        if len(s) == 1:
            self._only(method, "GET")
            self._format(params, "json")
            item = {
                "meta": {"xsi:type": "xnat:projectData", "isHistory": False},
                "data_fields": {"ID": project, "secondary_ID": project, "name": project},
                "children": [],
            }
            return _Reply(200, json.dumps({"items": [item]}), "application/json")
        if s[1:] == ["experiments"]:
            # GET /data/projects/<P>/experiments: the project's archived experiments (ID, label, URI).
            self._only(method, "GET")
            self._format(params, "json")
            with self._lock:
                rows = [
                    {
                        "ID": e.id,
                        "label": e.label,
                        "project": e.project,
                        "xsiType": e.xsi_type,
                        "URI": f"/data/experiments/{e.id}",
                    }
                    for e in self.experiments.values()
                    if e.project == project
                ]
            return _table(sorted(rows, key=lambda r: r["label"]))
        if s[1:] == ["prearchive_code"]:
            self._only(method, "GET")
            return _Reply(200, str(self.projects[project]))  # §4.3: 0 | 4 | 5
        if len(s) == 3 and s[1] == "prearchive_code":
            self._only(method, "PUT")
            if s[2] not in ("0", "4", "5"):  # §4.3: 0 | 4 | 5
                raise _Reply(400, f"Invalid prearchive code {s[2]}")
            with self._lock:
                self.projects[project] = int(s[2])
            return _Reply(200, "")
        raise _Reply(404, "Not Found")

    # --- /xapi -------------------------------------------------------------------------------------

    def _xapi(self, method: str, segs: list[str], params: dict[str, list[str]], body: bytes) -> _Reply:
        if segs[:2] == ["siteConfig", "buildInfo"] and len(segs) in (2, 3) and self.version is not None:
            self._only(method, "GET")
            info = {
                "version": self.version,
                "buildNumber": "standin",
                "buildDate": "",
                "sha": "",
                "isDirty": "false",
            }
            if len(segs) == 3:
                if segs[2] not in info:
                    raise _Reply(404, "Not Found")
                return _Reply(200, info[segs[2]])
            return _Reply(200, json.dumps(info), "application/json")
        if segs == ["siteConfig"]:
            self._only(method, "GET")  # SiteConfigApi:82 (the whole map)
            with self._lock:
                return _Reply(200, json.dumps(self.site_config), "application/json")
        if segs[:1] == ["siteConfig"] and len(segs) == 2:
            self._only(method, "GET", "POST")
            name = segs[1]
            with self._lock:
                if method == "POST":  # SiteConfigApi:219-235 (Admin): the body is the new value
                    self.site_config[name] = body.decode("utf-8")
                    return _Reply(200, "", "application/json")
                if name not in self.site_config:  # SiteConfigApi:206-207
                    raise _Reply(404, f"No site configuration property named {name}")
                return _Reply(200, self.site_config[name], "application/json")  # departure 13
        if segs == ["anonymize", "site", "enabled"]:
            self._only(method, "GET", "PUT")
            if method == "PUT":  # AnonymizeApi:104-107: ?enable=, default true
                enable = (params.get("enable") or ["true"])[-1].lower() == "true"
                self.anonymize_site_enabled = enable
                return _Reply(200, "", "application/json")
            # AnonymizeApi:95-98: the preference enableSitewideAnonymizationScript, as a JSON boolean
            return _Reply(200, "true" if self.anonymize_site_enabled else "false", "application/json")
        if segs == ["anonymize", "site"]:
            self._only(method, "GET", "PUT")
            if method == "PUT":  # AnonymizeApi:86-89 (Admin)
                self.anonymize_site_script = body.decode("utf-8")
                return _Reply(200, "")
            return _Reply(200, self.anonymize_site_script)  # AnonymizeApi:72-80, text/plain
        if segs[:1] == ["dicomscp"] and len(segs) <= 2:
            self._only(method, "GET")
            with self._lock:
                entries = [self._receiver_json(r) for r in self.receivers]
            if len(segs) == 1:  # DicomSCPApi:116-120
                return _Reply(200, json.dumps(entries), "application/json")
            found = [e for e in entries if str(e["id"]) == segs[1]]  # DicomSCPApi:128-132
            if not found:
                raise _Reply(404, f"Couldn't find DICOM SCP receiver definition with ID {segs[1]}")
            return _Reply(200, json.dumps(found[0]), "application/json")
        if segs[:1] == ["dicom"] and len(segs) in (2, 3):
            self._only(method, "GET")  # DicomTransactionApi
            if segs[1:] in (["list", "active"], ["list", "all"]):
                found = self.inbox.listing(active=segs[2] == "active")
                return _Reply(200, json.dumps([r.to_json() for r in found]), "application/json")
            if len(segs) == 2 and segs[1].isdigit():
                request = self.inbox.get(int(segs[1]), "")
                if request is None:
                    raise _Reply(404, "")
                return _Reply(200, json.dumps(request.to_json()), "application/json")
            raise _Reply(400, "Bad Request")  # @PathVariable long id
        if segs[:1] == ["direct-archive"] and len(segs) == 4:
            return self._direct_archive_api(method, segs[1], segs[2], segs[3])
        if segs[:1] == ["direct-archive"]:
            raise _Reply(501, "stand-in: paginated direct-archive listing and DELETE not implemented")
        raise _Reply(404, "Not Found")

    @staticmethod
    def _receiver_json(entry: dict[str, Any]) -> dict[str, Any]:
        """A DicomSCPInstance as Jackson writes its getters (DicomSCPInstance:34-99), NON_NULL (departure 14)."""
        keys = (
            "id",
            "aeTitle",
            "port",
            "identifier",
            "fileNamer",
            "enabled",
            "customProcessing",
            "directArchive",
            "anonymizationEnabled",
            "whitelistEnabled",
            "whitelist",
            "routingExpressionsEnabled",
            "projectRoutingExpression",
            "subjectRoutingExpression",
            "sessionRoutingExpression",
        )
        out = {k: entry.get(k) for k in keys}
        out["label"] = f"{entry['aeTitle']}:{entry['port']}"  # getLabel:96-99, formatDicomSCPInstanceKey
        return {k: v for k, v in out.items() if v is not None}

    def _direct_archive_api(self, method: str, project: str, tag: str, name: str) -> _Reply:
        """DirectArchiveSessionApi:54-61 (GET) and :70-82 (POST = trigger the archive now)."""
        self._only(method, "GET", "POST")
        if project not in self.projects:
            raise _Reply(404, f"No project named {project}")  # @Project on the path
        with self._lock:
            found = self._direct_archive_find(project, tag, name)
            if found is None:  # DirectArchiveSessionHibernateServiceImpl.findByProjectTagName:55-61
                raise _Reply(404, "No matching direct archive session")
            if method == "POST":
                self._direct_archive_trigger(found)
                return _Reply(200, "", "application/json")
            return _Reply(200, json.dumps(found.to_json()), "application/json")

    # --- §4.4 prearchive ---------------------------------------------------------------------------

    def _prearchive_list(self, projects: list[str] | None, params: dict[str, list[str]]) -> _Reply:
        """PrearcSessionListResource.represent:107-128."""
        self._format(params, "json")
        rows = self._select()
        for row in rows:  # valueOf on every row read (§1): one bad status breaks the listing
            self._check_status(row)
        tag = (params.get("tag") or [""])[-1]
        if tag:
            # :112-113 getSessionByUID: every row with that tag, whatever project the URI names.
            rows = [r for r in rows if r["tag"] == tag]
        else:
            # :115 the requested projects (else the user's editable ones: all, for an admin) …
            wanted: set[str | None] = set(self.projects) if projects is None else set()
            for p in projects or []:
                wanted.add(None if p == UNASSIGNED else p)  # DatabaseSession PROJECT.searchSql:37-39
            # … :116-118 and Unassigned (NULL) for a user with all-data access, whatever was asked.
            wanted.add(None)
            rows = [r for r in rows if r["project"] in wanted]
        return _table([self._render(r) for r in rows])

    def _prearchive_session(
        self, method: str, p: str, ts: str, folder: str, params: dict[str, list[str]]
    ) -> _Reply:
        self._only(method, "GET", "POST", "DELETE")
        key = self._session_key(p, ts, folder)
        if method == "GET":
            fmt = self._format(params, "json", "xml")
            if fmt == "json":
                # PrearcSessionResource:191-200: buildRows(triple) — no row is an empty ResultSet, 200.
                row = self._row(key)
                return _table([self._render(row)] if row is not None else [])
            xml = self._xml_path(key)
            if not xml.is_file():  # PrearcSessionResource:185-189 (no row check)
                raise _Reply(
                    404,
                    "The named session exists, but its XNAT session document is not available. "
                    "The session is likely invalid or incomplete.",
                )
            return _Reply(200, xml.read_bytes(), "text/xml")
        if method == "DELETE":
            return self._delete_session(key)
        action = (params.get("action") or [""])[-1]
        if action == "build":
            return self._sync_build(key)
        if action in ("commit", "reset-status", "move", "set-status", "reset", "set"):
            raise _Reply(501, f"stand-in: action={action} not implemented")  # departure 1
        # PrearcSessionResource:275-283
        raise _Reply(400, f"User admin requested an unsupported action on prearchive session: {action}")

    def _xml_path(self, key: Key) -> Path:
        sdir = self.session_dir(*key)
        return sdir.parent / f"{sdir.name}.xml"  # §2: <ts>/<folder>.xml, sibling of the session dir

    def _delete_session(self, key: Key) -> _Reply:
        """PrearcSessionResource.handleDelete:287-330 → PrearcDatabase.deleteSession:1445-1472.

        The answer is 200 whatever happened: a missing row, a row already DELETING and a locked row
        (markSession's setStatus refuses it) are left as they are; the caller must re-read to know.
        """
        with self._lock:
            row = self._row(key)
            if row is None or row["status"] == "DELETING":
                return _Reply(200, "")  # predicate:1451-1455 false → falseOp, ignored by handleDelete
            if not self._set_status_guarded(key, "DELETING"):  # markSession → setStatus (locked: false)
                return _Reply(200, "")
            self._set_status(key, "_DELETING")  # _deleteSession LockAndSync: checkStatus DELETING, lock
            self._delete_files(row)
            self._delete_row(key)  # cacheSync
        return _Reply(200, "")

    @staticmethod
    def _delete_files(row: dict[str, Any]) -> None:
        """FileSystemSessionDataModifier.delete:383-403: the folder the ``url`` column names, and its XML."""
        folder = Path(row["url"])
        xml = Path(str(folder) + ".xml")
        try:
            if folder.exists():
                xml.unlink(missing_ok=True)  # MoveToCache: gone from the prearchive
                shutil.rmtree(folder)
            else:
                xml.unlink(missing_ok=True)
        except OSError:
            pass  # :396-398 logs and carries on
        ts_dir = folder.parent
        if ts_dir.is_dir() and not any(ts_dir.iterdir()):
            ts_dir.rmdir()  # :400-402 the timestamp folder only if empty

    def _session_bean(self, key: Key) -> ET.Element:
        """PrearcSessionResourceA.retrieveSessionBean:70-94: the parsed XML, or 404 (no row needed)."""
        xml = self._xml_path(key)
        if not xml.exists():
            raise _Reply(404, "Unable to locate prearc resource.")
        try:
            return ET.parse(xml).getroot()
        except ET.ParseError as exc:
            raise _Reply(500, str(exc)) from None

    def _scans(self, key: Key) -> _Reply:
        """PrearcScansListResource:34-63: ID, xsiType, series_description of the XML's scans, no counts."""
        doc = self._session_bean(key)
        rows = [
            {
                "ID": scan.get("ID", ""),
                "xsiType": scan.get(f"{{{_XSI}}}type", ""),
                "series_description": _child_text(scan, "series_description"),
            }
            for scan in doc.iter(f"{{{_NS}}}scan")
        ]
        return _table(rows)

    def _resources(self, key: Key) -> _Reply:
        """PrearcSessionResourcesList:59-109: one row per scan resource, counts from its catalog."""
        doc = self._session_bean(key)
        sdir = self.session_dir(*key)
        rows = []
        for scan in doc.iter(f"{{{_NS}}}scan"):
            for res in scan.findall(f"{{{_NS}}}file"):
                count, size = self._catalog_stats(sdir, res.get("URI", ""))
                rows.append(
                    {
                        "category": "scans",
                        "cat_id": scan.get("ID", ""),
                        "label": res.get("label", ""),
                        "file_count": str(count),
                        "file_size": str(size),
                    }
                )
        return _table(rows)

    @staticmethod
    def _catalog_stats(sdir: Path, uri: str) -> tuple[int, int]:
        """CatalogUtils.Stats:1382-1391: catalog entries whose file exists, catalogs excluded."""
        catalog = Path(uri) if os.path.isabs(uri) else sdir / uri
        try:
            root = ET.parse(catalog).getroot()
        except (OSError, ET.ParseError):
            return 0, 0  # PrearcSessionResourcesList:96-98 logs and leaves the row out; count nothing
        count = size = 0
        for entry in root.iter(f"{{{_CAT_NS}}}entry"):
            path = catalog.parent / entry.get("URI", "")
            if path.is_file() and not path.name.endswith("catalog.xml"):
                count += 1
                size += path.stat().st_size
        return count, size

    # --- builds (§3 PrearchiveRebuildHandler, §4.4 action=build, §4.5 rebuild) --------------------

    def _rebuild(self, params: dict[str, list[str]]) -> _Reply:
        """PrearchiveBatchRebuild.handlePost:48-78."""
        sources = [
            part.strip() for value in params.get("src", []) for part in value.split(",") if part.strip()
        ]
        if not sources:
            raise _Reply(400, "Missing src")  # departure 10
        keys: list[Key] = []
        for src in sources:
            m = _SRC.match(src)
            if not m:  # BatchPrearchiveActionsA.getSessionDataTriples:258-263
                raise _Reply(500, f"One or more source values contained a malformed URL: {src}")
            project, ts, folder = (unquote(g) for g in m.groups())
            keys.append((None if project == UNASSIGNED else project, ts, folder))
        # :40-42 Boolean.parseBoolean; handed to the handler only, never to the queueing (PrearcUtils:1117).
        override = (params.get("overrideLock") or ["false"])[-1].lower() == "true"
        status = 200
        with self._lock:
            for key in keys:
                try:
                    self._get_session(key)  # PrearchiveOperationRequest:72-74 PrearcDatabase.getSession
                except _NoSuchSession:
                    status = 500  # :71-73 (and the loop goes on)
                    continue
                # :66 queuePrearchiveOperation: a locked row is not queued, silently (PrearcUtils:1117-1121).
                if self._queue(key, "QUEUED_BUILDING"):
                    # :63 autoArchiveBlocked: a REST rebuild never auto-archives.
                    self._spawn(self._rebuild_job, key, override, True)
            rows = [self._render(r) for key in keys if (r := self._row(key)) is not None]
        reply = _table(rows)  # setTriplesRepresentation:283-290 → buildRows(triples), status kept
        reply.status = status
        return reply

    def _rebuild_job(self, key: Key, override: bool, auto_archive_blocked: bool) -> None:
        """PrearchiveRebuildHandler.execute:47-60 with rebuild:62-108 and postBuild:110-123."""
        try:
            with self._lock:
                row = self._row(key)
                if row is None:
                    return  # the handler's setStatus throws on a vanished row; logged
                if row["status"] != "QUEUED_BUILDING" and not self._set_status_guarded(
                    key, "QUEUED_BUILDING", override
                ):
                    return  # :68-71
                if not self.session_dir(*key).parent.exists():
                    # :72-87 (departure 6: no 5 s wait): the row is deleted.
                    self._set_status(key, "_DELETING")
                    self._delete_row(key)
                    return
                if not self._set_status_guarded(key, "BUILDING"):  # :88
                    return
            if not self._build_locked(key):
                return
            with self._lock:
                current = self._row(key)  # :95
                if current is None:
                    return
                if current["status"] == "RECEIVING_INTERRUPT":  # :96-101
                    self._set_status(key, "RECEIVING")
                    return
                self._reset_status(key)  # postBuild:115
                # :119-122 autoArchive unless blocked, then execute:57-59 queues the Archive.
                auto = not auto_archive_blocked and self._is_auto_archive(key, {})
                if auto and self._queue(key, "QUEUED_ARCHIVING"):
                    self._spawn(self._auto_archive_job, key)
        except (_Reply, _NoSuchSession) as exc:
            self.task_log.append(f"rebuild {key}: {exc}")  # e.g. a status outside the enum: logged
        except Exception:
            with self._lock:
                self.errors.append(f"rebuild {key}: {traceback.format_exc()}")

    def _build_locked(self, key: Key) -> bool:
        """PrearcDatabase.buildSession:1056-1080 in its LockAndSync (:1631-1669); False when the build failed.

        The row must still be BUILDING (checkStatus): otherwise nothing is built and the caller goes on as
        XNAT does. The build holds ``_BUILDING`` for ``build_delay`` seconds.
        """
        with self._lock:
            row = self._row(key)
            if row is None or row["status"] != "BUILDING":
                return True
            self._set_status(key, "_BUILDING")  # lockSession: the _ form of the status
        time.sleep(self.build_delay)
        with self._lock:
            try:
                self._write_session_xml(
                    self.session_dir(*key),
                    key[0],
                    row["name"] or key[2],
                    row["subject"],
                    row["VISIT"],
                    row["PROTOCOL"],
                )
            except _BuildFailure as exc:
                # LockAndSync:1650-1662: unlocked, then ERROR with the log line (not a 409: no CONFLICT).
                self._log(key, str(exc))
                self._set_status(key, "ERROR")
                return False
            self._log(key, "Session build complete")
        return True

    def _sync_build(self, key: Key) -> _Reply:
        """PrearcSessionResource.postActionBuild:332-350."""
        with self._lock:
            try:
                if not self._set_status_guarded(key, "BUILDING"):
                    raise _Reply(409, "session document locked")  # :338-340
            except _NoSuchSession as exc:
                raise _Reply(500, str(exc)) from None  # isLocked → getSession throws: :345-348
        if not self._build_locked(key):
            with self._lock:
                raise _Reply(500, self._logs[key][-1])  # SyncFailedException: :345-348
        with self._lock:
            self._reset_status(key)  # :336
        return _Reply(200, f"/data{self._uri(key)}\r\n", "text/uri-list")  # :337 wrapPartialDataURI

    def _reset_status(self, key: Key) -> None:
        """PrearcUtils.resetStatus:503-524: rewrite the row from the session XML (§9).

        makeSessionFromXml:535-545 reads the XML (PrearcTableBuilder.Session:56-130); the four configuration
        columns are copied from the row being replaced, but only when that row has a tag
        (updateNewSessionMetadataWithExistingObject:901-924, populatePrearchiveSessionConfigFields:926-931);
        addOrUpdateSession:370-388 then writes every column.
        """
        project, ts, folder = key
        sdir = self.session_dir(*key)
        xml = self._xml_path(key)
        old = self._row(key)
        doc: ET.Element | None = None
        # Session:60-64 lastmod = the XML's mtime (now if there is none).
        lastmod = datetime.fromtimestamp(xml.stat().st_mtime) if xml.exists() else datetime.now()
        if not xml.exists() or xml.stat().st_size == 0:
            status = "RECEIVING"  # :77-84
        else:
            try:
                doc = ET.parse(xml).getroot()
                sid = doc.get("ID") or ""
                status = "READY" if sid in ("", "NULL") else "ARCHIVING"  # :93-98
            except ET.ParseError:
                status = "ERROR"  # :99-110

        def text(tag: str) -> str:
            return _child_text(doc, tag) if doc is not None else ""

        label = doc.get("label", "") if doc is not None else ""
        date = text("date")
        code = PREARCHIVE_CODES.get(self.projects.get(project or "", -1), "Manual") if project else "Manual"
        new: dict[str, Any] = {
            "project": project,
            "timestamp": ts,
            "lastmod": lastmod,
            "uploaded": parse_timestamp_folder(ts),  # Session:66-73: from the timestamp folder's name
            "scan_date": datetime.strptime(date, "%Y-%m-%d") if date else None,  # getSessionData:117
            "scan_time": text("time") or None,  # :118
            "subject": text("subject_ID") or text("dcmPatientName"),  # pickSubjectName:132-142 ("" if none)
            "folderName": folder,
            "name": label or text("dcmPatientId") or folder,  # pickSessionName:144-157
            "tag": text("UID") or None,  # :91
            "status": status,
            "url": str(sdir.absolute()),  # makeSessionFromXml:538-540
            "autoarchive": code,  # getPrearchiveCode:277-291 (Manual for Unassigned)
            "prevent_anon": False,  # SessionData:32-33 defaults
            "prevent_auto_commit": False,
            "SOURCE": None,  # getSource:256-258
            "VISIT": text("visit") or None,
            "PROTOCOL": text("protocol") or None,
            "TIMEZONE": None,  # getTimeZone:250-254
        }
        if old is not None and (old["tag"] or "").strip():
            new["tag"] = new["tag"] or old["tag"]
            for col in ("autoarchive", "prevent_anon", "SOURCE", "prevent_auto_commit"):
                new[col] = old[col]
        columns = ", ".join(c.lower() for c in COLUMNS)
        with self._cursor() as cur:
            if old is None:
                cur.execute(
                    f"INSERT INTO xdat_search.prearchive ({columns}) VALUES ({', '.join(['%s'] * len(COLUMNS))})",
                    [new[c] for c in COLUMNS],
                )
            else:
                where, params = self._where(key)
                sets = ", ".join(f"{c.lower()} = %s" for c in COLUMNS)
                cur.execute(
                    f"UPDATE xdat_search.prearchive SET {sets} WHERE {where}",
                    [*(new[c] for c in COLUMNS), *params],
                )

    def _write_session_xml(
        self,
        sdir: Path,
        project: str | None,
        label: str,
        subject: str | None,
        visit: str | None,
        protocol: str | None,
    ) -> None:
        """A minimal XNATSessionBuilder (departure 5), called as PrearcUtils.buildSession:811-855 calls it.

        The label is the row's name (PARAM_LABEL = defaultIfBlank(sd.getName(), folder), :821), the subject
        the row's subject when set (:822-824); ``<ts>/<folder>.xml`` with one catalog per scan.
        """
        failing = self._failing_builds.get(sdir.name)
        if failing is not None:
            raise _BuildFailure(failing)
        if not sdir.is_dir():
            raise _BuildFailure(f"session directory {sdir} does not exist")
        scans: list[tuple[str, list[Path], Any]] = []
        scans_dir = sdir / "SCANS"
        for scan in sorted(scans_dir.iterdir()) if scans_dir.is_dir() else []:
            files = _scan_files(scan)
            if files:
                scans.append((scan.name, files, self._first_header(iter(files))))
        if not scans:
            raise _BuildFailure(f"no DICOM files under {scans_dir}")
        header = next((h for _, _, h in scans if h is not None), None)
        if header is None:
            raise _BuildFailure(f"no readable DICOM file under {scans_dir}")
        modality = str(header.get("Modality", "") or "")
        study_date = str(header.get("StudyDate", "") or "")
        study_time = str(header.get("StudyTime", "") or "")
        date = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}" if len(study_date) >= 8 else ""
        tod = f"{study_time[:2]}:{study_time[2:4]}:{study_time[4:6]}" if len(study_time) >= 6 else ""
        root, _xsi, scan_xsi = _SESSION_TYPES.get(modality, _OTHER_TYPES)
        lines = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            # No ID attribute: a parsed XML with an ID is treated as ARCHIVING (§1 PrearcTableBuilder).
            f'<xnat:{root} xmlns:xnat="{_NS}" xmlns:xsi="{_XSI}" '
            f"project={quoteattr(project or '')} label={quoteattr(label)}>",
        ]
        for tag, value in (
            ("date", date),
            ("time", tod),
            ("visit", visit or ""),
            ("protocol", protocol or ""),
            ("dcmPatientId", str(header.get("PatientID", "") or "")),
            ("dcmPatientName", str(header.get("PatientName", "") or "")),
            ("UID", str(header.get("StudyInstanceUID", "") or "")),
            ("modality", modality),
            ("subject_ID", subject or ""),
            ("prearchivePath", str(sdir.parent)),
        ):
            if value:
                lines.append(f"  <xnat:{tag}>{escape(value)}</xnat:{tag}>")
        lines.append("  <xnat:scans>")
        for scan_id, files, scan_header in scans:
            catalog = scans_dir / scan_id / "DICOM" / f"scan_{scan_id}_catalog.xml"
            self._write_catalog(catalog, scan_id, files)
            lines.append(f'    <xnat:scan ID={quoteattr(scan_id)} xsi:type="{scan_xsi}">')
            if scan_header is not None:
                for tag, keyword in (
                    ("UID", "SeriesInstanceUID"),
                    ("series_description", "SeriesDescription"),
                ):
                    value = str(scan_header.get(keyword, "") or "")
                    if value:
                        lines.append(f"      <xnat:{tag}>{escape(value)}</xnat:{tag}>")
            lines += [
                f'      <xnat:file xsi:type="xnat:resourceCatalog" label="DICOM" format="DICOM" '
                f'content="RAW" URI={quoteattr(str(catalog))}/>',
                "    </xnat:scan>",
            ]
        lines += ["  </xnat:scans>", f"</xnat:{root}>", ""]
        xml = sdir.parent / f"{sdir.name}.xml"
        tmp = xml.with_name(xml.name + ".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.replace(xml)

    @staticmethod
    def _first_header(files: Iterator[Path]) -> Any:
        import pydicom

        for path in files:
            try:
                return pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue  # the builder skips files it cannot parse
        return None

    @staticmethod
    def _write_catalog(catalog: Path, scan_id: str, files: list[Path]) -> None:
        catalog.parent.mkdir(parents=True, exist_ok=True)
        entries = "".join(
            f'    <cat:entry URI={quoteattr(str(os.path.relpath(f, catalog.parent)))} format="DICOM"/>\n'
            for f in files
        )
        catalog.write_text(
            f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:DCMCatalog xmlns:cat="{_CAT_NS}" '
            f"ID={quoteattr('SCAN' + scan_id)}>\n  <cat:entries>\n{entries}  </cat:entries>\n</cat:DCMCatalog>\n",
            encoding="utf-8",
        )

    def _is_auto_archive(self, key: Key, params: dict[str, Any]) -> bool:
        """PrearcSession.isAutoArchive:83-114.

        The row's ``autoarchive`` decides only when it is AutoArchive or AutoArchiveOverwrite (:91-95):
        ``Manual`` or NULL fall through to an ``AA``/``auto-archive`` parameter (:103-106) and then to the
        project's prearchive code, 4 or 5 archiving (:108-111). Unassigned never auto-archives (:85-87).
        """
        project = key[0]
        if not project:
            return False
        row = self._row(key)  # getSessionIfExists: None once the row is gone
        if row is not None and row["autoarchive"] in ("AutoArchive", "AutoArchiveOverwrite"):
            return True
        for name, value in params.items():
            if _AUTO_ARCHIVE_KEY.search(name):  # hasAutoArchiveProperty:185-188, the first such key
                decided = _to_boolean_object(value)
                if decided is not None:
                    return decided
                break
        return self.projects.get(project, 0) >= 4

    def _is_overwrite_files(self, key: Key, params: dict[str, Any]) -> bool:
        """PrearcSession.isOverwriteFiles:116-137."""
        project = key[0]
        if not project:
            return False
        if str(params.get("overwrite_files", "")).lower() == "true":
            return True
        row = self._row(key)
        if row is not None and row["autoarchive"] == "AutoArchiveOverwrite":
            return True
        return self.projects.get(project, 0) == 5

    # --- XNAT's scheduled tasks ---------------------------------------------------------------------

    def _scheduler_loop(self) -> None:
        """The XnatTask scheduler: SessionXMLRebuilder every sessionXmlRebuilderRepeat ms (departure 16)."""
        last = time.monotonic()
        while not self._stop.wait(0.05):  # re-read every tick: a test may change the scale or the repeat
            repeat = int(self.site_config["sessionXmlRebuilderRepeat"]) / 1000.0 * self.time_scale
            if time.monotonic() - last >= repeat:
                last = time.monotonic()
                self.run_scheduled_tasks()

    def run_scheduled_tasks(self) -> None:
        """One pass of SessionXMLRebuilder and TriggerDirectArchiveRequests."""
        self.rebuilder_pass()
        try:
            self.direct_archive_pass()
        except Exception:
            with self._lock:
                self.errors.append(f"direct archive pass: {traceback.format_exc()}")

    def rebuilder_pass(self) -> list[Key]:
        """SessionXMLRebuilder.runTask:60-137: queue a Rebuild for every RECEIVING row idle long enough.

        Only rows with ``prevent_auto_commit`` false and a source other than ``uploader`` (:91); idle means
        ``floor(minutes since lastmod) >= sessionXmlRebuilderInterval`` on the JVM's clock (:81, :94-99, :148).
        The Rebuild carries no parameters, so it is not autoArchiveBlocked: after the build the session is
        archived when isAutoArchive holds. A NULL ``prevent_auto_commit`` on a RECEIVING row unboxes to a
        NullPointerException outside the per-row try (:91) and ends the whole pass (:134-136), as in §1.
        Returns the keys queued.
        """
        queued: list[Key] = []
        try:
            with self._lock:
                rows = self._select()
                for row in rows:
                    self._check_status(row)  # getAllSessions reads every status with valueOf
                now = datetime.now()  # :81
                interval = float(self.site_config["sessionXmlRebuilderInterval"])
                for row in rows:
                    if row["status"] != "RECEIVING":
                        continue
                    if row["prevent_auto_commit"] is None:
                        raise TypeError(
                            "NullPointerException: prevent_auto_commit is NULL (SessionXMLRebuilder:91)"
                        )
                    if row["prevent_auto_commit"] or (row["SOURCE"] or "").strip() == "uploader":
                        continue
                    if row["lastmod"] is None:
                        self.task_log.append(f"rebuilder: {row['folderName']} has no lastmod")  # :114-116
                        continue
                    elapsed = (now - row["lastmod"]).total_seconds()
                    diff = math.floor(elapsed / self.minutes(1.0))  # diffInMinutes:147-149
                    key = (row["project"], row["timestamp"], row["folderName"])
                    if diff >= interval and self._queue(key, "QUEUED_BUILDING"):  # :99-102
                        self._spawn(self._rebuild_job, key, False, False)
                        queued.append(key)
        except Exception as exc:  # :122-136: logged, never raised
            self.task_log.append(f"rebuilder pass aborted: {type(exc).__name__}: {exc}")
        return queued

    # --- §4.5 archive ------------------------------------------------------------------------------

    def _archive(self, params: dict[str, list[str]]) -> _Reply:
        """Archiver (handleParam:65-98, finishSingleSessionArchive:118-144) in BatchPrearchiveActionsA.handlePost."""

        def last(name: str) -> str:
            return (params.get(name) or [""])[-1]

        sources = [
            part.strip() for value in params.get("src", []) for part in value.split(",") if part.strip()
        ]
        by_folder = last("project") and last("PREARC_TIMESTAMP") and last("PREARC_SESSION_FOLDER")
        if not sources and not by_folder:
            raise _Reply(404, "Unknown prearchive session.")  # BatchPrearchiveActionsA:103-106
        if not sources:
            raise _Reply(
                501, "stand-in: archive by project/PREARC_TIMESTAMP/PREARC_SESSION_FOLDER not implemented"
            )
        keys: list[Key] = []
        for src in sources:
            if re.match(r"^(?:/data|/REST)?/archive/", src):
                raise _Reply(400, f"Invalid src URI ({src})")  # :118-121
            m = _SRC.match(src)
            if not m:
                raise _Reply(400, f"Invalid src URI ({src})")  # :114-116 MalformedURLException
            project, ts, folder = (unquote(g) for g in m.groups())
            if project.lower() == UNASSIGNED.lower():
                raise _Reply(400, "Cannot archive sessions from the Unassigned folder.")  # :159-161
            if project not in self.projects:
                raise _Reply(500, f"{src} invalid.")  # :127-128 (getPrearcDir: "No project named …")
            keys.append((project, ts, folder))
        if len(keys) > 1:
            raise _Reply(501, "stand-in: asynchronous multi-src archive not implemented")  # departure 1
        key = keys[0]
        if not self.session_dir(*key).exists():
            raise _Reply(404, f"{self._uri(key)} not found.")  # :163-165
        # Archiver.initialize:100-116: append/delete override exceptions; anything else is "none".
        overwrite = last("overwrite").lower()
        mode = overwrite if overwrite in ("append", "delete") else "none"
        redirect = last("redirect").lower() == "true"  # :85-87
        handled = {
            "src",
            "overwrite",
            "overwrite_files",
            "dest",
            "redirect",
            "http-session-listener",
            "project",
        }
        extra = {k: v[-1] for k, v in params.items() if k not in handled}  # :94-96 additionalValues
        dest_subject = dest_label = ""
        if last("dest"):
            m = _DEST.match(last("dest"))
            if not m:
                raise _Reply(400, f"Invalid dest URI ({last('dest')})")
            if m.group(1) != key[0]:
                raise _Reply(501, "stand-in: archiving into another project not implemented")
            dest_subject, dest_label = m.group(2) or "", m.group(3) or ""
        with self._lock:
            try:
                row = self._get_session(key)
            except _NoSuchSession as exc:
                raise _Reply(500, str(exc)) from None  # setStatus → isLocked → getSession; :197-199
            # setSessionArchiveStatus:166-171; departure 3 for the unlocked statuses it does not take.
            if row["status"].startswith("_") or row["status"] not in ("READY", "CONFLICT", "ERROR"):
                raise _Reply(403, "Operation already in progress on this prearchive entry.")
            self._set_status(key, "ARCHIVING")
            job = _ArchiveJob(key)
            # QueueBasedImageCommit(user, session, dest, overrideExceptions=_overwrite, allowSessionMerge=true):
            # Archiver:123-124; queued to the archive handler (QueueBasedImageCommit:124-126).
            self._spawn(
                self._archive_job,
                job,
                {**extra, "_dest_subject": dest_subject, "_dest_label": dest_label},
                mode,
                False,  # overwrite_files does not reach a single-session archive (Archiver:76-78)
            )
        timeout = float(self.site_config["sessionArchiveTimeoutInterval"])  # QueueBasedImageCommit:140
        started = time.monotonic()
        while not job.done.wait(self.archive_poll):
            if time.monotonic() - started > timeout:  # :143-147, the archive goes on in the background
                raise _Reply(
                    500,
                    f"The session {key[0]}/{key[1]}/{key[2]} did not complete within the configured "
                    "timeout interval.",
                )  # Archiver:139-141
        if job.failure is not None:
            raise _Reply(500, f"FAILED: {job.failure}")  # QueueBasedImageCommit:168-170 → Archiver:137-138
        assert job.uri is not None
        uri = "/data" + job.uri  # wrapPartialDataURI:204-206
        # Archiver:131: evaluated after the archive, when the row is gone: AA parameters, then the project code.
        if redirect or self._is_auto_archive(key, extra):
            return _Reply(303, "", headers={"Location": self.url + uri})  # XDAT.getSiteUrl() + uri
        return _Reply(200, uri + "\r\n", "text/uri-list")  # :134-135

    def _auto_archive_job(self, key: Key) -> None:
        """An Archive queued after a scheduled build (PrearchiveRebuildHandler.execute:57-59)."""
        row = self._row(key)
        merge = row is not None and row["autoarchive"] not in (None, "Manual")  # PrearchiveArchiveHandler:60
        job = _ArchiveJob(key)
        self._archive_job(job, {}, "append" if merge else "none", self._is_overwrite_files(key, {}))

    def _archive_job(
        self, job: _ArchiveJob, params: dict[str, Any], mode: str, overwrite_files: bool
    ) -> None:
        """PrearchiveArchiveHandler.execute:44-54 → PrearcDatabase._archive:965-1022 in its LockAndSync."""
        key = job.key
        try:
            with self._lock:
                try:
                    locked = self._set_status_guarded(key, "ARCHIVING")  # commitSessionToArchive:57
                except _NoSuchSession as exc:
                    raise _ArchiveFailure(str(exc)) from None
                if not locked:
                    raise _ArchiveFailure("Unable to lock session for archiving.")  # :62-64
                row = self._get_session(key)
                self._set_status(
                    key, "_ARCHIVING"
                )  # LockAndSync.run:1631-1637 (checkStatus ARCHIVING, _archive:1006-1008)
            time.sleep(self.archive_delay)
            with self._lock:
                try:
                    job.uri = self._archive_files(key, row, params, mode, overwrite_files)
                except _ArchiveFailure as exc:
                    # LockAndSync:1650-1662: CONFLICT for a 409-type ClientException, else ERROR; logged.
                    self._set_status(key, "CONFLICT" if exc.conflict else "ERROR")
                    self._log(key, str(exc))
                    # execute:51 failed(...) with wrapException's "Operation Failed: " (:1028-1033)
                    job.failure = f"Unable to archive {key[2]}: Operation Failed: {exc}"
                    return
                self._delete_row(key)  # cacheSync:996-1003: the row is deleted on success
        except _ArchiveFailure as exc:
            job.failure = f"Unable to archive {key[2]}: {exc}"
        except Exception as exc:
            job.failure = f"Unable to archive {key[2]}: {exc}"
            with self._lock:
                self.errors.append(f"archive {key}: {traceback.format_exc()}")
        finally:
            job.done.set()

    def _archive_files(
        self, key: Key, row: dict[str, Any], params: dict[str, Any], mode: str, overwrite_files: bool
    ) -> str:
        """PrearcSessionArchiver.call:436-700, as far as departures 2 and 4 allow; returns buildURI:1074-1085."""
        project = key[0]
        assert project is not None
        sdir = self.session_dir(*key)
        xml_path = self._xml_path(key)
        if not xml_path.is_file():
            raise _ArchiveFailure(
                f"Unable to locate session xml for {self._uri(key)}: build the session first"
            )
        doc = ET.parse(xml_path).getroot()

        def param(*names: str) -> str:
            for name in names:
                value = str(params.get(name) or "").strip()
                if value:
                    return value
            return ""

        # PrearcSessionArchiver.fixSessionLabel / fixSubject (§4.5), each through cleanValue (§6).
        label = _clean(
            param("session", "label", "EXPT_LABEL", "_dest_label") or doc.get("label", "") or key[2]
        )
        subject = _clean(
            param("subject", "SUBJECT_ID", "_dest_subject")
            or _child_text(doc, "subject_ID")
            or _child_text(doc, "dcmPatientName")
        )
        if not subject:
            raise _ArchiveFailure("Unable to identify subject.")  # :255 (ClientException 400: ERROR)
        target = self.archive / project / "arc001" / label
        existing = self.experiments.get((project, label))
        if existing is not None or target.exists():
            if mode == "none":
                # PRE_EXISTS (:89, :361-364) — departure 2: XNAT's REST archive would merge here.
                raise _ArchiveFailure("Session already exists, retry with overwrite enabled", conflict=True)
            if existing is not None and existing.subject != subject:
                raise _ArchiveFailure(  # SUBJECT_MOD (:90, :384-389)
                    f"Invalid modification of session subject via archive process.: {label} Already Exists "
                    "for another Subject",
                    conflict=True,
                )
        moved: dict[str, int] = {}
        for scan in sorted((sdir / "SCANS").iterdir()) if (sdir / "SCANS").is_dir() else []:
            if _scan_files(scan):
                moved[scan.name] = len(_scan_files(scan))
        if existing is not None and mode == "append":
            clash = [
                p.relative_to(sdir)
                for p in sdir.rglob("*")
                if p.is_file() and (target / p.relative_to(sdir)).exists() and not _CATALOG.fullmatch(p.name)
            ]
            if clash and not overwrite_files:
                raise _ArchiveFailure(f"Files already exist in the archive: {clash[0]}", conflict=True)
            shutil.copytree(sdir, target, dirs_exist_ok=True)
            shutil.rmtree(sdir)
            scans = {**existing.scans, **moved}
        else:
            if target.exists():
                shutil.rmtree(target)  # overwrite=delete
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(sdir), str(target))
            scans = moved
        arc_xml = target.parent / f"{label}.xml"
        shutil.move(str(xml_path), str(arc_xml))
        self._add_experiment(project, subject, label, doc, target, arc_xml, scans, existing)
        return f"/archive/projects/{project}/subjects/{subject}/experiments/{label}"

    def _add_experiment(
        self,
        project: str,
        subject: str,
        label: str,
        doc: ET.Element,
        path: Path,
        xml_path: Path,
        scans: dict[str, int],
        existing: ArchivedSession | None,
    ) -> None:
        with self._lock:
            subject_id = self._subject_ids.setdefault((project, subject), f"XNAT_S{next(self._ids):05d}")
            exp_id = existing.id if existing is not None else f"XNAT_E{next(self._ids):05d}"
            self.experiments[(project, label)] = ArchivedSession(
                project,
                subject,
                subject_id,
                label,
                exp_id,
                _XSI_BY_ROOT.get(doc.tag.split("}")[-1], _OTHER_TYPES[1]),
                path,
                xml_path,
                scans,
                _child_text(doc, "date"),
                _child_text(doc, "time"),
            )

    # --- direct archive (1.8.4+, §9) ----------------------------------------------------------------

    def _direct_archive_find(
        self, project: str | None, tag: str | None, name: str
    ) -> DirectArchiveSession | None:
        """DirectArchiveSessionDao.findByProjectTagName:49-63."""
        matches = [
            s
            for s in self.direct_archives.values()
            if s.project == project and s.tag == tag and s.name == name
        ]
        if len(matches) > 1:
            raise _Reply(500, f"NonUniqueResultException: {len(matches)}")
        return matches[0] if matches else None

    def direct_archive_get_or_create(
        self, incoming: DirectArchiveSession
    ) -> tuple[DirectArchiveSession, bool]:
        """DirectArchiveSessionServiceImpl.getOrCreate:124-148 (create: HibernateServiceImpl:64-79).

        Raises ``DirectArchiveRefused`` where XNAT throws ArchivingException: the receiver then files the
        instance in the prearchive instead (GDI.eitherGetOrCreateSession:493-501).
        """
        with self._lock:
            session = self._direct_archive_find(incoming.project, incoming.tag, incoming.name)
            if session is None:
                if Path(incoming.location).exists():  # :131-134
                    raise DirectArchiveRefused(
                        f"Cannot direct archive session because data already exists in {incoming.location}"
                    )
                if any(
                    s.location == incoming.location and s.status != "ERROR"
                    for s in self.direct_archives.values()
                ):  # create:66-72
                    raise DirectArchiveRefused(f"direct archive sessions with location={incoming.location}")
                incoming.id = next(self._da_ids)
                self.direct_archives[incoming.id] = incoming
                return incoming, True
            if session.status != "RECEIVING":  # :140-145
                raise DirectArchiveRefused(
                    f"Cannot direct archive additional files for session because it is no longer in receiving "
                    f"state ({session.status})"
                )
            return session, False

    def direct_archive_touch(self, session_id: int) -> None:
        """DirectArchiveSessionHibernateServiceImpl.touch:33-37."""
        with self._lock:
            if session_id in self.direct_archives:
                self.direct_archives[session_id].last_built = datetime.now()

    def direct_archive_delete(self, session_id: int) -> None:
        with self._lock:
            self.direct_archives.pop(session_id, None)

    def direct_archive_pass(self) -> list[int]:
        """TriggerDirectArchiveRequests → DirectArchiveSessionServiceImpl.triggerArchive:250-287.

        Sessions RECEIVING whose last file came at least sessionXmlRebuilderInterval minutes ago
        (DirectArchiveSessionDao.findReadyForArchive:70-78) are queued for building and archiving.
        """
        with self._lock:
            interval = self.minutes(float(self.site_config["sessionXmlRebuilderInterval"]))
            now = datetime.now()
            ready = [
                s
                for s in self.direct_archives.values()
                if s.status == "RECEIVING" and (now - s.last_built).total_seconds() >= interval
            ]
            for session in ready:
                self._direct_archive_trigger(session)
            return [s.id for s in ready]

    def _direct_archive_trigger(self, session: DirectArchiveSession) -> None:
        session.status = "QUEUED_BUILDING"  # triggerArchive:277
        self._spawn(self._direct_archive_job, session.id)  # :282 DirectArchiveRequest → listener

    def _direct_archive_job(self, session_id: int) -> None:
        """DirectArchiveRequestListener.onRequest: build(id) then archive(id) (ServiceImpl:151-239)."""
        try:
            with self._lock:
                session = self.direct_archives.get(session_id)
                if session is None or session.status != "QUEUED_BUILDING":
                    return  # setStatusAndReturn:153-164 throws: not buildable
                session.status = "BUILDING"
                location = Path(session.location)
            time.sleep(self.build_delay)
            with self._lock:
                try:
                    self._write_session_xml(
                        location,
                        session.project,
                        session.name,
                        session.subject,
                        session.visit,
                        session.protocol,
                    )
                except _BuildFailure as exc:
                    self._direct_archive_to_prearchive(session, str(exc))  # build:156-159
                    return
                session.status = "QUEUED_ARCHIVING"  # setStatusToQueuedArchiving:104-108
                session.upload_date = datetime.now()
                session.status = "ARCHIVING"  # archive:164
            time.sleep(self.archive_delay)
            with self._lock:
                xml = location.parent / f"{location.name}.xml"
                doc = ET.parse(xml).getroot()
                # saveSubject:318-342: the subject label is XML subject_ID, else dcmPatientName.
                subject = _child_text(doc, "subject_ID") or _child_text(doc, "dcmPatientName")
                label = doc.get("label", "") or session.name
                scans = {
                    p.name: len(_scan_files(p))
                    for p in sorted((location / "SCANS").glob("*"))
                    if _scan_files(p)
                }
                self._add_experiment(session.project, subject, label, doc, location, xml, scans, None)
                xml.unlink()  # archive:216
                self.direct_archives.pop(session_id, None)  # archive:233
        except Exception:
            with self._lock:
                self.errors.append(f"direct archive {session_id}: {traceback.format_exc()}")

    def _direct_archive_to_prearchive(self, session: DirectArchiveSession, message: str) -> None:
        """DirectArchiveSessionServiceImpl.doPrearchiveMove:416-482, after a failed build."""
        ts = session.timestamp
        target = self.session_dir(session.project, ts, session.folder_name)
        if target.exists():
            ts = ts + "_DA"  # :426-430
            target = self.session_dir(session.project, ts, session.folder_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(session.location, str(target))  # :433-434
        src_xml = Path(session.location + ".xml")
        status = "RECEIVING"
        if src_xml.exists():
            shutil.move(str(src_xml), str(target.parent / f"{target.name}.xml"))
            status = "ERROR"  # :463-466
        key: Key = (session.project, ts, session.folder_name)
        columns = ", ".join(c.lower() for c in COLUMNS)
        values = {
            "project": session.project,
            "timestamp": ts,
            "lastmod": session.last_built,
            "uploaded": session.upload_date,
            "scan_date": session.scan_date,
            "scan_time": session.scan_time,
            "subject": session.subject,
            "folderName": session.folder_name,
            "name": session.name,
            "tag": session.tag,
            "status": status,
            "url": str(target),
            "autoarchive": "AutoArchive",  # :468-470 eitherGetOrCreateSession(..., AutoArchive)
            "prevent_anon": session.prevent_anon,
            "prevent_auto_commit": False,
            "SOURCE": session.source,
            "VISIT": session.visit,
            "PROTOCOL": session.protocol,
            "TIMEZONE": session.timezone,
        }
        with self._cursor() as cur:
            cur.execute(
                f"INSERT INTO xdat_search.prearchive ({columns}) VALUES ({', '.join(['%s'] * len(COLUMNS))})",
                [values[c] for c in COLUMNS],
            )
        self._log(key, f"Attempt to direct-archive failed\n{message}")
        self.direct_archives.pop(session.id, None)  # :477
        if status == "RECEIVING" and self._queue(key, "QUEUED_BUILDING"):  # :471-476: Rebuild, not blocked
            self._spawn(self._rebuild_job, key, False, False)

    # --- archived experiments ----------------------------------------------------------------------

    def _archive_get(self, method: str, s: list[str], params: dict[str, list[str]]) -> _Reply:
        """``<P>/subjects/<S>/experiments/<E>[/scans[/<id>/resources]]``, for experiments archived here.

        DELETE on the experiment with ``removeFiles=true`` removes it and its files.
        """
        self._only(method, "GET", "DELETE")
        project, _, subj, _, exp, *rest = s
        if method == "DELETE":
            if rest:
                raise _Reply(405, "Method Not Allowed")
            with self._lock:
                key = next(
                    (
                        k
                        for k, e in self.experiments.items()
                        if e.project == project
                        and exp in (e.label, e.id)
                        and subj in (e.subject, e.subject_id)
                    ),
                    None,
                )
                if key is None:
                    raise _Reply(404, f"Unable to find experiment {exp}")
                gone = self.experiments.pop(key)
            if (params.get("removeFiles") or [""])[-1] == "true":
                shutil.rmtree(gone.path, ignore_errors=True)
                gone.xml_path.unlink(missing_ok=True)
            return _Reply(200, "")
        self._format(params, "json")
        with self._lock:
            found = next(
                (
                    e
                    for e in self.experiments.values()
                    if e.project == project and exp in (e.label, e.id) and subj in (e.subject, e.subject_id)
                ),
                None,
            )
        if found is None:
            raise _Reply(404, f"Unable to find experiment {exp}")
        if not rest:
            fields = {
                "ID": found.id,
                "label": found.label,
                "project": found.project,
                "subject_ID": found.subject_id,
                "date": found.date,
                "time": found.time,
            }
            item = {
                "meta": {"xsi:type": found.xsi_type, "isHistory": False},
                "data_fields": fields,
                "children": [],
            }
            return _Reply(200, json.dumps({"items": [item]}), "application/json")
        base = f"/data/experiments/{found.id}/scans"
        if rest == ["scans"]:
            scan_xsi = found.xsi_type.replace("Session", "Scan")
            rows = [
                {
                    "xnat_imagescandata_id": str(i),
                    "ID": sid,
                    "type": "",
                    "series_description": "",
                    "xsiType": scan_xsi,
                    "quality": "usable",
                    "note": "",
                    "URI": f"{base}/{sid}",
                }
                for i, sid in enumerate(sorted(found.scans), 1)
            ]
            return _table(rows)
        if len(rest) == 3 and rest[0] == "scans" and rest[2] == "resources" and rest[1] in found.scans:
            files = _scan_files(found.path / "SCANS" / rest[1])
            row = {
                "xnat_abstractresource_id": "1",
                "label": "DICOM",
                "element_name": "xnat:resourceCatalog",
                "category": "scans",
                "cat_id": rest[1],
                "cat_desc": "",
                "file_count": str(len(files)),
                "file_size": str(sum(p.stat().st_size for p in files)),
                "tags": "",
                "content": "RAW",
                "format": "DICOM",
            }
            return _table([row])
        raise _Reply(404, "Not Found")


def _child_text(node: ET.Element | None, tag: str) -> str:
    """The text of ``<xnat:tag>`` directly under ``node`` (stripped), or ""."""
    if node is None:
        return ""
    child = node.find(f"{{{_NS}}}{tag}")
    return (child.text or "").strip() if child is not None else ""


class _Handler(BaseHTTPRequestHandler):
    owner: XnatStandIn
    protocol_version = "HTTP/1.1"  # keep-alive, like Tomcat
    server_version = "XnatStandIn"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        reply = self.owner.handle(self.command, self.path, self.headers, body)
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        self.send_response(reply.status, phrase)
        self.send_header("Content-Type", f"{reply.content_type}; charset=UTF-8")
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve
