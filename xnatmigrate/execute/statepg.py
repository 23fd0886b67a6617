"""The state ledger in PostgreSQL (``--state-url postgresql://…`` or ``$XNATMIGRATE_STATE_URL``): the
``statedb.Database`` that ``state.StateStore`` speaks, in a schema of its own (``?schema=NAME`` in the
URL, default ``xnatmigrate``) of a database the site chooses (not XNAT's own).

Invariants:
- The same tables, columns and semantics as the SQLite ledger (``statedb``): TEXT where SQLite has
  TEXT, BIGINT where it has INTEGER, and BYTEA for the columns SQLite may hold a BLOB in (paths and
  messages holding one: any name ``os.fsdecode`` gives is stored as its bytes, one-to-one).
- A schema is created complete (CREATE SCHEMA, every table, the format marker) in one transaction: a
  schema without tables was emptied, never just created, and is refused like an empty state.db.
- Every failure of the database (down, authentication, permission, full, read-only, a lock held too
  long, a lost connection) is one ``StateError`` line saying what to do; Ctrl-C cancelling a statement
  is ``KeyboardInterrupt``; anything else (a constraint, a bug) keeps its psycopg exception.
- A password is never taken from the URL (it would be in the shell's history and ``ps``): libpq's
  ``PGPASSWORD`` or ``~/.pgpass`` give it.
- One connection, autocommit: statements outside ``begin``/``commit`` commit on their own, as
  SQLite's do. Row waits are bounded (``LOCK_TIMEOUT_S``, SQLite's busy timeout).
- ``begin`` is a plain BEGIN, not SQLite's one-writer BEGIN IMMEDIATE: what must not interleave
  (``serial``, ``current_plan``, a run's records) is already under the apply lock, and everything else
  is an upsert PostgreSQL's row locks keep whole; so a ``plan`` (the scan cache, timestamps) can run
  while an apply holds the lock, where SQLite makes it wait.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from ..errors import LockedError, StateError
from ..statedb import Database, Opener, Rows
from .pgerror import reported, said

DEFAULT_SCHEMA = "xnatmigrate"
LOCK_TIMEOUT_S = 30  # a row another transaction holds: as long as SQLite waits for its file
KEEPALIVE_S = (
    60  # a connection whose host vanished is dropped by the server (its locks freed) after about this
)
_SCHEMA_NAME = re.compile(r"(?!pg_)[a-z_][a-z0-9_]{0,62}\Z")
_HOLDER_KEY = "apply_lock"  # meta: who holds the apply lock (read by whoever is refused)

# BIGINT for INTEGER (sizes, nanoseconds), BYTEA where SQLite may hold a BLOB (statedb.db_text), and the
# C collation for the columns ``sessions()`` orders by, so the order is SQLite's (bytes, code points).
_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scan_cache (
    path BYTEA PRIMARY KEY, size BIGINT NOT NULL, mtime_ns BIGINT NOT NULL,
    keywords TEXT NOT NULL, transfer_syntax TEXT, header TEXT, reject BYTEA,
    ctime_ns BIGINT, ino BIGINT, digest TEXT, head_digest TEXT);
CREATE TABLE IF NOT EXISTS timestamps (
    project TEXT NOT NULL, session TEXT NOT NULL, study_uid TEXT NOT NULL, timestamp TEXT NOT NULL,
    PRIMARY KEY (project, session, study_uid));
CREATE TABLE IF NOT EXISTS sessions (
    action_id TEXT PRIMARY KEY, plan_id TEXT NOT NULL, method TEXT NOT NULL, project TEXT COLLATE "C",
    subject TEXT, session TEXT COLLATE "C" NOT NULL, study_uid TEXT COLLATE "C" NOT NULL,
    timestamp TEXT NOT NULL, session_dir TEXT, url TEXT, prearchive_uri TEXT NOT NULL, row_json TEXT,
    files BIGINT NOT NULL, bytes BIGINT NOT NULL, sources_json TEXT NOT NULL, status TEXT NOT NULL,
    updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    id BIGSERIAL PRIMARY KEY, action_id TEXT NOT NULL, step TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS steps_action ON steps (action_id, step);
CREATE TABLE IF NOT EXISTS files (
    action_id TEXT NOT NULL, dest BYTEA NOT NULL, source BYTEA NOT NULL, size BIGINT NOT NULL,
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
    plan_id TEXT NOT NULL, seq INTEGER NOT NULL, line BYTEA NOT NULL, PRIMARY KEY (plan_id, seq));
"""
TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _DDL))


@dataclass(frozen=True)
class StateUrl:
    """A ``--state-url`` taken apart: what libpq gets, the schema, and where (for messages)."""

    dsn: str
    schema: str
    where: str


