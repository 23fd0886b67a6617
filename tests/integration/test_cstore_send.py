"""C-STORE sender against real receivers: pynetdicom's SCP in process and dcmtk's storescp.

Each test checks what the receiver actually got (instances, routing element, the rest of each
dataset unchanged) and that the sources were not touched. Faults are injected in the receivers:
stopped mid-send, wrong called AE, nothing listening, Failure/Warning statuses, slow answers,
dropped associations, rejected presentation contexts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AllStoragePresentationContexts

from tests.dicom_peers import (
    PATIENT_COMMENTS,
    STUDY_COMMENTS,
    DcmtkStoreSCP,
    PynetdicomStoreSCP,
    Route,
    StudySpec,
    XnatRoutingSCP,
    build_test_files,
    contexts_for,
    dcmdump,
    free_port,
    planned_files,
    sha256_of,
    without,
)
from xnatmigrate.errors import DicomSendError
from xnatmigrate.execute import dicom
from xnatmigrate.execute.dicom import part10, workers
from xnatmigrate.model import PlannedFile, ScpTarget

LINE = "Project: P1 Subject: S01 Session: S01_MR1"
FAST: dict[str, Any] = {"acse_timeout": 5.0, "dimse_timeout": 5.0, "backoff": 0.01}


@pytest.fixture
def studies(tmp_path: Path) -> list[list[PlannedFile]]:
    """Four studies (MR explicit, CT implicit, SC explicit, MR implicit) of two files each."""
    return [planned_files(paths) for paths in build_test_files(tmp_path / "src")]


@pytest.fixture
def files(studies: list[list[PlannedFile]]) -> list[PlannedFile]:
    return [f for s in studies for f in s]


@pytest.fixture
def scp() -> Iterator[PynetdicomStoreSCP]:
    with PynetdicomStoreSCP() as receiver:
        yield receiver


class Calls:
    """Records ``on_confirmed`` batches and ``progress`` calls."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.progress: list[tuple[int, int]] = []

    def on_confirmed(self, batch: list[tuple[str, int]]) -> None:
        self.batches.append(list(batch))

    def on_progress(self, done: int, total: int) -> None:
        self.progress.append((done, total))

    @property
    def confirmed(self) -> list[tuple[str, int]]:
        return [c for b in self.batches for c in b]


def send(
    port: int,
    files: list[PlannedFile],
    *,
    routing: str = "patient_comments",
    line: str | None = LINE,
    calls: Calls | None = None,
    called_aet: str = "XNAT",
    **kwargs: Any,
) -> dicom.SendOutcome:
    options = {**FAST, **kwargs}
    calls = calls or Calls()
    return dicom.send_files(
        files,
        ScpTarget("127.0.0.1", port, called_aet=called_aet, calling_aet="XNATMIGRATE"),
        routing=routing,
        line=line,
        contexts=contexts_for(files),
        on_confirmed=calls.on_confirmed,
        progress=calls.on_progress,
        **options,
    )


def uids(files: list[PlannedFile]) -> set[str]:
    return {f.sop_instance_uid for f in files}


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    """Poll ``condition()`` until true; receivers record some events from their own threads."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_same_except(source: Path, received: Dataset, tag: int) -> None:
    """The received dataset equals the source file's dataset, element by element, but for ``tag``."""
    original = pydicom.dcmread(source)
    assert without(received, tag) == without(original, tag), source


# ----------------------------------------------------------------------------------------------
# Happy paths
# ----------------------------------------------------------------------------------------------


def test_every_file_arrives_over_one_association(scp: PynetdicomStoreSCP, files: list[PlannedFile]) -> None:
    before = sha256_of(f.source for f in files)
    calls = Calls()
    outcome = send(scp.port, files, calls=calls)

    assert outcome.failures == ()
    assert sorted(outcome.confirmed) == sorted((f.sop_instance_uid, 0) for f in files)
    assert sorted(calls.confirmed) == sorted(outcome.confirmed)  # every confirmation reached the caller
    assert calls.progress[-1] == (len(files), len(files))
    assert set(scp.received) == uids(files)
    assert scp.associations == 1  # many files per association, never one per file
    for f in files:
        got = scp.received[f.sop_instance_uid]
        assert got.patient_comments == LINE  # replaced where the source had one (study 1)
        assert got.transfer_syntax == f.transfer_syntax  # never transcoded
        assert got.calling_aet == "XNATMIGRATE"
        assert_same_except(Path(f.source), got.dataset(), PATIENT_COMMENTS)
    assert sha256_of(f.source for f in files) == before  # sources never modified


