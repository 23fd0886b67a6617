"""The state file (SQLite): a ledger of what this tool did, plus the scan cache.

Invariants:
- A ledger, not a cache: an unreadable state, or one written by a newer format, is an error with a
  fix, never a silent reset.
- Every step is recorded right after it takes effect (check → act → record), in its own committed
  transaction (``synchronous=FULL``), so a crash loses at most the record of the step in flight,
  which the next run's *check* rediscovers. Inside ``group`` (apply's group commit) the records of
  a group of sessions commit together: a crash loses that group's uncommitted records, each of which
  the rerun's check rediscovers the same way; a caller commits before any act whose check needs them.
- One writer per state directory: ``StateStore.lock()`` takes an exclusive ``flock`` and names the
  holder (host, pid, start time) to whoever is refused.
- ``serial`` changes only when a different plan starts to apply or something is reverted; resuming
  the plan recorded as ``current_plan`` keeps it, so an interrupted apply can rerun the same plan.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LockedError, StateError
from .model import (
    Build,
    CachedHeader,
    CstoreSession,
    InboxSession,
    Method,
    Outcome,
    PlannedSession,
    PrearchiveSession,
    SessionState,
    Step,
    ValuePool,
    XnatTarget,
    json_text,
    unreachable,
    xnat_from_dict,
    xnat_to_dict,
)
from .statedb import connect, db_text, py_text, state_error

STATE_FORMAT = 1
STATE_FILE = "state.db"
LOCK_FILE = "lock"
_CACHE_BATCH = 2048  # scan-cache rows fetched per call

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scan_cache (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    keywords TEXT NOT NULL, transfer_syntax TEXT, header TEXT, reject TEXT);
CREATE TABLE IF NOT EXISTS timestamps (
    project TEXT NOT NULL, session TEXT NOT NULL, study_uid TEXT NOT NULL, timestamp TEXT NOT NULL,
    PRIMARY KEY (project, session, study_uid));
CREATE TABLE IF NOT EXISTS sessions (
    action_id TEXT PRIMARY KEY, plan_id TEXT NOT NULL, method TEXT NOT NULL, project TEXT,
    subject TEXT, session TEXT NOT NULL, study_uid TEXT NOT NULL, timestamp TEXT NOT NULL,
    session_dir TEXT, url TEXT, prearchive_uri TEXT NOT NULL, row_json TEXT, files INTEGER NOT NULL,
    bytes INTEGER NOT NULL, sources_json TEXT NOT NULL, status TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT, action_id TEXT NOT NULL, step TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS steps_action ON steps (action_id, step);
CREATE TABLE IF NOT EXISTS files (
    action_id TEXT NOT NULL, dest TEXT NOT NULL, source TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (action_id, dest));
CREATE TABLE IF NOT EXISTS sent (
    action_id TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, status INTEGER NOT NULL,
    at TEXT NOT NULL, PRIMARY KEY (action_id, sop_instance_uid));
CREATE TABLE IF NOT EXISTS observed (
    action_id TEXT PRIMARY KEY, observation TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS session_targets (
    action_id TEXT PRIMARY KEY, target_json TEXT NOT NULL, build TEXT NOT NULL,
    archive INTEGER NOT NULL);
"""


def _decode_each(texts: list[str]) -> list[Any]:
    """``[json.loads(t) for t in texts]``, in one call of the decoder when it can: faster, and the
    equal keys of all those objects are then one str each.

    One call decodes ``[t1,t2,…]``: when every text is one JSON value that is exactly the list of
    them, and when it gives another number of values, some text was not one value, and decoding
    each on its own raises for that text as it always did.
    """
    if not texts:
        return []
    try:
        out: list[Any] = json.loads("[" + ",".join(texts) + "]")
    except ValueError:
        out = []
    if len(out) == len(texts):
        return out
    return [json.loads(t) for t in texts]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"


