"""The PostgreSQL rig: XNAT's prearchive table exactly as each XNAT version creates it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from xnatmigrate.testing import pg as pg_module
from xnatmigrate.testing.pg import (
    TABLE_PROFILES,
    EmbeddedPostgres,
    PgDb,
    create_database,
    ddl_path,
    drop_database,
    install_prearchive_table,
    unique_database_name,
)

VARCHAR, TS, BOOL = "character varying", "timestamp without time zone", "boolean"

# xnat-reference.md section 1: enum order, PostgreSQL (lower-cased) names, types, nullability.
EXPECTED_COLUMNS = [
    ("project", VARCHAR, "YES"),
    ("timestamp", VARCHAR, "NO"),
    ("lastmod", TS, "YES"),
    ("uploaded", TS, "YES"),
    ("scan_date", TS, "YES"),
    ("scan_time", VARCHAR, "YES"),
    ("subject", VARCHAR, "YES"),
    ("foldername", VARCHAR, "NO"),
    ("name", VARCHAR, "YES"),
    ("tag", VARCHAR, "YES"),
    ("status", VARCHAR, "NO"),
    ("url", VARCHAR, "NO"),
    ("autoarchive", VARCHAR, "YES"),
    ("prevent_anon", BOOL, "YES"),
    ("prevent_auto_commit", BOOL, "YES"),
    ("source", VARCHAR, "YES"),
    ("visit", VARCHAR, "YES"),
    ("protocol", VARCHAR, "YES"),
    ("timezone", VARCHAR, "YES"),
]

# The "Working prearchive table insert" from the XNAT wiki page "Importing data directly into XNAT".
DOC_EXAMPLE_INSERT = """
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date,
                                   scan_time, subject, foldername, name, tag, status,
                                   autoarchive, prevent_anon, prevent_auto_commit, url)
VALUES ('prj001', '20140818_144524024', '2014-08-18 11:33:30.621', '2014-08-18 14:45:24.024',
        '2013-12-11 00:00:00', '15:18:18', 'prj001_001', 'prj001_001_MR1', 'prj001_001_MR1',
        '1.2.840.113654.2.45.2.108105', 'RECEIVING', 'Manual', 'f', 'f',
        '/data/xnat/prearchive/prj001/20140818_144524024/prj001_001_MR1');