def test_dcmtk_storescp_receives_every_file(tmp_path: Path, files: list[PlannedFile]) -> None:
    before = sha256_of(f.source for f in files)
    with DcmtkStoreSCP(tmp_path / "dcmtk") as storescp:
        outcome = send(storescp.port, files)
        received = storescp.received()
    assert outcome.failures == ()
    assert set(received) == uids(files)
    for f in files:
        path = received[f.sop_instance_uid]
        assert f"[{LINE}]" in dcmdump(path, "0010,4000")  # dcmtk's own reading of what arrived
        assert_same_except(Path(f.source), pydicom.dcmread(path), PATIENT_COMMENTS)
    assert sha256_of(f.source for f in files) == before


@pytest.mark.parametrize("receiver", ["pynetdicom", "dcmtk"])
def test_two_jobs_send_the_same_set_over_two_associations(
    receiver: str, tmp_path: Path, files: list[PlannedFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "MIN_FILES_PER_WORKER", 1)  # 8 files are enough for two workers
    calls = Calls()
    if receiver == "pynetdicom":
        with PynetdicomStoreSCP() as peer:
            outcome = send(peer.port, files, jobs=2, calls=calls)
            assert peer.associations == 2
            assert {r.association for r in peer.received.values()} == {1, 2}
            got = set(peer.received)
            assert all(r.patient_comments == LINE for r in peer.received.values())
    else:
        with DcmtkStoreSCP(tmp_path / "dcmtk", fork=True) as peer:
            outcome = send(peer.port, files, jobs=2, calls=calls)
            got = set(peer.received())
    assert outcome.failures == ()
    assert got == uids(files) == {u for u, _ in outcome.confirmed}
    assert sorted(calls.confirmed) == sorted(outcome.confirmed)  # batches came back to this process
    assert calls.progress[-1] == (len(files), len(files))


def test_study_comments_routing_leaves_patient_comments_alone(
    scp: PynetdicomStoreSCP, files: list[PlannedFile]
) -> None:
    outcome = send(scp.port, files, routing="study_comments", line="Project: P2 Session: E2")
    assert outcome.failures == ()
    for f in files:
        got = scp.received[f.sop_instance_uid]
        assert got.study_comments == "Project: P2 Session: E2"  # replaced in study 2 ("old note")
        assert got.patient_comments == pydicom.dcmread(f.source).get("PatientComments")
        assert_same_except(Path(f.source), got.dataset(), STUDY_COMMENTS)


def test_routing_none_sends_each_dataset_byte_for_byte(
    scp: PynetdicomStoreSCP, files: list[PlannedFile]
) -> None:
    outcome = send(scp.port, files, routing="none", line=None)
    assert outcome.failures == ()
    for f in files:
        data = Path(f.source).read_bytes()
        assert data.endswith(scp.received[f.sop_instance_uid].raw)  # the file minus preamble and meta
        assert len(data) - len(scp.received[f.sop_instance_uid].raw) < 400


def test_many_fragments_and_streamed_tails_arrive_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = planned_files(p for s in build_test_files(tmp_path / "big", rows=128) for p in s)
    # Stream everything past the first 4 KiB of each file from disk, in the middle of a PDU.
    monkeypatch.setattr(part10, "WHOLE_FILE_LIMIT", 4096)
    monkeypatch.setattr(part10, "HEAD_LIMIT", 4096)
    with PynetdicomStoreSCP(max_pdu=4096) as peer:  # 32 KiB of pixels: ~9 PDUs per file
        outcome = send(peer.port, files)
        assert outcome.failures == ()
        for f in files:
            got = peer.received[f.sop_instance_uid]
            assert got.patient_comments == LINE
            assert_same_except(Path(f.source), got.dataset(), PATIENT_COMMENTS)


def test_deflated_files_go_through_the_pydicom_fallback(scp: PynetdicomStoreSCP, tmp_path: Path) -> None:
    spec = StudySpec(SecondaryCaptureImageStorage, DeflatedExplicitVRLittleEndian, "OT", "DEF^LATED", "D1")
    files = planned_files(build_test_files(tmp_path / "deflated", [spec])[0])
    before = sha256_of(f.source for f in files)
    outcome = send(scp.port, files)
    assert outcome.failures == ()
    for f in files:
        got = scp.received[f.sop_instance_uid]
        assert got.transfer_syntax == DeflatedExplicitVRLittleEndian
        assert got.patient_comments == LINE
        assert_same_except(Path(f.source), got.dataset(), PATIENT_COMMENTS)
    assert sha256_of(f.source for f in files) == before


def test_more_than_128_contexts_are_split_over_associations(scp: PynetdicomStoreSCP, tmp_path: Path) -> None:
    paths = []
    for n, cx in enumerate(AllStoragePresentationContexts[:65]):
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ds = Dataset()
            ds.SOPClassUID = cx.abstract_syntax
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["ctx", str(n), ts])
            ds.PatientID = f"P{n}"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ts
            path = tmp_path / f"{n}-{ts}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    files = planned_files(paths)
    outcome = send(scp.port, files)
    assert outcome.failures == ()
    assert set(scp.received) == uids(files)
    assert scp.associations == 2  # 130 (SOP class, transfer syntax) pairs > 128 per association


