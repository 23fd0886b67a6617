"""Routing into XNAT (xnat-reference.md §5) and writing it into datasets without decoding them.

Two halves: XNAT's side - the stand-in ``xnat_route`` (ClassicDicomObjectIdentifier order, the
ContainedAssignmentExtractor regex) and ``routing_line`` that feeds it; and our side - the routing
element spliced into encoded datasets (every encoding, sequences, group lengths, fallbacks) and the
C-STORE command encoding.
"""

from __future__ import annotations

import contextlib
import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
)
from pynetdicom.dsutils import decode, encode

from tests.dicom_peers import (
    PATIENT_COMMENTS,
    STUDY_COMMENTS,
    Route,
    build_test_files,
    comment_value,
    label_chars,
    xnat_route,
)
from xnatmigrate.execute import dicom
from xnatmigrate.execute.dicom import dimse, part10, rounds
from xnatmigrate.model import PlannedFile, PresentationContext, ScpTarget

LINE = "Project: P1 Subject: S01 Session: S01_MR1"


def _ds(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


# ----------------------------------------------------------------------------------------------
# routing_line
# ----------------------------------------------------------------------------------------------


def test_routing_line_is_xnats_comment_convention() -> None:
    # §5 Comment convention: "Project: P1 Subject: S01 Session: S01_MR1 works".
    assert dicom.routing_line("P1", "S01", "S01_MR1") == LINE


def test_routing_line_leaves_out_none_so_xnat_falls_back() -> None:
    # §5: each value is resolved independently; a missing key lets the next rule decide.
    assert dicom.routing_line(None, "S01", "E1") == "Subject: S01 Session: E1"
    assert dicom.routing_line("P1", None, "E1") == "Project: P1 Session: E1"
    assert dicom.routing_line(None, None, "E1") == "Session: E1"


@pytest.mark.parametrize(
    ("project", "subject", "session"),
    [
        ("P 1", "S", "E"),
        ("P", "S.1", "E"),
        ("P", "S", ""),
        ("P", "S", "E\n"),
        ("", "S", "E"),
        ("P", "S", "É"),
    ],
)
def test_routing_line_refuses_what_the_regex_would_cut(project: str, subject: str, session: str) -> None:
    # §5: values may contain only [A-Za-z0-9_-]; "P 1" would route to project "P".
    with pytest.raises(ValueError, match="not a valid XNAT label"):
        dicom.routing_line(project, subject, session)


@pytest.mark.parametrize("field", ["PatientComments", "StudyComments"])
def test_routing_line_round_trips_through_xnat_route(field: str) -> None:
    # §5 rows 3 and 4: the line in either comment field decides all three values.
    ds = _ds(PatientName="DOE^JOHN", PatientID="PID", StudyDescription="P2", **{field: LINE})
    assert xnat_route(ds, projects={"P1", "P2"}) == Route("P1", "S01", "S01_MR1")


# ----------------------------------------------------------------------------------------------
# ContainedAssignmentExtractor (§5 Comment convention)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        (LINE, "Project", "P1"),
        (LINE, "Session", "S01_MR1"),
        ("Project:P1,Subject:S01;Session:E-1", "Session", "E-1"),  # comma/semicolon separators
        ("project : p1", "Project", "p1"),  # case-insensitive key, spaces around the colon
        ("Notes; Project: P1", "Project", "P1"),
        ("Project: P1.2 Session: E", "Project", None),  # "." ends the value but is not a separator
        ("Project: P1", "Subject", None),
        ("Project:", "Project", None),  # empty value: not a candidate (first *non-empty* wins)
        ("MyProject: P1", "Project", None),  # the key must start the text or follow a separator
        ("Project: P1 Subject: S1\nSession: E1", "Project", None),  # no DOTALL: newline defeats it
        ("Project: P1 Subject: S1\rSession: E1", "Project", None),  # \r is a Java line terminator too
        ("Project: P1\nSession: E1", "Session", "E1"),  # ... unless it sits right before the key
    ],
)
def test_comment_value_follows_the_java_regex(text: str, key: str, expected: str | None) -> None:
    assert comment_value(text, key) == expected