@dataclass(frozen=True)
class AppliedSession:
    """What the ledger knows of one session an apply started."""

    action_id: str
    plan_id: str
    method: Method
    project: str | None
    subject: str | None
    session: str
    study_uid: str
    timestamp: str
    session_dir: str | None
    url: str | None
    prearchive_uri: str
    row: Mapping[str, Any] | None
    files: int
    bytes: int
    sources: tuple[str, ...]
    status: SessionState
    # Where it went and what was asked, as recorded when its apply started (None: a ledger
    # written before targets were recorded; callers fall back to the saved plan then).
    target: XnatTarget | None = None
    build: Build | None = None
    archive: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        object.__setattr__(self, "status", SessionState(self.status))

    @property
    def label(self) -> str:
        return f"{self.project or 'Unassigned'}/{self.session}"


class StateView:
    """Read-only view of the state for the pure planner (tests hand it a fake with these methods)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    @property
    def serial(self) -> int:
        return self._store.serial()

    def timestamp_for(self, project: str | None, session: str, study_uid: str) -> str | None:
        return self._store.timestamp_for(project, session, study_uid)

    def all_timestamps(self) -> set[str]:
        return self._store.all_timestamps()

    def sessions(self) -> list[AppliedSession]:
        return self._store.sessions()


_INSERT_STEP = "INSERT INTO steps (action_id, step, outcome, detail, at) VALUES (?, ?, ?, ?, ?)"


class StateStore:
    """The SQLite ledger in ``<state_dir>/state.db``."""

    def __init__(self, state_dir: str | Path, create: bool = True) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        if not self.path.exists() and not create:
            raise StateError(
                f"no state in {self.dir}: run `xnatmigrate plan MANIFEST` first (or pass --state-dir)"
            )
        self._lock_fd: int | None = None
        self._grouped = False
        self._steps: list[tuple[str, str, str, str | None, str]] = []  # records of a group, not yet written
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                self._create()
            elif self.path.stat().st_size == 0:
                raise StateError(
                    f"the state file {self.path} is empty (0 bytes), but a new one is written complete: "
                    "it was truncated (a crash, a full disk or a stray redirect), and it is the ledger "
                    "of what was migrated: restore it from backup, or move it aside to start over "
                    "deliberately"
                )
            self.conn = connect(self.path)
            try:
                self._check_format()
            except BaseException:
                self.conn.close()
                raise
        except StateError:
            raise
        except sqlite3.Error as exc:
            raise state_error(exc, self.path) or StateError(
                f"the state file {self.path} is unreadable ({exc}); it is the ledger of what was "
                "migrated: restore it from backup, or move it aside to start over deliberately"
            ) from None
        except OSError as exc:
            raise StateError(
                f"cannot open the state directory {self.dir}: {exc.strerror}; make it a writable "
                "folder with free space (or pass another --state-dir)"
            ) from None

    def _create(self) -> None:
        """Write a complete, empty ledger beside ``state.db`` and link it into place.

        A state.db therefore always holds the schema: one without it (0 bytes, no tables) was
        damaged, never just created, and is refused instead of being taken for a fresh ledger.
        """
        tmp = self.dir / f".{STATE_FILE}.new-{os.getpid()}"
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        conn = connect(tmp, shown=self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._write_schema(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()  # the last connection checkpoints the WAL into the file and removes it
        try:
            os.link(tmp, self.path)  # never replaces a state.db another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- format ---------------------------------------------------------------------------------

    def _check_format(self) -> None:
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" in tables:
            row = self.conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            fmt = int(row[0]) if row else 0
            if fmt > STATE_FORMAT:
                raise StateError(
                    f"the state file {self.path} has format {fmt}, newer than this xnatmigrate "
                    f"understands ({STATE_FORMAT}); upgrade xnatmigrate"
                )
            if fmt < 1:
                raise StateError(f"the state file {self.path} has no format marker; it is not ours")
        elif tables:
            raise StateError(f"{self.path} is an SQLite file but not an xnatmigrate state file")
        else:
            raise StateError(
                f"the state file {self.path} holds no tables, but a new one is written complete: it "
                "was emptied or replaced, and it is the ledger of what was migrated: restore it from "
                "backup, or move it aside to start over deliberately"
            )
        with self.tx():
            self._write_schema(self.conn)

    @staticmethod
    def _write_schema(conn: sqlite3.Connection) -> None:
        """Tables added since the file was created, and the format marker (idempotent)."""
        for stmt in _SCHEMA.strip().split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (str(STATE_FORMAT),))
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('serial', '0')")
        # Columns added since: a cache entry without them is never valid (NULL matches no stat).
        have = {r[1] for r in conn.execute("PRAGMA table_info(scan_cache)")}
        for column in ("ctime_ns", "ino"):
            if column not in have:
                conn.execute(f"ALTER TABLE scan_cache ADD COLUMN {column} INTEGER")
        # The header's digest (model.header_digest); NULL: not recorded, computed when planning.
        if "digest" not in have:
            conn.execute("ALTER TABLE scan_cache ADD COLUMN digest TEXT")
        # model.head_digest of the bytes before Pixel Data; NULL: not known (apply parses instead).
        if "head_digest" not in have:
            conn.execute("ALTER TABLE scan_cache ADD COLUMN head_digest TEXT")

    @contextlib.contextmanager
    def tx(self, *, single: bool = False) -> Iterator[sqlite3.Connection]:
        """One committed transaction (the unit of durability); inside ``group`` a savepoint of it, or,
        for a record that is one statement (``single``: atomic on its own), just that statement."""
        if self._grouped and single:
            yield self.conn
            return
        if self._grouped:
            # Atomic on its own (a failed record leaves no half of itself), durable with the group.
            self.conn.execute("SAVEPOINT record")
            try:
                yield self.conn
                self.conn.execute("RELEASE record")
            except BaseException:
                with contextlib.suppress(sqlite3.Error, StateError):
                    self.conn.execute("ROLLBACK TO record")
                    self.conn.execute("RELEASE record")
                raise
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (a full disk, an I/O error): keep the real error.
            with contextlib.suppress(sqlite3.Error, StateError):
                self.conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: every record made inside is committed together, once, when the block ends.

        For records whose loss a rerun's *check* rediscovers (the effect is there; only its record is
        missing): a crash inside the group loses those records, never an effect. Leaving by an
        exception still commits what was recorded (those steps did take effect), unless the ledger
        itself failed. ``commit()`` inside makes the records so far durable, before an act that needs them.
        """
        if self._grouped:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._grouped = True
        try:
            yield
            self._write_steps()
        except (sqlite3.Error, StateError):
            self._grouped = False
            self._steps = []
            with contextlib.suppress(sqlite3.Error, StateError):
                self.conn.execute("ROLLBACK")
            raise
        except BaseException:
            self._grouped = False
            self._write_steps()
            self.conn.execute("COMMIT")
            raise
        self._grouped = False
        self.conn.execute("COMMIT")

    def commit(self) -> None:
        """Inside ``group``: make the records so far durable now; the group goes on. Else nothing to do."""
        if self._grouped:
            self._write_steps()
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.unlock()
        if hasattr(self, "conn"):
            self.conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def view(self) -> StateView:
        return StateView(self)

    # -- meta -----------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def serial(self) -> int:
        return int(self._meta("serial") or 0)

    def current_plan(self) -> str | None:
        return self._meta("current_plan")

    def begin_plan(self, plan_id: str) -> None:
        """Mark ``plan_id`` as the plan being applied; bumps the serial unless it already was."""
        with self.tx():
            if self._meta("current_plan") != plan_id:
                self._set_meta("serial", str(self.serial() + 1))
                self._set_meta("current_plan", plan_id)

    def bump_serial(self) -> None:
        with self.tx():
            self._set_meta("serial", str(self.serial() + 1))
            self._set_meta("current_plan", "")

    # -- lock -----------------------------------------------------------------------------------

    def lock(self, what: str = "apply") -> None:
        """Take the directory's exclusive lock or raise LockedError naming the holder."""
        path = self.dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(
                f"cannot create the lock file {path}: {exc.strerror}; the state directory {self.dir} "
                "must be writable by this user, with free space"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(
                f"{self.dir} is in use by {holder}; wait for it to finish (or, if that process is "
                "gone, rerun: the lock is released when its holder exits)"
            ) from None
        info = f"{what} on host {socket.gethostname()} pid {os.getpid()} since {now_iso()}"
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as exc:
            self.unlock()
            raise StateError(
                f"cannot write the lock file {path}: {exc.strerror}; free space in the state "
                f"directory {self.dir} (or pass another --state-dir), then rerun"
            ) from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- scan cache -----------------------------------------------------------------------------

    def cache_all(self) -> dict[str, CachedHeader]:
        """The whole cache in one query (cheaper than IN-chunks when most paths are wanted).

        Equal keys and values of the headers are one object (``ValuePool``; the JSON decoder shares
        the keys of one batch): a large cache is mostly the same study and series values over and
        over.
        """
        out: dict[str, CachedHeader] = {}
        # Every entry of one scan shares its keyword list: decode each distinct list once.
        keyword_sets: dict[str, frozenset[str]] = {}
        loads = json.loads
        pool = ValuePool()
        share, text = pool.values, pool.text
        sizes: dict[int, int] = {}  # few distinct sizes (a series' images are alike): one int each
        cur = self.conn.execute(
            "SELECT path, size, mtime_ns, keywords, transfer_syntax, header, reject, ctime_ns, ino, digest, "
            "head_digest "
            "FROM scan_cache"
        )
        while True:
            try:  # in batches: 100,000s of rows, one fetch call (and its error check) per batch
                rows = cur.fetchmany(_CACHE_BATCH)
            except sqlite3.Error as exc:
                raise (state_error(exc, self.path) or exc) from None
            if not rows:
                return out
            headers = iter(_decode_each([r[5] for r in rows if r[5] is not None]))
            for path, size, mtime, kw, ts, header, reject, ctime, ino, digest, head in rows:
                keywords = keyword_sets.get(kw)
                if keywords is None:
                    keywords = keyword_sets[kw] = frozenset(loads(kw))
                if isinstance(path, bytes):  # a name that is not UTF-8 (_db_text)
                    path = os.fsdecode(path)
                out[path] = CachedHeader(
                    path,
                    sizes.setdefault(size, size),
                    mtime,
                    keywords,
                    text(ts) if ts is not None else None,
                    share(next(headers)) if header is not None else None,
                    py_text(reject),
                    -1 if ctime is None else mtime if ctime == mtime else ctime,  # often equal: one int
                    -1 if ino is None else ino,
                    digest or "",
                    head or "",
                )

    def cache_put(self, entries: Iterable[CachedHeader]) -> None:
        with self.tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO scan_cache "
                "(path, size, mtime_ns, keywords, transfer_syntax, header, reject, ctime_ns, ino, digest, "
                "head_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        db_text(e.path),
                        e.size,
                        e.mtime_ns,
                        json.dumps(sorted(e.keywords)),
                        e.transfer_syntax,
                        json_text(dict(e.header)) if e.header is not None else None,
                        db_text(e.reject),
                        e.ctime_ns,
                        e.ino,
                        e.digest or None,
                        e.head_digest or None,
                    )
                    for e in entries
                ),
            )

    # -- timestamps -----------------------------------------------------------------------------

    def timestamp_for(self, project: str | None, session: str, study_uid: str) -> str | None:
        row = self.conn.execute(
            "SELECT timestamp FROM timestamps WHERE project=? AND session=? AND study_uid=?",
            (project or "", session, study_uid),
        ).fetchone()
        return row[0] if row else None

    def all_timestamps(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT timestamp FROM timestamps")}

    def record_timestamps(self, rows: Iterable[tuple[str | None, str, str, str]]) -> None:
        """Keep each (project, session, study) → timestamp choice; an existing one is never changed."""
        with self.tx():
            self.conn.executemany(
                "INSERT OR IGNORE INTO timestamps (project, session, study_uid, timestamp) "
                "VALUES (?, ?, ?, ?)",
                ((p or "", s, u, t) for p, s, u, t in rows),
            )

    # -- sessions and steps ---------------------------------------------------------------------

    def register_session(self, plan_id: str, s: PlannedSession, target: XnatTarget) -> None:
        """Record a planned session and its target before its first step; idempotent.

        NOTE: the target is recorded once, with the first attempt: verify, revert, refresh and
        status then act on where the session went, whatever plan.json says later.
        """
        timestamp: str
        session_dir: str | None
        url: str | None
        row: Mapping[str, Any] | None
        match s:
            case PrearchiveSession():
                timestamp, session_dir, url, row = s.timestamp, s.session_dir, s.url, s.row
            case CstoreSession():
                timestamp, session_dir, url, row = "", None, None, None
            case InboxSession():
                # The staging folder (named after the plan id: recorded once, reused by later plans) and
                # the same folder as XNAT sees it, the import's ``path``.
                timestamp, session_dir, url, row = "", s.inbox_dir(plan_id), s.inbox_path(plan_id), None
            case _:
                unreachable(s)
        with self.tx():
            self.conn.execute(
                "INSERT INTO sessions (action_id, plan_id, method, project, subject, session, "
                "study_uid, timestamp, session_dir, url, prearchive_uri, row_json, files, bytes, "
                "sources_json, status, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (action_id) DO UPDATE SET plan_id=excluded.plan_id, "
                "updated=excluded.updated WHERE sessions.status != ?",
                (
                    s.action_id,
                    plan_id,
                    s.method,
                    s.project,
                    s.subject,
                    s.session,
                    s.study_uid,
                    timestamp,
                    session_dir,
                    url,
                    s.prearchive_uri,
                    json.dumps(dict(row)) if row is not None else None,
                    s.file_count,
                    s.bytes,
                    json.dumps(sorted(f.source for f in s.files)),
                    SessionState.APPLYING,
                    now_iso(),
                    SessionState.APPLIED,
                ),
            )
            self.conn.execute(
                "INSERT OR IGNORE INTO session_targets (action_id, target_json, build, archive) "
                "VALUES (?,?,?,?)",
                (s.action_id, json.dumps(xnat_to_dict(target), sort_keys=True), s.build, int(s.archive)),
            )

    def session_paths(self, action_id: str) -> tuple[str | None, str | None]:
        """(session_dir, url) as recorded with the session's first attempt; (None, None) if unknown."""
        row = self.conn.execute(
            "SELECT session_dir, url FROM sessions WHERE action_id=?", (action_id,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def set_session_status(self, action_id: str, status: SessionState) -> None:
        with self.tx(single=True):
            self.conn.execute(
                "UPDATE sessions SET status=?, updated=? WHERE action_id=?", (status, now_iso(), action_id)
            )

    def sessions(self) -> list[AppliedSession]:
        rows = self.conn.execute(
            "SELECT s.action_id, plan_id, method, project, subject, session, study_uid, timestamp, "
            "session_dir, url, prearchive_uri, row_json, files, bytes, sources_json, status, "
            "t.target_json, t.build, t.archive "
            "FROM sessions s LEFT JOIN session_targets t ON t.action_id = s.action_id "
            "ORDER BY project, session, study_uid"
        ).fetchall()
        targets: dict[str, XnatTarget] = {}  # one decode per distinct target
        out = []
        for r in rows:
            target = None
            if r[16] is not None:
                target = targets.get(r[16])
                if target is None:
                    target = targets[r[16]] = xnat_from_dict(json.loads(r[16]))
            out.append(
                AppliedSession(
                    action_id=r[0],
                    plan_id=r[1],
                    method=Method(r[2]),
                    project=r[3],
                    subject=r[4],
                    session=r[5],
                    study_uid=r[6],
                    timestamp=r[7],
                    session_dir=r[8],
                    url=r[9],
                    prearchive_uri=r[10],
                    row=json.loads(r[11]) if r[11] else None,
                    files=r[12],
                    bytes=r[13],
                    sources=tuple(json.loads(r[14])),
                    status=SessionState(r[15]),
                    target=target,
                    build=Build(r[17]) if r[17] is not None else None,
                    archive=bool(r[18]) if r[18] is not None else None,
                )
            )
        return out

    def record_step(
        self, action_id: str, step: Step, outcome: Outcome = Outcome.DONE, detail: Any = None
    ) -> None:
        """Append one ledger entry. Inside ``group`` it is written with the group's others in one
        statement when the group commits (``commit``, the end of ``group``) or a read of the ledger
        comes first: durable at the same moment as if written at once."""
        entry = (
            action_id,
            str(step),
            str(outcome),
            json_text(detail) if detail is not None else None,
            now_iso(),
        )
        if self._grouped:
            self._steps.append(entry)
            return
        with self.tx():
            self.conn.execute(_INSERT_STEP, entry)

    def _write_steps(self) -> None:
        if self._steps:
            entries, self._steps = self._steps, []
            self.conn.executemany(_INSERT_STEP, entries)

    def steps_done(self, action_id: str) -> set[Step]:
        """Steps whose latest record is done or noop (a later ``reverted`` record undoes them)."""
        self._write_steps()
        latest: dict[str, str] = {}
        for step, outcome in self.conn.execute(
            "SELECT step, outcome FROM steps WHERE action_id=? ORDER BY id", (action_id,)
        ):
            latest[step] = outcome
        return {Step(s) for s, o in latest.items() if o in (Outcome.DONE, Outcome.NOOP)}

    def step_detail(self, action_id: str, step: Step) -> Any:
        self._write_steps()
        row = self.conn.execute(
            "SELECT detail FROM steps WHERE action_id=? AND step=? AND outcome IN (?, ?) "
            "ORDER BY id DESC LIMIT 1",
            (action_id, step, Outcome.DONE, Outcome.NOOP),
        ).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def history(self, action_id: str) -> list[tuple[Step, Outcome, Any, str]]:
        self._write_steps()
        return [
            (Step(step), Outcome(outcome), json.loads(detail) if detail else None, at)
            for step, outcome, detail, at in self.conn.execute(
                "SELECT step, outcome, detail, at FROM steps WHERE action_id=? ORDER BY id", (action_id,)
            )
        ]

    # -- per-file records -----------------------------------------------------------------------

    def record_files(self, action_id: str, rows: Iterable[tuple[str, str, int, str]]) -> None:
        """(dest, source, size, sha256) of files staged for a session."""
        with self.tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO files (action_id, dest, source, size, sha256) VALUES (?,?,?,?,?)",
                ((action_id, db_text(d), db_text(s), n, h) for d, s, n, h in rows),
            )

    def files_for(self, action_id: str) -> dict[str, tuple[str, int, str]]:
        return {
            py_text(d): (py_text(s), n, h)
            for d, s, n, h in self.conn.execute(
                "SELECT dest, source, size, sha256 FROM files WHERE action_id=?", (action_id,)
            )
        }

    def record_sent(self, action_id: str, rows: Iterable[tuple[str, int]]) -> None:
        """(SOPInstanceUID, C-STORE status) confirmed by the receiver."""
        with self.tx():
            self.conn.executemany(
                "INSERT OR REPLACE INTO sent (action_id, sop_instance_uid, status, at) VALUES (?,?,?,?)",
                ((action_id, uid, status, now_iso()) for uid, status in rows),
            )

    def sent_for(self, action_id: str) -> dict[str, int]:
        return dict(
            self.conn.execute("SELECT sop_instance_uid, status FROM sent WHERE action_id=?", (action_id,))
        )

    def clear_session_records(self, action_id: str) -> None:
        """Forget files and sends of a reverted session (its steps stay in the ledger)."""
        with self.tx():
            self.conn.execute("DELETE FROM files WHERE action_id=?", (action_id,))
            self.conn.execute("DELETE FROM sent WHERE action_id=?", (action_id,))

    # -- observations (refresh) ------------------------------------------------------------------

    def record_observation(self, action_id: str, observation: Mapping[str, Any]) -> None:
        with self.tx():
            self.conn.execute(
                "INSERT OR REPLACE INTO observed (action_id, observation, at) VALUES (?,?,?)",
                (action_id, json.dumps(dict(observation)), now_iso()),
            )

    def observation(self, action_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT observation, at FROM observed WHERE action_id=?", (action_id,)
        ).fetchone()
        return {**json.loads(row[0]), "observed_at": row[1]} if row else None
