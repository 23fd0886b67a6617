"""The synthetic DICOM corpus: deterministic, Part 10, the promised layout, and the promised nuisances."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    MRImageStorage,
)

from xnatmigrate.testing.corpus import (
    NUISANCE_KINDS,
    CorpusFile,
    CorpusSpec,
    build_corpus,
    corpus_bytes,
    main,
)

SMALL = CorpusSpec(
    patients=2, studies_per_patient=2, series_per_study=2, images_per_series=3, rows=16, seed=7
)
LAYOUT = re.compile(r"PAT\d{3}/\d{8}_\d+/\d+_[A-Za-z0-9_-]+/IMG\d{4}\.dcm")


@pytest.fixture(scope="module")
def nuisance_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusFile]]:
    root = tmp_path_factory.mktemp("nuisance") / "corpus"
    return root, build_corpus(root, CorpusSpec(rows=16, seed=3, nuisances=True))


def _by_kind(files: list[CorpusFile], kind: str) -> CorpusFile:
    [found] = [f for f in files if f.kind == kind]
    return found


def _snapshot(root: Path, files: list[CorpusFile]) -> dict[str, bytes]:
    return {f.path.relative_to(root).as_posix(): f.path.read_bytes() for f in files}


def test_same_seed_gives_byte_identical_corpus(tmp_path: Path) -> None:
    spec = CorpusSpec(patients=2, rows=16, seed=11, nuisances=True)
    first, second = tmp_path / "a", tmp_path / "b"
    files_a, files_b = build_corpus(first, spec), build_corpus(second, spec)
    assert _snapshot(first, files_a) == _snapshot(second, files_b)
    on_disk = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()}
    assert on_disk == set(_snapshot(first, files_a)), "the listing is the whole tree"


def test_different_seed_gives_different_uids(tmp_path: Path) -> None:
    a = build_corpus(tmp_path / "a", CorpusSpec(patients=1, rows=8, seed=1))
    b = build_corpus(tmp_path / "b", CorpusSpec(patients=1, rows=8, seed=2))
    assert not {f.sop_uid for f in a} & {f.sop_uid for f in b}
    assert not {f.study_uid for f in a} & {f.study_uid for f in b}


def test_counts_layout_and_uids_follow_the_spec(tmp_path: Path) -> None:
    files = build_corpus(tmp_path / "c", SMALL)
    assert len(files) == SMALL.image_count == 2 * 2 * 2 * 3
    assert {f.kind for f in files} == {"image"}
    assert len({f.patient_id for f in files}) == 2
    assert len({f.study_uid for f in files}) == 4
    assert len({f.series_uid for f in files}) == 8
    assert len({f.sop_uid for f in files}) == 24
    for f in files:
        assert LAYOUT.fullmatch(f.path.relative_to(tmp_path / "c").as_posix()), f.path
        assert all(uid and len(uid) <= 64 and uid.startswith("2.25.") for uid in (f.study_uid, f.sop_uid))
    # Modalities cycle per study in build order: MR, CT, MR, CT.
    study_modality: dict[str | None, str] = {}
    for f in files:
        study_modality.setdefault(f.study_uid, pydicom.dcmread(f.path, stop_before_pixels=True).Modality)
    assert list(study_modality.values()) == ["MR", "CT", "MR", "CT"]


def test_images_are_part10_with_realistic_headers(tmp_path: Path) -> None:
    # rows=None: the modality defaults (MR 256, CT 512); one image each keeps this fast.
    spec = CorpusSpec(patients=2, series_per_study=1, images_per_series=1, seed=5)
    mr, ct = build_corpus(tmp_path / "d", spec)
    for f, sop_class, size, bits in ((mr, MRImageStorage, 256, 12), (ct, CTImageStorage, 512, 16)):
        raw = f.path.read_bytes()
        assert raw[:128] == bytes(128) and raw[128:132] == b"DICM"
        ds = pydicom.dcmread(f.path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == f.sop_uid
        assert ds.SOPClassUID == sop_class
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID) == (
            f.study_uid,
            f.series_uid,
            f.patient_id,
        )
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", str(ds.PatientName))
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (
            size,
            size,
            16,
            bits,
            bits - 1,
        )
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation) == (
            1,
            "MONOCHROME2",
            0,
        )
        assert len(ds.PixelData) == size * size * 2
        for keyword in (
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "StudyDescription",
            "AccessionNumber",
            "StudyID",
            "SeriesNumber",
            "SeriesDescription",
            "InstanceNumber",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "PixelSpacing",
            "SliceThickness",
            "InstitutionName",
            "Manufacturer",
            "FrameOfReferenceUID",
        ):
            assert ds.get(keyword) not in (None, ""), keyword
        assert ("RescaleIntercept" in ds) == (ds.Modality == "CT")
        # Samples fit in BitsStored (the generator keeps 12 significant bits).
        assert max(ds.PixelData[1::2]) < 16


def test_every_nuisance_kind_is_written_once(nuisance_corpus: tuple[Path, list[CorpusFile]]) -> None:
    root, files = nuisance_corpus
    counts = Counter(f.kind for f in files)
    assert counts == Counter({"image": CorpusSpec().image_count, **dict.fromkeys(NUISANCE_KINDS, 1)})
    assert all(f.path.is_file() and f.path.is_relative_to(root) for f in files)


def test_truncated_copy_is_cut_inside_pixel_data(nuisance_corpus: tuple[Path, list[CorpusFile]]) -> None:
    _, files = nuisance_corpus
    truncated = _by_kind(files, "truncated")
    ds = pydicom.dcmread(truncated.path)  # headers still parse, like an interrupted copy
    assert ds.SOPInstanceUID == truncated.sop_uid
    assert 0 < len(ds.PixelData) < ds.Rows * ds.Columns * 2


def test_no_meta_has_no_preamble_and_needs_force(nuisance_corpus: tuple[Path, list[CorpusFile]]) -> None:
    _, files = nuisance_corpus
    no_meta = _by_kind(files, "no_meta")
    raw = no_meta.path.read_bytes()
    assert raw[128:132] != b"DICM" and raw[:4] == b"\x08\x00\x05\x00"  # starts at (0008,0005), implicit VR
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(no_meta.path)
    ds = pydicom.dcmread(no_meta.path, force=True)
    assert ds.SOPInstanceUID == no_meta.sop_uid
    assert len(ds.file_meta) == 0


def test_dicomdir_references_the_extensionless_copy(nuisance_corpus: tuple[Path, list[CorpusFile]]) -> None:
    root, files = nuisance_corpus
    dicomdir = _by_kind(files, "dicomdir")
    assert dicomdir.path == root / "DICOMDIR"
    ds = pydicom.dcmread(dicomdir.path)
    assert ds.file_meta.MediaStorageSOPClassUID == MediaStorageDirectoryStorage
    copy = _by_kind(files, "no_extension")
    # Read the records directly: pydicom's FileSet(ds) would leave a staging TemporaryDirectory behind.
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert [root.joinpath(*r.ReferencedFileID) for r in images] == [copy.path]
    assert images[0].ReferencedSOPInstanceUIDInFile == copy.sop_uid
    assert copy.path.suffix == ""
    first_image = next(f for f in files if f.kind == "image")
    assert copy.sop_uid == first_image.sop_uid == pydicom.dcmread(copy.path).SOPInstanceUID


@pytest.mark.parametrize("kind", ["text", "png", "not_dicom"])
def test_non_dicom_files_are_rejected_by_pydicom(
    nuisance_corpus: tuple[Path, list[CorpusFile]], kind: str
) -> None:
    _, files = nuisance_corpus
    nuisance = _by_kind(files, kind)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(nuisance.path)
    assert nuisance.sop_uid is None
    if kind == "png":
        assert nuisance.path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if kind == "not_dicom":
        assert nuisance.path.name == "fake.dcm"


def test_refuses_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "existing.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_corpus(tmp_path, SMALL)


def test_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="modalities"):
        CorpusSpec(modalities=("US",))
    with pytest.raises(ValueError, match="patients"):
        CorpusSpec(patients=0)


def test_corpus_bytes_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli"
    assert main([str(root), "--patients", "1", "--rows", "8", "--modalities", "ct", "--nuisances"]) == 0
    out = capsys.readouterr().out
    expected = CorpusSpec(patients=1).image_count + len(NUISANCE_KINDS)
    assert out.strip() == str(expected)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) == expected
    listed = [CorpusFile(p, "image", None, None, None, None) for p in files]
    assert corpus_bytes(listed) == sum(p.stat().st_size for p in files)
