"""The SQL chokepoint against real PostgreSQL: printed == executed, guards, hostile values."""

import re
import shutil
import subprocess
from datetime import datetime
from typing import Any

import psycopg
import pytest

from tests.unit.test_planner import FakeState, header, manifest, src
from xnatmigrate import labels, statements
from xnatmigrate.errors import SessionConflict
from xnatmigrate.execute import db
from xnatmigrate.model import XnatFacts
from xnatmigrate.planner import build_plan
from xnatmigrate.render import Statement, literal, to_sql_text

HOSTILE = [
    "O'Brien",
    "back\\slash",
    "two\\\\ and ' quotes ''",
    "Ünïcødé 日本語 𝄞",
    "line\nbreak\ttab",
    "'); DROP TABLE xdat_search.prearchive; --",
    "$$ dollar $$",
    "%(project)s and %s",
]


def psycopg_spelling(value: Any) -> str:
    """How psycopg's client-side binding spells a value: as ``literal`` (plan.sql) does, but for a
    string holding a backslash (E'…', each backslash doubled) and a negative number, each written
    after a space. The server reads both spellings as the same value (tested below)."""
    ours = literal(value)
    if isinstance(value, str) and "\\" in value:
        return " E" + ours.replace("\\", "\\\\")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return " " + ours
    return ours


def sent_text(stmt: Statement) -> str:
    """``to_sql_text(stmt)`` with every value as psycopg spells it: what apply sends for ``stmt``."""
    return re.sub(r"%\((\w+)\)s", lambda m: psycopg_spelling(stmt.params[m.group(1)]), stmt.sql)


def plan_for(values: dict, n: int = 1, study: str = "1.2."):
    hs = [header(f"/src/{i}", study=f"{study}{i}", PatientID=f"P{i}", **values) for i in range(n)]
    m = manifest(src(subject="{{ PatientName }}"))
    return build_plan(m, [(0, h) for h in hs], [], FakeState(), XnatFacts(), datetime(2024, 1, 31, 10, 0, 0))


def rows(dsn):
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT project, timestamp, foldername, name, subject, tag, status, url, "
            "prevent_anon, prevent_auto_commit, autoarchive, source, scan_date, lastmod "
            "FROM xdat_search.prearchive ORDER BY timestamp"
        )
        return cur.fetchall()


@pytest.mark.parametrize("value", [*HOSTILE, -(2**63), -1, 0, 2**63 - 1, None, True, False])
def test_literal_reads_back_as_the_drivers_quoting_does(pg_db_17, value):
    with db.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        driver = cur.mogrify("%s", (value,))
        assert driver == psycopg_spelling(value)
        cur.execute(f"SELECT {literal(value)}, {driver}")
        assert cur.fetchone() == (value, value)


def test_printed_statements_equal_executed_ones(pg_dsn):
    # The study UID reaches the INSERT as the header has it: a backslash and a quote are spelled there.
    p = plan_for({"PatientName": "O'Brien^Jo\\hn"}, study="1.2.\\'")
    stmts = statements.insert_session(p.sessions[0])
    with db.connect(pg_dsn.dsn) as conn, conn.cursor() as cur:
        sent = [cur.mogrify(stmt.sql, dict(stmt.params)) for stmt in stmts]
    # The driver sends the printed text but for each value's spelling (read back equal above).
    assert sent == [sent_text(stmt) for stmt in stmts]
    assert " E'1.2.\\\\''0'" in sent[-1] and "'1.2.\\''0'" in to_sql_text(stmts[-1])


def test_insert_row_and_guards(pg_dsn):
    p = plan_for({})
    s = p.sessions[0]
    with db.connect(pg_dsn.dsn) as conn:
        assert db.insert_row(conn, s) == "done"
        assert db.insert_row(conn, s) == "noop"
    (r,) = rows(pg_dsn.dsn)
    assert r[:8] == ("prj001", s.timestamp, "P0_MR", "P0_MR", "DOE_JOHN", "1.2.0", "RECEIVING", s.url)
    assert r[8] is False and r[9] is True and r[10:12] == ("Manual", "xnatmigrate")
    assert r[12] == datetime(2013, 12, 11, 15, 18, 18) and r[13] is not None


