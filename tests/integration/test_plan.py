"""``xnatmigrate plan`` end to end: golden plan and SQL, pydicom's real-world files, exit codes,
cache reuse, offline planning and the database checks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from datetime import datetime
from pathlib import Path

import psycopg2
import pytest

from xnatmigrate import api, cli
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NOW = datetime(2024, 2, 29, 23, 59, 59, 999000)


def manifest_for(tmp_path: Path, source: Path, extra: str = "", **opts: str) -> Path:
    lines = "\n".join(f"  {k}: {v}" for k, v in opts.items())
    m = tmp_path / "manifest.yaml"
    m.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {tmp_path / "prearchive"}
              prearchive_url_root: /data/xnat/prearchive
              database: {{dsn_env: XNATMIGRATE_TEST_PLAN_DSN}}
            defaults:
              build: none
            """
        )
        + (lines + "\n" if lines else "")
        + textwrap.dedent(
            f"""\
            sources:
              - source: {source}
                project: prj001
                subject: "{{{{ PatientName }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}_{{{{ Modality }}}}"
            """
        )
        + extra
    )
    (tmp_path / "prearchive").mkdir(exist_ok=True)
    return m


def normalise(text: str, tmp_path: Path) -> str:
    text = text.replace(str(tmp_path), "<tmp>")
    text = re.sub(r'"mtime_ns": \d+', '"mtime_ns": 0', text)
    text = re.sub(r"sha256 [0-9a-f]{64}", "sha256 <digest>", text)
    text = re.sub(r'"manifest_digest": "[0-9a-f]{64}"', '"manifest_digest": "<digest>"', text)
    text = re.sub(r"plan [0-9a-f]{64}", "plan <id>", text)
    return re.sub(r'"plan_id": "[0-9a-f]{64}"', '"plan_id": "<id>"', text)


@pytest.fixture
def corpus(tmp_path):
    spec = CorpusSpec(
        patients=2,
        studies_per_patient=2,
        series_per_study=2,
        images_per_series=2,
        rows=8,
        seed=11,
        nuisances=True,
    )
    build_corpus(tmp_path / "legacy", spec)
    return tmp_path / "legacy"


def test_golden_plan_and_sql(tmp_path, corpus):
    """Manifest + corpus in, expected plan and SQL out. Regenerate deliberately with
    XNATMIGRATE_REGENERATE_GOLDEN=1 and review the diff."""
    m = manifest_for(tmp_path, corpus)
    out = api.plan(m, state_dir=tmp_path / "state", offline=True, now=NOW)
    got_plan = normalise(
        json.dumps(json.loads(out.plan_path.read_text()), indent=1, sort_keys=True), tmp_path
    )
    got_sql = normalise(out.sql_path.read_text(), tmp_path)
    if os.environ.get("XNATMIGRATE_REGENERATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / "plan.json").write_text(got_plan + "\n")
        (GOLDEN / "plan.sql").write_text(got_sql)
    assert got_plan + "\n" == (GOLDEN / "plan.json").read_text()
    assert got_sql == (GOLDEN / "plan.sql").read_text()


def test_pydicom_test_files_are_all_accounted_for_and_sql_runs_twice(tmp_path, pg_db_17, monkeypatch):
    from pydicom.data import get_testdata_file

    src_dir = Path(get_testdata_file("CT_small.dcm")).parent
    source = tmp_path / "pydicom_files"
    shutil.copytree(src_dir, source)
    on_disk = sum(1 for p in source.rglob("*") if p.is_file())
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    m = manifest_for(tmp_path, source)
    out = api.plan(m, state_dir=tmp_path / "state", now=NOW)
    plan = out.plan
    planned = sum(s.file_count for s in plan.sessions)
    assert planned + len(plan.rejected) == on_disk
    assert planned > 0 and "CT_small.dcm" in {Path(f.source).name for s in plan.sessions for f in s.files}
    if shutil.which("psql") is None:
        pytest.skip("psql not installed; .ci/run installs postgresql-client")
    for _ in range(2):
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(out.sql_path), pg_db_17.dsn],
            check=True,
            capture_output=True,
        )
    with psycopg2.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM xdat_search.prearchive")
        assert cur.fetchone()[0] == len(plan.sessions)
    conn.close()


