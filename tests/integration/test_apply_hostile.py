"""apply under hostile conditions (issue 11): nothing half-published, nothing that hangs, nothing the
plan did not see. Real PostgreSQL, real folders, the REST stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from tests.sites import NOW, Site
from xnatmigrate import api, cli
from xnatmigrate.execute import db
from xnatmigrate.model import Outcome, Result, Step
from xnatmigrate.state import StateStore


def plan(site: Site):
    return api.plan(site.manifest, state_dir=site.state, now=NOW).plan


def visible(site: Site, s) -> bool:
    return Path(s.session_dir).exists()


def foreign_row_of_the_same_study(site: Site, s) -> None:
    """Another upload of the same study, as XNAT's receiver would write it, at another timestamp."""
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url, "
            "prevent_anon, prevent_auto_commit) VALUES (%s, '20200101_000000000', %s, %s, %s, 'READY', "
            "'/elsewhere', false, false)",
            (s.project, s.session, s.session, s.study_uid),
        )


def test_conflicting_row_after_plan_publishes_nothing_and_fails_only_that_session(site):
    p = plan(site)
    victim, other = p.sessions
    foreign_row_of_the_same_study(site, victim)
    report = api.apply(state_dir=site.state, poll=0.05)
    by_id = {r.action_id: r for r in report.sessions}
    assert by_id[victim.action_id].outcome is Result.FAILED
    assert "another session of study" in (by_id[victim.action_id].message or "")
    assert "staged, not published" in (by_id[victim.action_id].message or "")
    assert by_id[other.action_id].outcome is Result.DONE  # a per-study conflict does not stop the run
    assert report.stopped is None
    assert not visible(site, victim) and visible(site, other)
    # A rerun says the same and still publishes nothing; once the other session is gone it goes through.
    again = api.apply(state_dir=site.state, poll=0.05)
    assert [r.outcome for r in again.sessions if r.action_id == victim.action_id] == [Result.FAILED]
    assert not visible(site, victim)
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM xdat_search.prearchive WHERE timestamp = '20200101_000000000'")
    last = api.apply(state_dir=site.state, poll=0.05)
    assert not last.failures and visible(site, victim)


def test_insert_that_fails_after_publishing_takes_the_folder_back_out_of_view(site, monkeypatch):
    p = plan(site)
    victim = p.sessions[0]
    foreign_row_of_the_same_study(site, victim)
    # The race the preflight cannot close: the other row appears between the check and the INSERT.
    monkeypatch.setattr(db, "check_insertable_many", lambda conn, ss: [False] * len(ss))
    report = api.apply(state_dir=site.state, poll=0.05)
    res = next(r for r in report.sessions if r.action_id == victim.action_id)
    assert res.outcome is Result.FAILED
    assert "moved back out of XNAT's view" in (res.message or "")
    assert not visible(site, victim)
    staged = site.prearchive / ".xnatmigrate-staging" / victim.timestamp / "prj001" / victim.session
    assert sorted(str(f.relative_to(staged)) for f in staged.rglob("*.dcm")) == sorted(
        f.dest for f in victim.files
    )
    with StateStore(site.state) as st:
        assert Step.PUBLISH not in st.steps_done(victim.action_id)
        assert (Step.PUBLISH, Outcome.REVERTED) in [(h[0], h[1]) for h in st.history(victim.action_id)]
    monkeypatch.undo()
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM xdat_search.prearchive WHERE timestamp = '20200101_000000000'")
    for k, v in site.env().items():
        monkeypatch.setenv(k, v)
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    assert visible(site, victim) and not staged.exists()


def test_database_down_at_apply_publishes_nothing(site, monkeypatch):
    p = plan(site)
    monkeypatch.setenv("XNATMIGRATE_TEST_SITE_DSN", "postgresql://nobody@127.0.0.1:1/none")
    report = api.apply(state_dir=site.state, poll=0.05)
    assert report.stopped and "cannot connect to XNAT's database" in report.stopped
    assert not any(visible(site, s) for s in p.sessions)
    assert [r.outcome for r in report.sessions] == [Result.FAILED, Result.SKIPPED]


def test_database_down_while_the_next_group_was_staged_ahead_then_rerun_finishes(site, monkeypatch):
    """A group per session: the second session is staged ahead while the first meets the dead database.
    The run stops; what was staged ahead is recorded (outside XNAT's view, not published), that session
    is reported not finished, and the rerun with the database back reuses it and finishes both."""
    from xnatmigrate.execute import files

    p = plan(site)
    monkeypatch.setenv("XNATMIGRATE_GROUP_SESSIONS", "1")
    monkeypatch.setenv("XNATMIGRATE_TEST_SITE_DSN", "postgresql://nobody@127.0.0.1:1/none")
    report = api.apply(state_dir=site.state, poll=0.05)
    assert report.stopped and "cannot connect to XNAT's database" in report.stopped
    assert [r.outcome for r in report.sessions] == [Result.FAILED, Result.SKIPPED]
    assert "not finished" in (report.sessions[1].message or "")
    assert not any(visible(site, s) for s in p.sessions) and site.rows() == []
    second = p.sessions[1]
    with StateStore(site.state) as store:
        assert Step.STAGE in store.steps_done(second.action_id)  # staged ahead, and recorded
    assert files.staging_dir(str(site.prearchive), second).is_dir()
    monkeypatch.setenv("XNATMIGRATE_TEST_SITE_DSN", site.dsn)
    again = api.apply(state_dir=site.state, poll=0.05)
    assert not again.failures, [r.message for r in again.sessions]
    assert len(site.rows()) == 2 and all(visible(site, s) for s in p.sessions)
    assert list((site.prearchive / files.STAGING_DIRNAME).iterdir()) == []


