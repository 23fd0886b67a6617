"""anonymize.edit_bytes writes only what the scripts changed (the rest copied from the source bytes):
byte for byte what pydicom's whole-dataset write makes of the same edited dataset."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from tests.xnat_standin import DEFAULT_ANON_SCRIPT
from xnatmigrate import anonymize
from xnatmigrate.model import PlannedScript

SITE = DEFAULT_ANON_SCRIPT + "\n-(0010,0030)\n-(0008,0080)\n"  # XNAT's default, and two deletions
SCRIPTS = {
    "site": SITE,
    "private": 'version "6.1"\nremoveAllPrivateTags\n(0010,0010) := "ANON"\n',
    "drop-pixels": 'version "6.1"\n-(7FE0,0010)\n',
    "sequence": 'version "6.1"\n(0008,1110)[0]/(0008,1150) := "1.2.3"\n',
    "charset": 'version "6.1"\n(0008,0005) := "ISO_IR 192"\n(0010,0010) := "Jöns^Émile"\n',
    "nothing": 'version "6.1"\n',
}


def _file(tmp_path: Path, name: str, ts: str, *, extra: bool = False, encapsulated: bool = False) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = f"2.25.{sum(map(ord, name))}"
    meta.TransferSyntaxUID = RLELossless if encapsulated else ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN1", "19700101"
    ds.InstitutionName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "Hospital", "CT", 1, 1
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", "2.25.9"
    ds.ReferencedStudySequence = [ref]
    ds.add_new(0x00091010, "LO", "private before pixels")
    if extra:
        ds.add_new(0x00080000, "UL", 1234)  # a retired group length, which pydicom does not write
        ds.add_new(0x00291010, "OB", b"\x01\x02\x03\x04")
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    pixels = bytes(range(32))
    ds.PixelData = encapsulate([pixels]) if encapsulated else pixels
    if encapsulated:
        ds["PixelData"].VR = "OB"
    if extra:
        ds.add_new(0xFFFCFFFC, "OB", b"\0\0\0\0")  # Data Set Trailing Padding, after Pixel Data
    path = tmp_path / f"{name}.dcm"
    ds.save_as(
        path,
        enforce_file_format=True,
        implicit_vr=ts == ImplicitVRLittleEndian,
        little_endian=ts != ExplicitVRBigEndian,
    )
    return path


FILES = {
    "explicit": {"ts": ExplicitVRLittleEndian},
    "implicit": {"ts": ImplicitVRLittleEndian},
    "big-endian": {"ts": ExplicitVRBigEndian},
    "extra": {"ts": ExplicitVRLittleEndian, "extra": True},
    "encapsulated": {"ts": ExplicitVRLittleEndian, "encapsulated": True},
}


def _edited(path: Path, script: str) -> tuple[Dataset, bytes]:
    text = SCRIPTS[script]
    sc = PlannedScript(script, hashlib.sha256(text.encode()).hexdigest(), text)
    chain = anonymize.chain_of([script], {script: sc})
    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    chain.apply(ds, anonymize.variables("prj", "SUBJ", "SESS"), secret=None)
    return ds, data


@pytest.mark.skipif(int(pydicom.__version__.split(".")[0]) < 3, reason="the splice needs pydicom 3")
@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("kind", sorted(FILES))
def test_spliced_output_equals_pydicoms_whole_write(tmp_path: Path, kind: str, script: str) -> None:
    path = _file(tmp_path, kind, **FILES[kind])  # type: ignore[arg-type]
    ds, data = _edited(path, script)
    whole = anonymize._written(ds)
    ds, data = _edited(
        path, script
    )  # again: writing converts elements; the splice sees them as apply left them
    spliced = anonymize._spliced(ds, data)
    if kind == "encapsulated" or script == "charset":
        assert spliced is None  # the walker stops at encapsulated pixels; a new charset re-encodes all
    else:
        assert spliced is not None and spliced == whole
    edited = pydicom.dcmread(io.BytesIO(spliced or whole), force=True)
    if script == "drop-pixels":
        assert "PixelData" not in edited
    if script == "site":
        assert str(edited.PatientName) == "SUBJ" and "PatientBirthDate" not in edited


def test_edit_bytes_keeps_untouched_elements_as_read(tmp_path: Path) -> None:
    """An element the script never touched keeps its original bytes, even an odd pydicom would rewrite."""
    path = _file(tmp_path, "x", ExplicitVRLittleEndian)
    text = SCRIPTS["site"]
    sc = PlannedScript("site", hashlib.sha256(text.encode()).hexdigest(), text)
    out = anonymize.edit_bytes(
        anonymize.chain_of(["site"], {"site": sc}),
        path.read_bytes(),
        anonymize.variables("prj", "SUBJ", "SESS"),
        None,
        str(path),
    )
    src = path.read_bytes()
    assert out.endswith(src[src.index(b"\xe0\x7f\x10\x00") :])  # Pixel Data onwards copied as it was
    assert pydicom.dcmread(io.BytesIO(out)).PatientID == "SESS"


# -- the partial parse (edit_split): only what the scripts name is parsed; the bytes are the whole parse's

MORE = {
    **SCRIPTS,
    "condition": 'version "6.1"\n(0008,0060) = "CT" ? (0010,0010) := "CT^PATIENT"\n(0020,0052) ?= "1.2"\n',
    "new-elements": 'version "6.1"\n(0010,1010) := "042Y"\n(0008,103E) := concatenate[(0008,0060), "-x"]\n',
    "after-pixels": 'version "6.1"\n-(FFFC,FFFC)\n(0010,0010) := "X"\n',
    "wildcard": 'version "6.1"\n-(0010,XXXX)\n',
    "echo": 'version "6.1"\necho (0010,0010)\n(0010,0020) := session\n',
    "derived": 'version "6.1"\n(0020,0052) := newUID[]\n'
    'mapReferencedUIDs["2.25", "(0020,000D)"]\n(0010,0010) := hashUID[(0008,0018)]\n',
}
KEPT = {"prearchive": anonymize.PREARCHIVE_KEPT, "cstore": anonymize.cstore_kept(anonymize.Routing.NONE)}


def _chain(script: str) -> anonymize.dicomedit.ScriptChain:
    text = MORE[script]
    sc = PlannedScript(script, hashlib.sha256(text.encode()).hexdigest(), text)
    return anonymize.chain_of([script], {script: sc})


def _outcome(fn: object, *args: object) -> bytes | str:
    try:
        return fn(*args)  # type: ignore[operator,no-any-return]
    except anonymize.AnonymizationError as exc:
        return str(exc)


def _both(data: bytes, script: str, kept: str, what: str = "f.dcm") -> tuple[bytes | str, bytes | str]:
    chain, labels = _chain(script), anonymize.variables("prj", "SUBJ", "SESS")
    args = (chain, data, labels, "s3cret", what, KEPT[kept])
    whole = _outcome(anonymize._edited_whole, *args)
    part = _outcome(anonymize.edit_bytes, *args)
    return whole, part


def _undefined_sequence(tmp_path: Path) -> Path:
    """A file whose sequence has an undefined length (pydicom decodes it as it reads)."""
    path = _file(tmp_path, "undefined", ExplicitVRLittleEndian)
    ds = pydicom.dcmread(path)
    ds["ReferencedStudySequence"].is_undefined_length = True
    for item in ds.ReferencedStudySequence:
        item.is_undefined_length_sequence_item = True
    ds.save_as(path, enforce_file_format=True)
    return path


def _out_of_order(tmp_path: Path) -> Path:
    """The file's first two data-set elements swapped (pydicom would write them in tag order)."""
    path = _file(tmp_path, "swapped", ExplicitVRLittleEndian)
    data = path.read_bytes()
    meta_end, _, _, elements = anonymize._walk(data)  # type: ignore[misc]
    (_, a, b, _), (_, _, c, _) = elements[0], elements[1]
    path.write_bytes(data[:meta_end] + data[b:c] + data[a:b] + data[c:])
    return path