# ----------------------------------------------------------------------------------------------
# ClassicDicomObjectIdentifier order (§5 table)
# ----------------------------------------------------------------------------------------------


def test_patient_comments_win_over_study_comments() -> None:
    # §5 rows 3 before 4.
    ds = _ds(
        PatientComments="Project: A Subject: SA Session: EA",
        StudyComments="Project: B Subject: SB Session: EB",
    )
    assert xnat_route(ds, {"A", "B"}) == Route("A", "SA", "EA")


def test_each_value_is_resolved_independently() -> None:
    # §5: "Each of the three values is resolved independently by its own ordered chain".
    ds = _ds(
        PatientComments="Subject: S1",
        StudyComments="Project: B Session: E2",
        AdditionalPatientHistory="Project: C Subject: S3 Session: E3",
    )
    assert xnat_route(ds, {"B", "C"}) == Route("B", "S1", "E2")


def test_additional_patient_history_is_row_5() -> None:
    # §5 row 5 (1.8.0+).
    ds = _ds(AdditionalPatientHistory="Project: C Subject: S3 Session: E3", PatientName="X", PatientID="Y")
    assert xnat_route(ds, {"C"}) == Route("C", "S3", "E3")


def test_unknown_project_candidates_are_skipped() -> None:
    # §5: "A candidate that resolves to no accessible project is skipped and the next rule is tried".
    ds = _ds(PatientComments="Project: NOPE", StudyComments="Project: B", StudyDescription="C")
    assert xnat_route(ds, {"B", "C"}).project == "B"
    assert xnat_route(ds, {"C"}).project == "C"  # row 6: StudyDescription
    assert xnat_route(_ds(AccessionNumber="D", StudyDescription="CT HEAD"), {"D"}).project == "D"  # row 7
    assert xnat_route(ds, set()).project is None  # Unassigned


def test_fallbacks_are_patient_name_and_patient_id_sanitised() -> None:
    # §5 row 6 and Sanitizing: PatientName DOE^JOHN becomes subject DOE_JOHN.
    ds = _ds(PatientName="DOE^JOHN", PatientID="PAT 001/7")
    assert xnat_route(ds) == Route(None, "DOE_JOHN", "PAT_001_7")
    assert label_chars("a.b c-d_e") == "a_b_c-d_e"


def test_empty_session_becomes_dicom_upload() -> None:
    # §5 Unroutable data: an empty session label becomes dicom_upload.
    assert xnat_route(_ds(PatientName="X")).session == "dicom_upload"
    assert xnat_route(_ds(PatientComments="Session:", PatientID="")).session == "dicom_upload"


# ----------------------------------------------------------------------------------------------
# Splicing the routing element into encoded datasets
# ----------------------------------------------------------------------------------------------

ENCODINGS = [
    pytest.param(ExplicitVRLittleEndian, id="explicit-le"),
    pytest.param(ImplicitVRLittleEndian, id="implicit-le"),
    pytest.param(ExplicitVRBigEndian, id="explicit-be"),
    pytest.param(JPEGBaseline8Bit, id="encapsulated"),  # dataset itself is explicit VR LE
]