def test_xnat_files_each_study_where_intended(studies: list[list[PlannedFile]]) -> None:
    intended = [
        Route("P1", "S01", "S01_MR1"),
        Route(None, "S02", "S02_CT1"),  # no Project: → Unassigned (§5 Unroutable data)
        Route("P2", "S03", "S03_OT1"),
        Route("P1", "S01", "S01_MR2"),  # same patient as study 1, second session
    ]
    with XnatRoutingSCP(projects={"P1", "P2"}) as xnat:
        for study, route in zip(studies, intended):
            line = dicom.routing_line(route.project, route.subject, route.session)
            assert send(xnat.port, study, line=line).failures == ()
        for study, route in zip(studies, intended):
            assert {xnat.routes[f.sop_instance_uid] for f in study} == {route}


def test_existing_patient_comments_beat_study_comments_routing(studies: list[list[PlannedFile]]) -> None:
    # §5 row 3 before row 4: study 1 carries "Project: WRONG Subject: WRONG Session: WRONG" in
    # PatientComments, so routing through StudyComments loses Subject and Session to it. WRONG is
    # not a project, so the project still comes from StudyComments.
    with XnatRoutingSCP(projects={"P1"}) as xnat:
        assert send(xnat.port, studies[0], routing="study_comments", line=LINE).failures == ()
        assert {xnat.routes[f.sop_instance_uid] for f in studies[0]} == {Route("P1", "WRONG", "WRONG")}


def test_echo(scp: PynetdicomStoreSCP) -> None:
    dicom.echo(ScpTarget("127.0.0.1", scp.port))
    with pytest.raises(DicomSendError, match="called AE title 'NOPE' not recognised"):
        dicom.echo(ScpTarget("127.0.0.1", scp.port, called_aet="NOPE"))


# ----------------------------------------------------------------------------------------------
# Faults
# ----------------------------------------------------------------------------------------------


def test_receiver_stopped_mid_send_then_restarted(scp: PynetdicomStoreSCP, files: list[PlannedFile]) -> None:
    calls = Calls()

    def stop_after_three(done: int, total: int) -> None:
        calls.on_progress(done, total)
        if done == 3 and scp.running:
            scp.stop()

    outcome = dicom.send_files(
        files,
        ScpTarget("127.0.0.1", scp.port),
        routing="patient_comments",
        line=LINE,
        contexts=contexts_for(files),
        retries=2,
        on_confirmed=calls.on_confirmed,
        progress=stop_after_three,
        **FAST,
    )
    assert len(outcome.confirmed) == 3
    assert len(outcome.failures) == len(files) - 3
    assert {u for u, _ in calls.confirmed} == {u for u, _ in outcome.confirmed}
    for _, reason in outcome.failures:
        # The last of the 3 attempts met the stopped receiver, and a failure reports its last attempt.
        assert reason.startswith(f"connection refused by 127.0.0.1:{scp.port}: ")
        assert reason.endswith(" (gave up after 3 attempts)")

    scp.start()  # same port
    sources = {f.source for f in files}
    rest = [f for f in files if f.source in {p for p, _ in outcome.failures}]
    assert {p for p, _ in outcome.failures} <= sources
    again = send(scp.port, rest)
    assert again.failures == ()
    assert {u for u, _ in outcome.confirmed} | {u for u, _ in again.confirmed} == uids(files)
    assert set(scp.received) == uids(files)


@pytest.mark.parametrize("jobs", [1, 2])
def test_wrong_called_ae_names_the_setting(
    scp: PynetdicomStoreSCP, files: list[PlannedFile], jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "MIN_FILES_PER_WORKER", 1)
    with pytest.raises(DicomSendError) as err:
        send(scp.port, files, called_aet="NOT_XNAT", jobs=jobs)
    message = str(err.value)
    assert "called AE title 'NOT_XNAT' not recognised" in message
    assert "xnat.scp.called_aet" in message
    assert not scp.received


