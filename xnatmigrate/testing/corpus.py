"""Deterministic synthetic DICOM corpus for tests, the demo and benchmarks.

``build_corpus(root, CorpusSpec(...))`` writes Part 10 MR/CT images (or CR/DX radiographs) laid out like a
typical export,

    root/<PatientID>/<StudyDate>_<n>/<SeriesNumber>_<SeriesDescription>/IMG<nnnn>.dcm

and, with ``nuisances=True``, the junk real source folders contain (DICOMDIR, text, PNG, a dataset
without file meta, a truncated copy, a ``.dcm`` that is not DICOM, a copy without extension).

NOTE: everything is a pure function of (seed, position): UIDs are ``2.25.<uuid5>`` built from the seed
and the (patient, study, series, instance) indices, and headers/pixels come from ``random.Random``
seeded with strings (hashed with SHA-512 by Python, so PYTHONHASHSEED does not matter). Two builds with
the same spec are byte-identical, and a larger spec with the same seed reproduces the smaller one's
files. Use different seeds for corpora that must not share UIDs.

NOTE: every nuisance that carries UIDs is a copy of the first image (same SOP Instance UID), so the
distinct SOP Instance UIDs of kind ``"image"`` are exactly the instances of the corpus.

Run ``python -m xnatmigrate.testing.corpus ROOT --patients 5 --nuisances`` to build one by hand.
"""

from __future__ import annotations

import argparse
import binascii
import random
import re
import struct
import sys
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

__all__ = [
    "NUISANCE_KINDS",
    "CorpusFile",
    "CorpusSpec",
    "build_corpus",
    "corpus_bytes",
    "main",
]

#: Kinds written by ``nuisances=True``, besides ``"image"``.
NUISANCE_KINDS: tuple[str, ...] = (
    "dicomdir",
    "no_extension",
    "text",
    "png",
    "no_meta",
    "truncated",
    "not_dicom",
)

# Namespace for the deterministic UIDs; changing it changes every UID of every corpus.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/xnatmigrate/testing/corpus")
_IMPLEMENTATION_VERSION = "XNATMIGRATE_SYN"

_FAMILY = ("DOE", "SMITH", "GARCIA", "NGUYEN", "MUELLER", "ROSSI", "TANAKA", "OKAFOR", "LARSEN", "DUBOIS")
_GIVEN = (
    ("JOHN", "M"),
    ("JANE", "F"),
    ("MARIA", "F"),
    ("WEI", "M"),
    ("AHMED", "M"),
    ("ELENA", "F"),
    ("LUCAS", "M"),
    ("AMARA", "F"),
    ("SOFIA", "F"),
    ("KENJI", "M"),
)
_INSTITUTIONS = ("GENERAL HOSPITAL", "ST. MARY'S MEDICAL CENTER", "UNIVERSITY CLINIC")


@dataclass(frozen=True)
class _Modality:
    sop_class: UID
    default_rows: int
    fov_mm: float  # kept constant when rows is overridden, so PixelSpacing stays plausible
    slice_mm: float
    bits_stored: int
    manufacturer: str
    model: str
    study_descriptions: tuple[str, ...]
    series_descriptions: tuple[str, ...]
    # A projection radiograph (CR/DX): no slice geometry (orientation, position, frame of reference,
    # slice thickness/location); a ViewPosition and BodyPartExamined per series instead.
    projection: bool = False
    kvp: str = "120"


