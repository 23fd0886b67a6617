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
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

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
