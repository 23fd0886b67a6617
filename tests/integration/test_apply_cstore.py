"""plan → apply for ``method: cstore``: real DICOM peers, routing, resume, and the XNAT round trip
(receiver files the session, REST builds and archives it, verify counts the instances)."""

from __future__ import annotations

import json
import shutil
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from tests.dicom_peers import DcmtkStoreSCP, PynetdicomStoreSCP, dcmdump, sha256_of
from tests.xnat_receiver import XnatReceiverSCP
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.execute.xnat import XnatClient, credentials_from_env
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

NOW = datetime(2024, 5, 6, 7, 8, 9)
SPEC = CorpusSpec(patients=2, studies_per_patient=1, series_per_study=2, images_per_series=3, rows=16, seed=5)


def write_manifest(
    path: Path,
    source: Path,
    port: int,
    url: str | None = None,
    routing: str = "patient_comments",
    build: str = "none",
    archive: bool = False,
) -> None:
    url_line = f"  url: {url}\n" if url else ""
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              scp: {{host: 127.0.0.1, port: {port}, called_aet: XNAT, calling_aet: XNATMIGRATE}}
            """
        )
        + url_line
        + textwrap.dedent(
            f"""\
            defaults:
              method: cstore
              routing: {routing}
              build: {build}
              archive: {str(archive).lower()}
              build_timeout: 30
            sources:
              - source: {source}
                project: prj001
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
    )


@pytest.fixture
def corpus(tmp_path):
    files = build_corpus(tmp_path / "legacy", SPEC)
    return tmp_path / "legacy", files


