"""The ledger in PostgreSQL (``--state-url``): what only a server can do to it, on a real server.

What a ledger does (format, records, group commit, the lock naming its holder) is tested on both
databases in ``test_state.py``; here: the URL, the schema's tables against SQLite's, the lock key, and
each failure of the server as one line.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import fresh_schema, state_url_of
from xnatmigrate import api, cli
from xnatmigrate.errors import LockedError, StateError
from xnatmigrate.execute import statepg
from xnatmigrate.state import CachedHeader, StateStore

DEAD = "postgresql://nobody@127.0.0.1:1/migrations"


def _store(url: str, create: bool = True) -> StateStore:
    return StateStore(create=create, opener=statepg.opener(url))


def _raw(dsn: str, statement: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement)
        return cur.fetchall() if cur.description else []


# -- the URL (no server needed) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mig:s3cret@db.example/migrations",
        "postgres://mig@db.example/migrations?password=s3cret",
        "postgresql://mig@db.example/migrations?schema=a&password=s3cret",
    ],
)
def test_a_password_in_the_state_url_is_refused_without_printing_it(url, capsys):
    with pytest.raises(StateError, match="holds a password.*PGPASSWORD or ~/.pgpass") as exc:
        statepg.opener(url)
    assert "s3cret" not in str(exc.value)
    assert cli.main(["status", "--state-url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a password" in err and "s3cret" not in err


def test_the_environment_names_the_state_url_too(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XNATMIGRATE_STATE_URL", "postgresql://mig:s3cret@db.example/migrations")
    assert cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "holds a password" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()  # the URL, not the directory, holds the ledger


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///tmp/x.db", "must be a postgresql:// URL"),
        ("/var/lib/xnatmigrate", "must be a postgresql:// URL"),
        ("postgresql://h/db?schema=Bad-Name", "not a plain PostgreSQL name"),
        ("postgresql://h/db?schema=pg_catalog", "not a plain PostgreSQL name"),
        ("postgresql://h/db?nosuchparameter=1", "not a URL libpq accepts"),
    ],
)
def test_a_state_url_that_is_not_one_is_one_line(url, message):
    with pytest.raises(StateError, match=message):
        statepg.opener(url)


def test_the_schema_comes_from_the_url_and_defaults_to_xnatmigrate():
    assert statepg.parse_state_url("postgresql://u@h:6432/mig").schema == "xnatmigrate"
    got = statepg.parse_state_url("postgresql://u@h:6432/mig?schema=study_42&sslmode=require")
    assert got.schema == "study_42" and got.where == "mig on h:6432"
    assert "schema" not in got.dsn and "sslmode=require" in got.dsn  # libpq never sees ours


def test_the_lock_key_is_derived_from_the_schema_as_documented():
    digest = hashlib.sha256(b"xnatmigrate\0apply\0study_42").digest()
    assert statepg.lock_key("study_42") == int.from_bytes(digest[:8], "big", signed=True)
    keys = {statepg.lock_key(s) for s in ("xnatmigrate", "study_42", "study_43")}
    assert len(keys) == 3 and all(-(2**63) <= k < 2**63 for k in keys)


# -- a dead server -----------------------------------------------------------------------------------


def test_a_dead_state_database_is_one_line(tmp_path, capsys):
    with pytest.raises(
        StateError, match=r"cannot connect to the state database \(migrations on 127.0.0.1:1\)"
    ):
        _store(DEAD)
    assert cli.main(["status", "--state-dir", str(tmp_path), "--state-url", DEAD]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "check that PostgreSQL is running" in err and "nothing was written" in err


# -- on a real server --------------------------------------------------------------------------------


@pytest.fixture
def url(state_url):
    return state_url


def test_the_schema_has_exactly_the_tables_and_columns_of_the_sqlite_file(url, state_db_dsn, tmp_path):
    _store(url).close()
    StateStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    lite = {
        t: {c[1] for c in conn.execute(f"PRAGMA table_info({t})")}
        for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name != 'sqlite_sequence'"
        )
    }
    conn.close()
    schema = statepg.parse_state_url(url).schema
    pg: dict[str, set[str]] = {}
    for table, column in _raw(
        state_db_dsn,
        f"SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = '{schema}'",
    ):
        pg.setdefault(table, set()).add(column)
    assert pg == lite and len(pg) == 10


def test_a_schema_is_created_only_by_plan_and_complete(url, state_db_dsn):
    schema = statepg.parse_state_url(url).schema
    with pytest.raises(StateError, match=f"no state in the state schema {schema} .*run `xnatmigrate plan"):
        _store(url, create=False)
    assert _raw(state_db_dsn, f"SELECT 1 FROM pg_namespace WHERE nspname = '{schema}'") == []
    _store(url).close()
    with _store(url, create=False) as st:
        assert st.serial() == 0


def test_the_lock_refuses_the_same_schema_and_never_blocks_another(url, state_db_dsn):
    other = state_url_of(state_db_dsn, fresh_schema())
    first = _store(url)
    try:
        first.lock("apply")
        with (
            _store(url) as second,
            pytest.raises(LockedError, match=r"is in use by apply on host .* pid \d+"),
        ):
            second.lock("apply")
        with _store(other) as unrelated:
            unrelated.lock("apply")  # another ledger: not blocked
            unrelated.record_step("a", "stage", "done")
            assert unrelated.steps_done("a") == {"stage"}
    finally:
        first.close()
    with _store(url) as again:
        again.lock("apply")  # released by close


def test_a_lost_connection_is_one_line_and_keeps_what_was_recorded(url, state_db_dsn):
    st = _store(url)
    try:
        st.record_step("a", "stage", "done")
        pid = st.db.conn.info.backend_pid  # type: ignore[attr-defined]
        _raw(state_db_dsn, f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(
            StateError, match="connection to the state database .* failed .*rerun when it is back"
        ):
            st.record_step("a", "publish", "done")
    finally:
        st.close()
    with _store(url) as again:
        assert again.steps_done("a") == {"stage"}


def test_a_full_disk_on_the_server_is_one_line(url):
    # The server's own error (SQLSTATE 53100, what a full disk gives), raised by the server.
    with (
        _store(url) as st,
        pytest.raises(StateError, match="out of resources .*free disk space .*every step"),
    ):
        st.db.execute(
            "DO $$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$"
        )


def test_a_read_only_server_is_one_line(url):
    with _store(url) as st:
        st.db.execute("SET default_transaction_read_only = on")  # what a hot standby answers
        with pytest.raises(StateError, match="is read-only .*point --state-url at the primary"):
            st.record_step("a", "stage", "done")


def test_a_row_held_by_another_transaction_times_out_with_one_line(url, state_db_dsn, monkeypatch):
    monkeypatch.setattr(statepg, "LOCK_TIMEOUT_S", 1)
    schema = statepg.parse_state_url(url).schema
    with _store(url) as st:
        holder = psycopg.connect(state_db_dsn)
        try:
            with holder.cursor() as cur:
                cur.execute(f"SELECT * FROM {schema}.meta WHERE key = 'serial' FOR UPDATE")
            with pytest.raises(StateError, match="stayed locked by another process .*wait for it to finish"):
                st.begin_plan("p1")
        finally:
            holder.close()
        st.begin_plan("p1")  # the same connection goes on once the row is free
        assert st.current_plan() == "p1"


def test_no_permission_is_one_line(state_db_dsn):
    role = f"xm_nobody_{uuid.uuid4().hex[:8]}"
    try:
        _raw(state_db_dsn, f"CREATE ROLE {role} LOGIN")
    except psycopg.Error as exc:
        pytest.skip(f"cannot create a role on this server: {exc}")
    try:
        dsn = make_conninfo(state_db_dsn, user=role)
        with pytest.raises(StateError, match="no permission in the state database .*grant them, then rerun"):
            _store(state_url_of(dsn, fresh_schema()))
    finally:
        _raw(state_db_dsn, f"DROP ROLE {role}")


def test_plan_and_status_name_the_url_in_the_api(url, tmp_path):
    # api.status on a schema no plan made: the same one line as a state directory with no state.db.
    with pytest.raises(StateError, match="no state in .*run `xnatmigrate plan MANIFEST --state-url"):
        api.status(tmp_path, state_url=url)


def test_a_transaction_that_failed_is_never_taken_for_committed(url):
    with _store(url) as st:
        failed = pytest.raises(StateError, match="failed inside a transaction, so nothing of it was recorded")
        with failed, st.tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('half', '1')")
            with pytest.raises(psycopg.Error):
                db.execute("INSERT INTO no_such_table VALUES (1)")  # a caller that goes on anyway
        assert st._meta("half") is None
        st.record_step("a", "stage", "done")  # the connection is usable again
        assert st.steps_done("a") == {"stage"}


def test_the_server_drops_a_vanished_holder_within_a_minute(url):
    with _store(url) as st:
        got = dict(
            st.db.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('tcp_keepalives_idle', 'tcp_keepalives_interval', 'tcp_keepalives_count', 'lock_timeout')"
            ).fetchall()
        )
    assert got["lock_timeout"] == str(statepg.LOCK_TIMEOUT_S * 1000)
    # On a Unix socket the server reports 0 (no TCP); over TCP, what was set: idle + count × interval.
    if got["tcp_keepalives_idle"] != "0":
        idle, interval, count = (int(got[f"tcp_keepalives_{k}"]) for k in ("idle", "interval", "count"))
        assert idle + count * interval <= statepg.KEEPALIVE_S


def test_a_statement_timeout_of_the_server_is_one_line(url):
    with _store(url) as st:
        st.db.execute("SET statement_timeout = 50")
        with pytest.raises(StateError, match="ran longer than the server's statement_timeout .*raise it"):
            st.db.execute("SELECT pg_sleep(2)")


def test_a_statement_cancelled_like_ctrl_c_is_keyboard_interrupt(url, state_db_dsn):
    import threading

    with _store(url) as st:
        pid = st.db.conn.info.backend_pid  # type: ignore[attr-defined]
        # From another connection, the cancel psycopg sends on Ctrl-C ("due to user request").
        timer = threading.Timer(0.3, _raw, (state_db_dsn, f"SELECT pg_cancel_backend({pid})"))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                st.db.execute("SELECT pg_sleep(20)")
        finally:
            timer.join()
        st.record_step("a", "stage", "done")  # the connection goes on
        assert st.steps_done("a") == {"stage"}


def test_ctrl_c_during_a_statement_cancels_it_on_the_server(url):
    import os
    import signal
    import threading

    with _store(url) as st:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                st.db.execute("SELECT pg_sleep(20)")
        finally:
            timer.join()
        assert time.monotonic() - started < 10  # not waited out: psycopg cancelled it on the server
        st.record_step("a", "stage", "done")  # the connection goes on
        assert st.steps_done("a") == {"stage"}


def test_a_plan_writes_its_cache_while_an_apply_holds_the_ledger(url, monkeypatch):
    monkeypatch.setattr(statepg, "LOCK_TIMEOUT_S", 1)  # a wait would fail this test within a second
    entry = CachedHeader("/src/1.dcm", 1, 1, frozenset({"A"}), "1.2", {"A": "x"}, None)
    with _store(url) as apply_side, _store(url) as plan_side:
        apply_side.lock("apply")
        with apply_side.group():
            apply_side.begin_plan("p1")
            apply_side.record_step("a", "stage", "done")
            plan_side.cache_put([entry])
            plan_side.record_timestamps([("P", "S", "1.2", "20240101_000000000")])
            assert plan_side.serial() == 0  # the apply's records are not committed yet
        assert plan_side.cache_all() == {entry.path: entry} and plan_side.serial() == 1
