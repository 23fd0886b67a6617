"""The whole run with the ledger in PostgreSQL (``--state-url``), against the prearchive stand-in:
plan → apply → re-apply (nothing) → status → verify, the lock per ledger, a dead state database, and
kill -9 followed by a resume through the PostgreSQL ledger ending as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import fresh_schema, state_url_of
from tests.integration.test_apply_prearchive import _archive_tree, _normalised
from tests.integration.test_apply_prearchive import reference as reference  # a fixture, reused
from tests.sites import NOW, Site
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.errors import LockedError, PlanError, StalePlanError
from xnatmigrate.execute import statepg
from xnatmigrate.state import StateStore


def _ledger_rows(state_db_dsn: str, url: str, table: str) -> list[tuple]:
    schema = statepg.parse_state_url(url).schema
    with psycopg.connect(state_db_dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {schema}.{table}")
        return cur.fetchall()


def test_plan_apply_reapply_status_verify_through_the_pg_ledger(site, state_url, state_db_dsn, capsys):
    state = ["--state-dir", str(site.state), "--state-url", state_url]
    assert cli.main(["plan", str(site.manifest), *state]) == 0
    # The plan's files stay in the state directory; the ledger and the scan cache are in the schema.
    assert sorted(p.name for p in site.state.iterdir()) == ["plan.json", "plan.sql"]
    assert len(_ledger_rows(state_db_dsn, state_url, "scan_cache")) == len(site.files)
    capsys.readouterr()

    assert cli.main(["apply", *state, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["done"] == 2 and doc["stopped"] is None
    assert [r[6] for r in site.rows()] == ["READY", "READY"]
    assert {r[3] for r in _ledger_rows(state_db_dsn, state_url, "sessions")} == {"prj001"}
    assert not (site.state / "state.db").exists() and not (site.state / "lock").exists()

    again = api.apply(state_dir=site.state, state_url=state_url, poll=0.05)
    assert [r.outcome for r in again.sessions] == ["noop", "noop"]
    replan = api.plan(site.manifest, state_dir=site.state, state_url=state_url)
    assert not replan.plan.has_changes and len(replan.plan.unchanged) == 2

    assert cli.main(["status", *state, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["applied", "applied"] and rows[0]["remaining"] == []
    assert cli.main(["verify", *state]) == 0
    assert "Verify: 2 of 2 session(s) hold; 0 problem(s)" in capsys.readouterr().out

    # The same ledger seen through SQLite's default: there is none in the directory.
    assert cli.main(["status", "--state-dir", str(site.state)]) == 1
    assert "no state in" in capsys.readouterr().err


def test_a_plan_made_on_one_host_is_applied_from_another_through_the_ledger(
    site, state_url, state_db_dsn, tmp_path, capsys
):
    """Issue 16: the plan lives in the shared ledger too. A second host (its own, empty state directory:
    no plan.json) applies, checks and verifies the very plan the first one made and reviewed."""
    outcome = api.plan(site.manifest, state_dir=site.state, state_url=state_url, now=NOW)
    saved = _ledger_rows(state_db_dsn, state_url, "plans")
    # One row per line of plan.json, together its exact bytes.
    assert b"".join(bytes(r[2]) for r in sorted(saved, key=lambda r: r[1])) == outcome.plan_path.read_bytes()
    assert {r[0] for r in saved} == {outcome.plan.plan_id} and len(saved) == len(outcome.plan.sessions) + 2
    other = tmp_path / "host-b"  # never planned here
    report = api.apply(state_dir=other, state_url=state_url, poll=0.05)
    assert report.plan_id == outcome.plan.plan_id and not report.failures
    assert [r[6] for r in site.rows()] == ["READY", "READY"]
    assert not other.exists()  # nothing of the ledger or the plan was needed on this host's disk
    assert cli.main(["verify", "--state-dir", str(other), "--state-url", state_url]) == 0
    assert "Verify: 2 of 2 session(s) hold" in capsys.readouterr().out
    # A newer plan replaces the saved one (the one applied is kept while it is current).
    again = api.plan(site.manifest, state_dir=site.state, state_url=state_url)
    assert not again.plan.has_changes
    ids = {r[0] for r in _ledger_rows(state_db_dsn, state_url, "plans")}
    assert ids == {outcome.plan.plan_id, again.plan.plan_id}
    assert [r.outcome for r in api.apply(state_dir=other, state_url=state_url, poll=0.05).sessions] == []


def test_a_damaged_saved_plan_is_refused_not_applied(site, state_url, state_db_dsn, tmp_path):
    api.plan(site.manifest, state_dir=site.state, state_url=state_url, now=NOW)
    schema = statepg.parse_state_url(state_url).schema
    with psycopg.connect(state_db_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"UPDATE {schema}.plans SET line = convert_to(replace(convert_from(line, 'UTF8'), "
            "'prj001', 'prj002'), 'UTF8') WHERE seq = 1"
        )
        assert cur.rowcount == 1
    with pytest.raises(PlanError, match="re-run `xnatmigrate plan`"):
        api.apply(state_dir=tmp_path / "host-b", state_url=state_url, poll=0.05)
    assert site.rows() == []


def test_refresh_and_revert_act_through_the_pg_ledger(site, state_url, state_db_dsn, capsys):
    state = ["--state-dir", str(site.state), "--state-url", state_url]
    outcome = api.plan(site.manifest, state_dir=site.state, state_url=state_url, now=NOW)
    assert not api.apply(state_dir=site.state, state_url=state_url, poll=0.05).failures
    assert cli.main(["refresh", *state]) == 0
    assert len(_ledger_rows(state_db_dsn, state_url, "observed")) == 2  # recorded in the schema
    assert cli.main(["revert", *state, "--yes"]) == 0
    assert not any(Path(s.session_dir).exists() for s in outcome.plan.sessions) and site.rows() == []
    assert {r["status"] for r in api_status(site, state_url)} == {"reverted"}
    # The saved plan was bound to the ledger's serial before the revert: stale now, refused.
    with pytest.raises(StalePlanError, match="the state moved on since this plan"):
        api.apply(state_dir=site.state, state_url=state_url)
    # A later plan plans the reverted sessions again (the serial moved in the schema).
    again = api.plan(site.manifest, state_dir=site.state, state_url=state_url, now=NOW)
    assert len(again.plan.sessions) == 2 and again.plan.state_serial == outcome.plan.state_serial + 2


def api_status(site: Site, url: str) -> list[dict]:
    return [{"status": str(r.status)} for r in api.status(site.state, state_url=url)]


def test_the_state_url_comes_from_the_environment(site, state_url, state_db_dsn, monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_STATE_URL", state_url)
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    report = api.apply(state_dir=site.state, poll=0.05)
    assert not report.failures and [r[6] for r in site.rows()] == ["READY", "READY"]
    assert len(_ledger_rows(state_db_dsn, state_url, "sessions")) == 2
    assert not (site.state / "state.db").exists()


def test_a_second_apply_of_the_same_plan_is_refused_and_another_schema_is_not_blocked(
    site, state_url, state_db_dsn
):
    api.plan(site.manifest, state_dir=site.state, state_url=state_url, now=NOW)
    holder = StateStore(create=False, opener=statepg.opener(state_url))
    try:
        holder.lock("apply")
        with pytest.raises(
            LockedError, match=r"the state schema \w+ in .* is in use by apply on host .* pid \d+"
        ):
            api.apply(state_dir=site.state, state_url=state_url)
        assert site.rows() == []  # refused before anything was done
        # An unrelated plan with its own ledger (another schema, another state directory) goes ahead.
        other_url = state_url_of(state_db_dsn, fresh_schema())
        other_dir = site.root / "other-state"
        api.plan(site.manifest, state_dir=other_dir, state_url=other_url, now=NOW)
        report = api.apply(state_dir=other_dir, state_url=other_url, poll=0.05)
        assert not report.failures and [r[6] for r in site.rows()] == ["READY", "READY"]
    finally:
        holder.close()


def test_a_dead_state_database_is_one_line_and_nothing_is_applied(site, state_url, capsys):
    assert (
        cli.main(["plan", str(site.manifest), "--state-dir", str(site.state), "--state-url", state_url]) == 0
    )
    capsys.readouterr()
    dead = "postgresql://nobody@127.0.0.1:1/migrations?schema=" + statepg.parse_state_url(state_url).schema
    assert cli.main(["apply", "--state-dir", str(site.state), "--state-url", dead]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: cannot connect to the state database" in err
    assert site.rows() == [] and not (site.prearchive / "prj001").exists()
    # The database back: the same plan applies.
    assert cli.main(["apply", "--state-dir", str(site.state), "--state-url", state_url]) == 0
    assert [r[6] for r in site.rows()] == ["READY", "READY"]


# --------------------------------------------------------------------------------------------
# kill -9, then a resume through the PostgreSQL ledger: the end state equals an uninterrupted run's
# --------------------------------------------------------------------------------------------

# A few points of test_apply_prearchive's matrix: inside the group (records not yet committed), after
# the insert (an effect in XNAT's database), and after the first build (the group committed).
CRASH_POINTS = ["before-record:stage", "after:insert:2", "after:build:1", "before-record:archive"]


def _apply(s: Site, url: str, crash: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, **s.env()}
    if crash:
        env["XNATMIGRATE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(s.state), "--state-url", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_then_resume_through_the_pg_ledger_equals_uninterrupted(
    tmp_path, pg_admin_dsn, state_url, state_db_dsn, reference, crash, monkeypatch
):
    from xnatmigrate.testing.pg import temporary_database

    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(tmp_path / "site", pdb.dsn, archive=True)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.0
            s.write_manifest(xnat.url)
            for k, v in s.env().items():
                monkeypatch.setenv(k, v)
            api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
            first = _apply(s, state_url, crash)
            assert first.returncode == -9, (crash, first.returncode, first.stderr)
            second = _apply(s, state_url, None)
            assert second.returncode == 0, second.stderr
            assert _normalised(s) == reference[0]
            assert sorted(xnat.experiments) == reference[1]
            assert _archive_tree(s) == reference[2]
            third = _apply(s, state_url, None)
            assert third.returncode == 0 and "Nothing to do" in third.stdout
            assert not re.search(r"\.part\b", "\n".join(s.tree()))
    statuses = {r[15] for r in _ledger_rows(state_db_dsn, state_url, "sessions")}
    assert statuses == {"applied"}
