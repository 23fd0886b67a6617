"""De-identification on the C-STORE route (issue 15): each file edited in memory by the session's DicomEdit
scripts before its routing is written and it is sent. Real DICOM peers (pynetdicom's SCP, the XNAT
receiver stand-in with XNAT's site script on receipt), real PostgreSQL where XNAT's table is needed."""

from __future__ import annotations

import json
import textwrap
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests.dicom_peers import DcmtkStoreSCP, PynetdicomStoreSCP, dcmdump, sha256_of
from tests.integration.test_apply_cstore import NOW, SPEC, write_manifest, xnat_folders
from tests.xnat_receiver import XnatReceiverSCP
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.execute.dicom import workers
from xnatmigrate.model import Result
from xnatmigrate.testing.corpus import build_corpus

SECRET = "a-secret-for-tests"
SCRIPT = """version "6.1"
(0010,0010) := subject
-(0010,0030)
(0008,0080) := "ANONYMISED"
(0020,0052) := newUID[]
"""
ROUTING = 0x00104000  # PatientComments: the routing line the sender writes (§5)


@pytest.fixture
def corpus(tmp_path):
    files = build_corpus(tmp_path / "legacy", SPEC)
    return tmp_path / "legacy", files


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_ANON_SECRET", SECRET)


def with_script(manifest: Path, script: Path, text: str = SCRIPT) -> None:
    """The manifest's sources anonymised by ``script`` (written with ``text``)."""
    script.write_text(text)
    manifest.write_text(
        manifest.read_text().replace("defaults:\n", f"defaults:\n  anonymization: {script}\n")
    )


def elements(ds: pydicom.Dataset) -> dict[int, object]:
    """The data set's elements but the routing element (the C-STORE route writes its own there)."""
    return {int(e.tag): e.value for e in ds if int(e.tag) != ROUTING}