def test_refused_connection_names_host_and_port(files: list[PlannedFile]) -> None:
    port = free_port()
    with pytest.raises(DicomSendError, match=f"connection refused by 127.0.0.1:{port}"):
        send(port, files)
    with pytest.raises(DicomSendError, match=f"127.0.0.1:{port}"):
        dicom.echo(ScpTarget("127.0.0.1", port), timeout=2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_failure_status_for_one_sop_class(
    files: list[PlannedFile], jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "MIN_FILES_PER_WORKER", 1)
    ct = {f.sop_instance_uid for f in files if f.sop_class_uid == CTImageStorage}
    with PynetdicomStoreSCP(fail_sop_classes={CTImageStorage}, fail_status=0xC000) as peer:
        outcome = send(peer.port, files, retries=2, jobs=jobs)
        assert {peer.attempts[u] for u in ct} == {3}  # first try + 2 retries, each on a new association
    failed = {f.sop_instance_uid for f in files if f.source in {p for p, _ in outcome.failures}}
    assert failed == ct
    for _, reason in outcome.failures:
        assert "C-STORE status 0xC000 (Failure: Cannot Understand)" in reason
        assert "gave up after 3 attempts" in reason
    assert {u for u, _ in outcome.confirmed} == uids(files) - ct


def test_dimse_timeout_is_a_failure_not_a_success(files: list[PlannedFile]) -> None:
    with PynetdicomStoreSCP(delay=1.0) as slow:
        started = time.monotonic()
        outcome = send(slow.port, files[:1], dimse_timeout=0.3, retries=1)
        elapsed = time.monotonic() - started
    assert outcome.confirmed == ()
    [(path, reason)] = outcome.failures
    assert path == files[0].source
    assert "no C-STORE status (empty response)" in reason and "DIMSE timeout" in reason
    assert elapsed < 4  # two 0.3 s timeouts, not the receiver's 1 s delays


def test_dropped_associations_are_resumed_on_new_ones(files: list[PlannedFile]) -> None:
    with PynetdicomStoreSCP(drop_after=3) as flaky:
        outcome = send(flaky.port, files, retries=3)
        assert outcome.failures == ()
        assert set(flaky.received) == uids(files)
        assert flaky.associations >= 3
        assert wait_for(lambda: flaky.aborted >= 2)


def test_warning_status_is_confirmed_with_its_status(files: list[PlannedFile]) -> None:
    sc = {f.sop_instance_uid for f in files if f.sop_class_uid == SecondaryCaptureImageStorage}
    with PynetdicomStoreSCP(warn_sop_classes={SecondaryCaptureImageStorage}, warn_status=0xB007) as peer:
        outcome = send(peer.port, files)
    assert outcome.failures == ()
    assert {u for u, s in outcome.confirmed if s == 0xB007} == sc
    assert {s for u, s in outcome.confirmed if u not in sc} == {0}


def test_rejected_presentation_context_fails_at_once(files: list[PlannedFile]) -> None:
    with PynetdicomStoreSCP(transfer_syntaxes=[ExplicitVRLittleEndian]) as picky:
        outcome = send(picky.port, files, retries=3)
        assert picky.associations == 1  # no retry rounds: another association would say the same
    implicit = {f.source for f in files if f.transfer_syntax == ImplicitVRLittleEndian}
    assert {p for p, _ in outcome.failures} == implicit
    assert all("did not accept" in r and ImplicitVRLittleEndian in r for _, r in outcome.failures)
    assert len(outcome.confirmed) == len(files) - len(implicit)


def test_interrupt_aborts_the_association_and_delivers_confirmations(
    scp: PynetdicomStoreSCP, files: list[PlannedFile]
) -> None:
    calls = Calls()

    def interrupt_after_three(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dicom.send_files(
            files,
            ScpTarget("127.0.0.1", scp.port),
            routing="patient_comments",
            line=LINE,
            contexts=contexts_for(files),
            on_confirmed=calls.on_confirmed,
            progress=interrupt_after_three,
            **FAST,
        )
    assert len(calls.confirmed) == 3  # flushed on the way out, though the batch was not full
    assert wait_for(lambda: scp.aborted == 1)  # aborted, not left hanging


def test_a_file_that_changes_while_sent_aborts_and_is_retried(
    scp: PynetdicomStoreSCP, files: list[PlannedFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = files[2].source
    real = part10.segments
    seen: list[str] = []

    def flaky(payload: Any) -> Iterator[Any]:
        first = payload.path == victim and victim not in seen
        seen.append(payload.path)
        for n, piece in enumerate(real(payload)):
            if first and n == 1:
                raise part10.SourceChanged("the file shrank while it was being sent")
            yield piece

    monkeypatch.setattr(part10, "segments", flaky)
    outcome = send(scp.port, files, retries=1)
    assert outcome.failures == ()
    assert {u for u, _ in outcome.confirmed} == uids(files) == set(scp.received)
    assert scp.associations == 2  # half a message on the wire: aborted, then a fresh association
    assert wait_for(lambda: scp.aborted == 1)