def _dataset(
    existing: str | None, *, undefined_sequences: bool, study_comments: str | None = None
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyDescription = "BRAIN"
    inner = Dataset()
    inner.CodeValue = "X1"
    inner.CodingSchemeDesignator = "99LOCAL"
    inner.CodeMeaning = "something"
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = "1.2.3.5"
    inner.ReferencedImageSequence = DicomSequence([nested])
    ds.ProcedureCodeSequence = DicomSequence([inner, Dataset()])
    if undefined_sequences:
        ds["ProcedureCodeSequence"].is_undefined_length = True
        inner["ReferencedImageSequence"].is_undefined_length = True
        for item in (inner, nested, ds.ProcedureCodeSequence[1]):
            item.is_undefined_length_sequence_item = True
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "P1"
    if existing is not None:
        ds.PatientComments = existing
    ds.add_new(0x00110010, "LO", "PRIVATE CREATOR")  # a private group between 0010 and 0032
    ds.StudyInstanceUID = "1.2.3"
    if study_comments is not None:
        ds.StudyComments = study_comments
    ds.add_new(0x7FE00010, "OB", b"\x01\x02\x03\x04")
    return ds


def _splice(raw: bytes, ts: str, tag: int, line: str) -> bytes:
    pieces, resume = dicom.splice_routing(raw, 0, len(raw), ts, tag, line)
    return b"".join(bytes(p) for p in pieces) + raw[resume:]


@pytest.mark.parametrize("ts", ENCODINGS)
@pytest.mark.parametrize("existing", [None, "Project: OLD Subject: OLD Session: OLD", ""])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_splice_sets_patient_comments_like_pydicom_would(
    ts: str, existing: str | None, undefined: bool
) -> None:
    uid = UID(ts)
    implicit, little = uid.is_implicit_VR, uid.is_little_endian
    raw = encode(_dataset(existing, undefined_sequences=undefined), implicit, little)
    assert raw is not None
    expected_ds = _dataset(existing, undefined_sequences=undefined)
    expected_ds.PatientComments = LINE  # 41 chars: padded to 42 with a space, as pydicom does
    expected = encode(expected_ds, implicit, little)
    assert _splice(raw, ts, PATIENT_COMMENTS, LINE) == expected


@pytest.mark.parametrize("ts", ENCODINGS)
def test_splice_study_comments_after_private_groups(ts: str) -> None:
    uid = UID(ts)
    for existing in (None, "old"):
        raw = encode(
            _dataset("keep me", undefined_sequences=True, study_comments=existing),
            uid.is_implicit_VR,
            uid.is_little_endian,
        )
        assert raw is not None
        out = decode(
            BytesIO(_splice(raw, ts, STUDY_COMMENTS, "Session: E1")), uid.is_implicit_VR, uid.is_little_endian
        )
        assert out.StudyComments == "Session: E1"
        assert out.PatientComments == "keep me"
        assert out.PixelData == b"\x01\x02\x03\x04"


def test_splice_appends_when_the_tag_is_past_every_element() -> None:
    ds = _ds(PatientName="A", PatientID="B")
    raw = encode(ds, False, True)
    assert raw is not None
    out = decode(BytesIO(_splice(raw, ExplicitVRLittleEndian, STUDY_COMMENTS, "x")), False, True)
    assert out.StudyComments == "x" and out.PatientID == "B"


@pytest.mark.parametrize("implicit", [True, False])
def test_splice_corrects_a_group_length_element(implicit: bool) -> None:
    ds = _ds(PatientName="DOE^JOHN", PatientID="P1", PatientComments="old")
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    raw = encode(ds, implicit, True)
    assert raw is not None
    # Prepend (0010,0000) UL with the true length of group 0010, as old files carry it.
    header = struct.pack("<HHI", 0x0010, 0, 4) if implicit else struct.pack("<HH2sH", 0x0010, 0, b"UL", 4)
    with_glen = header + struct.pack("<I", len(raw)) + raw
    out = _splice(with_glen, ts, PATIENT_COMMENTS, LINE)
    (glen,) = struct.unpack_from("<I", out, 8)
    assert glen == len(out) - 12  # still the length of everything after it
    assert decode(BytesIO(out), implicit, True).PatientComments == LINE


def test_splice_refuses_deflated_and_garbage() -> None:
    with pytest.raises(part10.Odd):
        dicom.splice_routing(b"", 0, 0, DeflatedExplicitVRLittleEndian, PATIENT_COMMENTS, "x")
    garbage = b"\x08\x00\x05\x00??\x04\x00abcd"
    with pytest.raises(part10.Odd):
        dicom.splice_routing(garbage, 0, len(garbage), ExplicitVRLittleEndian, PATIENT_COMMENTS, "x")


def _write(ds: Dataset, path: Path, ts: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.save_as(path, enforce_file_format=True)
    return path


def _payload_bytes(payload: part10.Payload) -> bytes:
    return b"".join(bytes(p) for p in payload.pieces)


def test_load_payload_without_routing_is_the_file_minus_its_meta(tmp_path: Path) -> None:
    [[path, _]] = build_test_files(tmp_path, images=2)[:1]
    payload = dicom.load_payload(str(path), None, None, "")
    data = path.read_bytes()
    assert data.endswith(_payload_bytes(payload))
    assert payload.length == len(_payload_bytes(payload))
    assert payload.transfer_syntax == ExplicitVRLittleEndian
    assert pydicom.dcmread(path).PatientComments.startswith("Project: WRONG")  # untouched source


def test_load_payload_reencodes_deflated_files_with_pydicom(tmp_path: Path) -> None:
    path = _write(
        _dataset("old", undefined_sequences=True), tmp_path / "d.dcm", DeflatedExplicitVRLittleEndian
    )
    before = path.read_bytes()
    payload = dicom.load_payload(str(path), DeflatedExplicitVRLittleEndian, PATIENT_COMMENTS, LINE)
    assert payload.transfer_syntax == DeflatedExplicitVRLittleEndian
    import zlib

    inflated = zlib.decompress(_payload_bytes(payload), -zlib.MAX_WBITS)
    out = decode(BytesIO(inflated), False, True)
    assert out.PatientComments == LINE and out.PatientID == "P1"
    assert path.read_bytes() == before


def test_load_payload_handles_a_file_without_preamble(tmp_path: Path) -> None:
    ds = _dataset(None, undefined_sequences=False)
    path = tmp_path / "raw.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    payload = dicom.load_payload(str(path), ImplicitVRLittleEndian, PATIENT_COMMENTS, LINE)
    assert payload.transfer_syntax == ImplicitVRLittleEndian
    assert decode(BytesIO(_payload_bytes(payload)), True, True).PatientComments == LINE
    with pytest.raises(dicom.DicomSendError, match="not a DICOM Part 10 file"):
        dicom.load_payload(str(path), ImplicitVRLittleEndian, None, "")


def test_large_files_keep_their_tail_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [[path, _]] = build_test_files(tmp_path, images=2, rows=64)[:1]
    monkeypatch.setattr(part10, "WHOLE_FILE_LIMIT", 1000)
    monkeypatch.setattr(part10, "HEAD_LIMIT", 1024)
    payload = dicom.load_payload(str(path), None, PATIENT_COMMENTS, LINE)
    assert payload.tail_length == path.stat().st_size - 1024
    stream = b"".join(bytes(s) for s in part10.segments(payload))
    assert len(stream) == payload.length
    out = decode(BytesIO(stream), False, True)
    assert out.PatientComments == LINE and len(out.PixelData) == 64 * 64 * 2


# ----------------------------------------------------------------------------------------------
# Command sets, statuses, context groups
# ----------------------------------------------------------------------------------------------


def test_c_store_command_set_decodes_as_pynetdicom_expects() -> None:
    cmd = dimse.command(
        [
            (0x0002, dimse.uid(MRImageStorage)),
            (0x0100, b"\x01\x00"),
            (0x0110, struct.pack("<H", 7)),
            (0x0700, b"\x00\x00"),
            (0x0800, b"\x00\x00"),
            (0x1000, dimse.uid("1.2.3.45")),
        ]
    )
    ds = decode(BytesIO(cmd), True, True)
    assert ds.CommandGroupLength == len(cmd) - 12
    assert ds.AffectedSOPClassUID == MRImageStorage
    assert (ds.CommandField, ds.MessageID, ds.CommandDataSetType) == (0x0001, 7, 0x0000)
    assert ds.AffectedSOPInstanceUID == "1.2.3.45"


def test_status_meanings() -> None:
    assert dicom.status_meaning(0xC000) == "Failure: Cannot Understand"
    assert dicom.status_meaning(0xA700) == "Failure: Refused: Out of Resources"
    assert dicom.status_meaning(0xB000) == "Warning: Coercion of Data Elements"
    assert dicom.status_meaning(0xFF00).startswith("Failure")  # Pending is not a C-STORE answer
    assert dimse.status_reason(0xC000, "bad").startswith("C-STORE status 0xC000 (Failure: Cannot Understand)")


def test_more_than_128_pairs_are_split_into_groups() -> None:
    files = [
        PlannedFile(
            f"/f{n}",
            1,
            1,
            f"1.2.{n}",
            f"1.2.840.{n // 2}",
            ImplicitVRLittleEndian if n % 2 else ExplicitVRLittleEndian,
            "x",
        )
        for n in range(300)
    ]
    contexts = [PresentationContext("9.9.9", (ExplicitVRLittleEndian,))]  # unused: not proposed
    groups = rounds.context_groups(files, contexts)
    assert [len(p) for p, _ in groups] == [128, 128, 44]
    assert sorted(i for _, idx in groups for i in idx) == list(range(300))
    for pairs, idx in groups:
        assert {(files[i].sop_class_uid, files[i].transfer_syntax) for i in idx} == set(pairs)


def test_bad_routing_arguments() -> None:
    scp = ScpTarget("127.0.0.1", 1)
    with pytest.raises(ValueError, match="routing must be one of"):
        dicom.send_files([], scp, routing="patient_name", line="x", contexts=[])
    with pytest.raises(ValueError, match="needs a routing line"):
        dicom.send_files([], scp, routing="study_comments", line=None, contexts=[])
    with pytest.raises(ValueError, match="single line"):
        dicom.send_files([], scp, routing="study_comments", line="Project: A\nSession: B", contexts=[])
    assert dicom.send_files([], scp, routing="none", line=None, contexts=[]) == dicom.SendOutcome((), ())


def test_read_ahead_keeps_order_reports_each_error_in_place_and_asks_the_kernel_ahead(monkeypatch) -> None:
    """While one file is sent, the kernel has been asked to read the next READ_AHEAD (WILLNEED), so a
    source not in the page cache is read meanwhile; files come in the plan's order, an unreadable one
    reported at its own turn; closing early reads nothing more."""
    events: list[str] = []

    def fake_load(
        path: str, ts: str | None, tag: int | None, line: str, edit: part10.Edit | None = None
    ) -> part10.Payload:
        events.append(f"load {path}")
        if path == "/f3":
            raise OSError(13, "Permission denied")
        return part10.Payload(ts or "", [memoryview(path.encode())], len(path), path)

    monkeypatch.setattr(rounds, "load_payload", fake_load)
    monkeypatch.setattr(rounds, "_will_need", lambda path: events.append(f"ahead {path}"))
    files = [
        (n, PlannedFile(f"/f{n}", 1, 1, f"1.2.{n}", "1.2.840.1", ExplicitVRLittleEndian, "x"))
        for n in range(20)
    ]
    opts = rounds.Options(tag=None, line="", retries=0, backoff=0.1, acse_timeout=1, dimse_timeout=1)
    got = []
    with contextlib.closing(rounds._read_ahead(files, opts)) as ahead:
        for pos, item, payload, error in ahead:
            got.append((pos, item[0], payload.path if payload else None, getattr(error, "strerror", None)))
            if pos == 0:  # the first is being sent: the next READ_AHEAD were asked for already
                assert events == [f"ahead /f{n}" for n in range(1 + rounds.READ_AHEAD)] + ["load /f0"]
            if pos == 5:
                break
    assert got == [
        (n, n, f"/f{n}" if n != 3 else None, "Permission denied" if n == 3 else None) for n in range(6)
    ]
    assert [e for e in events if e.startswith("load")] == [f"load /f{n}" for n in range(6)]
    assert f"ahead /f{5 + rounds.READ_AHEAD}" in events and f"ahead /f{6 + rounds.READ_AHEAD}" not in events
