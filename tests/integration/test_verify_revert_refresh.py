"""verify, revert and refresh on real PostgreSQL, real files and the REST stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.sites import NOW
from xnatmigrate import api, cli


def applied(site, **manifest_changes):
    for k, v in manifest_changes.items():
        setattr(site, k, v)
    site.write_manifest(site.xnat.url)
    outcome = api.plan(site.manifest, state_dir=site.state, now=NOW)
    report = api.apply(state_dir=site.state, poll=0.05)
    assert not report.failures, [s.message for s in report.sessions]
    return outcome.plan


def foreign_upload(site):
    """Another upload's session in the same prearchive: must survive any revert."""
    sdir = site.prearchive / "prj001" / "20200101_000000000" / "OTHER"
    (sdir / "SCANS" / "1" / "DICOM").mkdir(parents=True)
    (sdir / "SCANS" / "1" / "DICOM" / "x.dcm").write_bytes(b"other")
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url, source) "
            "VALUES ('prj001', '20200101_000000000', 'OTHER', 'OTHER', '9.9', 'READY', %s, NULL)",
            (str(sdir),),
        )
    return sdir


def test_verify_passes_then_names_a_corrupted_file(site, capsys, tmp_path):
    plan = applied(site)
    assert cli.main(["verify", "--state-dir", str(site.state)]) == 0
    assert "2 of 2 session(s) hold" in capsys.readouterr().out
    victim = Path(plan.sessions[0].session_dir) / plan.sessions[0].files[0].dest
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    junit = tmp_path / "verify.xml"
    assert cli.main(["verify", "--state-dir", str(site.state), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert f"SHA-256 differs from the one recorded at apply: {victim}" in out
    assert "<failure" in junit.read_text() and 'tests="2" failures="1"' in junit.read_text()
    # --quick compares sizes only: same size, so it holds.
    assert cli.main(["verify", "--state-dir", str(site.state), "--quick"]) == 0
    capsys.readouterr()
    victim.unlink()
    assert cli.main(["verify", "--state-dir", str(site.state), "--json", "--quick"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "missing" in doc["sessions"][0]["problems"][0]["message"]


def test_verify_flags_a_row_changed_behind_our_back(site, capsys):
    plan = applied(site)
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE xdat_search.prearchive SET tag = 'tampered' WHERE foldername = %s",
            (plan.sessions[1].session,),
        )
        cur.execute(
            "UPDATE xdat_search.prearchive SET status = 'ERROR' WHERE foldername = %s",
            (plan.sessions[0].session,),
        )
    assert cli.main(["verify", "--state-dir", str(site.state)]) == 1
    out = capsys.readouterr().out
    assert "column tag is 'tampered'" in out and "status ERROR" in out


def test_verify_archived_sessions_counts_files_in_xnat(site, capsys):
    applied(site, archive=True)
    assert cli.main(["verify", "--state-dir", str(site.state)]) == 0
    assert "not checked: checksums of archived files" in capsys.readouterr().out


def test_revert_dry_run_then_removes_only_ours(site, capsys):
    plan = applied(site)
    other = foreign_upload(site)
    assert cli.main(["revert", "--state-dir", str(site.state)]) == 0
    out = capsys.readouterr().out
    assert out.count("  would-remove ") == 2 and "Nothing was removed" in out
    assert all(Path(s.session_dir).exists() for s in plan.sessions)
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes"]) == 0
    assert not any(Path(s.session_dir).exists() for s in plan.sessions)
    assert (other / "SCANS" / "1" / "DICOM" / "x.dcm").read_bytes() == b"other"
    assert [r[3] for r in site.rows()] == ["OTHER"]
    # A later plan plans the reverted sessions again.
    again = api.plan(site.manifest, state_dir=site.state, now=NOW)
    assert len(again.plan.sessions) == 2


def test_revert_without_rest_removes_files_then_rows(site, capsys):
    plan = applied(site)
    other = foreign_upload(site)
    site.write_manifest(None)  # no xnat.url: files and rows directly
    data = json.loads((site.state / "plan.json").read_text())
    data["xnat"]["url"] = None
    (site.state / "plan.json").write_text(json.dumps(data))
    assert (
        cli.main(["revert", "--state-dir", str(site.state), "--yes", "--session", plan.sessions[0].session])
        == 0
    )
    assert not Path(plan.sessions[0].session_dir).exists() and Path(plan.sessions[1].session_dir).exists()
    assert sorted(r[3] for r in site.rows()) == sorted(["OTHER", plan.sessions[1].session])
    assert other.exists()


def test_revert_refuses_locked_changed_and_archived(site, capsys):
    plan = applied(site)
    s0, s1 = plan.sessions
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE xdat_search.prearchive SET status = '_BUILDING' WHERE foldername = %s", (s0.session,)
        )
    victim = Path(s1.session_dir) / s1.files[0].dest
    victim.write_bytes(victim.read_bytes() + b"x")
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes"]) == 1
    err = capsys.readouterr().err
    assert "locked (status _BUILDING)" in err and "changed since apply" in err
    assert Path(s0.session_dir).exists() and Path(s1.session_dir).exists()
    assert (
        cli.main(["revert", "--state-dir", str(site.state), "--yes", "--force", "--session", s1.session]) == 0
    )
    assert not Path(s1.session_dir).exists()


def test_revert_refuses_archived_unless_asked(site, capsys):
    plan = applied(site, archive=True)
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes"]) == 1
    assert "it is archived in XNAT; --archived" in capsys.readouterr().err
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes", "--archived"]) == 0
    assert site.xnat.experiments == {}
    assert not (site.archive_dir / "prj001" / "arc001" / plan.sessions[0].session).exists()


def test_verify_revert_refresh_act_where_the_ledger_says_not_on_plan_json(site, capsys):
    """The target is recorded per session at apply: a later plan.json (or none) does not redirect them."""
    plan = applied(site)
    (site.state / "plan.json").unlink()
    assert cli.main(["verify", "--state-dir", str(site.state)]) == 0
    assert "2 of 2 session(s) hold" in capsys.readouterr().out
    assert cli.main(["refresh", "--state-dir", str(site.state)]) == 0
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes"]) == 0
    assert site.rows() == [] and not any(Path(s.session_dir).exists() for s in plan.sessions)


def test_revert_killed_midway_resumes(site):
    # No xnat.url: revert removes the folder itself, then the row (the REST DELETE path does both at once).
    site.build = "none"
    site.write_manifest(None)
    plan = api.plan(site.manifest, state_dir=site.state, now=NOW).plan
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    code = (
        "import os, signal, sys\n"
        "import xnatmigrate.execute.revert as r\n"
        "real = r._Reverter.remove_row\n"
        "def boom(self, s, item):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "r._Reverter.remove_row = boom\n"
        "from xnatmigrate import cli\n"
        f"sys.exit(cli.main(['revert', '--state-dir', {str(site.state)!r}, '--yes']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **site.env()}, capture_output=True)
    assert run.returncode == -9
    assert not Path(plan.sessions[0].session_dir).exists()  # files went first
    assert len(site.rows()) == 2  # rows not yet
    assert cli.main(["revert", "--state-dir", str(site.state), "--yes"]) == 0
    assert site.rows() == [] and not any(Path(s.session_dir).exists() for s in plan.sessions)


def test_refresh_reports_built_archived_deleted_moved_and_stuck(site, capsys):
    plan = applied(site, build="none")
    s0, s1 = plan.sessions
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE xdat_search.prearchive SET lastmod = LOCALTIMESTAMP - interval '20 minutes' WHERE foldername = %s",
            (s0.session,),
        )
        cur.execute(
            "UPDATE xdat_search.prearchive SET project = 'prj002' WHERE foldername = %s", (s1.session,)
        )
    assert cli.main(["refresh", "--state-dir", str(site.state), "--json"]) == 0
    seen = {o["session"]: o for o in json.loads(capsys.readouterr().out)}
    stuck = seen[f"prj001/{s0.session}"]
    assert stuck["state"] == "stuck" and "prevent_auto_commit is true" in stuck["detail"]
    assert (
        seen[f"prj001/{s1.session}"]["state"] == "moved"
        and "prj002" in seen[f"prj001/{s1.session}"]["detail"]
    )
    assert cli.main(["status", "--state-dir", str(site.state), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["observed"]["state"] for r in rows} == {"stuck", "moved"}
    with psycopg.connect(site.dsn) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM xdat_search.prearchive")
    assert cli.main(["refresh", "--state-dir", str(site.state), "--json"]) == 0
    assert {o["state"] for o in json.loads(capsys.readouterr().out)} == {"deleted"}
