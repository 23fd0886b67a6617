"""The state is a ledger: never silently reset, one writer at a time, records survive.

The tests of what a ledger does run on both databases (``ledger``: SQLite in a state directory, and a
fresh schema in PostgreSQL, marked ``pg``); those of SQLite's file (damage, a full disk, a read-only
directory) and of PostgreSQL's server (a dead server, a lost connection, permissions) run on theirs.
"""

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import fresh_schema, state_url_of
from xnatmigrate import state
from xnatmigrate.errors import LockedError, StateError
from xnatmigrate.state import STATE_FORMAT, CachedHeader, StateStore


@dataclass
class Ledger:
    """One ledger on one database: ``open`` it as the commands do, ``raw`` reach past StateStore."""

    kind: str
    dir: Path
    url: str | None = None
    dsn: str | None = None  # PostgreSQL: the database, for raw connections
    schema: str | None = None

    def open(self, create: bool = True) -> StateStore:
        if self.url is None:
            return StateStore(self.dir, create)
        from xnatmigrate.execute import statepg

        return StateStore(create=create, opener=statepg.opener(self.url))

    def raw(self, statement: str, params: tuple = ()) -> list[tuple]:
        """Run one statement on another connection, committed (what another process sees)."""
        if self.url is None:
            conn = sqlite3.connect(self.dir / "state.db")
            try:
                rows = conn.execute(statement, params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(f"SET search_path TO {self.schema}")
            cur.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.Error,) if self.url is None else (psycopg.Error,)