def _padded_uid(tmp_path: Path) -> Path:
    """The SOP Instance UID padded with a space: pydicom writes it back with a NUL, so it is re-encoded."""
    path = _file(tmp_path, "padded", ImplicitVRLittleEndian)
    data = path.read_bytes()
    old = b"2.25.%d" % sum(map(ord, "padded"))  # even: no NUL
    assert data.count(old) == 2  # the file meta and the data set
    at = data.rindex(old)
    path.write_bytes(data[:at] + old[:-1] + b" " + data[at + len(old) :])
    return path


def _deflated(tmp_path: Path) -> Path:
    return _file(tmp_path, "deflated", DeflatedExplicitVRLittleEndian)


ODD_FILES = {
    "undefined-sequence": _undefined_sequence,
    "out-of-order": _out_of_order,
    "padded-uid": _padded_uid,
    "deflated": _deflated,
}


@pytest.mark.skipif(int(pydicom.__version__.split(".")[0]) < 3, reason="the splice needs pydicom 3")
@pytest.mark.parametrize("kept", sorted(KEPT))
@pytest.mark.parametrize("script", sorted(MORE))
@pytest.mark.parametrize("kind", sorted(FILES) + sorted(ODD_FILES))
def test_the_partial_parse_gives_the_whole_parses_bytes(
    tmp_path: Path, kind: str, script: str, kept: str
) -> None:
    if kind in FILES:
        path = _file(tmp_path, kind, **FILES[kind])  # type: ignore[arg-type]
    else:
        path = ODD_FILES[kind](tmp_path)
    data = path.read_bytes()
    anonymize._MEMO.clear()
    whole, part = _both(data, script, kept)
    assert part == whole
    again_whole, again = _both(data, script, kept)  # the second time from the remembered outcome
    assert again == again_whole == whole