def hold_table_lock(dsn: str, ready: threading.Event, release: threading.Event) -> None:
    conn = psycopg.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE xdat_search.prearchive IN ACCESS EXCLUSIVE MODE")
            ready.set()
            release.wait(60)
        conn.rollback()
    finally:
        conn.close()


def test_a_table_lock_held_elsewhere_times_out_with_one_line(site, monkeypatch):
    p = plan(site)
    monkeypatch.setenv(db.LOCK_TIMEOUT_ENV, "1")
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_table_lock, args=(site.dsn, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        report = api.apply(state_dir=site.state, poll=0.05)
    finally:
        release.set()
        holder.join()
    assert report.stopped and "waited 1 s for a lock that another transaction holds" in report.stopped
    assert "\n" not in report.stopped
    assert not any(visible(site, s) for s in p.sessions)
    assert not api.apply(state_dir=site.state, poll=0.05).failures  # lock gone: it resumes


def _apply_waiting_on_the_lock(site: Site, extra_env: dict[str, str], also=lambda: True) -> subprocess.Popen:
    """``xnatmigrate apply`` in a subprocess, returned once it waits on a lock (an ungranted request in
    pg_locks) and ``also()`` holds; the caller holds the table lock."""
    env = {**os.environ, **site.env(), db.LOCK_TIMEOUT_ENV: "120", **extra_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(site.state)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    waiting = 0
    while time.monotonic() < deadline:
        with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
            (waiting,) = cur.fetchone()
        if waiting and also():
            break
        time.sleep(0.1)
    assert waiting, "apply never waited on the lock"
    return proc


def test_ctrl_c_while_waiting_on_a_lock_stops_at_once(site):
    plan(site)
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_table_lock, args=(site.dsn, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        proc = _apply_waiting_on_the_lock(site, {})
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - started
    finally:
        release.set()
        holder.join()
    assert proc.returncode == 130, (out, err)
    assert "interrupted: rerun the same command to resume" in err
    assert took < 20  # bounded by communicate's timeout: the lock would have held it for 60 s


def test_ctrl_c_while_the_next_group_stages_ahead_then_rerun_finishes(site):
    """A group per session: while the first waits on a table lock held elsewhere, the second is staged
    ahead on the background thread. Ctrl-C stops both at once (exit 130, one line); what was staged
    ahead is outside XNAT's view and unrecorded, and the rerun finishes every session with no scratch
    file or staging folder left."""
    from xnatmigrate.execute import files

    p = plan(site)
    assert len(p.sessions) >= 2
    second = files.staging_dir(str(site.prearchive), p.sessions[1])
    ready, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_table_lock, args=(site.dsn, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        proc = _apply_waiting_on_the_lock(site, {"XNATMIGRATE_GROUP_SESSIONS": "1"}, also=second.is_dir)
        assert second.is_dir(), "the second session was not staged ahead while the first waited"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        release.set()
        holder.join()
    assert proc.returncode == 130, (out, err)
    assert "interrupted: rerun the same command to resume" in err
    assert site.rows() == [] and not any(visible(site, s) for s in p.sessions)
    report = api.apply(state_dir=site.state, poll=0.05)
    assert not report.failures, [r.message for r in report.sessions]
    assert len(site.rows()) == len(p.sessions) and all(visible(site, s) for s in p.sessions)
    staging_root = site.prearchive / files.STAGING_DIRNAME
    assert list(staging_root.iterdir()) == []
    assert not [q for q in site.prearchive.rglob("*") if q.name.endswith(files.PART_SUFFIX)]


def test_a_hand_edited_plan_is_refused(site, capsys):
    plan(site)
    path = site.state / "plan.json"
    data = json.loads(path.read_text())
    data["sessions"][0]["session"] = "SOMEONE_ELSE"
    path.write_text(json.dumps(data))
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not match its plan_id" in err and "\n" not in err
    assert not list(site.prearchive.glob("prj001/*")) and site.rows() == []


@pytest.mark.parametrize("edit", ["source", "dest"])
def test_a_hand_edited_file_entry_is_refused(site, capsys, edit):
    plan(site)
    path = site.state / "plan.json"
    data = json.loads(path.read_text())
    f = data["sessions"][0]["scans"][0]["files"][0]
    f[edit] = str(site.manifest) if edit == "source" else "SCANS/1/DICOM/other.dcm"
    path.write_text(json.dumps(data))
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 1
    assert "does not match its plan_id" in capsys.readouterr().err


# --- a file changed after plan (item 1) ------------------------------------------------------------


def rewrite_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Change bytes without changing the size, then put the mtime back (``touch -r``)."""
    st = path.stat()
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_a_file_rewritten_after_plan_with_its_mtime_restored_fails_its_session(site):
    p = plan(site)
    victim, other = p.sessions
    f = Path(victim.files[0].source)
    rewrite_in_place(f, b"PAT001", b"PAT009")
    report = api.apply(state_dir=site.state, poll=0.05)
    by_id = {r.action_id: r for r in report.sessions}
    assert by_id[victim.action_id].outcome is Result.FAILED
    assert "changed since the plan" in (by_id[victim.action_id].message or "")
    assert "re-run xnatmigrate plan" in (by_id[victim.action_id].message or "")
    assert by_id[other.action_id].outcome is Result.DONE
    assert not visible(site, victim)
    # The scan cache does not trust the old header either: a re-plan reads the file again, and the
    # study's files now disagree on PatientID, so it is held back instead of planned on stale values.
    again = plan(site)
    (held,) = [h for h in again.held_back if h.study_uid == victim.study_uid]
    assert "disagree on the values its labels use" in held.reason and "PAT009" in held.reason


def test_a_hardlinked_file_whose_header_changed_is_caught_from_the_staged_bytes(site):
    # With hard links the ctime is not compared (linking moves it): the header read back still is.
    site.write_manifest(site.xnat.url)
    site.manifest.write_text(
        site.manifest.read_text().replace("defaults:\n", "defaults:\n  transfer: hardlink\n")
    )
    p = plan(site)
    victim = p.sessions[0]
    rewrite_in_place(Path(victim.files[0].source), b"PAT001", b"PAT009")
    report = api.apply(state_dir=site.state, poll=0.05)
    res = next(r for r in report.sessions if r.action_id == victim.action_id)
    assert res.outcome is Result.FAILED and "has another header than the one planned" in (res.message or "")
    assert not visible(site, victim)
    staged = site.prearchive / ".xnatmigrate-staging" / victim.timestamp / "prj001" / victim.session
    assert not staged.exists()  # never reused by a later run
    assert [r for r in site.rows() if r[3] == victim.session] == []


# --- saying clearly what happened ------------------------------------------------------------------


def test_verify_judges_the_whole_plan_failed_and_never_attempted(site, capsys):
    p = plan(site)
    assert cli.main(["verify", "--state-dir", str(site.state), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and len(doc["sessions"]) == 2
    assert all(s["problems"][0]["check"] == "not-applied" for s in doc["sessions"])
    assert all("never attempted" in s["problems"][0]["message"] for s in doc["sessions"])
    foreign_row_of_the_same_study(site, p.sessions[0])
    api.apply(state_dir=site.state, poll=0.05)
    assert cli.main(["verify", "--state-dir", str(site.state)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {p.sessions[0].label}: not-applied: its apply failed" in out
    assert "Verify: 1 of 2 session(s) hold; 1 problem(s), 1 session(s) not applied." in out


def test_a_plan_made_with_a_relative_manifest_applies_from_anywhere(site, monkeypatch, tmp_path):
    monkeypatch.chdir(site.manifest.parent)
    api.plan(site.manifest.name, state_dir=site.state, now=NOW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not api.apply(state_dir=site.state, poll=0.05).failures


def test_the_summary_counts_what_this_run_moved(site, capsys):
    p = plan(site)
    assert cli.main(["apply", "--state-dir", str(site.state), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["summary"]
    assert first["files"] == sum(s.file_count for s in p.sessions) and first["bytes"] == sum(
        s.bytes for s in p.sessions
    )
    assert cli.main(["apply", "--state-dir", str(site.state), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["summary"]
    assert (again["files"], again["bytes"], again["done"], again["noop"]) == (0, 0, 0, 2)


def test_a_session_interrupted_after_its_last_step_is_finished_not_noop(site):
    plan(site)
    env = {**os.environ, **site.env(), "XNATMIGRATE_TEST_CRASH": "after:build"}
    run = subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(site.state)],
        env=env,
        capture_output=True,
    )
    assert run.returncode == -9
    report = api.apply(state_dir=site.state, poll=0.05)
    first = report.sessions[0]
    assert first.outcome is Result.DONE and "interrupted earlier run" in (first.message or "")
    assert report.sessions[1].outcome is Result.DONE and report.sessions[1].message is None


def test_after_the_rest_build_the_row_is_handed_back_to_xnats_scheduler(site):
    """A build copies prevent_auto_commit from the old row (§9): left true, later data of the study
    would stay RECEIVING for ever. After READY the tool sets it back to false on its own rows."""
    plan(site)
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    assert [(r[6], r[10]) for r in site.rows()] == [("READY", "False"), ("READY", "False")]
