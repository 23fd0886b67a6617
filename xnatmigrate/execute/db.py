"""XNAT's PostgreSQL: connect, check the table profile, read facts, insert rows.

Invariants:
- Every statement comes from ``render`` (templates in ``sql/``) and runs with bind parameters, bound
  on the client (``psycopg.ClientCursor``): a group's locks and INSERTs go as one text in one round
  trip, which server-side binding refuses (one statement per prepared query).
- Connection and query failures become one-line ``DatabaseError``s that say what to do.
- Rows are written under a transaction-scoped advisory lock per session, one transaction per group
  of sessions (``insert_rows``); a failed transaction inserts none of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import psycopg
import psycopg.conninfo
import psycopg.errors
from psycopg.rows import TupleRow

from .. import statements, xnat_table
from ..errors import DatabaseError, SessionConflict, XnatMigrateError
from ..model import DatabaseTarget, ExistingRow, Outcome, PrearchiveSession
from ..render import Statement, batched
from . import settings
from .pgerror import reported, said

Connection: TypeAlias = psycopg.Connection[TupleRow]
Cursor: TypeAlias = psycopg.Cursor[TupleRow]


def resolve_dsn(target: DatabaseTarget | None) -> str:
    if target is None:
        raise DatabaseError("the manifest has no xnat.database; add dsn or dsn_env")
    if target.dsn:
        return target.dsn
    assert target.dsn_env
    value = os.environ.get(target.dsn_env)
    if not value:
        raise DatabaseError(
            f"environment variable {target.dsn_env} (xnat.database.dsn_env) is not set; export the DSN"
        )
    return value


def _where(dsn: str) -> str:
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the configured database"
    host = params.get("host", "local socket")
    return f"{params.get('dbname', '?')} on {host}:{params.get('port', '5432')}"


# Waits on the database are bounded (a lock held by another transaction must not hang a run for
# days) and interruptible: psycopg waits without blocking signals, and on Ctrl-C it cancels the
# running statement on the server and raises KeyboardInterrupt instead of waiting for it to return.
LOCK_TIMEOUT_ENV = settings.DB_LOCK_TIMEOUT[0]
STATEMENT_TIMEOUT_ENV = settings.DB_STATEMENT_TIMEOUT[0]


def _seconds(setting: tuple[str, float]) -> float:
    try:
        return settings.positive(setting)
    except XnatMigrateError as exc:
        raise DatabaseError(str(exc)) from None


@contextlib.contextmanager
def connect(dsn: str, timeout: int = 10) -> Iterator[Connection]:
    """A connection that is always closed, with bounded lock and statement waits; failures become DatabaseError.

    Not autocommit: statements run in a transaction that ``transaction`` commits or rolls back.
    """
    lock_ms = int(_seconds(settings.DB_LOCK_TIMEOUT) * 1000)
    statement_ms = int(_seconds(settings.DB_STATEMENT_TIMEOUT) * 1000)
    try:
        conn = psycopg.connect(
            dsn,
            cursor_factory=psycopg.ClientCursor,
            connect_timeout=timeout,
            application_name="xnatmigrate",
            options=f"-c lock_timeout={lock_ms} -c statement_timeout={statement_ms}",
        )
    except psycopg.OperationalError as exc:
        first = said(exc) or "no answer"
        raise DatabaseError(
            f"cannot connect to XNAT's database ({_where(dsn)}): {first}; check that PostgreSQL "
            "is running and xnat.database, then rerun (nothing was written)"
        ) from None
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@contextlib.contextmanager
def transaction(conn: Connection) -> Iterator[Cursor]:
    """A cursor whose statements are one transaction: committed when the block ends, rolled back when
    it raises. The connection stays open (psycopg's own ``with conn`` closes it).

    NOTE: a connection the server closed has no transaction left to roll back; the error that ended
    the block is the one raised, not a second one from the rollback.
    """
    with conn.cursor() as cur:
        try:
            yield cur
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        conn.commit()


def execute(cur: Cursor, stmt: Statement) -> None:
    """The executing side of the SQL chokepoint (render.to_sql_text is the printing side)."""
    try:
        cur.execute(stmt.sql, dict(stmt.params))
    except psycopg.errors.LockNotAvailable:
        raise DatabaseError(
            f"{stmt.name} waited {_seconds(settings.DB_LOCK_TIMEOUT):g} s for a lock that another "
            "transaction holds on xdat_search.prearchive; find it in pg_locks/pg_stat_activity and let it "
            f"finish (or raise {LOCK_TIMEOUT_ENV}), then rerun"
        ) from None
    except psycopg.errors.QueryCanceled as exc:
        if "user request" in str(exc):
            raise KeyboardInterrupt from None  # a cancel request, what Ctrl-C sends (pg_cancel_backend too)
        raise DatabaseError(
            f"{stmt.name} ran longer than {_seconds(settings.DB_STATEMENT_TIMEOUT):g} s in "
            f"XNAT's database and was cancelled; check the server's load (or raise {STATEMENT_TIMEOUT_ENV}), "
            "then rerun"
        ) from None
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"the database connection failed during {stmt.name}: {said(exc)}; "
            "rerun when it is back (the step resumes)"
        ) from None
    except psycopg.Error as exc:
        raise DatabaseError(f"{stmt.name} failed in XNAT's database: {reported(exc)}") from None


# --------------------------------------------------------------------------------------------
# Facts for the planner
# --------------------------------------------------------------------------------------------


def table_profile(cur: Cursor) -> tuple[str | None, str | None]:
    """(profile, None) when the live table matches a known profile, else (None, why not)."""
    execute(cur, statements.table_profile())
    rows = cur.fetchall()
    if not rows:
        return None, (
            "xdat_search.prearchive does not exist in this database; is xnat.database XNAT's database?"
        )
    live = [(name, dtype, nullable == "YES") for name, dtype, nullable, _ in rows]
    if live != list(xnat_table.COLUMNS):
        expected = {c[0]: c for c in xnat_table.COLUMNS}
        diffs = [f"{n} {t}{'' if nl else ' NOT NULL'}" for n, t, nl in live if expected.get(n) != (n, t, nl)]
        missing = sorted(set(expected) - {c[0] for c in live})
        return None, (
            "the columns of xdat_search.prearchive match no known XNAT profile (1.7, 1.8.2): "
            f"unexpected {', '.join(diffs) or 'order'}; missing {', '.join(missing) or 'none'} — "
            "this XNAT version is not supported yet"
        )
    return ("1.8.2" if rows[0][3] else "1.7"), None


def existing_rows(cur: Cursor, tags: Sequence[str]) -> tuple[ExistingRow, ...]:
    execute(cur, statements.rows_by_tag(tags))
    return tuple(ExistingRow(*r) for r in cur.fetchall())


def used_timestamps(cur: Cursor) -> frozenset[str]:
    execute(cur, statements.used_timestamps())
    return frozenset(r[0] for r in cur.fetchall())


def archived_labels(cur: Cursor, projects: Iterable[str]) -> frozenset[tuple[str, str]] | None:
    """(project, label) of archived sessions, or None when XNAT's tables are not in this database."""
    cur.execute(
        "SELECT to_regclass('xnat_experimentdata') IS NOT NULL "
        "AND to_regclass('xnat_experimentdata_share') IS NOT NULL"
    )
    found = cur.fetchone()
    if not found or not found[0]:
        return None
    execute(cur, statements.archived_sessions(projects))
    return frozenset((p, label) for p, label in cur.fetchall())


def fetch_row(cur: Cursor, project: str | None, timestamp: str, foldername: str) -> dict[str, Any] | None:
    execute(cur, statements.fetch_row(project, timestamp, foldername))
    row = cur.fetchone()
    return dict(zip(xnat_table.COLUMN_NAMES, row)) if row else None


# --------------------------------------------------------------------------------------------
# Acting
# --------------------------------------------------------------------------------------------


def insert_row(conn: Connection, session: PrearchiveSession) -> Outcome:
    """Insert the session's row in one transaction: done, or noop when it is already there (ours).

    Raises SessionConflict when XNAT holds another session of this study (the guard inserted
    nothing and the row is not ours).
    """
    (outcome,) = insert_rows(conn, [session])
    if isinstance(outcome, SessionConflict):
        raise outcome
    return outcome


def insert_rows(conn: Connection, sessions: Sequence[PrearchiveSession]) -> list[Outcome | SessionConflict]:
    """The rows of a group of sessions in one transaction (one commit, one WAL flush, for them all).

    Per session, in the order given: done, noop (the row is already ours), or the SessionConflict
    its guard found (nothing inserted for it; the others are unaffected). Each row keeps its own
    guard and advisory lock; the locks are taken in key order, so two writers never deadlock.
    Raises DatabaseError, with nothing inserted at all, when the transaction fails.
    """
    keyed = sorted(
        range(len(sessions)),
        key=lambda i: statements.lock_key(sessions[i].project, sessions[i].timestamp, sessions[i].session),
    )
    try:
        with transaction(conn) as cur:
            # Every lock and guarded INSERT of the group in one round trip, then one read-back of what
            # they did: per session, written now (done), there before (ours: noop) or held back by guard 2.
            execute(cur, batched([statements.insert_session(sessions[i]) for i in keyed]))
            execute(cur, statements.inserted_rows(sessions))
            found: dict[int, tuple[bool, bool]] = {}
            for i, present, inserted in cur.fetchall():  # a row each; more where duplicates stand (1.7)
                was = found.get(int(i), (False, False))
                found[int(i)] = (was[0] or bool(present), was[1] or bool(inserted))
    except psycopg.OperationalError as exc:  # the COMMIT itself
        what = sessions[0].prearchive_uri + (f" and {len(sessions) - 1} more" if len(sessions) > 1 else "")
        raise DatabaseError(
            f"the database connection failed while inserting {what}: "
            f"{said(exc)}; rerun when it is back (the step resumes)"
        ) from None
    return [_outcome(s, *found.get(i, (False, False))) for i, s in enumerate(sessions)]


def _outcome(session: PrearchiveSession, present: bool, inserted: bool) -> Outcome | SessionConflict:
    if inserted:
        return Outcome.DONE
    if present:
        return Outcome.NOOP
    return SessionConflict(
        f"XNAT's prearchive gained another session of study {session.study_uid} as "
        f"{session.project_label}/{session.session} since the plan; the row was not inserted: "
        "re-run `xnatmigrate plan` to see it"
    )


def check_insertable(conn: Connection, session: PrearchiveSession) -> bool:
    """Before publishing: True when the row is already ours; raises DatabaseError when it cannot be written.

    Checked before the folder enters XNAT's view, so a refusal leaves nothing visible to XNAT.
    """
    (got,) = check_insertable_many(conn, [session])
    if isinstance(got, XnatMigrateError):
        raise got
    return got


def check_insertable_many(
    conn: Connection, sessions: Sequence[PrearchiveSession]
) -> list[bool | XnatMigrateError]:
    """``check_insertable`` for a group in one read-only transaction (one round of BEGIN/COMMIT).

    Per session, in order: True (the row is ours), False (it can be inserted), or the error that
    ``check_insertable`` would raise for it. A failure of the transaction itself (a dead connection,
    a timeout) is every session's answer: none of them was checked.
    """
    out: list[bool | XnatMigrateError] = []
    if not sessions:
        return out
    try:
        with transaction(conn) as cur:
            execute(cur, statements.preflight_inserts(sessions))
            found = {int(r[0]): r[1:] for r in cur.fetchall()}
            out = [_insertable(session, *found[i]) for i, session in enumerate(sessions)]
    except DatabaseError as exc:
        return [exc] * len(sessions)
    except psycopg.OperationalError as exc:  # the COMMIT itself
        err = DatabaseError(
            f"the database connection failed while checking rows: {said(exc)}; "
            "rerun when it is back (the step resumes)"
        )
        return [err] * len(sessions)
    return out


def _insertable(
    session: PrearchiveSession, can_insert: bool, mine: bool, conflict: str | None
) -> bool | XnatMigrateError:
    if mine:
        return True
    if not can_insert:
        return DatabaseError(
            f"the database user may not INSERT into xdat_search.prearchive, so {session.prearchive_uri} "
            "cannot get its row; GRANT INSERT ON xdat_search.prearchive to it (or use XNAT's user), then "
            "rerun (the session is staged, not published)"
        )
    if conflict:
        return SessionConflict(
            f"XNAT's prearchive gained another session of study {session.study_uid} as "
            f"{session.project_label}/{conflict} since the plan, so the row of {session.prearchive_uri} would "
            "not be written; the session is staged, not published: re-run `xnatmigrate plan` to see it"
        )
    return False


def release_row(conn: Connection, session: PrearchiveSession) -> int:
    """After the tool's REST build: let XNAT's scheduler handle later data of the session (rows changed)."""
    with transaction(conn) as cur:
        execute(cur, statements.release_row(session.project, session.timestamp, session.session))
        return int(cur.rowcount)


def delete_row(conn: Connection, project: str | None, timestamp: str, foldername: str) -> int:
    with transaction(conn) as cur:
        execute(cur, statements.delete_row(project, timestamp, foldername))
        return int(cur.rowcount)