_MODALITIES: dict[str, _Modality] = {
    "MR": _Modality(
        sop_class=MRImageStorage,
        default_rows=256,
        fov_mm=240.0,
        slice_mm=5.0,
        bits_stored=12,
        manufacturer="SIEMENS",
        model="Prisma",
        study_descriptions=("MR BRAIN W/O CONTRAST", "MR KNEE LEFT", "MR L-SPINE"),
        series_descriptions=("T1_MPRAGE_SAG", "T2 FLAIR AX", "DWI b1000", "T2_TSE_COR", "localizer"),
    ),
    "CT": _Modality(
        sop_class=CTImageStorage,
        default_rows=512,
        fov_mm=360.0,
        slice_mm=2.5,
        bits_stored=16,
        manufacturer="GE MEDICAL SYSTEMS",
        model="Revolution CT",
        study_descriptions=("CT CHEST W/ CONTRAST", "CT HEAD W/O", "CT ABDOMEN/PELVIS"),
        series_descriptions=("AX 5.0 SOFT", "AX 1.25 LUNG", "COR 3.0", "SCOUT"),
    ),
    # Radiographs are small here on purpose (256², ≈ 130 KB like MR; real ones are 2-3k²): the bench
    # uses them for many small studies, where per-study costs, not bytes, dominate.
    "CR": _Modality(
        sop_class=ComputedRadiographyImageStorage,
        default_rows=256,
        fov_mm=430.0,
        slice_mm=0.0,
        bits_stored=12,
        manufacturer="FUJIFILM Corporation",
        model="FCR PROFECT CS",
        study_descriptions=("XR CHEST PA AND LATERAL", "XR KNEE LEFT 3 VIEWS", "XR HAND RIGHT"),
        series_descriptions=("PA", "LAT", "OBL", "AP"),
        projection=True,
        kvp="85",
    ),
    "DX": _Modality(
        sop_class=DigitalXRayImageStorageForPresentation,
        default_rows=256,
        fov_mm=430.0,
        slice_mm=0.0,
        bits_stored=12,
        manufacturer="Carestream Health",
        model="DRX-Evolution",
        study_descriptions=("XR CHEST 2 VIEWS", "XR ANKLE RIGHT", "XR PELVIS AP"),
        series_descriptions=("AP", "LAT", "PA", "OBL"),
        projection=True,
        kvp="70",
    ),
}
# Body part per study description of a radiograph (BodyPartExamined).
_BODY_PART = {"CHEST": "CHEST", "KNEE": "KNEE", "HAND": "HAND", "ANKLE": "ANKLE", "PELVIS": "PELVIS"}
# ViewPosition's defined terms for the series descriptions that are not one already.
_VIEW = {"LAT": "LL", "OBL": "LLO"}

# Keeps only the low 12 bits of each little-endian 16-bit sample when applied to the odd (high) bytes:
# MR declares BitsStored 12, and CT values stay in a plausible HU range after RescaleIntercept -1024.
_MASK_HIGH_NIBBLE = bytes(b & 0x0F for b in range(256))


@dataclass(frozen=True)
class CorpusSpec:
    """What to build. Counts are per parent; ``modalities`` is cycled over studies in build order."""

    patients: int = 3
    studies_per_patient: int = 1
    series_per_study: int = 2
    images_per_series: int = 4
    modalities: tuple[str, ...] = ("MR", "CT")
    rows: int | None = None  # None: MR/CR/DX 256x256, CT 512x512; Columns always equals Rows
    seed: int = 0
    nuisances: bool = False

    def __post_init__(self) -> None:
        for name in ("patients", "studies_per_patient", "series_per_study", "images_per_series"):
            if getattr(self, name) < 1:
                raise ValueError(f"CorpusSpec.{name} must be >= 1")
        if not self.modalities or any(m not in _MODALITIES for m in self.modalities):
            raise ValueError(f"CorpusSpec.modalities must be a non-empty subset of {sorted(_MODALITIES)}")
        if self.rows is not None and self.rows < 1:
            raise ValueError("CorpusSpec.rows must be >= 1")

    @property
    def image_count(self) -> int:
        """Number of files of kind ``"image"`` the spec produces."""
        return self.patients * self.studies_per_patient * self.series_per_study * self.images_per_series


@dataclass(frozen=True)
class CorpusFile:
    """One written file. UIDs/patient are None for files that carry none (text, PNG, DICOMDIR, ...)."""

    path: Path
    kind: str  # "image" or one of NUISANCE_KINDS
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    patient_id: str | None