def parse_state_url(url: str) -> StateUrl:
    """``postgresql://[user@]host[:port]/dbname[?schema=NAME&libpq-parameters]``; StateError if not.

    A password in it (``user:secret@`` or ``?password=``) is refused, as manifests refuse it in DSNs.
    """
    if not re.match(r"postgres(ql)?://", url):
        scheme = url.split("://", 1)[0] if "://" in url else "no scheme"
        raise StateError(
            f"--state-url must be a postgresql:// URL (postgresql://user@host/dbname?schema=NAME), not "
            f"{scheme}; for the state in a directory pass --state-dir instead"
        )
    try:
        parts = urlsplit(url)
        has_password = bool(parts.password)
    except ValueError as exc:
        raise StateError(f"--state-url is not a valid URL ({exc}); fix it, then rerun") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
        raise StateError(f"--state-url is not a URL libpq accepts ({first}); fix it, then rerun") from None
    if has_password or params.get("password"):
        raise StateError(
            "the state URL holds a password; keep passwords out of command lines and URLs: remove it "
            "and use PGPASSWORD or ~/.pgpass (libpq reads both)"
        )
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.match(schema):
        raise StateError(
            f"the state schema {schema!r} (?schema= in --state-url) is not a plain PostgreSQL name: use "
            "lower-case letters, digits and _, at most 63, not starting with a digit or pg_"
        )
    host = params.get("host") or "local socket"
    where = f"{params.get('dbname') or params.get('user') or '?'} on {host}:{params.get('port') or '5432'}"
    return StateUrl(dsn, schema, where)