def test_guard_refuses_merging_into_another_session_of_the_study(pg_dsn):
    s = plan_for({}).sessions[0]
    with psycopg.connect(pg_dsn.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url) "
            "VALUES ('prj001', '20200101_000000000', 'P0_MR', 'P0_MR', '1.2.0', 'READY', '/x')"
        )
    with (
        db.connect(pg_dsn.dsn) as conn,
        pytest.raises(SessionConflict, match="another session of study 1.2.0"),
    ):
        db.insert_row(conn, s)
    assert len(rows(pg_dsn.dsn)) == 1


def test_a_group_of_rows_in_one_round_trip_reports_each_sessions_own_outcome(pg_dsn):
    """insert_rows sends the group's locks and INSERTs as one text, then reads back per session what
    they did: one inserted now, one there before (ours), one held back by another session of its study;
    the preflight of the same group answers per session in one statement too."""
    p = plan_for({"PatientName": "O'Brien"}, n=4)
    old, new, blocked, fourth = p.sessions[:4]
    with db.connect(pg_dsn.dsn) as conn:
        assert db.insert_row(conn, old) == "done"
    with psycopg.connect(pg_dsn.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url) "
            "VALUES ('prj001', '20200101_000000000', %s, %s, %s, 'READY', '/x')",
            (blocked.session, blocked.row["name"], blocked.study_uid),
        )
    group = [new, old, blocked, fourth]
    with db.connect(pg_dsn.dsn) as conn:
        checked = db.check_insertable_many(conn, group)
        assert checked[:2] == [False, True]
        assert isinstance(checked[2], SessionConflict) and checked[3] is False
        got = db.insert_rows(conn, group)
    assert got[0] == "done" and got[1] == "noop" and got[3] == "done"
    assert isinstance(got[2], SessionConflict) and blocked.study_uid in str(got[2])
    assert sorted(r[2] for r in rows(pg_dsn.dsn)) == sorted(
        [old.session, new.session, blocked.session, fourth.session]
    )
    with db.connect(pg_dsn.dsn) as conn:  # again: every row is ours now, nothing written twice
        again = db.insert_rows(conn, group)
    assert again[0] == again[1] == again[3] == "noop" and isinstance(again[2], SessionConflict)
    assert len(rows(pg_dsn.dsn)) == 4


def test_unassigned_guard_holds_without_the_unique_constraint(pg_dsn):
    m = manifest(src(project=None))
    p = build_plan(m, [(0, header("/src/a"))], [], FakeState(), XnatFacts(), datetime(2024, 1, 1))
    with db.connect(pg_dsn.dsn) as conn:
        assert db.insert_row(conn, p.sessions[0]) == "done"
        assert db.insert_row(conn, p.sessions[0]) == "noop"
    assert [r[0] for r in rows(pg_dsn.dsn)] == [None]


def test_the_preflight_finds_conflicts_per_session_among_many_rows_and_for_unassigned(pg_dsn):
    """The group's preflight (one join over the table for all its sessions) names, per session, the
    row of another session of its study: in its project, or among Unassigned rows (project NULL, which
    only IS NOT DISTINCT FROM matches); rows of other projects, studies or labels are no conflict."""
    assigned = plan_for({}, n=3, study="1.2.7.")
    m = manifest(src(project=None))
    hs = [header(f"/src/u{i}", study=f"1.2.8.{i}", PatientID=f"U{i}") for i in range(2)]
    unassigned = build_plan(m, [(0, h) for h in hs], [], FakeState(), XnatFacts(), datetime(2024, 1, 1))
    a0, a1, a2 = assigned.sessions[:3]
    u0, u1 = unassigned.sessions[:2]
    fill = [
        (f"prj{i % 7:03d}", f"2019{i:010d}", f"F{i}", f"N{i}", f"1.9.{i}") for i in range(400)
    ]  # noise: none of these is any session's study
    blockers = [
        ("prj001", "20200101_000000001", "A1", a1.row["name"], a1.study_uid),  # same project: conflict
        ("prj002", "20200101_000000002", "A2", a2.row["name"], a2.study_uid),  # another project: none
        (None, "20200101_000000003", "U1", u1.row["name"], u1.study_uid),  # Unassigned: conflict
        ("prj001", "20200101_000000004", "U0", u0.row["name"], u0.study_uid),  # u0 is Unassigned: none
    ]
    with psycopg.connect(pg_dsn.dsn) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url) "
            "VALUES (%s, %s, %s, %s, %s, 'READY', '/x')",
            fill + blockers,
        )
    assert a1.project == "prj001" and u1.project is None
    with db.connect(pg_dsn.dsn) as conn:
        checked = db.check_insertable_many(conn, [a0, a1, a2, u0, u1])
    assert checked[0] is False and checked[2] is False and checked[3] is False
    assert isinstance(checked[1], SessionConflict) and a1.study_uid in str(checked[1])
    assert isinstance(checked[4], SessionConflict) and u1.study_uid in str(checked[4])