@pytest.fixture(params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def ledger(request, tmp_path) -> Ledger:
    if request.param == "sqlite":
        return Ledger("sqlite", tmp_path)
    dsn = request.getfixturevalue("state_db_dsn")
    schema = fresh_schema()
    if conninfo_to_dict(dsn).get("password"):
        request.getfixturevalue("monkeypatch").setenv("PGPASSWORD", conninfo_to_dict(dsn)["password"])
    return Ledger("pg", tmp_path, state_url_of(dsn, schema), dsn, schema)


def test_fresh_state_has_format_and_serial(ledger):
    with ledger.open() as st:
        assert st.serial() == 0 and st.current_plan() is None
    assert ledger.raw("SELECT value FROM meta WHERE key='format'") == [(str(STATE_FORMAT),)]


def test_missing_state_is_an_error_when_not_creating(ledger):
    if ledger.url is None:
        ledger.dir = ledger.dir / "nothing"
    with pytest.raises(
        StateError, match=r"no state in .*: run `xnatmigrate plan MANIFEST( --state-url …)?` first"
    ):
        ledger.open(create=False)


def test_newer_format_is_refused_not_reset(ledger):
    ledger.open().close()
    ledger.raw("UPDATE meta SET value=? WHERE key='format'", (str(STATE_FORMAT + 1),))
    with pytest.raises(StateError, match="newer than this xnatmigrate understands"):
        ledger.open()
    assert ledger.raw("SELECT value FROM meta WHERE key='format'") == [(str(STATE_FORMAT + 1),)]


def test_garbage_state_is_refused(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="unreadable"):
        StateStore(tmp_path)
    assert (tmp_path / "state.db").read_bytes().startswith(b"this is not sqlite")


def test_empty_state_file_is_refused_not_reset(tmp_path):
    (tmp_path / "state.db").write_bytes(b"")
    with pytest.raises(StateError, match=r"is empty \(0 bytes\).*restore it from backup"):
        StateStore(tmp_path)
    assert (tmp_path / "state.db").read_bytes() == b""  # left as found


def test_sqlite_file_without_tables_is_refused_not_reset(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("PRAGMA user_version=7")  # a valid, non-empty SQLite file with no tables
    conn.close()
    with pytest.raises(StateError, match="holds no tables"):
        StateStore(tmp_path)


def test_a_new_state_file_is_written_complete(tmp_path):
    StateStore(tmp_path / "s").close()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.db"]  # no temporary left
    conn = sqlite3.connect(tmp_path / "s" / "state.db")
    assert conn.execute("SELECT value FROM meta WHERE key='format'").fetchone() == (str(STATE_FORMAT),)
    conn.close()


def _filled(path, n=3000):
    with StateStore(path) as st:
        st.cache_put(
            CachedHeader(f"/p/{i}", 1, 1, frozenset({"A"}), "1.2", {"A": "x" * 200}, None) for i in range(n)
        )
        st.record_timestamps([("P", "S", "1.2.3", "20240101_000000000")])
    return path / "state.db"


def test_damage_found_after_opening_is_one_line(tmp_path):
    db = _filled(tmp_path)
    size = db.stat().st_size
    with db.open("r+b") as f:  # pages in the middle of the scan cache, past the schema
        f.seek(size // 2)
        f.write(b"\xff" * 16384)
    with (
        pytest.raises(StateError, match="is unreadable .*restore it from backup"),
        StateStore(tmp_path) as st,
    ):
        st.cache_all()


def test_a_full_state_database_is_one_line(tmp_path):
    # SQLITE_FULL without a full disk: the page limit makes SQLite report "database or disk is full".
    with StateStore(tmp_path) as st:
        st.db.execute("PRAGMA max_page_count=20")
        with pytest.raises(StateError, match="is full .*free space there.*every step recorded before"):
            st.cache_put(
                CachedHeader(f"/p/{i}", 1, 1, frozenset({"A"}), "1.2", {"A": "x" * 200}, None)
                for i in range(5000)
            )
        st.record_step("a", "stage", "done")  # the connection is still usable for what fits
    with StateStore(tmp_path) as st:
        assert st.cache_all() == {} and st.steps_done("a") == {"stage"}


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root with mount rights; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_and_keeps_what_was_recorded(tiny_fs):
    with StateStore(tiny_fs / "s") as st:
        st.record_step("a", "stage", "done")
        with pytest.raises(StateError, match="is full"):
            for j in range(100):
                st.cache_put(
                    CachedHeader(f"/p/{j}/{i}", 1, 1, frozenset({"A"}), "1.2", {"A": "x" * 200}, None)
                    for i in range(500)
                )
    with StateStore(tiny_fs / "s") as st:
        assert st.steps_done("a") == {"stage"}


def test_a_read_only_state_directory_is_one_line(tiny_fs):
    StateStore(tiny_fs / "s").close()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with pytest.raises(StateError, match="must be writable by this user"):
        StateStore(tiny_fs / "s")
    with pytest.raises(StateError, match="cannot open the state directory .*Read-only file system"):
        StateStore(tiny_fs / "new")


def test_a_path_that_is_not_utf8_round_trips(ledger):
    path = os.fsdecode(b"/src/bad\xff\xfe.dcm")  # what os.scandir gives for those bytes
    entry = CachedHeader(path, 1, 1, frozenset({"A"}), "1.2", {"A": "x"}, f"not DICOM: {path}")
    plain = CachedHeader("/src/ok.dcm", 2**40, 2**62, frozenset({"A"}), "1.2", {"A": "y"}, None, 2**61, 2**50)
    with ledger.open() as st:
        st.cache_put([entry, plain])
        st.cache_put([entry])  # one key per path: replaced, not added
        st.record_files("a", [("/pre/1.dcm", path, 1, "h")])
        st.record_step("a", "stage", "done", {"source": path})
    with ledger.open() as st:
        assert st.cache_all() == {path: entry, plain.path: plain}
        assert st.files_for("a") == {"/pre/1.dcm": (path, 1, "h")}
        assert st.step_detail("a", "stage") == {"source": path}


def test_cache_get_returns_what_cache_all_has_for_the_paths_asked(ledger, monkeypatch):
    monkeypatch.setattr(state, "_STATES_BATCH", 3)  # several IN (…) statements
    odd = os.fsdecode(b"/src/bad\xff\xfe.dcm")
    entries = [CachedHeader(odd, 1, 1, frozenset({"A"}), "1.2", {"A": "x"}, None, 1, 7, "d" * 32)]
    entries += [
        CachedHeader(f"/src/{i:02d}.dcm", i, 2, frozenset({"A"}), None, None, f"not DICOM: {i}")
        for i in range(8)
    ]
    with ledger.open() as st:
        st.cache_put(entries)
    with ledger.open() as st:
        everything = st.cache_all()
        asked = [odd, "/src/03.dcm", "/nowhere", "/src/00.dcm", "/src/07.dcm", "/src/05.dcm", "/src/01.dcm"]
        got = st.cache_get(asked)
        assert got == {p: everything[p] for p in asked if p in everything}
        assert set(got) == set(asked) - {"/nowhere"} and got[odd] == entries[0]
        assert st.cache_get([]) == {}


def test_foreign_tables_are_refused(ledger):
    if ledger.url is None:
        ledger.raw("CREATE TABLE x (a)")
    else:
        with psycopg.connect(ledger.dsn) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {ledger.schema}; CREATE TABLE {ledger.schema}.x (a int)")
    with pytest.raises(
        StateError, match=r"holds tables that are not an xnatmigrate state file.s \(x\); it is not ours"
    ):
        ledger.open()
    assert ledger.raw("SELECT count(*) FROM x") == [(0,)]  # left as found


def test_a_ledger_emptied_of_its_tables_is_refused_not_reset(ledger):
    ledger.open().close()
    for table in ("meta", "scan_cache", "timestamps", "sessions", "steps", "files", "sent", "observed"):
        ledger.raw(f"DROP TABLE {table}")
    ledger.raw("DROP TABLE session_targets")
    ledger.raw("DROP TABLE plans")
    with pytest.raises(StateError, match="holds no tables, .*restore it from backup"):
        ledger.open()


def _hold_lock(ledger, ready, release):
    st = ledger.open()
    st.lock("apply")
    ready.set()
    release.wait(10)
    st.close()


def test_second_writer_is_refused_naming_the_holder(ledger):
    ledger.open().close()
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(ledger, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with ledger.open() as st, pytest.raises(LockedError) as exc:
            st.lock("apply")
        assert f"pid {proc.pid}" in str(exc.value) and "apply on host" in str(exc.value)
        assert "is in use by" in str(exc.value) and "wait for it to finish" in str(exc.value)
    finally:
        release.set()
        proc.join(10)
    with ledger.open() as st:
        st.lock("apply")  # released with its holder


def test_serial_moves_only_for_a_new_plan(ledger):
    with ledger.open() as st:
        st.begin_plan("A")
        assert st.serial() == 1
        st.begin_plan("A")
        assert st.serial() == 1 and st.current_plan() == "A"
        st.begin_plan("B")
        assert st.serial() == 2


def test_timestamps_are_never_changed(ledger):
    with ledger.open() as st:
        st.record_timestamps([("P", "S", "1.2", "20240101_000000000")])
        st.record_timestamps(
            [("P", "S", "1.2", "20250101_000000000"), (None, "S", "1.3", "20240101_000000001")]
        )
        assert st.timestamp_for("P", "S", "1.2") == "20240101_000000000"
        assert st.timestamp_for(None, "S", "1.3") == "20240101_000000001"


def test_steps_ledger_latest_outcome_counts(ledger):
    with ledger.open() as st:
        st.record_step("a", "stage", "done", {"files": 2})
        st.record_step("a", "publish", "failed")
        assert st.steps_done("a") == {"stage"}
        st.record_step("a", "publish", "noop")
        assert st.steps_done("a") == {"stage", "publish"}
        st.record_step("a", "stage", "reverted")
        assert st.steps_done("a") == {"publish"}
        assert st.step_detail("a", "stage") == {"files": 2}
        assert [h[:2] for h in st.history("a")] == [
            ("stage", "done"),
            ("publish", "failed"),
            ("publish", "noop"),
            ("stage", "reverted"),
        ]


def test_scan_cache_round_trip(ledger):
    entry = CachedHeader(
        "/x", 10, 5, frozenset({"PatientID"}), "1.2.840.10008.1.2.1", {"PatientID": "Ü"}, None
    )
    bad = CachedHeader("/y", 1, 1, frozenset(), None, None, "not DICOM: x")
    with ledger.open() as st:
        st.cache_put([entry, bad])
    with ledger.open() as st:
        assert st.cache_all() == {"/x": entry, "/y": bad}


def test_cached_headers_share_equal_strings(ledger):
    entries = [
        CachedHeader(f"/src/{i}", 1, 1, frozenset({"A", "U"}), "1.2.840", {"A": "same", "U": f"u{i}"}, None)
        for i in range(3)
    ]
    with ledger.open() as st:
        st.cache_put(entries)
        got = st.cache_all()
    assert got == {e.path: e for e in entries}
    a, b = got["/src/0"], got["/src/1"]
    assert a.header is not None and b.header is not None
    assert a.header["A"] is b.header["A"] and a.transfer_syntax is b.transfer_syntax
    assert next(iter(a.header)) is next(iter(b.header))


# -- group commit -----------------------------------------------------------------------------


def _other_view(ledger):
    """What another process would read: a fresh connection sees committed records only."""
    return {r[0] for r in ledger.raw("SELECT key FROM meta")}


def test_records_inside_a_group_commit_together_when_it_ends(ledger):
    store = ledger.open()
    with store.group():
        store.begin_plan("p1")
        assert "current_plan" not in _other_view(ledger)  # held back: one commit for the group
        store.commit()
        assert "current_plan" in _other_view(ledger)  # commit() makes them durable mid-group
        store.bump_serial()
    assert store.serial() == 2 and ledger.open().serial() == 2
    store.close()


def test_a_group_left_by_an_exception_keeps_its_records(ledger):
    store = ledger.open()
    with pytest.raises(KeyboardInterrupt), store.group():
        store.begin_plan("p1")
        raise KeyboardInterrupt  # those steps did take effect: their records stay
    store.close()
    assert ledger.open().current_plan() == "p1"


def test_a_failed_record_inside_a_group_leaves_no_half_of_itself(ledger):
    store = ledger.open()
    with store.group():
        store.begin_plan("p1")
        with pytest.raises(ledger.errors), store.tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('half', '1')")
            db.execute("INSERT INTO no_such_table VALUES (1)")
        store.record_step("a", "stage", "done")  # the group goes on after the failed record
    keys = _other_view(ledger)
    assert "current_plan" in keys and "half" not in keys
    assert ledger.open().steps_done("a") == {"stage"}
    store.close()


def test_a_failed_group_commits_nothing(ledger):
    """The ledger itself failing inside a group: nothing of that group is committed."""
    store = ledger.open()
    with pytest.raises(StateError), store.group():
        store.begin_plan("p1")
        store.record_step("a", "stage", "done")
        raise StateError("the ledger failed")
    assert "current_plan" not in _other_view(ledger) and ledger.raw("SELECT count(*) FROM steps") == [(0,)]
    store.close()


def test_the_header_digest_round_trips_and_an_older_cache_gets_its_column(tmp_path):
    entry = CachedHeader("/src/1", 1, 1, frozenset({"A"}), "1.2", {"A": "x"}, None, 5, 6, "d" * 32)
    with StateStore(tmp_path) as st:
        st.db.execute("ALTER TABLE scan_cache DROP COLUMN digest")  # as an older version wrote it
    with StateStore(tmp_path) as st:  # the column is added again
        st.cache_put([entry])
        assert st.cache_all() == {"/src/1": entry}


def test_the_headers_of_one_batch_are_decoded_in_one_call_or_each_on_its_own():
    import json

    from xnatmigrate.state import _decode_each

    texts = ['{"A": "1"}', '{"A": "2", "B": "\\udcff"}', "{}"]
    assert _decode_each(texts) == [json.loads(t) for t in texts]
    assert _decode_each([]) == []
    # Texts that are not one JSON value each: never joined into other values, the bad one raises.
    with pytest.raises(ValueError):
        _decode_each(['{"A": "1"}, {"B": "2"}', '{"C": "3"}'])
    with pytest.raises(ValueError):
        _decode_each(['{"A": "1"}', ""])


def test_states_of_reads_just_the_sessions_asked_for_and_all_states_every_one(ledger):
    from xnatmigrate.model import PlannedFile, PlannedScan, SessionState, XnatTarget
    from xnatmigrate.testing.sessions import prearchive_session

    target = XnatTarget(prearchive="/data/prearchive")
    with ledger.open() as st:
        for i in range(3):
            f = PlannedFile(
                f"/src/{i}", 10, 1, f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "1.dcm"
            )
            s = prearchive_session(
                (PlannedScan("1", f"1.2.{i}", "1", "MR", (f,)),), action_id=f"a{i}", label=f"S{i}"
            )
            st.register_session("plan-1", s, target)
        st.set_session_status("a1", SessionState.APPLIED)
        many = [f"x{i}" for i in range(1200)] + ["a1", "a2"]  # more than one batch of ids
        assert st.states_of(many) == {"a1": SessionState.APPLIED, "a2": st.states_of(["a2"])["a2"]}
        assert st.states_of(["nothing"]) == {}
        assert set(st.all_states()) == {"a0", "a1", "a2"} and st.all_states()["a1"] is SessionState.APPLIED
        assert st.applied_ids() == {"a1"}