def lock_key(schema: str, kind: str = "apply") -> int:
    """The advisory lock key of one ledger: never one fixed key for every migration.

    Derivation: the first 8 bytes of SHA-256 over ``b"xnatmigrate\\0" + kind + b"\\0" + schema``, as a
    signed 64-bit integer (``pg_try_advisory_lock(bigint)``). PostgreSQL scopes advisory locks to the
    current database, so the key need name only the schema: two ledgers (schemas) never block each
    other, and nothing else in that database that uses advisory locks is likely to collide (2^-64).

    The key names the ledger, not the plan or manifest, on purpose: a ledger has one ``serial`` and one
    ``current_plan``, so two plans applied into one schema at once would each make the other stale
    mid-run (the SQLite ledger likewise has one lock per state directory). Each migration (plan or
    manifest) gets its own lock by getting its own schema (``?schema=`` in ``--state-url``).
    """
    digest = hashlib.sha256(b"xnatmigrate\0" + kind.encode() + b"\0" + schema.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def opener(url: str) -> Opener:
    """The ``StateStore`` opener for ``url``; the URL is checked now (a password is refused at once)."""
    target = parse_state_url(url)
    return lambda create, write_schema: PgDatabase.open(target, create, write_schema)


def state_error(exc: psycopg.Error, where: str, schema: str) -> BaseException:
    """The one line for a failure of the state database; KeyboardInterrupt for a statement cancelled
    as Ctrl-C cancels it; else ``exc``."""
    code = exc.sqlstate or ""
    first = reported(exc) or type(exc).__name__
    kept = "every step recorded before this one is kept"
    if isinstance(exc, psycopg.errors.QueryCanceled) and "user request" in first:
        return KeyboardInterrupt()
    if code == "42501" or code.startswith("28"):
        return StateError(
            f"no permission in the state database {where} ({first}): its user needs CREATE on the "
            f"database (or a schema {schema} made for it) and all rights in that schema; grant them, "
            "then rerun"
        )
    if code.startswith("53"):
        return StateError(
            f"the state database {where} is out of resources ({first}); free disk space (or raise the "
            f"limit) on its server, then rerun: {kept}"
        )
    if code == "55P03":
        return StateError(
            f"the state schema {schema} in {where} stayed locked by another process for "
            f"{LOCK_TIMEOUT_S} s ({first}); wait for it to finish, then rerun"
        )
    if code == "25P02":  # a statement before, in this transaction, failed (or was cancelled)
        return StateError(
            f"a statement on the state schema {schema} in {where} failed inside a transaction, so "
            f"nothing of it was recorded ({first}); rerun: {kept}"
        )
    if code == "57014":  # the server's statement_timeout (Ctrl-C was caught above)
        return StateError(
            f"a statement on the state schema {schema} in {where} ran longer than the server's "
            f"statement_timeout ({first}); raise it for this user (ALTER ROLE … SET statement_timeout), "
            f"then rerun: {kept}"
        )
    if code in ("40001", "40P01"):
        return StateError(
            f"a write to the state schema {schema} in {where} collided with another process ({first}); "
            f"rerun: {kept}"
        )
    if code == "25006":
        return StateError(
            f"the state database {where} is read-only ({first}): point --state-url at the primary "
            "server, then rerun"
        )
    if code.startswith("58") or code.startswith("XX"):
        return StateError(
            f"the state database {where} failed ({first}); check its server's disk and log, then rerun: {kept}"
        )
    if (
        code.startswith(("08", "57"))
        or isinstance(exc, psycopg.InterfaceError)
        or (isinstance(exc, psycopg.OperationalError) and not code)
    ):
        return StateError(
            f"the connection to the state database {where} failed ({first}); rerun when it is back: {kept}"
        )
    return exc


@functools.lru_cache(maxsize=256)
def _pg(statement: str) -> str:
    """The ledger's dialect (``?`` placeholders) as psycopg's (``%s``, a literal ``%`` doubled)."""
    return statement.replace("%", "%%").replace("?", "%s")


class _Rows:
    """A psycopg cursor whose fetches turn failures of the database into their StateError."""

    __slots__ = ("_cur", "_fail")

    def __init__(self, cur: psycopg.Cursor[TupleRow], fail: Callable[[psycopg.Error], BaseException]):
        self._cur, self._fail = cur, fail

    def fetchone(self) -> Any:
        try:
            return self._cur.fetchone()
        except psycopg.Error as exc:
            raise self._fail(exc) from None

    def fetchall(self) -> list[Any]:
        try:
            return self._cur.fetchall()
        except psycopg.Error as exc:
            raise self._fail(exc) from None

    def fetchmany(self, size: int, /) -> list[Any]:
        try:
            return self._cur.fetchmany(size)
        except psycopg.Error as exc:
            raise self._fail(exc) from None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class PgDatabase:
    """One connection to the ledger's schema (``search_path`` set to it)."""

    errors: tuple[type[Exception], ...] = (psycopg.Error,)
    start_over = "drop the schema to start over deliberately"

    def __init__(self, conn: psycopg.Connection[TupleRow], target: StateUrl) -> None:
        self.conn = conn
        self.target = target
        self.schema = target.schema
        self.name = f"the state schema {target.schema} in {target.where}"
        self._locked = ""  # "", "exclusive" or "shared"

    @classmethod
    def open(cls, target: StateUrl, create: bool, write_schema: Callable[[Database], None]) -> PgDatabase:
        try:
            conn = psycopg.connect(
                target.dsn,
                autocommit=True,
                connect_timeout=10,
                application_name="xnatmigrate state",
                # This end probes the link too (the server's probes are set below): a cut network
                # surfaces as a lost connection within about KEEPALIVE_S, not a statement that hangs.
                keepalives=1,
                keepalives_idle=KEEPALIVE_S // 2,
                keepalives_interval=KEEPALIVE_S // 6,
                keepalives_count=3,
                tcp_user_timeout=KEEPALIVE_S * 1000,
            )
        except psycopg.OperationalError as exc:
            first = said(exc) or "no answer"
            raise StateError(
                f"cannot connect to the state database ({target.where}): {first}; check that PostgreSQL "
                "is running and --state-url (or $XNATMIGRATE_STATE_URL; a password goes in PGPASSWORD or "
                "~/.pgpass), then rerun (nothing was written)"
            ) from None
        db = cls(conn, target)
        try:
            # The server probes this connection when idle (TCP keepalives, ignored on a Unix socket): a
            # host that vanished without closing it (power cut) frees its apply lock within about
            # KEEPALIVE_S, not after the operating system's two hours.
            db.execute(
                sql.SQL(
                    "SET search_path TO {}; SET lock_timeout = '{}s'; SET tcp_keepalives_idle = {}; "
                    "SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = 3"
                )
                .format(
                    sql.Identifier(target.schema),
                    sql.SQL(str(LOCK_TIMEOUT_S)),
                    sql.SQL(str(KEEPALIVE_S // 2)),
                    sql.SQL(str(KEEPALIVE_S // 6)),
                )
                .as_string(conn)
            )
            if not db._schema_exists():
                if not create:
                    raise StateError(
                        f"no state in {db.name}: run `xnatmigrate plan MANIFEST --state-url …` first "
                        "(or check ?schema= in --state-url)"
                    )
                db._create(write_schema)
        except BaseException:
            db.close()
            raise
        return db

    def _schema_exists(self) -> bool:
        return (
            self.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.schema,)).fetchone()
            is not None
        )

    def _create(self, write_schema: Callable[[Database], None]) -> None:
        """The schema and every table with its format marker, in one transaction: complete or absent."""
        self.begin()
        try:
            self.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)).as_string(self.conn))
            write_schema(self)
            self.commit()
        except psycopg.errors.DuplicateSchema:
            self.rollback()  # created meanwhile by another process, complete (the same transaction there)
        except BaseException:
            with _suppressed():
                self.rollback()
            raise

    def _fail(self, exc: psycopg.Error) -> BaseException:
        return state_error(exc, self.target.where, self.schema)

    # -- statements and transactions ----------------------------------------------------------

    def execute(self, statement: str, params: Sequence[Any] = (), /) -> Rows:
        cur = self.conn.cursor()
        try:
            cur.execute(_pg(statement), tuple(params))
        except psycopg.Error as exc:
            raise self._fail(exc) from None
        return _Rows(cur, self._fail)

    def executemany(self, statement: str, rows: Iterable[Sequence[Any]], /) -> None:
        """The statement once per row, pipelined: psycopg prepares it on the server once (parsed and
        planned once: the scan cache writes 100,000s of rows) and sends the rows without waiting for
        each answer."""
        cur = self.conn.cursor()
        try:
            cur.executemany(_pg(statement), rows)
        except psycopg.Error as exc:
            raise self._fail(exc) from None

    def begin(self) -> None:
        self.execute("BEGIN")

    def commit(self) -> None:
        """COMMIT, never taken for one when PostgreSQL would roll back instead (a statement of this
        transaction failed, e.g. cancelled by Ctrl-C): then it rolls back and says so."""
        if self.conn.info.transaction_status == TransactionStatus.INERROR:
            with _suppressed():
                self.rollback()
            raise StateError(
                f"a statement on {self.name} failed inside a transaction, so nothing of it was "
                "recorded; rerun: every step recorded before it is kept"
            )
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def savepoint(self, name: str) -> None:
        self.execute(f"SAVEPOINT {name}")

    def release(self, name: str) -> None:
        self.execute(f"RELEASE SAVEPOINT {name}")

    def rollback_to(self, name: str) -> None:
        self.execute(f"ROLLBACK TO SAVEPOINT {name}")

    def tables(self) -> set[str]:
        rows = self.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ? AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            (self.schema,),
        )
        return {r[0] for r in rows}

    def write_tables(self) -> None:
        # Only when one is missing: CREATE … IF NOT EXISTS needs CREATE on the schema even when the
        # table is there, and reading the ledger (status, verify) needs no more than the tables' rights.
        if not TABLES.issubset(self.tables()):
            for stmt in _DDL.strip().split(";"):
                if stmt.strip():
                    self.execute(stmt)

    def fs_text(self, text: str | None, /) -> bytes | None:
        return None if text is None else os.fsencode(text)

    # -- the apply lock -------------------------------------------------------------------------

    def lock(self, holder: str, *, shared: bool = False) -> None:
        """A session-level advisory lock on ``lock_key(schema)``, held until ``unlock`` or until this
        connection ends (a killed process's lock goes with its connection), or LockedError naming the
        holder (the ``apply_lock`` row of ``meta``, written by each holder). ``shared``: the fleet's
        workers (``execute.fleet.join``) hold it together; an exclusive holder (revert) excludes them."""
        key = lock_key(self.schema)
        take = "SELECT pg_try_advisory_lock_shared(?)" if shared else "SELECT pg_try_advisory_lock(?)"
        # A holder killed a moment ago: its server process may take a moment to notice and end.
        for attempt in range(6):
            if self.execute(take, (key,)).fetchone()[0]:
                break
            if attempt < 5:
                time.sleep(0.2)
        else:
            row = self.execute("SELECT value FROM meta WHERE key = ?", (_HOLDER_KEY,)).fetchone()
            who = row[0] if row and row[0] else "another process"
            raise LockedError(
                f"{self.name} is in use by {who}; wait for it to finish (or, if that process is gone, "
                f"rerun: the lock ends with its holder's connection, within about {KEEPALIVE_S} s of a "
                "host that vanished)"
            )
        self._locked = "shared" if shared else "exclusive"
        try:
            self.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (_HOLDER_KEY, holder),
            )
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        if self._locked:
            release = (
                "SELECT pg_advisory_unlock_shared(?)"
                if self._locked == "shared"
                else "SELECT pg_advisory_unlock(?)"
            )
            self._locked = ""
            with _suppressed():
                self.execute(release, (lock_key(self.schema),))

    def close(self) -> None:
        self.unlock()
        with _suppressed():
            self.conn.close()


def _suppressed() -> contextlib.suppress:
    return contextlib.suppress(psycopg.Error, StateError)
