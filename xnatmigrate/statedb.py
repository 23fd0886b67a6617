"""The databases under the state ledger: what ``state.StateStore`` speaks (``Database``), and the
embedded default, SQLite in ``<state-dir>/state.db`` (``SqliteDatabase``). The PostgreSQL one
(``--state-url``) lives in ``execute.statepg``, where its driver may be imported.

The ledger's SQL is one dialect both run: ``?`` placeholders, ``INSERT … ON CONFLICT`` (never SQLite's
``INSERT OR …``), ``NULLS FIRST`` spelled out; each database keeps its own DDL (the same tables and
columns; ``tests/unit/test_state.py`` holds them equal).

Invariants:
- Only failures of the directory or file become StateError; a constraint violation or a bug keeps
  its ``sqlite3`` exception and traceback.
- ``db_text``/``py_text`` are inverse: any path ``os.fsdecode`` can give is stored and read back as
  the same str (TEXT when it is UTF-8, else its bytes as a BLOB).
- One writer per state directory: ``SqliteDatabase.lock`` takes an exclusive ``flock`` and names the
  holder (host, pid, start time) to whoever is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, overload

from .errors import LockedError, StateError

STATE_FILE = "state.db"
LOCK_FILE = "lock"

# SQLite primary result codes (sqlite3.h) that are the state directory's condition, not a bug.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26


def state_error(exc: sqlite3.Error, path: Path) -> StateError | None:
    """The one line for an SQLite failure caused by the state directory (full, read-only, damaged,
    busy); None for anything else (a constraint, a bug), which keeps its traceback."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = path.parent
    if primary == _SQLITE_FULL:
        return StateError(
            f"the state directory {where} is full (writing {path.name} failed: {exc}); free space "
            "there (or move the whole directory elsewhere and pass --state-dir), then rerun: every "
            "step recorded before this one is kept"
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
        return StateError(
            f"cannot write the state file {path} ({exc}): the state directory {where} must be "
            "writable by this user; fix its permissions or mount it read-write, then rerun"
        )
    if primary == _SQLITE_IOERR:
        return StateError(
            f"I/O error on the state file {path} ({exc}): check the disk holding {where}, then rerun"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StateError(
            f"the state file {path} is unreadable ({exc}); it is the ledger of what was "
            "migrated: restore it from backup, or move it aside to start over deliberately"
        )
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StateError(
            f"the state file {path} stayed locked by another process ({exc}); wait for it to "
            "finish, then rerun"
        )
    return None


class _Cursor(sqlite3.Cursor):
    """Every statement and fetch turns a state-directory failure into its StateError."""

    def _fail(self, exc: sqlite3.Error) -> BaseException:
        path = getattr(self.connection, "state_path", None)
        err = state_error(exc, path) if isinstance(path, Path) else None
        return err if err is not None else exc

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> _Cursor:
        try:
            return super().executemany(sql, seq_of_parameters)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        try:
            return super().fetchmany(size)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None


class Connection(sqlite3.Connection):
    """A connection whose statements run on ``_Cursor`` (``state_path`` names the file)."""

    state_path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return _Cursor(self).execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> _Cursor:
        return _Cursor(self).executemany(sql, seq_of_parameters)


def connect(path: Path, shown: Path | None = None) -> Connection:
    """Open ``path``; failures name ``shown`` (the state file a temporary one is written for)."""
    # Used by one thread at a time, not always the one that opened it (apply commits behind a request).
    conn = sqlite3.connect(
        path, timeout=30, isolation_level=None, factory=Connection, check_same_thread=False
    )
    conn.state_path = shown or path
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


@overload
def db_text(text: str) -> str | bytes: ...
@overload
def db_text(text: None) -> None: ...
def db_text(text: str | None) -> str | bytes | None:
    """A path (or a message holding one) as SQLite can store it: TEXT when it is UTF-8, as every
    usual name is; else the file system's bytes (a BLOB), which ``py_text`` turns back into the
    same str. The mapping is one-to-one, so a path stays the scan cache's key."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: a name that is not UTF-8 (os.fsdecode)
        return os.fsencode(text)
    return text


@overload
def py_text(value: str | bytes) -> str: ...
@overload
def py_text(value: None) -> None: ...
def py_text(value: str | bytes | None) -> str | None:
    return os.fsdecode(value) if isinstance(value, bytes) else value


# --------------------------------------------------------------------------------------------
# What the ledger speaks
# --------------------------------------------------------------------------------------------


class Rows(Protocol):
    """The result of one statement (a DB-API cursor, or what wraps one)."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int, /) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """One open connection to the ledger's database, as ``state.StateStore`` uses it.

    Every failure of the database itself (a full disk, no permission, damage, a lost connection,
    a lock held too long) is one ``StateError`` line saying what to do; a constraint violation or a
    bug keeps its driver exception (one of ``errors``) and traceback. Statements run one by one
    (autocommit) unless ``begin`` opened a transaction.
    """

    #: Starts the one-line messages: "the state file …/state.db", "the state schema s in db on host".
    name: str
    #: How to start over deliberately (the ledger is never reset silently).
    start_over: str
    #: The driver's exceptions that ``StateStore`` may suppress on a rollback.
    errors: tuple[type[Exception], ...]

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None: ...
    def begin(self) -> None:
        """Start a write transaction (SQLite: BEGIN IMMEDIATE, the one writer of the file)."""

    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def savepoint(self, name: str) -> None: ...
    def release(self, name: str) -> None: ...
    def rollback_to(self, name: str) -> None: ...
    def tables(self) -> set[str]:
        """Names of the tables there now (none: an empty ledger, which is refused)."""

    def write_tables(self) -> None:
        """Every table and column of this format, adding those missing (idempotent; in a transaction)."""

    def fs_text(self, text: str | None, /) -> Any:
        """A path (or a message holding one) as this database stores it, one-to-one (``py_text`` reads it)."""

    def lock(self, holder: str) -> None:
        """Take the exclusive lock of this ledger for a run (apply, revert), or raise ``LockedError``
        naming the holder; ``holder`` says who this is (what, host, pid, since)."""

    def unlock(self) -> None: ...
    def close(self) -> None: ...


#: Opens a ledger's database: ``(create, write_schema)``. When there is none and ``create``, it is made
#: complete (``write_schema`` inside one transaction) before anyone can see it; when there is none and
#: not ``create``, StateError says to run ``plan`` first.
Opener = Callable[[bool, Callable[[Database], None]], Database]


# --------------------------------------------------------------------------------------------
# SQLite: <state-dir>/state.db
# --------------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT NOT NULL, seq INTEGER NOT NULL, line BLOB NOT NULL, PRIMARY KEY (plan_id, seq));
"""


class SqliteDatabase:
    """The embedded ledger: ``<state_dir>/state.db`` (WAL, ``synchronous=FULL``) and its lock file."""

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    start_over = "move it aside to start over deliberately"

    def __init__(self, conn: Connection, state_dir: Path) -> None:
        self.conn = conn
        self.dir = state_dir
        self.path = conn.state_path
        self.name = f"the state file {self.path}"
        self._lock_fd: int | None = None

    @staticmethod
    def opener(state_dir: str | os.PathLike[str]) -> Opener:
        directory = Path(state_dir)
        return lambda create, write_schema: SqliteDatabase.open(directory, create, write_schema)

    @classmethod
    def open(cls, state_dir: Path, create: bool, write_schema: Callable[[Database], None]) -> SqliteDatabase:
        path = state_dir / STATE_FILE
        if not path.exists() and not create:
            raise StateError(
                f"no state in {state_dir}: run `xnatmigrate plan MANIFEST` first (or pass --state-dir)"
            )
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                cls._create(state_dir, write_schema)
            elif path.stat().st_size == 0:
                raise StateError(
                    f"the state file {path} is empty (0 bytes), but a new one is written complete: "
                    "it was truncated (a crash, a full disk or a stray redirect), and it is the ledger "
                    "of what was migrated: restore it from backup, or move it aside to start over "
                    "deliberately"
                )
            return cls(connect(path), state_dir)
        except StateError:
            raise
        except sqlite3.Error as exc:
            raise state_error(exc, path) or StateError(
                f"the state file {path} is unreadable ({exc}); it is the ledger of what was "
                "migrated: restore it from backup, or move it aside to start over deliberately"
            ) from None
        except OSError as exc:
            raise StateError(
                f"cannot open the state directory {state_dir}: {exc.strerror}; make it a writable "
                "folder with free space (or pass another --state-dir)"
            ) from None

    @classmethod
    def _create(cls, state_dir: Path, write_schema: Callable[[Database], None]) -> None:
        """Write a complete, empty ledger beside ``state.db`` and link it into place.

        A state.db therefore always holds the schema: one without it (0 bytes, no tables) was
        damaged, never just created, and is refused instead of being taken for a fresh ledger.
        """
        path = state_dir / STATE_FILE
        tmp = state_dir / f".{STATE_FILE}.new-{os.getpid()}"
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)
        db = cls(connect(tmp, shown=path), state_dir)
        try:
            db.begin()
            write_schema(db)
            db.commit()
        finally:
            db.conn.close()  # the last connection checkpoints the WAL into the file and removes it
        try:
            os.link(tmp, path)  # never replaces a state.db another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- statements and transactions ----------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Rows:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> None:
        self.conn.executemany(sql, rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        self.conn.execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self.conn.execute(f"RELEASE {name}")

    def rollback_to(self, name: str) -> None:
        self.conn.execute(f"ROLLBACK TO {name}")

    def tables(self) -> set[str]:
        # sqlite_sequence and the like are SQLite's own, there once a table used AUTOINCREMENT.
        rows = self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'"
        )
        return {r[0] for r in rows}

    def write_tables(self) -> None:
        for stmt in _SQLITE_SCHEMA.strip().split(";"):
            if stmt.strip():
                self.conn.execute(stmt)
        # Columns added since: a cache entry without them is never valid (NULL matches no stat).
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(scan_cache)")}
        for column in ("ctime_ns", "ino"):
            if column not in have:
                self.conn.execute(f"ALTER TABLE scan_cache ADD COLUMN {column} INTEGER")
        # The header's digest (model.header_digest); NULL: not recorded, computed when planning.
        if "digest" not in have:
            self.conn.execute("ALTER TABLE scan_cache ADD COLUMN digest TEXT")
        # model.head_digest of the bytes before Pixel Data; NULL: not known (apply parses instead).
        if "head_digest" not in have:
            self.conn.execute("ALTER TABLE scan_cache ADD COLUMN head_digest TEXT")

    def fs_text(self, text: str | None, /) -> str | bytes | None:
        return db_text(text)

    # -- the lock -----------------------------------------------------------------------------

    def lock(self, holder: str) -> None:
        """Take the directory's exclusive ``flock`` or raise LockedError naming the holder."""
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
            who = Path(path).read_text(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(
                f"{self.dir} is in use by {who}; wait for it to finish (or, if that process is "
                "gone, rerun: the lock is released when its holder exits)"
            ) from None
        self._lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
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

    def close(self) -> None:
        self.unlock()
        self.conn.close()