@pytest.mark.skipif(
    shutil.which("psql") is None, reason="psql not installed; .ci/run installs postgresql-client"
)
def test_plan_sql_runs_twice_under_psql_with_hostile_values(pg_dsn, tmp_path):
    # Labels are sanitised, but the tag (StudyInstanceUID) is written as the header has it.
    hostile = "'); DROP TABLE xdat_search.prearchive; --\\ Ünï $$ %s "
    p = plan_for({"PatientName": hostile}, n=3, study=hostile)
    sql = tmp_path / "plan.sql"
    sql.write_text(statements.plan_script(p))
    for _ in range(2):
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(sql), pg_dsn.dsn],
            check=True,
            capture_output=True,
        )
    got = rows(pg_dsn.dsn)
    assert len(got) == 3
    assert sorted(r[5] for r in got) == [f"{hostile}{i}" for i in range(3)]
    # The trailing space is DICOM padding, trimmed with the value; toLabelChars itself trims nothing.
    assert {r[4] for r in got} == {labels.sanitize(hostile.strip())}


def test_table_profile_detection(pg_dsn):
    with db.connect(pg_dsn.dsn) as conn, conn.cursor() as cur:
        assert db.table_profile(cur) == (pg_dsn.profile, None)
        cur.execute("ALTER TABLE xdat_search.prearchive ADD COLUMN extra varchar")
        profile, why = db.table_profile(cur)
        assert profile is None and "match no known XNAT profile" in why and "extra" in why
        cur.execute("DROP TABLE xdat_search.prearchive")
        assert "does not exist" in db.table_profile(cur)[1]


def test_dead_database_is_one_clear_line():
    with (
        pytest.raises(db.DatabaseError) as exc,
        db.connect("postgresql://nobody@127.0.0.1:1/none", timeout=2),
    ):
        pass
    msg = str(exc.value)
    assert "cannot connect to XNAT's database (none on 127.0.0.1:1)" in msg and "\n" not in msg


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Los_Angeles"])
def test_lastmod_is_written_in_xnats_zone_whatever_the_database_sessions(pg_dsn, monkeypatch, zone):
    """SessionXMLRebuilder compares lastmod with the JVM's clock in the JVM's zone (§9)."""
    from zoneinfo import ZoneInfo

    from xnatmigrate.model import XnatTarget

    m = manifest(src())
    m = m.__class__(**{**m.__dict__, "xnat": XnatTarget(**{**m.xnat.__dict__, "timezone": zone})})
    p = build_plan(m, [(0, header("/src/a"))], [], FakeState(), XnatFacts(), datetime(2024, 1, 31, 10))
    assert p.sessions[0].lastmod_zone == zone
    monkeypatch.setenv("PGTZ", "UTC")  # the database session's zone differs from XNAT's
    with db.connect(pg_dsn.dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("SHOW TimeZone")
            assert cur.fetchone()[0] == "UTC"
        assert db.insert_row(conn, p.sessions[0]) == "done"
    (row,) = rows(pg_dsn.dsn)
    want = datetime.now(ZoneInfo(zone)).replace(tzinfo=None)
    assert abs((row[-1] - want).total_seconds()) < 120  # XNAT's wall clock, not UTC's
    utc = datetime.now(ZoneInfo("UTC")).replace(tzinfo=None)
    assert abs((row[-1] - utc).total_seconds()) > 3600


def test_no_zone_known_keeps_localtimestamp(pg_dsn):
    p = plan_for({})
    assert p.sessions[0].lastmod_zone == ""
    assert "LOCALTIMESTAMP" in statements.insert_session(p.sessions[0])[1].sql
