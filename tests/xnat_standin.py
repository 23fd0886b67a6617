"""A small, strict stand-in for XNAT's REST side (xnat-reference.md §4), for tests.

XNAT cannot run here. This server implements only what §4 documents, backed, as XNAT is, by the real
PostgreSQL table ``xdat_search.prearchive`` (§1) and the real prearchive folder on disk (§2).

Invariants:
- Never more forgiving than XNAT. Where XNAT's exact answer is unknown the stand-in refuses (4xx) rather
  than accepts; every such choice is marked ``STRICTER`` below. Whatever it does not implement answers
  501, so a test that strays outside §4 fails loudly.
- Rows are read with ``SELECT *`` by ordinal, as XNAT does (§1); a status outside the PrearcStatus enum
  breaks every listing with 500, as ``valueOf`` does in XNAT (§1 column ``status``).
- Table answers are ``{"ResultSet":{"Result":[...],"totalRecords":"N"}}``, every value a string (§4).
- REST builds never auto-archive (§3 autoArchiveBlocked); the scheduled SessionXMLRebuilder, receivers,
  move/separate and the import service are not emulated.
- Every request is recorded in ``calls`` (never a password).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
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

import psycopg2
import psycopg2.pool

__all__ = ["COLUMNS", "STATUSES", "ArchivedSession", "Call", "XnatStandIn"]

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
#: PrearcUtils.PrearcStatus (§3): plain, QUEUED_*, and locked _* statuses.
STATUSES: frozenset[str] = frozenset(
    [*_PLAIN, *(f"QUEUED_{s}" for s in _QUEUED), *(f"_{s}" for s in _LOCKED)]
)
UNASSIGNED = "Unassigned"
_NS = "http://nrg.wustl.edu/xnat"
# §4.5 common behaviour: src = /prearchive/projects/<P|Unassigned>/<ts>/<folder>, /data prefix optional.
_SRC = re.compile(r"^(?:/data|/REST)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$")
_DEST = re.compile(
    r"^(?:/data|/REST)?/archive/projects/([^/]+)(?:/subjects/([^/]+)(?:/experiments/([^/]+))?)?/?$"
)
# §6: XnatImagesessiondata.cleanValue turns these (and space) into '_'.
_CATALOG = re.compile(r"scan_.*_catalog\.xml")
_CLEAN = re.compile(r"[ `~@#$%^&*()+=\[\]{}|\\/?:;\"',.<>]")
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


class _BuildFailure(Exception):
    pass


def java_timestamp(value: datetime) -> str:
    """``java.sql.Timestamp.toString()``: nanoseconds with trailing zeros cut, at least one digit (§4)."""
    frac = f"{value.microsecond * 1000:09d}".rstrip("0") or "0"
    return value.strftime("%Y-%m-%d %H:%M:%S") + "." + frac


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


class XnatStandIn:
    """XNAT's REST side for tests; a context manager serving on ``127.0.0.1:<free port>``.

    Args:
        dsn: database holding ``xdat_search.prearchive`` (any §1 profile).
        prearchive: the prearchive root (``prearchivePath``, §2).
        archive: the archive root (``archivePath``); experiments go to ``<archive>/<P>/arc001/<label>``.
        users: user → password; every user may edit every project (a site admin).
        projects: project ID → prearchive code (§4.3).
        version: ``buildInfo`` version; None answers 404 as XNAT 1.6 does (§4.2).
    """

    def __init__(
        self,
        dsn: str,
        prearchive: Path,
        archive: Path,
        users: dict[str, str] | None = None,
        projects: dict[str, int] | None = None,
        version: str | None = "1.8.10",
    ) -> None:
        self.dsn = dsn
        self.prearchive = Path(prearchive)
        self.archive = Path(archive)
        self.users = dict(users if users is not None else {"admin": "admin"})
        self.projects = dict(projects if projects is not None else {"prj001": 0})
        self.version = version
        self.calls: list[Call] = []
        self.errors: list[str] = []  # unexpected exceptions inside the stand-in (tests assert it is empty)
        self.build_delay = 0.05
        self.experiments: dict[tuple[str, str], ArchivedSession] = {}  # (project, label) → experiment
        self._sessions: dict[str, str] = {}  # JSESSIONID → user
        self._faults: list[list[Any]] = []  # [remaining, status, path_prefix]
        self._failing_builds: dict[str, str] = {}
        self._logs: dict[Key, list[str]] = {}
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count(1)
        self._subject_ids: dict[tuple[str, str], str] = {}
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- lifecycle and test controls ---------------------------------------------------------------

    def __enter__(self) -> XnatStandIn:
        self._pool = psycopg2.pool.ThreadedConnectionPool(1, 16, self.dsn)
        try:
            self._check_table()
        except BaseException:
            self._pool.closeall()
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
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._pool is not None:
            self._pool.closeall()
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
        """Wait until every asynchronous build has finished."""
        end = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, end - time.monotonic()))

    def session_dir(self, project: str | None, timestamp: str, folder: str) -> Path:
        """Where XNAT looks for a session (§2 PrearcUtils.getPrearcDir: Unassigned has no project level)."""
        base = self.prearchive / project if project else self.prearchive
        return base / timestamp / folder

    # --- database (§1) -----------------------------------------------------------------------------

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        assert self._pool is not None, "use XnatStandIn as a context manager"
        conn = self._pool.getconn()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur
        finally:
            self._pool.putconn(conn)

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
            # STRICTER: XNAT's getSession behaviour with duplicate rows (1.7 has no unique key) is unverified.
            raise _Reply(500, f"{len(rows)} prearchive rows for {key}")
        if rows:
            self._check_status(rows[0])
        return rows[0] if rows else None

    @staticmethod
    def _check_status(row: dict[str, Any]) -> None:
        if row["status"] not in STATUSES:
            # PrearcStatus.valueOf (§1): a value outside the enum breaks the read.
            raise _Reply(
                500,
                f"No enum constant org.nrg.xnat.helpers.prearchive.PrearcUtils.PrearcStatus.{row['status']}",
            )

    def _set_status(self, key: Key, status: str, **columns: Any) -> None:
        # STATUS.updateSessionSql updates lastmod on every status change (§1 lastmod); JVM clock.
        assert status in STATUSES
        sets = ["status = %s", "lastmod = %s"] + [f"{c} = %s" for c in columns]
        where, params = self._where(key)
        with self._cursor() as cur:
            cur.execute(
                f"UPDATE xdat_search.prearchive SET {', '.join(sets)} WHERE {where}",
                [status, datetime.now(), *columns.values(), *params],
            )

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
            reply = self._route(method, path, params, headers, user)
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
        """HTTP Basic or the JSESSIONID cookie (§4.1); anything else is 401."""
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

    def _route(self, method: str, path: str, params: dict[str, list[str]], headers: Any, user: str) -> _Reply:
        segs = [unquote(s) for s in path.split("/")[1:]]
        if segs and segs[-1] == "":
            segs.pop()
        if segs[:1] == ["xapi"]:
            return self._xapi(method, segs[1:])
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
            return self._projects(method, s[1:], params)
        if s[:2] == ["prearchive", "projects"] and n == 3:
            self._only(method, "GET")
            return self._prearchive_list(s[2].split(","), params)
        if s == ["prearchive"]:
            self._only(method, "GET")
            return self._prearchive_list(None, params)
        if s[:2] == ["prearchive", "projects"] and n == 5:
            return self._prearchive_session(method, s[2], s[3], s[4], params)
        if s[:2] == ["prearchive", "projects"] and n == 6 and s[5] == "scans":
            # UNCONFIRMED shape: one row per SCANS/<id> folder with its DICOM file count.
            self._only(method, "GET")
            self._format(params, "json")
            key = self._key(s[2], s[3], s[4])
            if self._row(key) is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            scans = self.session_dir(*key) / "SCANS"
            rows = (
                [
                    {"ID": d.name, "file_count": str(len(_scan_files(d)))}
                    for d in sorted(scans.iterdir())
                    if d.is_dir()
                ]
                if scans.is_dir()
                else []
            )
            return _table(rows)
        if s[:2] == ["prearchive", "projects"] and n == 7 and s[5:] == ["logs", "last"]:
            self._only(method, "GET")
            key = self._key(s[2], s[3], s[4])
            if self._row(key) is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            with self._lock:
                lines = self._logs.get(key, [])
            return _Reply(200, lines[-1] if lines else "")  # UNCONFIRMED: XNAT's answer with no log
        if s == ["services", "prearchive", "rebuild"]:
            self._only(method, "POST")  # BatchPrearchiveActionsA.allowGet() is false
            return self._rebuild(params)
        if s == ["services", "archive"]:
            self._only(method, "POST")
            return self._archive(params)
        if s[:2] == ["services", "prearchive"] or s[:2] == ["services", "import"]:
            raise _Reply(501, "stand-in: not implemented (move/delete/import services)")
        raise _Reply(404, "Not Found")

    @staticmethod
    def _only(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _Reply(405, "Method Not Allowed", headers={"Allow": ", ".join(allowed)})

    @staticmethod
    def _format(params: dict[str, list[str]], *allowed: str) -> str:
        fmt = (params.get("format") or [""])[-1].lower()
        if fmt not in allowed:
            # STRICTER: XNAT would pick HTML (or by Accept); a client parsing that would break anyway.
            raise _Reply(
                406, f"stand-in: format={fmt or '(none)'} not implemented here; use {'|'.join(allowed)}"
            )
        return fmt

    def _project(self, name: str) -> str | None:
        """Project segment → DB value: Unassigned (any case) is NULL (§4.4); unknown projects are 404."""
        if name.lower() == UNASSIGNED.lower():
            return None
        if name not in self.projects:
            raise _Reply(404, f"Unable to identify project {name}")
        return name

    def _key(self, project: str, ts: str, folder: str) -> Key:
        return (self._project(project), ts, folder)

    @staticmethod
    def _uri(key: Key) -> str:
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

    def _xapi(self, method: str, segs: list[str]) -> _Reply:
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
        raise _Reply(404, "Not Found")

    def _projects(self, method: str, s: list[str], params: dict[str, list[str]]) -> _Reply:
        if not s:
            self._only(method, "GET")
            self._format(params, "json")
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
            return _Reply(200, str(self.projects[project]))
        if len(s) == 3 and s[1] == "prearchive_code":
            self._only(method, "PUT")
            if s[2] not in ("0", "4", "5"):  # §4.3: 0 | 4 | 5
                raise _Reply(400, f"Invalid prearchive code {s[2]}")
            with self._lock:
                self.projects[project] = int(s[2])
            return _Reply(200, "")
        raise _Reply(404, "Not Found")

    # --- §4.4 prearchive ---------------------------------------------------------------------------

    def _prearchive_list(self, projects: list[str] | None, params: dict[str, list[str]]) -> _Reply:
        self._format(params, "json")
        rows = self._select()
        for row in rows:  # valueOf on every row read (§1): one bad status breaks the listing
            self._check_status(row)
        if projects is not None:
            wanted = {self._project(p) for p in projects}
            rows = [r for r in rows if r["project"] in wanted]
        if params.get("tag"):
            rows = [r for r in rows if r["tag"] == params["tag"][-1]]
        return _table([self._render(r) for r in rows])

    def _prearchive_session(
        self, method: str, p: str, ts: str, folder: str, params: dict[str, list[str]]
    ) -> _Reply:
        key = self._key(p, ts, folder)
        self._only(method, "GET", "POST", "DELETE")
        if method == "GET":
            fmt = self._format(params, "json", "xml")
            row = self._row(key)
            if row is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            if fmt == "json":
                return _table([self._render(row)])
            xml = self._xml_path(key)
            if not xml.is_file():
                raise _Reply(404, "XNAT session document is not available")
            return _Reply(200, xml.read_bytes(), "text/xml")
        if method == "DELETE":
            return self._delete_session(key)
        action = (params.get("action") or [""])[-1]
        if action == "build":
            return self._sync_build(key)
        if action in ("commit", "reset", "move", "set"):
            raise _Reply(501, f"stand-in: action={action} not implemented")
        raise _Reply(400, f"Unsupported action: {action or '(none)'}")

    def _xml_path(self, key: Key) -> Path:
        sdir = self.session_dir(*key)
        return sdir.parent / f"{sdir.name}.xml"  # §2: <ts>/<folder>.xml, sibling of the session dir

    def _delete_session(self, key: Key) -> _Reply:
        with self._lock:
            row = self._row(key)
            if row is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            if row["status"].startswith("_"):
                raise _Reply(409, "session document locked")
            self._set_status(key, "_DELETING")
            shutil.rmtree(self.session_dir(*key), ignore_errors=True)
            self._xml_path(key).unlink(missing_ok=True)
            self._delete_row(key)
        return _Reply(200, "")

    # --- builds (§3 PrearchiveRebuildHandler, §4.4 action=build, §4.5 rebuild) --------------------

    def _sources(self, params: dict[str, list[str]]) -> list[Key]:
        raw = [part for value in params.get("src", []) for part in value.split(",") if part.strip()]
        if not raw:
            raise _Reply(400, "Missing src")  # STRICTER: XNAT answers 404 or an empty table here
        keys = []
        for src in raw:
            if re.match(r"^(?:/data|/REST)?/archive/", src):
                raise _Reply(400, f"Invalid src URI ({src})")
            m = _SRC.match(src.strip())
            if not m:
                raise _Reply(400, f"Invalid src URI ({src})")
            keys.append(self._key(*(unquote(g) for g in m.groups())))
        return keys

    def _rebuild(self, params: dict[str, list[str]]) -> _Reply:
        keys = self._sources(params)
        override = (params.get("overrideLock") or ["false"])[-1].lower() == "true"
        with self._lock:
            rows = []
            for key in keys:
                row = self._row(key)
                if row is None:  # PrearcDatabase.getSession throws DoesntExist (§4.5)
                    raise _Reply(404, f"{self._uri(key)} not found")
                if row["status"].startswith("_") and not override:
                    raise _Reply(
                        409,
                        f"Prearchive session {self._uri(key)} could not be queued for rebuild; "
                        "another operation holds it",
                    )
                rows.append(row)
            out = []
            for key in keys:
                self._set_status(key, "QUEUED_BUILDING")
                thread = threading.Thread(target=self._rebuild_job, args=(key, override), daemon=True)
                self._threads.append(thread)
                thread.start()
                row = self._row(key)
                assert row is not None
                out.append(self._render(row))
        return _table(out)

    def _rebuild_job(self, key: Key, override: bool) -> None:
        try:
            with self._lock:
                row = self._row(key)
                if row is None or (
                    row["status"] != "QUEUED_BUILDING" and (row["status"].startswith("_") and not override)
                ):
                    return
                sdir = self.session_dir(*key)
                if not sdir.parent.exists():
                    # "If the timestamp dir is missing the row is deleted" (§3).
                    self._set_status(key, "_DELETING")
                    self._delete_row(key)
                    return
                self._set_status(key, "BUILDING")
            time.sleep(self.build_delay)
            with self._lock:
                row = self._row(key)
                if row is None or row["status"] != "BUILDING":
                    return  # deleted or taken over meanwhile
                self._set_status(key, "_BUILDING")
                self._finish_build(key, row)
        except _Reply:
            pass  # e.g. a status outside the enum; XNAT's handler logs it and gives up
        except Exception:
            with self._lock:
                self.errors.append(f"rebuild {key}: {traceback.format_exc()}")

    def _sync_build(self, key: Key) -> _Reply:
        with self._lock:
            row = self._row(key)
            if row is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            if row["status"].startswith("_") or row["status"] == "BUILDING":
                raise _Reply(409, "session document locked")
            self._set_status(key, "_BUILDING")
            if not self._finish_build(key, row):
                raise _Reply(500, self._logs[key][-1])
        return _Reply(200, f"/data{self._uri(key)}\r\n", "text/uri-list")

    def _finish_build(self, key: Key, row: dict[str, Any]) -> bool:
        """Write the session XML and set READY, or ERROR with a log line. Called with the lock held."""
        try:
            scan_date, scan_time = self._build(key, row)
        except _BuildFailure as exc:
            self._log(key, str(exc))
            self._set_status(key, "ERROR")
            return False
        self._log(key, "Session build complete")
        # resetStatus re-reads the XML → READY (§3); the build writes the XML date/time (§1 scan_date/scan_time).
        self._set_status(key, "READY", scan_date=scan_date, scan_time=scan_time)
        return True

    def _build(self, key: Key, row: dict[str, Any]) -> tuple[datetime | None, str | None]:
        """A minimal XNATSessionBuilder: scans from ``SCANS/*``, one catalog per scan, ``<ts>/<folder>.xml``."""
        with self._lock:
            failing = self._failing_builds.get(key[2])
        if failing is not None:
            raise _BuildFailure(failing)
        sdir = self.session_dir(*key)
        if not sdir.is_dir():
            raise _BuildFailure(f"session directory {sdir} does not exist")
        if os.path.normpath(row["url"]) != os.path.normpath(sdir):
            # STRICTER: XNAT builds from the layout path and only receivers read url (§1 url); a wrong url
            # would make later receivers append elsewhere, so the stand-in fails the build instead.
            raise _BuildFailure(
                f"stand-in check: url column {row['url']!r} is not the session directory {sdir}"
            )
        scans: list[tuple[str, list[Path]]] = []
        scans_dir = sdir / "SCANS"
        for scan in sorted(scans_dir.iterdir()) if scans_dir.is_dir() else []:
            files = _scan_files(scan)
            if files:
                scans.append((scan.name, files))
        if not scans:
            raise _BuildFailure(f"no DICOM files under {scans_dir}")
        header = self._first_header(f for _, files in scans for f in files)
        if header is None:
            raise _BuildFailure(f"no readable DICOM file under {scans_dir}")
        modality = str(header.get("Modality", "") or "")
        study_date = str(header.get("StudyDate", "") or "")
        study_time = str(header.get("StudyTime", "") or "")
        date = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}" if len(study_date) >= 8 else ""
        tod = f"{study_time[:2]}:{study_time[2:4]}:{study_time[4:6]}" if len(study_time) >= 6 else ""
        label = row["name"] or key[2]  # PrearcUtils.buildSession: PARAM_LABEL = sd.getName()
        root, _xsi, scan_xsi = _SESSION_TYPES.get(modality, _OTHER_TYPES)
        lines = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            # No ID attribute: a parsed XML with an ID is treated as ARCHIVING (§1 PrearcTableBuilder).
            f'<xnat:{root} xmlns:xnat="{_NS}" '
            f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f"project={quoteattr(key[0] or '')} label={quoteattr(label)}>",
        ]
        for tag, value in (
            ("date", date),
            ("time", tod),
            ("dcmPatientId", str(header.get("PatientID", "") or "")),
            ("dcmPatientName", str(header.get("PatientName", "") or "")),
            ("UID", str(header.get("StudyInstanceUID", "") or "")),
            ("modality", modality),
            ("subject_ID", row["subject"] or ""),
        ):
            if value:
                lines.append(f"  <xnat:{tag}>{escape(value)}</xnat:{tag}>")
        lines.append("  <xnat:scans>")
        for scan_id, files in scans:
            catalog = scans_dir / scan_id / "DICOM" / f"scan_{scan_id}_catalog.xml"
            self._write_catalog(catalog, scan_id, files)
            lines += [
                f'    <xnat:scan ID={quoteattr(scan_id)} xsi:type="{scan_xsi}">',
                f'      <xnat:file xsi:type="xnat:resourceCatalog" label="DICOM" format="DICOM" '
                f'content="RAW" URI={quoteattr(str(catalog))} file_count="{len(files)}"/>',
                "    </xnat:scan>",
            ]
        lines += ["  </xnat:scans>", f"</xnat:{root}>", ""]
        xml = self._xml_path(key)
        tmp = xml.with_name(xml.name + ".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.replace(xml)
        return (datetime.strptime(date, "%Y-%m-%d") if date else None), (tod or None)

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
            f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:DCMCatalog xmlns:cat="http://nrg.wustl.edu/catalog" '
            f"ID={quoteattr('SCAN' + scan_id)}>\n  <cat:entries>\n{entries}  </cat:entries>\n</cat:DCMCatalog>\n",
            encoding="utf-8",
        )

    # --- §4.5 archive ------------------------------------------------------------------------------

    def _archive(self, params: dict[str, list[str]]) -> _Reply:
        def param(*names: str) -> str:
            for name in names:
                value = (params.get(name) or [""])[-1].strip()
                if value:
                    return value
            return ""

        if not params.get("src") and param("project", "PREARC_TIMESTAMP", "PREARC_SESSION_FOLDER"):
            raise _Reply(
                501, "stand-in: archive by project/PREARC_TIMESTAMP/PREARC_SESSION_FOLDER not implemented"
            )
        keys = self._sources(params)
        if len(keys) > 1:
            raise _Reply(501, "stand-in: asynchronous multi-src archive not implemented")
        key = keys[0]
        project = key[0]
        if project is None:
            raise _Reply(400, "Cannot archive sessions from the Unassigned folder.")
        overwrite = param("overwrite") or "none"
        if overwrite not in ("none", "append", "delete"):
            raise _Reply(400, f"Invalid overwrite value {overwrite}")  # STRICTER: §4.5 lists three values
        dest_subject = dest_label = ""
        if param("dest"):
            m = _DEST.match(param("dest"))
            if not m:
                raise _Reply(400, f"Invalid dest URI ({param('dest')})")
            if m.group(1) != project:
                raise _Reply(501, "stand-in: archiving into another project not implemented")
            dest_subject, dest_label = m.group(2) or "", m.group(3) or ""
        with self._lock:
            row = self._row(key)
            if row is None:
                raise _Reply(404, f"{self._uri(key)} not found")
            sdir = self.session_dir(*key)
            if not sdir.is_dir():
                raise _Reply(404, f"{self._uri(key)} not found.")  # Archiver: session dir must exist
            # Archiver: setStatus(ARCHIVING) fails on locked rows → 403 (§4.5). STRICTER: also refuse any
            # status but READY/CONFLICT (XNAT would archive an unbuilt or half-built session).
            if row["status"] not in ("READY", "CONFLICT"):
                raise _Reply(403, "Operation already in progress on this prearchive entry.")
            self._set_status(key, "ARCHIVING")
            try:
                return self._archive_locked(key, row, sdir, overwrite, param, dest_subject, dest_label)
            except _Reply as reply:
                # PrearcDatabase.LockAndSync: a 409-type ClientException → CONFLICT, anything else → ERROR.
                self._set_status(key, "CONFLICT" if reply.status == 409 else "ERROR")
                self._log(key, reply.body.decode("utf-8", "replace"))
                raise

    def _archive_locked(
        self,
        key: Key,
        row: dict[str, Any],
        sdir: Path,
        overwrite: str,
        param: Any,
        dest_subject: str,
        dest_label: str,
    ) -> _Reply:
        project = key[0]
        assert project is not None
        xml_path = self._xml_path(key)
        if not xml_path.is_file():
            raise _Reply(400, f"Unable to locate session xml for {self._uri(key)}: build the session first")
        doc = ET.parse(xml_path).getroot()

        def xml_text(tag: str) -> str:
            node = doc.find(f"{{{_NS}}}{tag}")
            return (node.text or "").strip() if node is not None else ""

        # PrearcSessionArchiver.fixSessionLabel / fixSubject (§4.5), each through cleanValue (§6).
        label = _clean(
            param("session", "label", "EXPT_LABEL") or dest_label or doc.get("label", "") or key[2]
        )
        subject = _clean(
            param("subject", "SUBJECT_ID")
            or dest_subject
            or xml_text("subject_ID")
            or xml_text("dcmPatientName")
        )
        if not subject:
            raise _Reply(400, "Unable to identify subject for session")  # STRICTER: unverified in XNAT
        self._set_status(key, "_ARCHIVING")
        target = self.archive / project / "arc001" / label
        existing = self.experiments.get((project, label))
        if existing is not None or target.exists():
            if overwrite == "none":
                raise _Reply(409, "Session already exists, retry with overwrite enabled")
            if existing is not None and existing.subject != subject:
                raise _Reply(409, f"Session {label} already exists for subject {existing.subject}")
        moved: dict[str, int] = {}
        for scan in sorted((sdir / "SCANS").iterdir()) if (sdir / "SCANS").is_dir() else []:
            if _scan_files(scan):
                moved[scan.name] = len(_scan_files(scan))
        if existing is not None and overwrite == "append":
            clash = [
                p.relative_to(sdir)
                for p in sdir.rglob("*")
                if p.is_file() and (target / p.relative_to(sdir)).exists() and not _CATALOG.fullmatch(p.name)
            ]
            if clash and param("overwrite_files").lower() != "true":
                raise _Reply(409, f"Files already exist in the archive: {clash[0]}")
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
        self._delete_row(key)  # success: the row is deleted (§3 Archive)
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
                target,
                arc_xml,
                scans,
                xml_text("date"),
                xml_text("time"),
            )
        uri = f"/data/archive/projects/{project}/subjects/{subject}/experiments/{label}"
        if param("redirect").lower() == "true":
            return _Reply(303, "", headers={"Location": uri})
        return _Reply(200, uri + "\r\n", "text/uri-list")

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
