"""plan → apply for the prearchive method, end to end on real PostgreSQL, real files and the
strict XNAT REST stand-in; kill -9 at many points must end exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_sql import sent_text
from tests.sites import NOW, Site
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.errors import StalePlanError
from xnatmigrate.execute import db
from xnatmigrate.render import to_sql_text


def plan_and_apply(s: Site, **kw):
    outcome = api.plan(s.manifest, state_dir=s.state, now=NOW)
    report = api.apply(state_dir=s.state, poll=0.05, **kw)
    return outcome, report


def test_apply_puts_sessions_where_xnat_expects_and_builds_them(site):
    outcome, report = plan_and_apply(site)
    plan = outcome.plan
    assert len(plan.sessions) == 2 and not report.failures
    for s in plan.sessions:
        sdir = Path(s.session_dir)
        assert sdir == site.prearchive / "prj001" / s.timestamp / s.session
        got = sorted(str(p.relative_to(sdir)) for p in sdir.rglob("*.dcm"))
        assert got == sorted(f.dest for f in s.files)
        assert (sdir.parent / f"{s.session}.xml").is_file()  # built by the stand-in (REST rebuild)
    rows = site.rows()
    assert [r[6] for r in rows] == ["READY", "READY"]
    # Publishing moved every staged session out and pruned its folders; the staging root itself stays.
    assert list((site.prearchive / ".xnatmigrate-staging").iterdir()) == []
    # Re-applying a finished plan does nothing, and re-planning finds nothing to do.
    again = api.apply(state_dir=site.state, poll=0.05)
    assert [r.outcome for r in again.sessions] == ["noop", "noop"]
    replan = api.plan(site.manifest, state_dir=site.state)
    assert not replan.plan.has_changes and len(replan.plan.unchanged) == 2


def test_the_progress_line_says_when_the_run_waits_on_xnat(site):
    site.xnat.build_delay = 0.3  # builds that take several polls
    heard: list[str] = []
    _, report = plan_and_apply(site, status=heard.append)
    assert not report.failures
    assert "waiting on XNAT" in heard  # while XNAT builds…
    first = heard.index("waiting on XNAT")
    assert "" in heard[first:]  # …and working again once the build is recorded
    assert report.xnat_seconds > 0.3


def test_executed_sql_equals_plan_sql(site, monkeypatch):
    executed: list[str] = []
    real = db.execute

    def spy(cur, stmt):
        # What the driver sends is the printed text but for each value's spelling (see test_sql).
        assert cur.mogrify(stmt.sql, dict(stmt.params)) == sent_text(stmt)
        executed.append(to_sql_text(stmt))
        return real(cur, stmt)

    monkeypatch.setattr(db, "execute", spy)
    outcome, _ = plan_and_apply(site)
    plan_sql = outcome.sql_path.read_text()
    inserts = [
        e for e in executed if "INSERT INTO xdat_search.prearchive" in e or "pg_advisory_xact_lock" in e
    ]
    # One round trip for the group: each session's advisory lock and INSERT, exactly as plan.sql has them.
    assert len(inserts) == 1
    parts = inserts[0].split("\n\n")
    assert len(parts) == 2
    for part in parts:
        assert part.index("pg_advisory_xact_lock") < part.index("INSERT INTO xdat_search.prearchive")
        assert part in plan_sql


def test_archive_moves_sessions_out_of_the_prearchive(site):
    site.archive = True
    site.write_manifest(site.xnat.url)
    outcome, report = plan_and_apply(site)
    assert not report.failures, [r.message for r in report.sessions]
    assert site.rows() == []
    assert sorted(site.xnat.experiments) == sorted(("prj001", s.session) for s in outcome.plan.sessions)
    for s in outcome.plan.sessions:
        assert (site.archive_dir / "prj001" / "arc001" / s.session / "SCANS").is_dir()
    again = api.apply(state_dir=site.state, poll=0.05)
    assert [r.outcome for r in again.sessions] == ["noop", "noop"]


def test_stale_plan_is_refused(site):
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    site.manifest.write_text(site.manifest.read_text() + "\n# edited\n")
    with pytest.raises(StalePlanError, match="manifest .* changed since the plan"):
        api.apply(state_dir=site.state)


def test_source_deleted_after_planning_fails_that_session_only(site, capsys):
    outcome = api.plan(site.manifest, state_dir=site.state, now=NOW)
    victim = outcome.plan.sessions[0].files[0].source
    os.unlink(victim)
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 1
    err = capsys.readouterr().err
    assert f"source {victim} has vanished since planning; re-run xnatmigrate plan" in err
    report_rows = site.rows()
    assert len(report_rows) == 1  # the other session went through
    assert not Path(outcome.plan.sessions[0].session_dir).exists()  # nothing half-written in XNAT's view


def test_dead_database_then_recovery_resumes(site, monkeypatch, capsys):
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    monkeypatch.setenv("XNATMIGRATE_TEST_SITE_DSN", "postgresql://nobody@127.0.0.1:1/xnat")
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to XNAT's database" in err and "rerun" in err
    monkeypatch.setenv("XNATMIGRATE_TEST_SITE_DSN", site.dsn)
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 0
    assert [r[6] for r in site.rows()] == ["READY", "READY"]


def test_rest_500_is_retried_and_persistent_failure_resumes(site, capsys):
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    site.xnat.fail_next(2, 500, path_prefix="/data/services/prearchive/rebuild")
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 0  # client retries with backoff
    site2_rows = site.rows()
    assert [r[6] for r in site2_rows] == ["READY", "READY"]


def test_rest_failure_stops_with_one_line_and_rerun_resumes(site, capsys):
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    site.xnat.fail_next(50, 503, path_prefix="/data/services/prearchive/rebuild")
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 1
    err = capsys.readouterr().err
    assert "503" in err and "rerun" in err.lower()
    # One group: both sessions staged, published and inserted together; the first build failed and
    # the run stopped before the second's build (rows stay RECEIVING, prevent_auto_commit on).
    assert [r[6] for r in site.rows()] == ["RECEIVING", "RECEIVING"]
    site.xnat.clear_faults()
    assert cli.main(["apply", "--state-dir", str(site.state)]) == 0
    assert [r[6] for r in site.rows()] == ["READY", "READY"]


def test_status_and_json(site, capsys):
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    assert cli.main(["apply", "--state-dir", str(site.state), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["done"] == 2 and doc["stopped"] is None
    assert [s["step"] for s in doc["sessions"][0]["steps"]] == ["stage", "publish", "insert", "build"]
    assert cli.main(["status", "--state-dir", str(site.state), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["applied", "applied"] and rows[0]["remaining"] == []


def test_second_apply_is_refused_while_one_runs(site):
    from xnatmigrate.errors import LockedError
    from xnatmigrate.state import StateStore

    api.plan(site.manifest, state_dir=site.state, now=NOW)
    holder = StateStore(site.state)
    holder.lock("apply")
    try:
        with pytest.raises(LockedError, match=r"in use by apply on host .* pid \d+"):
            api.apply(state_dir=site.state)
    finally:
        holder.close()


# --------------------------------------------------------------------------------------------
# kill -9 anywhere: the end state equals an uninterrupted run's
# --------------------------------------------------------------------------------------------

# Both sessions are one group (group commit): the ":2" points and every point before "build" fall
# inside it, where the ledger's records are not yet committed (a crash loses them, never an effect).
CRASH_POINTS = [
    "files:1",
    "files:5",
    "before-record:stage",
    "after:stage",
    "after:stage:2",
    "before-record:publish",
    "after:publish",
    "before-record:publish:2",
    "after:publish:2",
    "before-record:insert",
    "after:insert",
    "before-record:insert:2",
    "after:insert:2",
    "before-record:build",
    "after:build:1",
    "before-record:archive",
    "after:archive",
]


def _apply_subprocess(s: Site, crash: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, **s.env()}
    if crash:
        env["XNATMIGRATE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(s.state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _normalised(s: Site) -> tuple[list[str], list[tuple]]:
    tree = [t for t in s.tree() if ".xnatmigrate-staging" not in t]
    return tree, [r[:12] + r[13:] for r in s.rows()]


@pytest.fixture
def reference(tmp_path_factory, pg_admin_dsn):
    """An uninterrupted run with archive on, for comparison (same plan time, same corpus)."""
    from xnatmigrate.testing.pg import temporary_database

    root = tmp_path_factory.mktemp("ref")
    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(root / "site", pdb.dsn, archive=True)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.0
            s.write_manifest(xnat.url)
            with pytest.MonkeyPatch.context() as mp:  # this site's DSN and login, for this block only
                for k, v in s.env().items():
                    mp.setenv(k, v)
                api.plan(s.manifest, state_dir=s.state, now=NOW)
            run = _apply_subprocess(s, None)
            assert run.returncode == 0, run.stderr
            yield _normalised(s), sorted(xnat.experiments), _archive_tree(s)


def _archive_tree(s: Site) -> list[str]:
    return sorted(
        str(p.relative_to(s.archive_dir)) + ("/" if p.is_dir() else f" {p.stat().st_size}")
        for p in s.archive_dir.rglob("*")
        if not p.name.endswith(".xml")
    )


# "1": a group per session, so the second session's staging runs ahead on its background thread while
# the first one is published, inserted, built and archived: every point falls inside that overlap.
@pytest.mark.parametrize("group_sessions", ["200", "1"], ids=["one-group", "staging-ahead"])
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_anywhere_then_rerun_equals_uninterrupted(
    tmp_path, pg_admin_dsn, reference, crash, group_sessions, monkeypatch
):
    from xnatmigrate.testing.pg import temporary_database

    monkeypatch.setenv("XNATMIGRATE_GROUP_SESSIONS", group_sessions)

    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(tmp_path / "site", pdb.dsn, archive=True)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.0
            s.write_manifest(xnat.url)
            for k, v in s.env().items():
                monkeypatch.setenv(k, v)
            api.plan(s.manifest, state_dir=s.state, now=NOW)
            first = _apply_subprocess(s, crash)
            assert first.returncode == -9, (crash, first.returncode, first.stderr)
            second = _apply_subprocess(s, None)
            assert second.returncode == 0, second.stderr
            assert _normalised(s) == reference[0]
            assert sorted(xnat.experiments) == reference[1]
            assert _archive_tree(s) == reference[2]
            third = _apply_subprocess(s, None)
            assert third.returncode == 0 and "Nothing to do" in third.stdout
            assert not re.search(r"\.part\b", "\n".join(s.tree()))