def test_send_routes_every_instance_and_resends_nothing(tmp_path, corpus, capsys):
    source, files = corpus
    before = sha256_of(f.path for f in files)
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        outcome = api.plan(manifest, state_dir=tmp_path / "state", now=NOW)
        assert cli.main(["plan", str(manifest), "--state-dir", str(tmp_path / "state"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["sessions"][0]["routing_line"].startswith("Project: prj001 Subject: PAT")
        assert outcome.sql_path.read_text().count("INSERT INTO") == 0  # no rows for cstore sessions
        assert cli.main(["apply", "--state-dir", str(tmp_path / "state")]) == 0
        assert len(scp.received) == len(files)
        for s in outcome.plan.sessions:
            for f in s.files:
                assert scp.received[f.sop_instance_uid].patient_comments == s.routing_line
        attempts = dict(scp.attempts)
        assert cli.main(["apply", "--state-dir", str(tmp_path / "state")]) == 0
        assert "Nothing to do" in capsys.readouterr().out
        assert scp.attempts == attempts  # nothing re-sent
    assert sha256_of(f.path for f in files) == before  # sources untouched


def test_receiver_down_mid_send_then_rerun_sends_only_the_rest(tmp_path, corpus, capsys):
    source, files = corpus
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        api.plan(manifest, state_dir=tmp_path / "state", now=NOW)

        def stop_after_four():
            deadline = time.monotonic() + 30
            while len(scp.received) < 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            scp.stop()  # the receiver goes down mid-send

        watcher = threading.Thread(target=stop_after_four)
        watcher.start()
        assert cli.main(["apply", "--state-dir", str(tmp_path / "state")]) == 1
        watcher.join()
        err = capsys.readouterr().err
        assert "rerun" in err
        got_first = set(scp.received)
        assert 0 < len(got_first) < len(files)
        scp.start()
        assert cli.main(["apply", "--state-dir", str(tmp_path / "state")]) == 0
        assert len(scp.received) == len(files)
        confirmed_first = [uid for uid in got_first if scp.attempts[uid] > 1]
        # Only instances whose confirmation was lost with the connection may be sent twice.
        assert len(confirmed_first) <= 1


def test_wrong_called_ae_is_one_clear_line(tmp_path, corpus, capsys):
    source, _ = corpus
    with PynetdicomStoreSCP(ae_title="OTHER") as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        api.plan(manifest, state_dir=tmp_path / "state", now=NOW)
        assert cli.main(["apply", "--state-dir", str(tmp_path / "state")]) == 1
        err = capsys.readouterr().err
        assert "called_aet" in err


@pytest.mark.skipif(
    shutil.which("storescp") is None, reason="dcmtk storescp not installed; .ci/run installs it"
)
def test_dcmtk_storescp_receives_the_routing_line(tmp_path, corpus):
    source, files = corpus
    out = tmp_path / "received"
    out.mkdir()
    with DcmtkStoreSCP(out) as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port, routing="study_comments")
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        report = api.apply(state_dir=tmp_path / "state", jobs=2)
        assert not report.failures
        received = scp.received()
    assert len(received) == len(files)
    s = plan.sessions[0]
    dumped = dcmdump(received[s.files[0].sop_instance_uid], "0032,4000")
    assert s.routing_line in dumped


def xnat_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """XNAT's prearchive and archive folders, and the REST credentials of the stand-in's admin."""
    prearchive, archive = tmp_path / "prearchive", tmp_path / "archive"
    prearchive.mkdir()
    archive.mkdir()
    monkeypatch.setenv("XNAT_USER", "admin")
    monkeypatch.setenv("XNAT_PASSWORD", "admin")
    return prearchive, archive


def test_xnat_round_trip_build_archive_verify(tmp_path, corpus, pg_db_17, monkeypatch, capsys):
    source, _ = corpus
    prearchive, archive = xnat_folders(tmp_path, monkeypatch)
    with (
        XnatStandIn(pg_db_17.dsn, prearchive, archive, projects={"prj001": 0}) as xnat,
        XnatReceiverSCP(dsn=pg_db_17.dsn, prearchive=prearchive, projects={"prj001"}) as scp,
    ):
        xnat.build_delay = 0.0
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port, url=xnat.url, build="rest", archive=True)
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        report = api.apply(state_dir=tmp_path / "state", poll=0.05)
        assert not report.failures, [s.message for s in report.sessions]
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
        for s in plan.sessions:
            exp = xnat.experiments[("prj001", s.session)]
            assert sum(exp.scans.values()) == s.file_count
        assert cli.main(["verify", "--state-dir", str(tmp_path / "state")]) == 0
        assert f"{len(plan.sessions)} of {len(plan.sessions)} session(s) hold" in capsys.readouterr().out


def test_verify_counts_a_located_session_from_xnats_resources(
    tmp_path, corpus, pg_db_17, monkeypatch, capsys
):
    """Located, built, not archived: the instance count comes from /resources (/scans has none, §9)."""
    source, _ = corpus
    prearchive, archive = xnat_folders(tmp_path, monkeypatch)
    with (
        XnatStandIn(pg_db_17.dsn, prearchive, archive, projects={"prj001": 0}) as xnat,
        XnatReceiverSCP(dsn=pg_db_17.dsn, prearchive=prearchive, projects={"prj001"}, xnat=xnat) as scp,
    ):
        xnat.build_delay = 0.0
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port, url=xnat.url, build="rest", archive=False)
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        assert not api.apply(state_dir=tmp_path / "state", poll=0.05).failures
        assert cli.main(["verify", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["ok"] and all(s["checks"] == 2 for s in doc["sessions"])
        # One file gone from XNAT's copy, and the session rebuilt: verify says how many XNAT holds.
        victim = plan.sessions[0]
        sdir = next(p for p in prearchive.rglob(victim.session) if p.is_dir())
        next(sdir.rglob("*.dcm")).unlink()
        xml = sdir.parent / f"{sdir.name}.xml"
        xml.unlink()
        with XnatClient(xnat.url, credentials_from_env(xnat.url)) as c:
            c.rebuild("prj001", sdir.parent.name, sdir.name)
            c.wait_for_status("prj001", sdir.parent.name, sdir.name, timeout=10, poll=0.05)
        assert cli.main(["verify", "--state-dir", str(tmp_path / "state")]) == 1
        out = capsys.readouterr().out
        assert (
            f"XNAT holds {victim.file_count - 1} instance(s) of this session; {victim.file_count} were confirmed sent"
            in out
        )


def test_a_direct_archive_receiver_is_followed_to_the_archive(
    tmp_path, corpus, pg_db_17, monkeypatch, capsys
):
    """No prearchive row ever appears (GradualDicomImporter:101-107): apply waits in the archive."""
    source, _ = corpus
    prearchive, archive = xnat_folders(tmp_path, monkeypatch)
    with XnatStandIn(pg_db_17.dsn, prearchive, archive, projects={"prj001": 0}, receivers=[]) as xnat:
        xnat.time_scale = 0.002  # XNAT's minutes as a fraction of a second
        with XnatReceiverSCP(
            dsn=pg_db_17.dsn, prearchive=prearchive, projects={"prj001"}, xnat=xnat, direct_archive=True
        ) as scp:
            manifest = tmp_path / "m.yaml"
            write_manifest(manifest, source, scp.port, url=xnat.url, build="rest", archive=False)
            plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
            assert all(s.direct_archive for s in plan.sessions)
            assert any("archives directly" in w for w in plan.warnings)
            report = api.apply(state_dir=tmp_path / "state", poll=0.05)
            assert not report.failures, [s.message for s in report.sessions]
            assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
            with psycopg.connect(pg_db_17.dsn) as conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM xdat_search.prearchive")
                assert cur.fetchone()[0] == 0
            assert cli.main(["verify", "--state-dir", str(tmp_path / "state")]) == 0