def test_what_the_partial_parse_takes_on_and_what_it_leaves_to_the_whole(tmp_path: Path) -> None:
    kept = anonymize.PREARCHIVE_KEPT
    assert anonymize._reads(_chain("site"), kept) is not None
    for script in ("private", "drop-pixels", "charset", "wildcard"):  # every element, or an ambiguous VR
        assert anonymize._reads(_chain(script), kept) is None, script
    reads = anonymize._reads(_chain("derived"), kept)
    assert reads is not None and 0x00080018 in reads.keyed  # newUID derives from the SOP Instance UID
    reads = anonymize._reads(_chain("echo"), kept)
    assert reads is not None and not reads.memo  # echo logs per file: nothing is reused
    data = _file(tmp_path, "x", ExplicitVRLittleEndian).read_bytes()
    labels = anonymize.variables("prj", "SUBJ", "SESS")
    head, rest = anonymize.edit_split(_chain("site"), data, labels, None, "x", kept)
    assert rest == data.index(b"\xe0\x7f\x10\x00") or rest < data.index(b"\xe0\x7f\x10\x00")
    assert head + data[rest:] == anonymize._edited_whole(_chain("site"), data, labels, None, "x", kept)
    # An element edited after Pixel Data: nothing is left in place.
    extra = _file(tmp_path, "y", ExplicitVRLittleEndian, extra=True).read_bytes()
    head, rest = anonymize.edit_split(_chain("after-pixels"), extra, labels, None, "y", kept)
    assert rest == len(extra) and b"\xfc\xff\xfc\xff" not in head


def test_files_of_one_study_share_the_scripts_outcome_each_with_its_own_uids(tmp_path: Path) -> None:
    anonymize._MEMO.clear()
    chain, labels, kept = (
        _chain("site"),
        anonymize.variables("prj", "SUBJ", "SESS"),
        anonymize.PREARCHIVE_KEPT,
    )
    outs = []
    for name in ("a", "b", "c"):
        data = _file(tmp_path, name, ImplicitVRLittleEndian).read_bytes()  # the same but for the SOP UID
        out = anonymize.edit_bytes(chain, data, labels, None, name, kept)
        assert out == anonymize._edited_whole(chain, data, labels, None, name, kept)
        outs.append(pydicom.dcmread(io.BytesIO(out)))
    assert len(anonymize._MEMO) == 1
    assert len({str(ds.SOPInstanceUID) for ds in outs}) == 3 and {str(ds.PatientID) for ds in outs} == {
        "SESS"
    }


def test_a_failure_is_remembered_and_names_each_file(tmp_path: Path) -> None:
    anonymize._MEMO.clear()
    text = 'version "6.1"\n(0010,0010) := substring[(0010,0010), 0, 99]\n'
    sc = PlannedScript("bad", hashlib.sha256(text.encode()).hexdigest(), text)
    chain = anonymize.chain_of(["bad"], {"bad": sc})
    for name in ("a", "b"):
        data = _file(tmp_path, name, ExplicitVRLittleEndian).read_bytes()
        args = (chain, data, anonymize.variables("prj", "S", "S1"), None, name, anonymize.PREARCHIVE_KEPT)
        with pytest.raises(anonymize.AnonymizationError, match=rf"index out of range.*\(on {name}\)$"):
            anonymize.edit_bytes(*args)
        assert _outcome(anonymize._edited_whole, *args) == _outcome(anonymize.edit_bytes, *args)
    renaming = 'version "6.1"\n(0020,0013) := "7"\n'
    sc = PlannedScript("renames", hashlib.sha256(renaming.encode()).hexdigest(), renaming)
    chain = anonymize.chain_of(["renames"], {"renames": sc})
    data = _file(tmp_path, "c", ExplicitVRLittleEndian).read_bytes()
    with pytest.raises(
        anonymize.AnonymizationError, match="changes InstanceNumber of c, which the plan named"
    ):
        anonymize.edit_bytes(chain, data, anonymize.variables("prj", "S", "S1"), None, "c")


def test_the_secret_from_the_environment_is_part_of_what_is_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _file(tmp_path, "s", ExplicitVRLittleEndian).read_bytes()
    text = 'version "6.1"\n(0020,0052) := newUID[]\n'
    sc = PlannedScript("uid", hashlib.sha256(text.encode()).hexdigest(), text)
    chain, labels = anonymize.chain_of(["uid"], {"uid": sc}), anonymize.variables("prj", "SUBJ", "SESS")
    outs = []
    for secret in ("one", "two"):
        monkeypatch.setenv(anonymize.dicomedit.SECRET_ENV, secret)
        out = anonymize.edit_bytes(chain, data, labels, None, "s")
        assert out == anonymize._edited_whole(chain, data, labels, None, "s", anonymize.PREARCHIVE_KEPT)
        outs.append(out)
    assert outs[0] != outs[1]