def _uid(seed: int, *parts: object) -> str:
    """Deterministic UID under the ISO ``2.25`` arc (UUID-derived; no registered root needed)."""
    name = "/".join(str(p) for p in (seed, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _rng(seed: int, *parts: object) -> random.Random:
    # A str seed is hashed with SHA-512 (seed version 2): stable across runs, platforms, hash seeds.
    return random.Random("/".join(str(p) for p in ("xnatmigrate-corpus", seed, *parts)))


def _path_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "NA"


def _ds(value: float) -> str:
    # Decimal String values are formatted here, once, so the bytes never depend on float repr rules.
    return f"{value:.6g}"


def _da(d: date) -> str:
    return d.strftime("%Y%m%d")


def _pixel_pattern(seed: int, key: tuple[int, ...], nbytes: int, extra: int) -> bytes:
    """Random 16-bit little-endian samples, 12 significant bits, ``nbytes + extra`` long."""
    raw = bytearray(_rng(seed, "pixels", *key).randbytes(nbytes + extra))
    raw[1::2] = raw[1::2].translate(_MASK_HIGH_NIBBLE)
    return bytes(raw)


def _file_meta(sop_class: str, sop_uid: str, seed: int) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Set explicitly: pydicom would otherwise stamp its own version, making bytes vary by pydicom release.
    meta.ImplementationClassUID = UID(_uid(seed, "implementation"))
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _write_images(root: Path, spec: CorpusSpec) -> list[CorpusFile]:
    files: list[CorpusFile] = []
    seed = spec.seed
    for p in range(spec.patients):
        prng = _rng(seed, "patient", p)
        given, sex = prng.choice(_GIVEN)
        patient_name = f"{prng.choice(_FAMILY)}^{given}"
        patient_id = f"PAT{p + 1:03d}"
        birth = date(1940, 1, 1) + timedelta(days=prng.randrange(60 * 365))
        institution = prng.choice(_INSTITUTIONS)
        for s in range(spec.studies_per_patient):
            study_index = p * spec.studies_per_patient + s
            mod_name = spec.modalities[study_index % len(spec.modalities)]
            mod = _MODALITIES[mod_name]
            srng = _rng(seed, "study", p, s)
            study_uid = _uid(seed, "study", p, s)
            study_date = date(2015, 1, 1) + timedelta(days=srng.randrange(3000))
            study_time = f"{srng.randrange(7, 19):02d}{srng.randrange(60):02d}{srng.randrange(60):02d}"
            study_dir = root / patient_id / f"{_da(study_date)}_{s + 1}"
            rows = spec.rows or mod.default_rows
            spacing = mod.fov_mm / rows
            nbytes = rows * rows * 2
            shift = rows * 2  # consecutive images are the series pattern shifted by one row

            study = Dataset()
            study.SpecificCharacterSet = "ISO_IR 100"
            study.ImageType = ["ORIGINAL", "PRIMARY"] if mod.projection else ["ORIGINAL", "PRIMARY", "AXIAL"]
            study.SOPClassUID = mod.sop_class
            study.StudyDate = _da(study_date)
            study.StudyTime = study_time
            study.AccessionNumber = f"A{srng.randrange(10**8):08d}"
            study.Modality = mod_name
            study.Manufacturer = mod.manufacturer
            study.InstitutionName = institution
            study.ReferringPhysicianName = "REFERRER^DR"
            study.StudyDescription = srng.choice(mod.study_descriptions)
            study.ManufacturerModelName = mod.model
            study.PatientName = patient_name
            study.PatientID = patient_id
            study.PatientBirthDate = _da(birth)
            study.PatientSex = sex
            if not mod.projection:
                study.SliceThickness = _ds(mod.slice_mm)
            if mod_name == "MR":
                study.ScanningSequence = "SE"
                study.SequenceVariant = "NONE"
                study.MRAcquisitionType = "2D"
                study.RepetitionTime = "500"
                study.EchoTime = "15"
                study.MagneticFieldStrength = "3"
            else:
                study.KVP = mod.kvp
            if mod.projection:
                words = study.StudyDescription.split()
                study.BodyPartExamined = next((_BODY_PART[w] for w in words if w in _BODY_PART), "")
                study.PatientOrientation = ["A", "F"]
                if mod_name == "DX":
                    study.PresentationIntentType = "FOR PRESENTATION"
            else:
                study.PatientPosition = "HFS"
            study.StudyInstanceUID = study_uid
            study.StudyID = str(1000 + study_index)
            if not mod.projection:
                study.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
                study.PositionReferenceIndicator = ""
            study.SamplesPerPixel = 1
            study.PhotometricInterpretation = "MONOCHROME2"
            study.Rows = rows
            study.Columns = rows
            study.PixelSpacing = [_ds(spacing), _ds(spacing)]
            study.BitsAllocated = 16
            study.BitsStored = mod.bits_stored
            study.HighBit = mod.bits_stored - 1
            study.PixelRepresentation = 0
            if mod_name == "CT":
                study.RescaleIntercept = "-1024"
                study.RescaleSlope = "1"
                study.RescaleType = "HU"

            for se in range(spec.series_per_study):
                series_uid = _uid(seed, "series", p, s, se)
                series_number = se + 1
                description = mod.series_descriptions[se % len(mod.series_descriptions)]
                series_dir = study_dir / f"{series_number}_{_path_part(description)}"
                series_dir.mkdir(parents=True, exist_ok=True)
                pattern = _pixel_pattern(seed, (p, s, se), nbytes, shift * (spec.images_per_series - 1))
                z0 = -0.5 * mod.slice_mm * spec.images_per_series

                # One dataset per series, mutated per image: far cheaper than rebuilding ~50 elements.
                ds = Dataset()
                ds.update(study)
                ds.SeriesDate = study.StudyDate
                ds.SeriesTime = study_time
                ds.SeriesDescription = description
                ds.SeriesInstanceUID = series_uid
                ds.SeriesNumber = series_number
                if mod.projection:
                    ds.ViewPosition = _VIEW.get(description, description)
                else:
                    ds.FrameOfReferenceUID = _uid(seed, "frame", p, s, se)
                for i in range(spec.images_per_series):
                    sop_uid = _uid(seed, "instance", p, s, se, i)
                    ds.file_meta = _file_meta(mod.sop_class, sop_uid, seed)
                    ds.SOPInstanceUID = sop_uid
                    ds.ContentDate = study.StudyDate
                    ds.ContentTime = study_time
                    ds.InstanceNumber = i + 1
                    if not mod.projection:
                        ds.ImagePositionPatient = [
                            _ds(-0.5 * mod.fov_mm),
                            _ds(-0.5 * mod.fov_mm),
                            _ds(z0 + i * mod.slice_mm),
                        ]
                        ds.SliceLocation = _ds(z0 + i * mod.slice_mm)
                    ds.PixelData = pattern[i * shift : i * shift + nbytes]
                    ds["PixelData"].VR = "OW"
                    path = series_dir / f"IMG{i + 1:04d}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    files.append(CorpusFile(path, "image", study_uid, series_uid, sop_uid, patient_id))
    return files


def _png_bytes(width: int = 8, height: int = 8) -> bytes:
    """A valid 8-bit greyscale PNG (a gradient), built without an imaging library."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", binascii.crc32(tag + data))

    raw = b"".join(b"\x00" + bytes((x * 32 + y * 8) & 0xFF for x in range(width)) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _write_nuisances(root: Path, spec: CorpusSpec, first: CorpusFile) -> list[CorpusFile]:
    out: list[CorpusFile] = []
    uids = (first.study_uid, first.series_uid, first.sop_uid, first.patient_id)
    series_dir = first.path.parent

    # DICOMDIR as on removable media: pydicom writes the referenced copy as PT000000/.../IM000000, the
    # standard's extension-less File ID, which doubles as the "no_extension" case.
    fs = FileSet()
    fs.UID = UID(_uid(spec.seed, "fileset"))  # default is random; fixed for byte-identical rebuilds
    fs.ID = "XNATMIGRATE"
    fs.add(first.path)
    fs.write(root)  # reloads the file-set, so instances are only looked up afterwards
    [copied] = list(fs)
    # FileSet keeps a staging TemporaryDirectory that is otherwise only removed at garbage collection
    # (with a ResourceWarning); there is no public close(), so clean it if the attribute is there.
    stage_dir = getattr(fs, "_stage", {}).get("t")
    if stage_dir is not None:
        stage_dir.cleanup()
    out.append(CorpusFile(root / "DICOMDIR", "dicomdir", None, None, None, None))
    out.append(CorpusFile(Path(copied.path), "no_extension", *uids))

    notes = root / "notes.txt"
    notes.write_text(
        "Exported from PACS for the migration test.\nDo not import this file.\n", encoding="ascii"
    )
    out.append(CorpusFile(notes, "text", None, None, None, None))

    png = series_dir / "preview.png"
    png.write_bytes(_png_bytes())
    out.append(CorpusFile(png, "png", None, None, None, None))

    # A raw dataset as some old tools write it: no 128-byte preamble, no DICM, no file meta, implicit VR.
    ds = pydicom.dcmread(first.path)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    no_meta = series_dir / "NOMETA0001.dcm"
    ds.save_as(no_meta, implicit_vr=True, little_endian=True, enforce_file_format=False)
    out.append(CorpusFile(no_meta, "no_meta", *uids))

    # Cut halfway through Pixel Data (the last element), like an interrupted copy: headers still parse.
    data = first.path.read_bytes()
    rows = int(ds.Rows)
    truncated = series_dir / "TRUNC0001.dcm"
    truncated.write_bytes(data[: len(data) - rows * rows])  # pixel data is rows*rows*2 bytes
    out.append(CorpusFile(truncated, "truncated", *uids))

    fake = root / str(first.patient_id) / "fake.dcm"
    fake.write_bytes(b"This file is called .dcm but it is not DICOM; a scanner must reject it.\n" * 4)
    out.append(CorpusFile(fake, "not_dicom", None, None, None, None))
    return out


def build_corpus(root: Path, spec: CorpusSpec) -> list[CorpusFile]:
    """Write the corpus described by ``spec`` under ``root`` and list every file written.

    Args:
        root: Directory to create; it must not exist or be empty, so the listing is the whole tree.
        spec: What to write.

    Returns:
        Images first (patient, study, series, instance order), then nuisances in NUISANCE_KINDS order.

    Raises:
        FileExistsError: ``root`` exists and is not empty.

    NOTE: deterministic; see the module docstring.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"corpus root {root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    files = _write_images(root, spec)
    if spec.nuisances:
        files.extend(_write_nuisances(root, spec, files[0]))
    return files


def corpus_bytes(files: Iterable[CorpusFile]) -> int:
    """Total size on disk of ``files``, in bytes."""
    return sum(f.path.stat().st_size for f in files)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build a corpus and print the number of files written (details on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m xnatmigrate.testing.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("root", type=Path)
    parser.add_argument("--patients", type=int, default=CorpusSpec.patients)
    parser.add_argument("--studies-per-patient", type=int, default=CorpusSpec.studies_per_patient)
    parser.add_argument("--series-per-study", type=int, default=CorpusSpec.series_per_study)
    parser.add_argument("--images-per-series", type=int, default=CorpusSpec.images_per_series)
    parser.add_argument(
        "--modalities",
        default=",".join(CorpusSpec.modalities),
        help=f"comma-separated, e.g. MR,CT (any of {', '.join(_MODALITIES)})",
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="square image size (default MR/CR/DX 256, CT 512)"
    )
    parser.add_argument("--seed", type=int, default=CorpusSpec.seed)
    parser.add_argument("--nuisances", action="store_true", help="also write non-image and broken files")
    args = parser.parse_args(argv)
    try:
        spec = CorpusSpec(
            patients=args.patients,
            studies_per_patient=args.studies_per_patient,
            series_per_study=args.series_per_study,
            images_per_series=args.images_per_series,
            modalities=tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip()),
            rows=args.rows,
            seed=args.seed,
            nuisances=args.nuisances,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        files = build_corpus(args.root, spec)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(len(files))
    print(f"{len(files)} files, {corpus_bytes(files)} bytes under {args.root}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
