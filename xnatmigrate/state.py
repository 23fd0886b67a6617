"""The state: a ledger of what this tool did, plus the scan cache, in a database ``StateStore``
does not choose: SQLite in ``<state-dir>/state.db`` (the embedded default, ``statedb``) or a schema
in PostgreSQL (``--state-url``, ``execute.statepg``), both behind ``statedb.Database``.

Invariants:
- A ledger, not a cache: an unreadable state, or one written by a newer format, is an error with a
  fix, never a silent reset.
- Every step is recorded right after it takes effect (check → act → record), in its own committed
  transaction (SQLite's ``synchronous=FULL``, PostgreSQL's COMMIT), so a crash loses at most the
  record of the step in flight, which the next run's *check* rediscovers. Inside ``group`` (apply's
  group commit) the records of a group of sessions commit together: a crash loses that group's
  uncommitted records, each of which the rerun's check rediscovers the same way; a caller commits
  before any act whose check needs them.
- One writer per ledger: ``StateStore.lock()`` takes the database's exclusive lock (SQLite: a
  ``flock`` of the state directory; PostgreSQL: a session-level advisory lock keyed by the schema)
  and names the holder (host, pid, start time) to whoever is refused.
- ``serial`` changes only when a different plan starts to apply or something is reverted; resuming
  the plan recorded as ``current_plan`` keeps it, so an interrupted apply can rerun the same plan.
- The SQL here is the one dialect both databases run (``statedb``): ``?`` placeholders, ``ON
  CONFLICT`` upserts, NULL order spelled out.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StateError
from .model import (
    Build,
    CachedHeader,
    CstoreSession,
    InboxSession,
    JsonHeader,
    Method,
    Outcome,
    PlannedSession,
    PrearchiveSession,
    SessionState,
    Step,
    ValuePool,
    XnatTarget,
    json_text,
    plain_header,
    unreachable,
    xnat_from_dict,
    xnat_to_dict,
)
from .statedb import Database, Opener, SqliteDatabase, py_text

STATE_FORMAT = 1
_CACHE_BATCH = 2048  # scan-cache rows fetched per call
_STATES_BATCH = 500  # ids per IN (…) of states_of (SQLite allows 32,766 parameters, PostgreSQL 65,535)
_PLAN_BATCH = 256  # lines of a saved plan (one session each) written per statement
_PLAN_READ_BATCH = 16  # lines of a saved plan read per statement (a worker's memory, not the plan's)
_INSERT_PLAN_LINE = "INSERT INTO plans (plan_id, seq, line) VALUES (?, ?, ?)"


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


_CACHE_COLUMNS = (
    "path, size, mtime_ns, keywords, transfer_syntax, header, reject, ctime_ns, ino, digest, head_digest"
)


class _CacheRows:
    """Rows of ``scan_cache`` (``_CACHE_COLUMNS``) → ``CachedHeader``; equal keys and values of the
    headers are one object (``ValuePool``) across the calls of one instance. ``lazy``: each header a
    ``JsonHeader`` of its stored text, decoded only if it is read (a scan's batch, mostly not)."""

    def __init__(self, *, lazy: bool = False) -> None:
        # Every entry of one scan shares its keyword list: decode each distinct list once.
        self.keyword_sets: dict[str, frozenset[str]] = {}
        self.pool = ValuePool()
        self.sizes: dict[int, int] = {}  # few distinct sizes (a series' images are alike): one int each
        self.lazy = lazy

    def __call__(self, rows: list[Any]) -> Iterator[CachedHeader]:
        keyword_sets, sizes, loads = self.keyword_sets, self.sizes, json.loads
        share, text = self.pool.values, self.pool.text
        texts = [r[5] for r in rows if r[5] is not None]
        headers = iter(map(JsonHeader, texts) if self.lazy else map(share, _decode_each(texts)))
        for path, size, mtime, kw, ts, header, reject, ctime, ino, digest, head in rows:
            keywords = keyword_sets.get(kw)
            if keywords is None:
                keywords = keyword_sets[kw] = frozenset(loads(kw))
            if isinstance(path, bytes):  # a name that is not UTF-8 (Database.fs_text)
                path = os.fsdecode(path)
            yield CachedHeader(
                path,
                sizes.setdefault(size, size),
                mtime,
                keywords,
                text(ts) if ts is not None else None,
                next(headers) if header is not None else None,
                py_text(reject),
                -1 if ctime is None else mtime if ctime == mtime else ctime,  # often equal: one int
                -1 if ino is None else ino,
                digest or "",
                head or "",
                header or "",
            )


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
        """Without their ``sources`` (every applied file's path): ``sources_of`` reads one's."""
        return self._store.sessions(with_sources=False)

    def sources_of(self, action_id: str) -> tuple[str, ...]:
        return self._store.sources_of(action_id)


_INSERT_STEP = "INSERT INTO steps (action_id, step, outcome, detail, at) VALUES (?, ?, ?, ?, ?)"


class StateStore:
    """The ledger, on SQLite in ``<state_dir>/state.db`` unless ``opener`` opens another database
    (``execute.statepg.opener`` for ``--state-url``)."""

    def __init__(
        self, state_dir: str | Path | None = None, create: bool = True, *, opener: Opener | None = None
    ) -> None:
        if opener is None:
            if state_dir is None:
                raise ValueError("StateStore needs a state directory or an opener")
            opener = SqliteDatabase.opener(state_dir)
        self._grouped = False
        self._steps: list[tuple[str, str, str, str | None, str]] = []  # records of a group, not yet written
        self.db: Database = opener(create, self._write_schema)
        try:
            self._check_format()
        except BaseException as exc:
            self.db.close()
            if isinstance(exc, self.db.errors):
                raise StateError(
                    f"{self.db.name} is unreadable ({exc}); it is the ledger of what was migrated: "
                    f"restore it from backup, or {self.db.start_over}"
                ) from None
            raise

    # -- format ---------------------------------------------------------------------------------

    def _check_format(self) -> None:
        tables = self.db.tables()
        name = self.db.name
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            fmt = int(row[0]) if row else 0
            if fmt > STATE_FORMAT:
                raise StateError(
                    f"{name} has format {fmt}, newer than this xnatmigrate understands ({STATE_FORMAT}); "
                    "upgrade xnatmigrate"
                )
            if fmt < 1:
                raise StateError(f"{name} has no format marker; it is not ours")
        elif tables:
            shown = ", ".join(sorted(tables)[:3]) + (", …" if len(tables) > 3 else "")
            raise StateError(
                f"{name} holds tables that are not an xnatmigrate state file's ({shown}); it is not ours: "
                "choose another (--state-dir, or ?schema= in --state-url)"
            )
        else:
            raise StateError(
                f"{name} holds no tables, but a new one is written complete: it was emptied or "
                "replaced, and it is the ledger of what was migrated: restore it from backup, or "
                f"{self.db.start_over}"
            )
        with self.tx():
            self._write_schema(self.db)

    @staticmethod
    def _write_schema(db: Database) -> None:
        """Tables and columns added since the ledger was created, and the format marker (idempotent)."""
        db.write_tables()
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('format', ?) ON CONFLICT DO NOTHING", (str(STATE_FORMAT),)
        )
        db.execute("INSERT INTO meta (key, value) VALUES ('serial', '0') ON CONFLICT DO NOTHING")

    @contextlib.contextmanager
    def tx(self, *, single: bool = False) -> Iterator[Database]:
        """One committed transaction (the unit of durability); inside ``group`` a savepoint of it, or,
        for a record that is one statement (``single``: atomic on its own), just that statement."""
        db = self.db
        if self._grouped and single:
            yield db
            return
        if self._grouped:
            # Atomic on its own (a failed record leaves no half of itself), durable with the group.
            db.savepoint("record")
            try:
                yield db
                db.release("record")
            except BaseException:
                with contextlib.suppress(*db.errors, StateError):
                    db.rollback_to("record")
                    db.release("record")
                raise
            return
        db.begin()
        try:
            yield db
            db.commit()
        except BaseException:
            # SQLite may already have rolled back (a full disk, an I/O error): keep the real error.
            with contextlib.suppress(*db.errors, StateError):
                db.rollback()
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
        db = self.db
        ledger_failed: tuple[type[Exception], ...] = (*db.errors, StateError)
        db.begin()
        self._grouped = True
        try:
            yield
            self._write_steps()
        except ledger_failed:
            self._grouped = False
            self._steps = []
            with contextlib.suppress(*db.errors, StateError):
                db.rollback()
            raise
        except BaseException:
            self._grouped = False
            self._write_steps()
            db.commit()
            raise
        self._grouped = False
        db.commit()

    def commit(self) -> None:
        """Inside ``group``: make the records so far durable now; the group goes on. Else nothing to do."""
        if self._grouped:
            self._write_steps()
            self.db.commit()
            self.db.begin()

    def close(self) -> None:
        if hasattr(self, "db"):
            self.db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def view(self) -> StateView:
        return StateView(self)

    # -- meta -----------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

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

    # -- the plan itself, for a ledger other hosts share ------------------------------------------

    @property
    def shared(self) -> bool:
        """The ledger is a database server's (``--state-url``), not a file of this host's."""
        return not isinstance(self.db, SqliteDatabase)

    def save_plan(self, plan_id: str, lines: Iterable[bytes]) -> None:
        """Keep plan.json's bytes (``lines``, each with its newline) as the ledger's saved plan, so any
        host with the ledger applies the plan reviewed. One transaction: a plan is there whole or not at
        all. The plan being applied (``current_plan``) is kept as well; older ones go."""
        keep = self.current_plan() or plan_id
        with self.tx():
            self.db.execute("DELETE FROM plans WHERE plan_id <> ? AND plan_id <> ?", (plan_id, keep))
            self.db.execute("DELETE FROM plans WHERE plan_id = ?", (plan_id,))
            batch: list[tuple[str, int, bytes]] = []
            for seq, line in enumerate(lines):
                batch.append((plan_id, seq, line))
                if len(batch) >= _PLAN_BATCH:
                    self.db.executemany(_INSERT_PLAN_LINE, batch)
                    batch = []
            if batch:
                self.db.executemany(_INSERT_PLAN_LINE, batch)
            self._set_meta("saved_plan", plan_id)

    def saved_plan(self) -> str | None:
        """The id of the plan ``plan`` saved in the ledger last (None: none saved)."""
        return self._meta("saved_plan")

    def plan_lines(self, plan_id: str) -> Iterator[bytes]:
        """The saved plan's bytes, line by line, ``_PLAN_READ_BATCH`` lines per query (never all at
        once: a line is a session, tens of KB for a large one, and the driver holds a query's result
        twice while it is read)."""
        seq = 0
        while True:
            rows = self.db.execute(
                "SELECT line FROM plans WHERE plan_id = ? AND seq >= ? AND seq < ? ORDER BY seq",
                (plan_id, seq, seq + _PLAN_READ_BATCH),
            ).fetchall()
            for (line,) in rows:
                yield bytes(line)
            if len(rows) < _PLAN_READ_BATCH:
                return
            seq += _PLAN_READ_BATCH

    def bump_serial(self) -> None:
        with self.tx():
            self._set_meta("serial", str(self.serial() + 1))
            self._set_meta("current_plan", "")

    # -- lock -----------------------------------------------------------------------------------

    def lock(self, what: str = "apply") -> None:
        """Take the ledger's exclusive lock or raise LockedError naming the holder (``Database.lock``)."""
        self.db.lock(f"{what} on host {socket.gethostname()} pid {os.getpid()} since {now_iso()}")

    def unlock(self) -> None:
        self.db.unlock()

    # -- scan cache -----------------------------------------------------------------------------

    def cache_all(self) -> dict[str, CachedHeader]:
        """The whole cache in one query (cheaper than IN-chunks when most paths are wanted).

        Equal keys and values of the headers are one object (``ValuePool``; the JSON decoder shares
        the keys of one batch): a large cache is mostly the same study and series values over and
        over.
        """
        out: dict[str, CachedHeader] = {}
        decode = _CacheRows()
        cur = self.db.execute(f"SELECT {_CACHE_COLUMNS} FROM scan_cache")
        while True:
            rows = cur.fetchmany(_CACHE_BATCH)  # in batches: 100,000s of rows, one fetch call per batch
            if not rows:
                return out
            for e in decode(rows):
                out[e.path] = e

    def cache_get(self, paths: Sequence[str]) -> dict[str, CachedHeader]:
        """The entries of those of ``paths`` the cache has (a scan's batch: ``scan.ScanCache``),
        decoded as ``cache_all`` does, looked up ``_STATES_BATCH`` paths per statement."""
        out: dict[str, CachedHeader] = {}
        decode = _CacheRows(lazy=True)  # per call: what it shares lives as long as the batch
        fs_text = self.db.fs_text
        for i in range(0, len(paths), _STATES_BATCH):
            chunk = paths[i : i + _STATES_BATCH]
            marks = ", ".join("?" * len(chunk))
            rows = self.db.execute(
                f"SELECT {_CACHE_COLUMNS} FROM scan_cache WHERE path IN ({marks})",
                tuple(fs_text(p) for p in chunk),
            ).fetchall()
            for e in decode(rows):
                out[e.path] = e
        return out

    def cache_put(self, entries: Iterable[CachedHeader]) -> None:
        fs_text = self.db.fs_text
        with self.tx():
            self.db.executemany(
                "INSERT INTO scan_cache "
                "(path, size, mtime_ns, keywords, transfer_syntax, header, reject, ctime_ns, ino, digest, "
                "head_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET "
                "size=excluded.size, mtime_ns=excluded.mtime_ns, keywords=excluded.keywords, "
                "transfer_syntax=excluded.transfer_syntax, header=excluded.header, reject=excluded.reject, "
                "ctime_ns=excluded.ctime_ns, ino=excluded.ino, digest=excluded.digest, "
                "head_digest=excluded.head_digest",
                (
                    (
                        fs_text(e.path),
                        e.size,
                        e.mtime_ns,
                        json.dumps(sorted(e.keywords)),
                        e.transfer_syntax,
                        json_text(plain_header(e.header)) if e.header is not None else None,
                        fs_text(e.reject),
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
        row = self.db.execute(
            "SELECT timestamp FROM timestamps WHERE project=? AND session=? AND study_uid=?",
            (project or "", session, study_uid),
        ).fetchone()
        return row[0] if row else None

    def all_timestamps(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT timestamp FROM timestamps")}

    def record_timestamps(self, rows: Iterable[tuple[str | None, str, str, str]]) -> None:
        """Keep each (project, session, study) → timestamp choice; an existing one is never changed."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO timestamps (project, session, study_uid, timestamp) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            self.db.execute(
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
            self.db.execute(
                "INSERT INTO session_targets (action_id, target_json, build, archive) "
                "VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (s.action_id, json.dumps(xnat_to_dict(target), sort_keys=True), s.build, int(s.archive)),
            )

    def session_paths(self, action_id: str) -> tuple[str | None, str | None]:
        """(session_dir, url) as recorded with the session's first attempt; (None, None) if unknown."""
        row = self.db.execute(
            "SELECT session_dir, url FROM sessions WHERE action_id=?", (action_id,)
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def set_session_status(self, action_id: str, status: SessionState) -> None:
        with self.tx(single=True):
            self.db.execute(
                "UPDATE sessions SET status=?, updated=? WHERE action_id=?", (status, now_iso(), action_id)
            )

    def states_of(self, action_ids: Iterable[str]) -> dict[str, SessionState]:
        """The status of each of ``action_ids`` the ledger holds (absent: never started): one
        statement per batch, so a unit of a large plan reads its own rows, not the whole table."""
        out: dict[str, SessionState] = {}
        ids = list(dict.fromkeys(action_ids))
        for i in range(0, len(ids), _STATES_BATCH):
            chunk = ids[i : i + _STATES_BATCH]
            marks = ",".join("?" * len(chunk))
            for action_id, status in self.db.execute(
                f"SELECT action_id, status FROM sessions WHERE action_id IN ({marks})", tuple(chunk)
            ).fetchall():
                out[action_id] = SessionState(status)
        return out

    def all_states(self) -> dict[str, SessionState]:
        """The status of every session the ledger holds."""
        rows = self.db.execute("SELECT action_id, status FROM sessions").fetchall()
        return {a: SessionState(st) for a, st in rows}

    def applied_ids(self) -> set[str]:
        """The action ids of every session the ledger holds as applied."""
        rows = self.db.execute("SELECT action_id FROM sessions WHERE status = ?", (SessionState.APPLIED,))
        return {r[0] for r in rows.fetchall()}

    def sources_of(self, action_id: str) -> tuple[str, ...]:
        """The source files of a session an apply started (() for one the ledger does not have)."""
        row = self.db.execute(
            "SELECT sources_json FROM sessions WHERE action_id = ?", (action_id,)
        ).fetchone()
        return tuple(json.loads(row[0])) if row is not None else ()

    def sessions(self, *, with_sources: bool = True) -> list[AppliedSession]:
        """Every session an apply started; ``with_sources=False`` leaves ``sources`` empty (a large
        ledger's paths are every file it migrated)."""
        sources = "sources_json" if with_sources else "'[]'"
        rows = self.db.execute(
            "SELECT s.action_id, plan_id, method, project, subject, session, study_uid, timestamp, "
            f"session_dir, url, prearchive_uri, row_json, files, bytes, {sources}, status, "
            "t.target_json, t.build, t.archive "
            "FROM sessions s LEFT JOIN session_targets t ON t.action_id = s.action_id "
            "ORDER BY project NULLS FIRST, session, study_uid"
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
            self.db.execute(_INSERT_STEP, entry)

    def _write_steps(self) -> None:
        if self._steps:
            entries, self._steps = self._steps, []
            self.db.executemany(_INSERT_STEP, entries)

    def steps_done(self, action_id: str) -> set[Step]:
        """Steps whose latest record is done or noop (a later ``reverted`` record undoes them)."""
        self._write_steps()
        latest: dict[str, str] = {}
        for step, outcome in self.db.execute(
            "SELECT step, outcome FROM steps WHERE action_id=? ORDER BY id", (action_id,)
        ):
            latest[step] = outcome
        return {Step(s) for s, o in latest.items() if o in (Outcome.DONE, Outcome.NOOP)}

    def step_detail(self, action_id: str, step: Step) -> Any:
        self._write_steps()
        row = self.db.execute(
            "SELECT detail FROM steps WHERE action_id=? AND step=? AND outcome IN (?, ?) "
            "ORDER BY id DESC LIMIT 1",
            (action_id, step, Outcome.DONE, Outcome.NOOP),
        ).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def history(self, action_id: str) -> list[tuple[Step, Outcome, Any, str]]:
        self._write_steps()
        return [
            (Step(step), Outcome(outcome), json.loads(detail) if detail else None, at)
            for step, outcome, detail, at in self.db.execute(
                "SELECT step, outcome, detail, at FROM steps WHERE action_id=? ORDER BY id", (action_id,)
            )
        ]

    # -- per-file records -----------------------------------------------------------------------

    def record_files(self, action_id: str, rows: Iterable[tuple[str, str, int, str]]) -> None:
        """(dest, source, size, sha256) of files staged for a session."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO files (action_id, dest, source, size, sha256) VALUES (?,?,?,?,?) "
                "ON CONFLICT (action_id, dest) DO UPDATE SET source=excluded.source, size=excluded.size, "
                "sha256=excluded.sha256",
                ((action_id, self.db.fs_text(d), self.db.fs_text(s), n, h) for d, s, n, h in rows),
            )

    def files_for(self, action_id: str) -> dict[str, tuple[str, int, str]]:
        return {
            py_text(d): (py_text(s), n, h)
            for d, s, n, h in self.db.execute(
                "SELECT dest, source, size, sha256 FROM files WHERE action_id=?", (action_id,)
            )
        }

    def record_sent(self, action_id: str, rows: Iterable[tuple[str, int]]) -> None:
        """(SOPInstanceUID, C-STORE status) confirmed by the receiver."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO sent (action_id, sop_instance_uid, status, at) VALUES (?,?,?,?) "
                "ON CONFLICT (action_id, sop_instance_uid) DO UPDATE SET status=excluded.status, at=excluded.at",
                ((action_id, uid, status, now_iso()) for uid, status in rows),
            )

    def sent_for(self, action_id: str) -> dict[str, int]:
        return dict(
            self.db.execute("SELECT sop_instance_uid, status FROM sent WHERE action_id=?", (action_id,))
        )

    def clear_session_records(self, action_id: str) -> None:
        """Forget files and sends of a reverted session (its steps stay in the ledger)."""
        with self.tx():
            self.db.execute("DELETE FROM files WHERE action_id=?", (action_id,))
            self.db.execute("DELETE FROM sent WHERE action_id=?", (action_id,))

    # -- observations (refresh) ------------------------------------------------------------------

    def record_observation(self, action_id: str, observation: Mapping[str, Any]) -> None:
        with self.tx():
            self.db.execute(
                "INSERT INTO observed (action_id, observation, at) VALUES (?,?,?) "
                "ON CONFLICT (action_id) DO UPDATE SET observation=excluded.observation, at=excluded.at",
                (action_id, json.dumps(dict(observation)), now_iso()),
            )

    def observation(self, action_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT observation, at FROM observed WHERE action_id=?", (action_id,)
        ).fetchone()
        return {**json.loads(row[0]), "observed_at": row[1]} if row else None
