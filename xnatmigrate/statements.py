"""Every SQL statement the tool runs or prints, built from the templates in ``sql/``.

Pure: no driver import. ``execute/db.py`` executes these; ``plan.sql`` prints the same objects, so
what a reviewer reads is what apply runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

from . import xnat_table
from .model import Plan, PrearchiveSession, shells_of
from .render import Statement, render_script_pieces, render_statement, render_statements

_BOOL_COLUMNS = frozenset({"prevent_anon", "prevent_auto_commit"})


def lock_key(project: str | None, timestamp: str, foldername: str) -> int:
    """A stable signed 64-bit advisory-lock key for one prearchive session."""
    digest = hashlib.sha256(f"xnatmigrate|{project or ''}|{timestamp}|{foldername}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def insert_session(session: PrearchiveSession) -> list[Statement]:
    """The advisory lock and the guarded INSERT for one session (sql/prearchive_insert.sql.j2)."""
    row = dict(session.row)
    return render_statements(
        "prearchive_insert.sql.j2",
        session=session,
        row=row,
        columns=xnat_table.COLUMN_NAMES,
        timestamp_columns=xnat_table.TIMESTAMP_COLUMNS,
        bool_columns=_BOOL_COLUMNS,
        lock_key=lock_key(row["project"], row["timestamp"], row["foldername"]),
        lastmod_zone=session.lastmod_zone,
    )


def preflight_inserts(sessions: Sequence[PrearchiveSession]) -> Statement:
    """Per session (a result row each, by index): can its row be inserted, is it there already, and
    does another session of the study stand in its way. One statement for a whole group."""
    return render_statement("prearchive_preflight.sql.j2", rows=[dict(s.row) for s in sessions])


def inserted_rows(sessions: Sequence[PrearchiveSession]) -> Statement:
    """Inside the transaction of the group's INSERTs: per session (by index), is its row there and did
    this transaction write it."""
    return render_statement("prearchive_inserted.sql.j2", rows=[dict(s.row) for s in sessions])


def table_profile() -> Statement:
    return render_statement("prearchive_profile.sql.j2", constraint=xnat_table.UNIQUE_CONSTRAINT)


def rows_by_tag(tags: Sequence[str]) -> Statement:
    return render_statement("prearchive_rows_by_tag.sql.j2", tags=list(tags))


def used_timestamps() -> Statement:
    return render_statement("prearchive_timestamps.sql.j2")


def archived_sessions(projects: Iterable[str]) -> Statement:
    return render_statement("archived_sessions.sql.j2", projects=sorted(set(projects)))


def fetch_row(project: str | None, timestamp: str, foldername: str) -> Statement:
    return render_statement(
        "prearchive_row.sql.j2",
        columns=xnat_table.COLUMN_NAMES,
        project=project,
        timestamp=timestamp,
        foldername=foldername,
    )


def release_row(project: str | None, timestamp: str, foldername: str) -> Statement:
    """prevent_auto_commit back to false on this tool's row once its REST build is READY."""
    return render_statement(
        "prearchive_release.sql.j2",
        project=project,
        timestamp=timestamp,
        foldername=foldername,
        source=xnat_table.ROW_SOURCE,
    )


def delete_row(project: str | None, timestamp: str, foldername: str) -> Statement:
    return render_statement(
        "prearchive_delete.sql.j2",
        project=project,
        timestamp=timestamp,
        foldername=foldername,
        source=xnat_table.ROW_SOURCE,
    )


def plan_script(plan: Plan) -> str:
    """plan.sql: one transaction holding every statement apply will run, values as literals."""
    return "".join(plan_script_pieces(plan))


def plan_script_pieces(plan: Plan) -> Iterator[str]:
    """``plan_script`` piece by piece: each session's statements rendered as the script gets to
    them, from the sessions without their files (``shells_of``), so plan.sql is written without
    holding it, or the plan, whole. Trailing whitespace is dropped and one newline ends it."""
    shells = shells_of(plan.sessions)
    rows = sum(1 for s in shells if isinstance(s, PrearchiveSession))
    pieces = render_script_pieces(
        "plan.sql.j2",
        plan=plan,
        rows=rows,
        cstore=len(shells) - rows,
        statements=(insert_session(s) for s in shells if isinstance(s, PrearchiveSession)),
    )
    pending = ""  # whitespace not yet known to be trailing
    for piece in pieces:
        text = pending + piece
        kept = text.rstrip()
        if kept:
            yield kept
            pending = text[len(kept) :]
        else:
            pending = text
    yield "\n"