def test_exit_codes_strict_and_nothing_to_do(tmp_path, corpus, pg_db_17, monkeypatch, capsys):
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    # The fixed session label makes two studies of one patient collide: held back, not refused.
    m = manifest_for(tmp_path, corpus)
    state = str(tmp_path / "state")
    assert cli.main(["plan", m.as_posix(), "--state-dir", state, "--detailed-exitcode"]) == 2
    assert cli.main(["plan", m.as_posix(), "--state-dir", state]) == 0
    capsys.readouterr()
    assert cli.main(["apply", "--state-dir", state]) == 0
    capsys.readouterr()
    assert cli.main(["plan", m.as_posix(), "--state-dir", state, "--detailed-exitcode"]) == 0
    assert "No changes." in capsys.readouterr().out
    collide = manifest_for(tmp_path, corpus)
    collide.write_text(collide.read_text().replace('_{{ StudyDate }}_{{ Modality }}"', '"'))
    assert cli.main(["plan", collide.as_posix(), "--state-dir", str(tmp_path / "s2"), "--offline"]) == 0
    assert "held back" in capsys.readouterr().out
    assert (
        cli.main(["plan", collide.as_posix(), "--state-dir", str(tmp_path / "s2"), "--offline", "--strict"])
        == 1
    )


def test_warm_plan_reads_no_file_contents(tmp_path, corpus, monkeypatch, capsys):
    m = manifest_for(tmp_path, corpus)
    first = api.plan(m, state_dir=tmp_path / "state", offline=True, now=NOW)
    assert first.cache_hits == 0
    import xnatmigrate.scan as scan

    def no_reading(*a, **k):  # any header read on a warm plan is a failure
        raise AssertionError("a warm plan read a file")

    monkeypatch.setattr(scan, "read_header", no_reading)
    second = api.plan(m, state_dir=tmp_path / "state", offline=True, now=NOW)
    assert second.cache_hits == second.files_seen > 0
    assert second.plan.plan_id == first.plan.plan_id


def test_offline_marks_what_was_not_checked_and_dead_db_is_reported(tmp_path, corpus, monkeypatch, capsys):
    m = manifest_for(tmp_path, corpus)
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s"), "--offline"]) == 0
    assert "not checked: XNAT's database (--offline)" in capsys.readouterr().out
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", "postgresql://nobody@127.0.0.1:1/x")
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s")]) == 0
    assert "not checked: XNAT's database (cannot connect" in capsys.readouterr().out


def test_unknown_table_profile_refuses_the_plan(tmp_path, corpus, pg_db_17, monkeypatch, capsys):
    with psycopg2.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE xdat_search.prearchive DROP COLUMN timezone")
    conn.close()
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    m = manifest_for(tmp_path, corpus)
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s")]) == 1
    assert "match no known XNAT profile" in capsys.readouterr().err


def test_existing_row_holds_the_study_back(tmp_path, corpus, pg_db_17, monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    m = manifest_for(tmp_path, corpus)
    plan = api.plan(m, state_dir=tmp_path / "s", offline=True, now=NOW).plan
    victim = plan.sessions[0]
    with psycopg2.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url) "
            "VALUES ('prj001', '20200101_000000000', %s, %s, %s, 'READY', '/x')",
            (victim.session, victim.session, victim.study_uid),
        )
    conn.close()
    again = api.plan(m, state_dir=tmp_path / "s2", now=NOW).plan
    assert victim.study_uid in {h.study_uid for h in again.held_back}
    assert len(again.sessions) == len(plan.sessions) - 1
