"""The SQL chokepoint without a database: literals for review scripts, templates that refuse an undefined
name, values only ever as bind parameters, and the statements of a small plan (tests/integration/test_sql.py
proves the same against PostgreSQL's own quoting)."""

import re

import jinja2
import pytest

from tests.unit.test_planner import header, manifest, plan_of, src
from xnatmigrate import statements
from xnatmigrate.errors import XnatMigrateError
from xnatmigrate.render import literal, render_statement, to_sql_text

HOSTILE = [
    "O'Brien",
    "''",
    "back\\slash",
    "trailing backslash \\",
    "'); DROP TABLE xdat_search.prearchive; --",
    "line\nbreak\ttab\r",
    "$$ dollar $$ and $tag$",
    "%(project)s and %s",
    "Ünïcødé 日本語 𝄞",
]
# One standard-conforming string literal: quotes doubled inside, nothing else special (not even "\").
ONE_LITERAL = re.compile(r"'(?:[^']|'')*'", re.DOTALL)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "NULL"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-42, "-42"),
        (1.5, "1.5"),
        ("", "''"),
        ("prj001", "'prj001'"),
        ("O'Brien", "'O''Brien'"),
        ("back\\slash", "'back\\slash'"),  # standard_conforming_strings = on: a backslash is just a backslash
    ],
)
def test_literal(value, text):
    assert literal(value) == text


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_string_stays_one_literal_holding_exactly_the_value(value):
    text = literal(value)
    assert ONE_LITERAL.fullmatch(text), text
    assert text[1:-1].replace("''", "'") == value


def test_nul_and_unknown_types_are_refused():
    with pytest.raises(XnatMigrateError, match="NUL character"):
        literal("a\x00b")
    for value in (b"bytes", [1], object()):
        with pytest.raises(
            XnatMigrateError, match=f"cannot write a {type(value).__name__} as an SQL literal"
        ):
            literal(value)


def test_a_template_refuses_a_name_it_was_not_given():
    # StrictUndefined: a missing name fails the render instead of printing as nothing.
    with pytest.raises(jinja2.UndefinedError, match="'columns' is undefined"):
        render_statement("prearchive_row.sql.j2", timestamp="20240131_101112123", project="p", foldername="f")


@pytest.mark.parametrize("value", HOSTILE)
def test_values_reach_sql_only_as_bind_parameters(value):
    stmt = statements.delete_row(value, "20240131_101112123", value)
    assert value not in stmt.sql
    assert set(re.findall(r"%\((\w+)\)s", stmt.sql)) == {"timestamp", "foldername", "project", "source"}
    assert stmt.params["project"] == stmt.params["foldername"] == value
    printed = to_sql_text(stmt)
    assert printed.count(literal(value)) == 2  # substituted once: a "%(x)s" inside a value stays text
    assert "%(" not in ONE_LITERAL.sub("", printed)  # no placeholder is left outside the literals
    assert "'xnatmigrate'" in printed and "'20240131_101112123'" in printed


def test_unassigned_project_is_null_not_a_string():
    printed = to_sql_text(statements.delete_row(None, "20240131_101112123", "S1"))
    assert "project IS NOT DISTINCT FROM NULL" in printed


@pytest.fixture
def plan():
    """Two sessions; the prearchive URL root holds a quote, a backslash and a semicolon."""
    m = manifest(src(), url_root="/data/it's; x\\y")
    return plan_of(m, [header("/src/a"), header("/src/b", study="1.3", PatientID="PAT002")])


def test_each_session_is_an_advisory_lock_then_one_guarded_insert(plan):
    for s in plan.sessions:
        lock, insert = statements.insert_session(s)
        assert re.fullmatch(r"SELECT pg_advisory_xact_lock\(%\(lock_key\)s\);", lock.sql.splitlines()[-1])
        assert lock.params == {"lock_key": statements.lock_key(s.project, s.timestamp, s.session)}
        assert insert.sql.count("INSERT INTO xdat_search.prearchive") == 1
        assert insert.sql.count("WHERE NOT EXISTS") == 1 and insert.sql.count("AND NOT EXISTS") == 1
        p = insert.params
        assert (p["project"], p["timestamp"], p["foldername"], p["name"], p["tag"]) == (
            "prj001",
            s.timestamp,
            s.session,
            s.session,
            s.study_uid,
        )
        assert p["url"] == f"/data/it's; x\\y/prj001/{s.timestamp}/{s.session}"  # as given, not escaped
        assert "it's" not in insert.sql


def test_plan_script_holds_exactly_the_statements_apply_executes(plan):
    script = statements.plan_script(plan)
    lines = script.splitlines()
    assert lines.index("SET standard_conforming_strings = on;") < lines.index("BEGIN;")
    assert lines[-1] == "COMMIT;"
    assert script.count("INSERT INTO xdat_search.prearchive") == 2
    assert script.count("pg_advisory_xact_lock(") == 2
    executed = [to_sql_text(stmt) for s in plan.sessions for stmt in statements.insert_session(s)]
    positions = [script.index(text) for text in executed]
    assert positions == sorted(positions)  # all of them, in apply's order
    assert "'/data/it''s; x\\y/prj001/" in script
    assert "-- sessions:  2 prearchive row(s) to insert" in script


@pytest.mark.parametrize(
    "uid",
    ["1.2\nDROP TABLE xdat_search.prearchive; --", "1.2\rDROP TABLE x; --", "1.2 %(tag)s %s 100%"],
)
def test_header_values_in_sql_comments_cannot_start_a_statement_or_a_parameter(uid):
    """A StudyInstanceUID is a header value: it reaches the ``--`` comment above each INSERT."""
    p = plan_of(manifest(src()), [header("/src/a", study=uid)])
    lines = statements.plan_script(p).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("-- /prearchive/"))
    # The comment stays one line and the statement after it starts on the next one. (The value
    # still spans lines inside its quoted literal further down: that is data, not SQL.)
    assert "DROP" not in lines[at] or "?DROP" in lines[at]
    assert lines[at + 1].startswith("SELECT pg_advisory_xact_lock(")
    for stmt in statements.insert_session(p.sessions[0]):
        comment_lines = [line for line in stmt.sql.splitlines() if line.startswith("--")]
        assert all("%" not in line for line in comment_lines)
        # The value itself still reaches the row exactly, as a bind parameter.
    assert p.sessions[0].row["tag"] == uid


def test_binding_an_undefined_value_is_refused():
    from xnatmigrate.render import _Binder

    with pytest.raises(XnatMigrateError, match="undefined value"):
        _Binder()("x", jinja2.Undefined(name="x"))


def test_plan_sql_written_piece_by_piece_is_the_whole_render(plan):
    from xnatmigrate import render
    from xnatmigrate.model import PrearchiveSession

    rows = [s for s in plan.sessions if isinstance(s, PrearchiveSession)]
    whole = render.render_script(
        "plan.sql.j2",
        plan=plan,
        rows=len(rows),
        cstore=len(plan.sessions) - len(rows),
        statements=[statements.insert_session(s) for s in rows],
    )
    pieces = list(statements.plan_script_pieces(plan))
    assert len(pieces) > 3 and "".join(pieces) == whole.rstrip() + "\n"
