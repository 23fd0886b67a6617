"""The state file is a ledger: never silently reset, one writer at a time, records survive."""

import multiprocessing
import sqlite3

import pytest

from xnatmigrate.errors import LockedError, StateError
from xnatmigrate.state import STATE_FORMAT, CachedHeader, StateStore


def test_fresh_state_has_format_and_serial(tmp_path):
    with StateStore(tmp_path) as st:
        assert st.serial() == 0 and st.current_plan() is None


def test_missing_state_is_an_error_when_not_creating(tmp_path):
    with pytest.raises(StateError, match="run `xnatmigrate plan MANIFEST` first"):
        StateStore(tmp_path / "nothing", create=False)


def test_newer_format_is_refused_not_reset(tmp_path):
    StateStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE meta SET value=? WHERE key='format'", (str(STATE_FORMAT + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer than this xnatmigrate understands"):
        StateStore(tmp_path)


def test_garbage_state_is_refused(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="unreadable"):
        StateStore(tmp_path)
    assert (tmp_path / "state.db").read_bytes().startswith(b"this is not sqlite")


def test_foreign_sqlite_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("CREATE TABLE x (a)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="not an xnatmigrate state file"):
        StateStore(tmp_path)


def _hold_lock(path, ready, release):
    st = StateStore(path)
    st.lock("apply")
    ready.set()
    release.wait(10)
    st.close()


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(10)
        with StateStore(tmp_path) as st, pytest.raises(LockedError) as exc:
            st.lock("apply")
        assert f"pid {proc.pid}" in str(exc.value) and "apply on host" in str(exc.value)
    finally:
        release.set()
        proc.join(10)
    with StateStore(tmp_path) as st:
        st.lock("apply")  # released with its holder


def test_serial_moves_only_for_a_new_plan(tmp_path):
    with StateStore(tmp_path) as st:
        st.begin_plan("A")
        assert st.serial() == 1
        st.begin_plan("A")
        assert st.serial() == 1 and st.current_plan() == "A"
        st.begin_plan("B")
        assert st.serial() == 2


def test_timestamps_are_never_changed(tmp_path):
    with StateStore(tmp_path) as st:
        st.record_timestamps([("P", "S", "1.2", "20240101_000000000")])
        st.record_timestamps(
            [("P", "S", "1.2", "20250101_000000000"), (None, "S", "1.3", "20240101_000000001")]
        )
        assert st.timestamp_for("P", "S", "1.2") == "20240101_000000000"
        assert st.timestamp_for(None, "S", "1.3") == "20240101_000000001"


def test_steps_ledger_latest_outcome_counts(tmp_path):
    with StateStore(tmp_path) as st:
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


def test_scan_cache_round_trip(tmp_path):
    entry = CachedHeader(
        "/x", 10, 5, frozenset({"PatientID"}), "1.2.840.10008.1.2.1", {"PatientID": "Ü"}, None
    )
    bad = CachedHeader("/y", 1, 1, frozenset(), None, None, "not DICOM: x")
    with StateStore(tmp_path) as st:
        st.cache_put([entry, bad])
    with StateStore(tmp_path) as st:
        assert st.cache_all() == {"/x": entry, "/y": bad}
        assert st.cache_get(["/x"]) == {"/x": entry}