"""


def _fetchall(dsn: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


def _execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement)


def test_columns_match_xnat_in_order(pg_dsn: PgDb) -> None:
    rows = _fetchall(
        pg_dsn.dsn,
        """SELECT column_name, data_type, is_nullable, character_maximum_length, column_default
             FROM information_schema.columns
            WHERE table_schema = 'xdat_search' AND table_name = 'prearchive'
            ORDER BY ordinal_position""",
    )
    assert [(name, dtype, nullable) for name, dtype, nullable, _, _ in rows] == EXPECTED_COLUMNS
    assert all(length is None and default is None for _, _, _, length, default in rows)


def test_only_182_has_the_unique_constraint(pg_dsn: PgDb) -> None:
    # contype 'n' (NOT NULL, catalogued since PostgreSQL 18) is left out: it is covered by the column test.
    constraints = _fetchall(
        pg_dsn.dsn,
        """SELECT c.conname, c.contype,
                  ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                         ORDER BY k.ord)
             FROM pg_constraint c
            WHERE c.conrelid = 'xdat_search.prearchive'::regclass AND c.contype <> 'n'""",
    )
    if pg_dsn.profile == "1.8.2":
        assert constraints == [("prearchive_study", "u", ["timestamp", "project", "foldername"])]
    else:
        assert constraints == []  # no primary key, no unique, nothing


def test_documented_example_row_inserts(pg_dsn: PgDb) -> None:
    _execute(pg_dsn.dsn, DOC_EXAMPLE_INSERT)
    rows = _fetchall(
        pg_dsn.dsn,
        "SELECT project, timestamp, foldername, status, prevent_anon, source FROM xdat_search.prearchive",
    )
    assert rows == [("prj001", "20140818_144524024", "prj001_001_MR1", "RECEIVING", False, None)]


def test_duplicate_session_row_is_refused_only_by_182(pg_dsn: PgDb) -> None:
    _execute(pg_dsn.dsn, DOC_EXAMPLE_INSERT)
    if pg_dsn.profile == "1.8.2":
        with pytest.raises(errors.UniqueViolation):
            _execute(pg_dsn.dsn, DOC_EXAMPLE_INSERT)
    else:
        _execute(pg_dsn.dsn, DOC_EXAMPLE_INSERT)
    expected = 1 if pg_dsn.profile == "1.8.2" else 2
    assert _fetchall(pg_dsn.dsn, "SELECT count(*) FROM xdat_search.prearchive") == [(expected,)]


def test_unassigned_rows_escape_the_constraint(pg_dsn: PgDb) -> None:
    # NULLs are distinct in a UNIQUE constraint, so XNAT's constraint never protects Unassigned rows.
    unassigned = DOC_EXAMPLE_INSERT.replace("VALUES ('prj001'", "VALUES (NULL")
    _execute(pg_dsn.dsn, unassigned)
    _execute(pg_dsn.dsn, unassigned)
    assert _fetchall(pg_dsn.dsn, "SELECT count(*) FROM xdat_search.prearchive WHERE project IS NULL") == [
        (2,)
    ]


def test_pg_db_17_fixture_is_the_17_profile(pg_db_17: PgDb) -> None:
    assert pg_db_17.profile == "1.7"
    assert _fetchall(pg_db_17.dsn, "SELECT to_regclass('xdat_search.prearchive') IS NOT NULL") == [(True,)]


def test_create_and_drop_database(pg_admin_dsn: str) -> None:
    name = unique_database_name("xmt_rig")
    dsn = create_database(pg_admin_dsn, name)
    leaked = psycopg.connect(dsn)  # drop_database must not be blocked by a connection left open
    try:
        assert _fetchall(dsn, "SELECT current_database()") == [(name,)]
    finally:
        drop_database(pg_admin_dsn, name)
        leaked.close()
    assert _fetchall(pg_admin_dsn, "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)) == [(0,)]


def test_embedded_server_starts_and_cleans_up() -> None:
    # Exercised even when XNATMIGRATE_TEST_DSN points the other tests at an external server.
    with EmbeddedPostgres() as server:
        pgdata = server.data_dir
        assert pgdata is not None and (pgdata / "PG_VERSION").is_file()
        assert _fetchall(server.dsn, "SELECT current_user")[0] == ("postgres",)
        assert _fetchall(server.dsn, "SHOW fsync") == [("off",)]  # throwaway server: speed over durability
    assert not pgdata.exists()
    assert server.data_dir is None
    with pytest.raises(RuntimeError):
        _ = server.dsn


def test_embedded_server_on_a_given_dir_keeps_its_data(tmp_path: Path) -> None:
    pgdata = tmp_path / "kept" / "pgdata"
    with EmbeddedPostgres(pgdata) as server:
        assert _fetchall(server.dsn, "SHOW fsync") == [("on",)]
        install_prearchive_table(server.dsn, "1.7")
    assert (pgdata / "PG_VERSION").is_file()
    with EmbeddedPostgres(pgdata) as server:  # restarted on the same data
        assert _fetchall(server.dsn, "SELECT to_regclass('xdat_search.prearchive') IS NOT NULL") == [(True,)]


@pytest.mark.parametrize("profile", TABLE_PROFILES)
def test_ddl_files_cite_their_source(profile: str) -> None:
    text = ddl_path(profile).read_text(encoding="utf-8")
    assert text.startswith("--")
    assert "DatabaseSession.java" in text and "PrearcDatabase" in text
    assert ("9f344ec8e" in text) == (profile == "1.8.2")
    assert ("CONSTRAINT prearchive_study" in text) == (profile == "1.8.2")


def test_ddl_path_rejects_unknown_profile() -> None:
    with pytest.raises(ValueError, match=r"1\.9"):
        ddl_path("1.9")


def test_ddl_path_prefers_packaged_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed wheel ships sql/ as xnatmigrate/_data/sql; a source checkout falls back to sql/.
    assert ddl_path("1.7") == Path(pg_module.__file__).resolve().parents[2] / "sql" / "xnat" / "1.7.sql"
    (tmp_path / "_data" / "sql" / "xnat").mkdir(parents=True)
    import xnatmigrate.resources as resources

    monkeypatch.setattr(resources, "files", lambda package: tmp_path)
    assert ddl_path("1.8.2") == tmp_path / "_data" / "sql" / "xnat" / "1.8.2.sql"
