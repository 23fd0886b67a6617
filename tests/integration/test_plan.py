"""``xnatmigrate plan`` end to end: golden plan and SQL, pydicom's real-world files, exit codes,
cache reuse, offline planning and the database checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests import golden_regen
from xnatmigrate import api, cli

GOLDEN = golden_regen.GOLDEN
NOW = golden_regen.NOW
manifest_for = golden_regen.manifest_for


@pytest.fixture
def corpus(tmp_path):
    return golden_regen.build_golden_corpus(tmp_path)


def test_golden_plan_and_sql(tmp_path):
    """Manifest + corpus in, expected plan and SQL out. This only compares; regenerate deliberately
    with `make golden` (python -m tests.golden_regen) and review the diff."""
    got = golden_regen.render(tmp_path)
    assert sorted(got) == sorted(p.name for p in GOLDEN.iterdir())  # nothing golden goes unchecked
    for name, text in got.items():
        assert text == (GOLDEN / name).read_bytes().decode(), (
            f"{name} differs: run `make golden`, review the diff"
        )


def test_pydicom_test_files_are_all_accounted_for_and_sql_runs_twice(tmp_path, pg_db_17, monkeypatch):
    from pydicom.data import get_testdata_file

    src_dir = Path(get_testdata_file("CT_small.dcm")).parent
    source = tmp_path / "pydicom_files"
    shutil.copytree(src_dir, source)
    on_disk = sum(1 for p in source.rglob("*") if p.is_file())
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    # pydicom's files share one folder: account for each of them, do not hold the rest back.
    m = manifest_for(tmp_path, source, allow_partial_studies="true")
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
    with psycopg.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM xdat_search.prearchive")
        assert cur.fetchone()[0] == len(plan.sessions)


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
    from xnatmigrate.scan import sources  # where scan_sources looks read_header up

    def no_reading(*a, **k):  # any header read on a warm plan is a failure
        raise AssertionError("a warm plan read a file")

    monkeypatch.setattr(sources, "read_header", no_reading)
    second = api.plan(m, state_dir=tmp_path / "state", offline=True, now=NOW)
    assert second.cache_hits == second.files_seen > 0
    assert second.plan.plan_id == first.plan.plan_id


def test_plan_json_is_the_canonical_json_of_the_plan_returned(tmp_path, corpus):
    """Written in one pass with its id (issue 13): the file is the plan's canonical JSON, its id the
    content hash load_plan checks, and the collector paused while planning is running again."""
    import gc

    from xnatmigrate.model import compute_plan_id, json_text, plan_to_dict

    m = manifest_for(tmp_path, corpus)
    for _ in range(2):  # cold, then warm
        out = api.plan(m, state_dir=tmp_path / "state", offline=True, now=NOW)
        text = out.plan_path.read_text(encoding="utf-8")
        # One session per line (``model.PLAN_LAYOUT``); without those newlines, the canonical JSON.
        assert text.endswith("}\n") and text.count("\n") == len(out.plan.sessions) + 2
        assert text.replace("\n", "") == json_text(
            plan_to_dict(out.plan), sort_keys=True, separators=(",", ":")
        )
        assert out.plan.plan_id == compute_plan_id(out.plan)
        assert api.load_plan(out.plan_path) == out.plan
        assert gc.isenabled()


def test_a_file_name_that_is_not_utf8_is_planned_like_any_other(tmp_path, corpus, capsys):
    first = sorted(corpus.rglob("IMG0002.dcm"))[0]  # planned under its own name (IMG0001 is a duplicate)
    bad = os.fsencode(first.parent) + b"/bad\xff\xfe name.dcm"  # Latin-1 bytes, not UTF-8
    os.rename(first, bad)
    m = manifest_for(tmp_path, corpus, allow_partial_studies="true").as_posix()
    state = tmp_path / "s"
    for _ in range(2):  # cold, then from the scan cache
        assert cli.main(["plan", m, "--state-dir", str(state), "--offline"]) == 0
        assert "bad\\udcff\\udcfe name.dcm" not in capsys.readouterr().err
        raw = (state / "plan.json").read_bytes()
        raw.decode("utf-8")  # plan.json stays UTF-8: the name's bytes are written as JSON escapes
        plan = api.load_plan(state / "plan.json")  # and its content hash still holds
        sources = {f.source for s in plan.sessions for f in s.files}
        assert os.fsdecode(bad) in sources and os.path.exists(os.fsencode(os.fsdecode(bad)))
    assert cli.main(["plan", m, "--state-dir", str(state), "--offline", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan_id"] == plan.plan_id


def test_offline_marks_what_was_not_checked_and_dead_db_is_reported(tmp_path, corpus, monkeypatch, capsys):
    m = manifest_for(tmp_path, corpus)
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s"), "--offline"]) == 0
    assert "not checked: XNAT's database (--offline)" in capsys.readouterr().out
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", "postgresql://nobody@127.0.0.1:1/x")
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s")]) == 0
    assert "not checked: XNAT's database (cannot connect" in capsys.readouterr().out


def test_unknown_table_profile_refuses_the_plan(tmp_path, corpus, pg_db_17, monkeypatch, capsys):
    with psycopg.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE xdat_search.prearchive DROP COLUMN timezone")
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    m = manifest_for(tmp_path, corpus)
    assert cli.main(["plan", m.as_posix(), "--state-dir", str(tmp_path / "s")]) == 1
    assert "match no known XNAT profile" in capsys.readouterr().err


def test_existing_row_holds_the_study_back(tmp_path, corpus, pg_db_17, monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_TEST_PLAN_DSN", pg_db_17.dsn)
    m = manifest_for(tmp_path, corpus)
    plan = api.plan(m, state_dir=tmp_path / "s", offline=True, now=NOW).plan
    victim = plan.sessions[0]
    with psycopg.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url) "
            "VALUES ('prj001', '20200101_000000000', %s, %s, %s, 'READY', '/x')",
            (victim.session, victim.session, victim.study_uid),
        )
    again = api.plan(m, state_dir=tmp_path / "s2", now=NOW).plan
    assert victim.study_uid in {h.study_uid for h in again.held_back}
    assert len(again.sessions) == len(plan.sessions) - 1


def test_overlapping_sources_say_which_source_won(tmp_path, corpus, capsys):
    first = sorted(p for p in corpus.iterdir() if p.is_dir())[0]  # one patient's folder, also in the whole
    extra = (
        f"  - source: {first}\n"
        "    project: prj002\n"
        '    subject: "{{ PatientName }}"\n'
        '    session: "{{ PatientID }}_{{ StudyDate }}_{{ Modality }}"\n'
    )
    m = manifest_for(tmp_path, corpus, extra, allow_partial_studies="true")
    assert cli.main(["plan", str(m), "--state-dir", str(tmp_path / "s"), "--offline", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    n = sum(1 for p in first.rglob("*") if p.is_file())
    (w,) = [w for w in doc["warnings"] if "are under both" in w]
    assert w.startswith(f"{n} file(s) are under both sources[0] and sources[1]")
    assert "migrated with sources[0], the first listed" in w
    assert {s["project"] for s in doc["sessions"]} == {"prj001"}