def test_every_file_is_sent_edited_pixel_data_as_stored_and_a_rerun_sends_nothing(
    tmp_path, corpus, monkeypatch, capsys
):
    source, files = corpus
    before = sha256_of(f.path for f in files)
    monkeypatch.setattr(workers, "MIN_FILES_PER_WORKER", 1)  # two worker processes: the edit is pickled
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        with_script(manifest, tmp_path / "anon.das")
        assert cli.main(["plan", str(manifest), "--state-dir", str(tmp_path / "state"), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        first = doc["sessions"][0]
        assert first["anonymize"] == [str((tmp_path / "anon.das").resolve())]
        assert {"name": "InstitutionName", "action": "set", "value": "ANONYMISED"} in first["anonymized"]
        assert {"name": "PatientBirthDate", "action": "delete", "value": None} in first["anonymized"]
        plan = api.load_plan(tmp_path / "state" / "plan.json")
        assert not api.apply(state_dir=tmp_path / "state", jobs=2).failures
        assert len(scp.received) == len(files)
        for s in plan.sessions:
            for f in s.files:
                src = pydicom.dcmread(f.source)
                got = scp.received[f.sop_instance_uid]
                ds = got.dataset()
                assert src.PatientBirthDate and src.PatientBirthDate.encode() not in got.raw
                assert "PatientBirthDate" not in ds and ds.InstitutionName == "ANONYMISED"
                assert str(ds.PatientName) == s.subject != str(src.PatientName)
                assert ds.FrameOfReferenceUID != src.FrameOfReferenceUID
                assert ds.PatientComments == s.routing_line  # written after the scripts
                assert ds.PixelData == src.PixelData
                assert ds.StudyInstanceUID == src.StudyInstanceUID
        sent = {uid: r.raw for uid, r in scp.received.items()}
        attempts = dict(scp.attempts)
        again = api.apply(state_dir=tmp_path / "state")
        assert {r.outcome for r in again.sessions} == {Result.NOOP}
        assert scp.attempts == attempts  # nothing re-sent
        # Same files, script and secret, planned and applied afresh: byte for byte what was sent before.
        api.plan(manifest, state_dir=tmp_path / "state2", now=NOW)
        assert not api.apply(state_dir=tmp_path / "state2").failures
        assert {uid: r.raw for uid, r in scp.received.items()} == sent
    assert sha256_of(f.path for f in files) == before  # sources untouched


def test_dcmtk_storescp_reads_the_edited_header_and_the_routing_line(tmp_path, corpus):
    """dcmtk's own reading of what it received: the scripts' values and deletions, then the routing."""
    source, _ = corpus
    out = tmp_path / "received"
    with DcmtkStoreSCP(out) as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        with_script(manifest, tmp_path / "anon.das")
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        assert not api.apply(state_dir=tmp_path / "state").failures
        received = scp.received()
    s = plan.sessions[0]
    f = s.files[0]
    src = pydicom.dcmread(f.source)
    dumped = dcmdump(received[f.sop_instance_uid], "0010,0010", "0010,0030", "0008,0080", "0010,4000")
    assert f"[{s.subject}]" in dumped and "[ANONYMISED]" in dumped and s.routing_line in dumped
    assert "(0010,0030)" not in dumped and str(src.PatientName) not in dumped


def test_a_send_cut_short_resumes_with_the_rest_edited_and_resends_nothing_confirmed(tmp_path, corpus):
    source, files = corpus
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        with_script(manifest, tmp_path / "anon.das")
        api.plan(manifest, state_dir=tmp_path / "state", now=NOW)

        def stop_after_four() -> None:
            deadline = time.monotonic() + 30
            while len(scp.received) < 4 and time.monotonic() < deadline:
                time.sleep(0.001)
            scp.stop()

        watcher = threading.Thread(target=stop_after_four)
        watcher.start()
        assert api.apply(state_dir=tmp_path / "state").failures
        watcher.join()
        first = set(scp.received)
        assert 0 < len(first) < len(files)
        scp.start()
        assert not api.apply(state_dir=tmp_path / "state").failures
        assert len(scp.received) == len(files)
        assert sum(1 for uid in first if scp.attempts[uid] > 1) <= 1  # only a confirmation lost in flight
        assert all(r.dataset().InstitutionName == "ANONYMISED" for r in scp.received.values())


def test_a_study_the_script_fails_on_is_held_back_and_nothing_of_it_is_sent(tmp_path, corpus, monkeypatch):
    source, _ = corpus
    monkeypatch.delenv("XNATMIGRATE_ANON_SECRET")  # newUID needs it: the script fails on every study
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        with_script(manifest, tmp_path / "anon.das")
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        assert plan.sessions == () and len(plan.held_back) == SPEC.patients
        assert all("the anonymisation script fails on" in h.reason for h in plan.held_back)
        api.apply(state_dir=tmp_path / "state")
        assert scp.received == {}


def test_a_file_the_script_fails_on_at_apply_fails_its_session_and_is_never_sent_raw(
    tmp_path, corpus, monkeypatch
):
    """Planned with the secret, applied without it: every file fails in the sender, none goes raw."""
    source, _ = corpus
    with PynetdicomStoreSCP() as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        with_script(manifest, tmp_path / "anon.das")
        api.plan(manifest, state_dir=tmp_path / "state", now=NOW)
        monkeypatch.delenv("XNATMIGRATE_ANON_SECRET")
        report = api.apply(state_dir=tmp_path / "state")
        assert {r.outcome for r in report.sessions} == {Result.FAILED}
        assert all(
            "not sent: " in (r.message or "") and "XNATMIGRATE_ANON_SECRET" in (r.message or "")
            for r in report.sessions
        )
        assert scp.received == {}


def test_cstore_and_the_prearchive_route_give_the_same_anonymised_file(site, monkeypatch):
    """The same file, script, labels and secret: the data set XNAT's receiver gets over C-STORE equals the
    file the prearchive route stages (but the routing element), newUID's anonymised UID included."""
    script = site.root / "anon.das"
    site.manifest.write_text(
        site.manifest.read_text().replace(
            "anonymization: none   # synthetic data; the stand-in has XNAT's default: site script on",
            f"anonymization: {script}",
        )
    )
    script.write_text(SCRIPT)
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    staged = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
        for p in site.prearchive.rglob("*.dcm")
        if ".xnatmigrate-staging" not in p.parts
    }
    assert len(staged) == len(site.files)
    with PynetdicomStoreSCP() as scp:
        manifest = site.root / "cstore.yaml"
        manifest.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                xnat:
                  scp: {{host: 127.0.0.1, port: {scp.port}, called_aet: XNAT, calling_aet: XNATMIGRATE}}
                defaults:
                  method: cstore
                  build: none
                  anonymization: {script}
                sources:
                  - source: {site.source}
                    project: prj001
                    subject: "{{{{ PatientID }}}}"
                    session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
                """
            )
        )
        api.plan(manifest, state_dir=site.root / "cstore-state", now=NOW)
        assert not api.apply(state_dir=site.root / "cstore-state").failures
        assert set(scp.received) == set(staged)
        for uid, got in scp.received.items():
            ours, src = (
                got.dataset(),
                pydicom.dcmread(next(f.path for f in site.files if f.sop_uid == uid)),
            )
            assert ours.FrameOfReferenceUID == staged[uid].FrameOfReferenceUID != src.FrameOfReferenceUID
            assert elements(ours) == elements(staged[uid])


def test_xnat_receiver_applies_its_site_script_on_receipt_as_well_and_the_session_is_found(
    tmp_path, corpus, pg_db_17, monkeypatch
):
    source, _ = corpus
    prearchive, archive = xnat_folders(tmp_path, monkeypatch)
    with (
        XnatStandIn(pg_db_17.dsn, prearchive, archive, projects={"prj001": 0}) as xnat,
        XnatReceiverSCP(dsn=pg_db_17.dsn, prearchive=prearchive, projects={"prj001"}, xnat=xnat) as scp,
    ):
        xnat.build_delay = 0.0
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port, url=xnat.url, build="rest", archive=True)
        with_script(
            manifest, tmp_path / "anon.das", 'version "6.1"\n-(0010,0030)\n(0008,0080) := "ANONYMISED"\n'
        )
        plan = api.plan(manifest, state_dir=tmp_path / "state", now=NOW).plan
        assert any("on receipt as well" in w for w in plan.warnings)
        report = api.apply(state_dir=tmp_path / "state", poll=0.05)
        assert not report.failures, [s.message for s in report.sessions]
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
        filed = list(archive.rglob("*.dcm"))
        assert len(filed) == sum(s.file_count for s in plan.sessions)
        for path in filed:
            ds = pydicom.dcmread(path)
            assert ds.InstitutionName == "ANONYMISED" and "PatientBirthDate" not in ds  # the tool's script
            assert ds.StudyDescription == "prj001"  # XNAT's default site script, applied on receipt
        assert api.verify(state_dir=tmp_path / "state").ok
