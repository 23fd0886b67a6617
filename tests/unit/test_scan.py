"""The header scan: globs, every reject reason, truncation without reading pixels, cache, duplicates."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import random
import socket
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from xnatmigrate.errors import PlanError
from xnatmigrate.model import BASE_KEYWORDS, Manifest, SourceSpec, XnatTarget
from xnatmigrate.scan import (
    dedupe,
    glob_to_regex,
    header,
    parse,
    read_header,
    scan_sources,
    sources,
    walk_source,
)
from xnatmigrate.state import CachedHeader

KW = frozenset(BASE_KEYWORDS)
STUDY = "1.2.826.0.1.3680043.10.999.1"
SERIES = "1.2.826.0.1.3680043.10.999.1.1"
PIXELS = bytes(range(64))  # 8 rows x 4 columns x 16 bits


def sop(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.999.1.1.{n}"


def image(n: int = 1, **overrides: Any) -> Dataset:
    """A small CT image; ``overrides`` set (value) or delete (None) attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop(n)
    ds.StudyDate = "20200102"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.StudyDescription = "CT HEAD "
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "P1"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.SeriesNumber = 5
    ds.InstanceNumber = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 4
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = PIXELS
    ds["PixelData"].VR = "OW"
    for key, value in overrides.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    return ds


def part10(path: Path, ds: Dataset, ts: str = ExplicitVRLittleEndian) -> bytes:
    """Write ``ds`` as a Part 10 file in ``ts``; returns the bytes written."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", sop(0))
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def raw_stream(path: Path, ds: Dataset, implicit: bool = True) -> bytes:
    """Write ``ds`` without preamble or file meta, as some old tools do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return path.read_bytes()


def encapsulated(n: int = 1) -> Dataset:
    ds = image(n)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(40) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def reason(path: Path, keywords: frozenset[str] = KW) -> str | None:
    return read_header(str(path), keywords).reject


def manifest(*folders: Path, include: tuple[str, ...] = ("**/*",), exclude: tuple[str, ...] = ()) -> Manifest:
    sources = tuple(
        SourceSpec(i, None, str(f), "P", None, "S", include=include, exclude=exclude)
        for i, f in enumerate(folders)
    )
    return Manifest("manifest.yaml", "0" * 64, 1, XnatTarget(), sources)


# --------------------------------------------------------------------------------------------
# Globs and walking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("**/*", "a.dcm", True),
        ("**/*", "x/y/a.dcm", True),
        ("**", "x/y/a.dcm", True),
        ("**/*.dcm", "a.dcm", True),
        ("**/*.dcm", "x/y/a.dcm", True),
        ("**/*.dcm", "x/y/a.DCM", False),
        ("*.dcm", "a.dcm", True),
        ("*.dcm", "x/a.dcm", False),
        ("*", "x/a", False),
        ("a/**/b.dcm", "a/b.dcm", True),
        ("a/**/b.dcm", "a/x/y/b.dcm", True),
        ("a/**/b.dcm", "ab.dcm", False),
        ("a/**", "a/x/y", True),
        ("a/**", "b/a/x", False),
        ("**/SCOUT/**", "p/SCOUT/1.dcm", True),
        ("**/SCOUT/**", "SCOUT/1.dcm", True),
        ("**/SCOUT/**", "p/SCOUTS/1.dcm", False),
        ("?.dcm", "a.dcm", True),
        ("?.dcm", "ab.dcm", False),
        ("a?b", "a/b", False),
        ("x*y", "x/y", False),
        ("IMG[0-9]*", "IMG1.dcm", True),
        ("IMG[!0-9]*", "IMG1.dcm", False),
        ("IMG[!0-9]*", "IMGa.dcm", True),
        ("a.b", "aXb", False),
        ("(x)+.dcm", "(x)+.dcm", True),
        ("**/.*", ".hidden", True),
        ("./sub/*", "sub/a", True),
        ("sub//*", "sub/a", True),
        ("a**b", "aXYb", True),
        ("a**b", "a/b", False),
    ],
)
def test_glob_semantics(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_to_regex(pattern).match(path)) is matches
    assert bool(glob_to_regex(pattern).fullmatch(path)) is matches


def test_walk_applies_globs_to_relative_paths_and_skips_what_is_not_a_file(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for rel in (
        "a.dcm",
        "b.txt",
        "sub/c.dcm",
        "sub/deep/d.dcm",
        "skip/e.dcm",
        "skip/more/f.dcm",
        ".hid/g.dcm",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.dcm").write_bytes(b"x")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)  # not followed
    (root / "loop").symlink_to(root, target_is_directory=True)  # would loop if followed
    (root / "linkfile.dcm").symlink_to(outside / "o.dcm")  # outside the source: not followed
    (root / "inlink.dcm").symlink_to(root / "a.dcm")  # a file inside the source: kept
    (root / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")  # kept: reported as unreadable
    os.mkfifo(root / "pipe.dcm")  # skipped: reading it would block

    spec = SourceSpec(0, None, str(root), "P", None, "S", include=("**/*.dcm",), exclude=("skip/**",))
    got = walk_source(spec)
    rel = [os.path.relpath(p, root) for p in got]
    assert rel == sorted(rel)
    assert all(os.path.isabs(p) and p.startswith(str(root) + os.sep) for p in got)
    assert set(rel) == {"a.dcm", "sub/c.dcm", "sub/deep/d.dcm", ".hid/g.dcm", "inlink.dcm", "dangling.dcm"}
    assert read_header(str(root / "dangling.dcm"), KW).reject == "unreadable: No such file or directory"

    default = SourceSpec(0, None, str(root), "P", None, "S")
    assert len(walk_source(default)) == 9  # 7 regular files + 2 links inside; no fifo, dir or outside link


def _odd_entries(tmp_path: Path) -> tuple[Path, Path]:
    """A source with every kind of entry the walk does not read, and a folder outside it."""
    root, outside = tmp_path / "src", tmp_path / "outside"
    part10(root / "a" / "1.dcm", image(1))
    part10(outside / "o.dcm", image(2))
    (outside / "back").symlink_to(outside, target_is_directory=True)  # a loop once followed
    os.mkfifo(root / "pipe.dcm")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "linkin").symlink_to(root / "a", target_is_directory=True)
    (root / "linkfile.dcm").symlink_to(outside / "o.dcm")
    (root / "null.dcm").symlink_to("/dev/null")  # a character device, outside the source
    (root / "pipe.txt").symlink_to(root / "pipe.dcm")  # excluded by the globs: not reported
    return root, outside


def test_entries_skipped_by_the_walk_are_rejects_with_a_reason(tmp_path: Path) -> None:
    root, outside = _odd_entries(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "s.dcm"))
    try:
        result = scan_sources(manifest(root, include=("**/*.dcm", "linkdir", "linkin")), KW, jobs=1)
    finally:
        sock.close()
    assert [h.path for _, h in result.headers] == [str(root / "a" / "1.dcm")]
    outside_link = "skipped: symbolic link leading outside the source, to {}; set follow_links: true on this source to follow it"
    not_read = "not a regular file: it is not read (reading could block or never end)"
    assert [(os.path.relpath(r.path, root), r.reason) for r in result.rejects] == [
        ("linkdir", outside_link.format(outside)),
        ("linkfile.dcm", outside_link.format(outside / "o.dcm")),
        (
            "linkin",
            f"skipped: symbolic link to the folder {root / 'a'}, inside the source: walked there, not twice",
        ),
        ("null.dcm", outside_link.format("/dev/null")),
        ("pipe.dcm", f"skipped: a FIFO (named pipe), {not_read}"),
        ("s.dcm", f"skipped: a socket, {not_read}"),
    ]
    assert len(result.headers) + len(result.rejects) == 7  # every entry the globs take, once


def test_follow_links_walks_outside_the_source_and_stops_at_loops(tmp_path: Path) -> None:
    root, outside = _odd_entries(tmp_path)
    spec = SourceSpec(0, None, str(root), "P", None, "S", include=("**/*.dcm", "**/back"), follow_links=True)
    result = scan_sources(Manifest("m.yaml", "0" * 64, 1, XnatTarget(), (spec,)), KW, jobs=1)
    # Paths keep the link (never resolved); the same image through two links is one duplicate.
    assert sorted(os.path.relpath(h.path, root) for _, h in result.headers) == ["a/1.dcm", "linkdir/o.dcm"]
    reasons = {os.path.relpath(r.path, root): r.reason for r in result.rejects}
    assert (
        reasons["linkdir/back"]
        == f"skipped: symbolic link to the folder {outside}, already walked (a loop, or a second way in)"
    )
    assert reasons["null.dcm"].startswith(
        "skipped: symbolic link to /dev/null, a character device, not a regular file"
    )
    assert reasons["linkfile.dcm"].startswith("duplicate: same SOPInstanceUID as")
    assert reasons["linkin"].endswith("inside the source: walked there, not twice")


def test_walk_of_a_missing_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"sources\[0\]: cannot list"):
        walk_source(SourceSpec(0, None, str(tmp_path / "nope"), "P", None, "S"))


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    part10(root / "ok" / "1.dcm", image(1))
    (root / "locked").mkdir()
    real = os.scandir

    def scandir(path: Any) -> Any:
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan_sources(manifest(root), KW, jobs=1)
    assert [h.path for _, h in result.headers] == [str(root / "ok" / "1.dcm")]
    assert [(r.path, r.reason) for r in result.rejects] == [
        (str(root / "locked"), "unreadable: Permission denied (folder not listed)")
    ]


# --------------------------------------------------------------------------------------------
# One file: values
# --------------------------------------------------------------------------------------------


def test_values_are_dicom_strings(tmp_path: Path) -> None:
    ds = image(3, PatientName="DOE^JOHN^^DR", SOPInstanceUID=sop(3))
    ds.OtherPatientNames = ["ROE^JANE", "ROE^J"]
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.AccessionNumber = ""
    part10(tmp_path / "a.dcm", ds)
    extra = frozenset({"ImageType", "OtherPatientNames", "Rows", "ReferencedImageSequence", "NotAKeyword"})
    entry = read_header(str(tmp_path / "a.dcm"), KW | extra)
    assert entry.reject is None and entry.header is not None
    h = entry.header
    assert h["PatientName"] == "DOE^JOHN^^DR"
    assert h["OtherPatientNames"] == "ROE^JANE\\ROE^J"
    assert h["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert h["InstanceNumber"] == "3" and h["SeriesNumber"] == "5"
    assert h["StudyDescription"] == "CT HEAD"  # padding stripped
    assert h["SOPInstanceUID"] == sop(3)  # the UID's NUL padding stripped
    assert "Rows" not in h  # binary VR
    assert "ReferencedImageSequence" not in h  # sequence
    assert "AccessionNumber" not in h  # empty
    assert entry.transfer_syntax == ExplicitVRLittleEndian
    assert entry.keywords >= KW | extra
    st = os.stat(tmp_path / "a.dcm")
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_values_follow_the_character_set(tmp_path: Path) -> None:
    ds = image(1, SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen", StudyDescription="Ünïcödé")
    part10(tmp_path / "u.dcm", ds)
    h = read_header(str(tmp_path / "u.dcm"), KW).header
    assert h is not None
    assert h["PatientName"] == "Müller^Jürgen"
    assert h["StudyDescription"] == "Ünïcödé"


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_values_in_every_uncompressed_transfer_syntax(tmp_path: Path, ts: str) -> None:
    part10(tmp_path / "a.dcm", image(1), ts)
    entry = read_header(str(tmp_path / "a.dcm"), KW)
    assert entry.reject is None and entry.header is not None
    assert entry.transfer_syntax == ts
    assert entry.header["PatientName"] == "DOE^JOHN"
    assert entry.header["StudyInstanceUID"] == STUDY


# --------------------------------------------------------------------------------------------
# One file: every reject reason
# --------------------------------------------------------------------------------------------


def test_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "tiny.dcm").write_bytes(b"\x08\x00")
    (tmp_path / "png.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    for name in ("notes.txt", "empty.dcm", "tiny.dcm", "png.dcm"):
        assert (reason(tmp_path / name) or "").startswith("not DICOM: "), name


def test_garbage_that_parses_as_a_data_set_is_not_dicom(tmp_path: Path) -> None:
    # Starts like a real data set (0008,0005) CS, so the reader is tried, but carries no UIDs.
    rng = random.Random(5)
    data = b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + rng.randbytes(3000)
    (tmp_path / "g.dcm").write_bytes(data)
    assert (reason(tmp_path / "g.dcm") or "").startswith("not DICOM: ")
    # Implicit VR: (0008,0016) with a 26-byte value, then garbage.
    data = struct.pack("<HHI", 8, 0x16, 26) + CTImageStorage.encode().ljust(26, b"\0") + rng.randbytes(500)
    (tmp_path / "h.dcm").write_bytes(data)
    assert (reason(tmp_path / "h.dcm") or "").startswith("not DICOM: ")


def test_dicomdir(tmp_path: Path) -> None:
    part10(tmp_path / "img" / "1.dcm", image(1, StudyID="1"))  # FileSet needs a Study ID
    fs = FileSet()
    fs.add(tmp_path / "img" / "1.dcm")
    fs.write(tmp_path / "media")
    (tmp_path / "media" / "DICOMDIR").rename(tmp_path / "media" / "index.bin")  # found by content too
    (tmp_path / "DICOMDIR").write_bytes(b"whatever")  # found by name
    assert reason(tmp_path / "media" / "index.bin") == "DICOMDIR: media directory, not an image"
    assert reason(tmp_path / "DICOMDIR") == "DICOMDIR: media directory, not an image"


@pytest.mark.parametrize("missing", ["SOPInstanceUID", "StudyInstanceUID", "SOPClassUID"])
def test_missing_uid(tmp_path: Path, missing: str) -> None:
    part10(tmp_path / "a.dcm", image(1, **{missing: None}))
    assert reason(tmp_path / "a.dcm") == f"no {missing}"


def test_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert reason(tmp_path / "gone.dcm") == "unreadable: No such file or directory"
    assert reason(tmp_path) == "unreadable: not a regular file"
    os.mkfifo(tmp_path / "fifo")
    assert reason(tmp_path / "fifo") == "unreadable: not a regular file"  # and it did not block
    part10(tmp_path / "a.dcm", image(1))
    real = os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("a.dcm"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # tests may run as root, where chmod 000 denies nothing
    assert reason(tmp_path / "a.dcm") == "unreadable: Permission denied"


def test_read_error_inside_the_parse_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = image(1)
    ds.TextValue = "x" * 40_000  # UT: a header larger than the first read, so the windowed reader runs
    part10(tmp_path / "a.dcm", ds)
    real = os.pread

    def flaky(fd: int, n: int, offset: int) -> bytes:
        if offset > 0:
            raise OSError(5, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", flaky)
    monkeypatch.setattr(header, "_head_size", [header._HEAD_MIN])
    assert reason(tmp_path / "a.dcm") == "unreadable: Input/output error"


# --------------------------------------------------------------------------------------------
# Truncation, found without reading pixels
# --------------------------------------------------------------------------------------------


PIXEL_TAG = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_pydicom_leaves_the_stream_at_the_pixel_data_tag(tmp_path: Path, ts: str) -> None:
    data = part10(tmp_path / "a.dcm", image(1), ts)
    offset = data.rindex(PIXEL_TAG[ts != ExplicitVRBigEndian])
    with open(tmp_path / "a.dcm", "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        assert fp.tell() == offset
    parsed = parse.run_pydicom(io.BytesIO(data), True, parse.want_for(KW))
    assert parsed.tracker.pixel
    assert parsed.stop == offset


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_cut_inside_pixel_data(tmp_path: Path, ts: str) -> None:
    data = part10(tmp_path / "full.dcm", image(1), ts)
    assert reason(tmp_path / "full.dcm") is None
    header = 8 if ts == ImplicitVRLittleEndian else 12
    assert len(data) == data.rindex(PIXEL_TAG[ts != ExplicitVRBigEndian]) + header + len(PIXELS)
    (tmp_path / "cut.dcm").write_bytes(data[:-24])
    assert reason(tmp_path / "cut.dcm") == "truncated: Pixel Data declares 64 bytes, file has 40 after it"
    (tmp_path / "nopixels.dcm").write_bytes(data[: -len(PIXELS)])
    assert reason(tmp_path / "nopixels.dcm") == "truncated: Pixel Data declares 64 bytes, file has 0 after it"


def test_cut_inside_float_pixel_data(tmp_path: Path) -> None:
    ds = image(1, PixelData=None)
    ds.FloatPixelData = bytes(64)
    data = part10(tmp_path / "f.dcm", ds)
    assert reason(tmp_path / "f.dcm") is None
    (tmp_path / "cut.dcm").write_bytes(data[:-1])
    assert reason(tmp_path / "cut.dcm") == "truncated: Pixel Data declares 64 bytes, file has 63 after it"


def test_cut_inside_the_header(tmp_path: Path) -> None:
    data = part10(tmp_path / "a.dcm", image(1))
    name = data.index(b"DOE^JOHN")  # a value pydicom reads
    image_type = data.index(b"ORIGINAL")  # a value pydicom skips (not a wanted keyword)
    patient_id_tag = data.index(b"\x10\x00\x20\x00LO")
    for cut in (name + 3, image_type + 2, patient_id_tag + 3, patient_id_tag + 7, 150, 200):
        (tmp_path / "cut.dcm").write_bytes(data[:cut])
        assert reason(tmp_path / "cut.dcm") == "truncated: header ends early", cut


def test_cut_inside_the_header_of_a_stream_without_meta(tmp_path: Path) -> None:
    data = raw_stream(tmp_path / "a.dcm", image(1))
    cut = data.index(PIXEL_TAG[True]) - 3  # inside the last element before Pixel Data
    (tmp_path / "cut.dcm").write_bytes(data[:cut])
    assert reason(tmp_path / "cut.dcm") == "truncated: header ends early"


def test_encapsulated_pixel_data(tmp_path: Path) -> None:
    data = part10(tmp_path / "ok.dcm", encapsulated(1), JPEGBaseline8Bit)
    assert data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    assert reason(tmp_path / "ok.dcm") is None

    (tmp_path / "nodelim.dcm").write_bytes(data[:-8])
    assert (reason(tmp_path / "nodelim.dcm") or "").startswith(
        "truncated: encapsulated Pixel Data has no Sequence Delimitation Item"
    )
    (tmp_path / "cutitem.dcm").write_bytes(data[:-20])
    assert (reason(tmp_path / "cutitem.dcm") or "").startswith(
        "truncated: encapsulated Pixel Data item declares"
    )

    # Elements after the delimiter (trailing padding) are legal: the items are walked instead.
    trailing = data + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 4) + bytes(4)
    (tmp_path / "trailing.dcm").write_bytes(trailing)
    assert reason(tmp_path / "trailing.dcm") is None

    end = data.rindex(b"\xfe\xff\xdd\xe0")
    corrupt = data[:end] + b"\x08\x00\x10\x00" + data[end + 4 :]
    (tmp_path / "corrupt.dcm").write_bytes(corrupt)
    assert (reason(tmp_path / "corrupt.dcm") or "").startswith(
        "corrupt: encapsulated Pixel Data holds (0008,0010)"
    )


def test_a_header_larger_than_the_first_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(header, "_head_size", [header._HEAD_MIN])
    ds = image(1)
    ds.TextValue = "c" * 100_000  # UT (0040,A160): 100 kB before Pixel Data
    data = part10(tmp_path / "big.dcm", ds)
    entry = read_header(str(tmp_path / "big.dcm"), KW | {"TextValue"})
    assert entry.header is not None and entry.header["TextValue"] == "c" * 100_000
    assert header._head_size[0] > 100_000  # the next file is read in one go
    (tmp_path / "cut.dcm").write_bytes(data[:-10])
    assert reason(tmp_path / "cut.dcm") == "truncated: Pixel Data declares 64 bytes, file has 54 after it"
    monkeypatch.setattr(header, "_head_size", [header._HEAD_MIN])
    (tmp_path / "cuthead.dcm").write_bytes(data[:50_000])
    assert reason(tmp_path / "cuthead.dcm") == "truncated: header ends early"


def test_the_entry_does_not_depend_on_how_much_the_first_read_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_head_size`` is a hint grown by earlier files: the same file gives the same entry, its head
    digest included (the bytes before Pixel Data, re-read when the first read held fewer), whether it
    is read first or after a larger header."""
    ds = image(1)
    ds.TextValue = "c" * 40_000  # more than the smallest first read
    part10(tmp_path / "a.dcm", ds)
    monkeypatch.setattr(header, "_head_size", [header._HEAD_MIN])
    first = read_header(str(tmp_path / "a.dcm"), KW)
    monkeypatch.setattr(header, "_head_size", [header._HEAD_MAX])
    after = read_header(str(tmp_path / "a.dcm"), KW)
    assert first == after and first.head_digest
    stop = int(first.head_digest.split(":")[0])
    assert 40_000 < stop < (tmp_path / "a.dcm").stat().st_size


def test_deflated_transfer_syntax(tmp_path: Path) -> None:
    part10(tmp_path / "d.dcm", image(1), "1.2.840.10008.1.2.1.99")
    entry = read_header(str(tmp_path / "d.dcm"), KW)
    assert entry.reject is None and entry.header is not None
    assert entry.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert entry.header["PatientName"] == "DOE^JOHN"


# --------------------------------------------------------------------------------------------
# Streams without preamble / file meta
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("implicit", "ts"), [(True, ImplicitVRLittleEndian), (False, ExplicitVRLittleEndian)]
)
def test_stream_without_file_meta_is_accepted(tmp_path: Path, implicit: bool, ts: str) -> None:
    data = raw_stream(tmp_path / "raw.dcm", image(1), implicit)
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    entry = read_header(str(tmp_path / "raw.dcm"), KW)
    assert entry.reject is None and entry.header is not None
    assert entry.transfer_syntax == ts
    assert entry.header["SOPInstanceUID"] == sop(1)
    (tmp_path / "cut.dcm").write_bytes(data[:-1])
    assert reason(tmp_path / "cut.dcm") == "truncated: Pixel Data declares 64 bytes, file has 63 after it"


def test_stream_without_file_meta_needs_the_uids(tmp_path: Path) -> None:
    raw_stream(tmp_path / "raw.dcm", image(1, StudyInstanceUID=None))
    assert (
        reason(tmp_path / "raw.dcm")
        == "not DICOM: no file meta, and no valid StudyInstanceUID in what parses"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID we set on purpose
        bad = image(1, SOPInstanceUID="not a uid")
    raw_stream(tmp_path / "bad.dcm", bad)
    assert (reason(tmp_path / "bad.dcm") or "").startswith("not DICOM: ")


def test_file_meta_without_preamble_is_read(tmp_path: Path) -> None:
    data = part10(tmp_path / "a.dcm", image(1))
    (tmp_path / "nopre.dcm").write_bytes(data[132:])
    entry = read_header(str(tmp_path / "nopre.dcm"), KW)
    assert entry.reject is None and entry.transfer_syntax == ExplicitVRLittleEndian


# --------------------------------------------------------------------------------------------
# No input bytes make it raise
# --------------------------------------------------------------------------------------------


def test_fuzz_never_raises(tmp_path: Path) -> None:
    rng = random.Random(20240601)
    good = part10(tmp_path / "good.dcm", image(1))
    raw = raw_stream(tmp_path / "raw.dcm", image(2))
    enc = part10(tmp_path / "enc.dcm", encapsulated(3), JPEGBaseline8Bit)
    samples: list[bytes] = []
    samples += [rng.randbytes(rng.randrange(0, 3000)) for _ in range(150)]
    samples += [bytes(128) + b"DICM" + rng.randbytes(rng.randrange(0, 2000)) for _ in range(100)]
    samples += [
        bytes(128) + b"DICM" + good[132:200] + rng.randbytes(rng.randrange(0, 800)) for _ in range(50)
    ]
    for data in (good, raw, enc):
        samples += [data[:n] for n in range(0, len(data), 3)]
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            samples.append(bytes(mutated))
    path = tmp_path / "fuzz.dcm"
    outcomes = set()
    for data in samples:
        path.write_bytes(data)
        entry = read_header(str(path), KW)
        assert (entry.header is None) != (entry.reject is None)
        outcomes.add((entry.reject or "accepted").split(":")[0])
    assert {"not DICOM", "truncated", "accepted"} <= outcomes


# --------------------------------------------------------------------------------------------
# The scan: cache, duplicates, determinism
# --------------------------------------------------------------------------------------------


def corpus(root: Path, n: int = 6) -> list[Path]:
    paths = [root / f"s{i % 2}" / f"IMG{i:04d}.dcm" for i in range(n)]
    for i, p in enumerate(paths):
        part10(p, image(i + 1))
    (root / "notes.txt").write_text("hello\n")
    return paths


def test_scan_result_shape(tmp_path: Path) -> None:
    paths = corpus(tmp_path / "src")
    calls: list[tuple[int, int]] = []
    result = scan_sources(manifest(tmp_path / "src"), KW, jobs=1, progress=lambda d, t: calls.append((d, t)))
    assert result.files_seen == 7 and result.cache_hits == 0
    assert [h.path for _, h in result.headers] == sorted(str(p) for p in paths)
    assert [r.path for r in result.rejects] == [str(tmp_path / "src" / "notes.txt")]
    assert len(result.cache_updates) == 7  # rejects are cached too
    assert calls[-1] == (7, 7) and calls == sorted(calls)
    h = result.headers[0][1]
    assert h.transfer_syntax == ExplicitVRLittleEndian and h.values["PatientName"] == "DOE^JOHN"


def test_cache_hit_reads_no_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus(tmp_path / "src")
    m = manifest(tmp_path / "src")
    first = scan_sources(m, KW, jobs=1)
    cache = {e.path: e for e in first.cache_updates}

    real_os_open, real_open = os.open, builtins.open

    def guard(real: Any) -> Any:
        # Only the source's files: the scan's working set is a temporary file of its own.
        def boom(path: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(path).startswith(str(tmp_path / "src")):
                raise AssertionError("a cached file was opened")
            return real(path, *args, **kwargs)

        return boom

    monkeypatch.setattr(os, "open", guard(real_os_open))
    monkeypatch.setattr(builtins, "open", guard(real_open))
    again = scan_sources(m, KW, cache=cache, jobs=1)
    monkeypatch.undo()
    assert again.cache_hits == 7 and again.cache_updates == ()
    assert again.headers == first.headers and again.rejects == first.rejects


def test_changed_file_invalidates_its_cache_entry(tmp_path: Path) -> None:
    paths = corpus(tmp_path / "src")
    m = manifest(tmp_path / "src")
    cache = {e.path: e for e in scan_sources(m, KW, jobs=1).cache_updates}
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    part10(paths[1], image(2, PatientName="CHANGED^NAME", PatientID="LONGER-ID-THAN-BEFORE"))
    again = scan_sources(m, KW, cache=cache, jobs=1)
    assert again.cache_hits == 5
    assert sorted(e.path for e in again.cache_updates) == [str(paths[0]), str(paths[1])]
    names = {h.path: h.values["PatientName"] for _, h in again.headers}
    assert names[str(paths[1])] == "CHANGED^NAME"


def test_cache_keyword_superset_rule(tmp_path: Path) -> None:
    corpus(tmp_path / "src", n=2)
    m = manifest(tmp_path / "src")
    wide = KW | {"ImageType"}
    cache = {e.path: e for e in scan_sources(m, wide, jobs=1).cache_updates}
    narrow = scan_sources(m, KW, cache=cache, jobs=1)
    assert narrow.cache_hits == 3
    assert all("ImageType" not in h.values for _, h in narrow.headers)  # only what was asked for
    wider = scan_sources(m, wide | {"BodyPartExamined"}, cache=cache, jobs=1)
    assert wider.cache_hits == 0 and len(wider.cache_updates) == 3


def test_unreadable_is_not_cached(tmp_path: Path) -> None:
    root = tmp_path / "src"
    corpus(root, n=1)
    (root / "dangling.dcm").symlink_to(tmp_path / "gone")
    result = scan_sources(manifest(root), KW, jobs=1)
    assert [r.reason for r in result.rejects if r.path.endswith("dangling.dcm")] == [
        "unreadable: No such file or directory"
    ]
    assert not any(e.path.endswith("dangling.dcm") for e in result.cache_updates)


def test_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "src"
    a = part10(root / "a" / "1.dcm", image(1))
    (root / "b").mkdir()
    (root / "b" / "1.dcm").write_bytes(a)  # identical copy
    part10(root / "c" / "1.dcm", image(1, PatientName="OTHER^NAME"))  # same UID, other content
    part10(root / "d" / "1.dcm", image(1, PatientName="DOE^JOHX"))  # same size, other content
    result = scan_sources(manifest(root), KW, jobs=1)
    kept = str(root / "a" / "1.dcm")
    assert [h.path for _, h in result.headers] == [kept]
    assert {r.path: r.reason for r in result.rejects} == {
        str(root / "b" / "1.dcm"): f"duplicate: same SOPInstanceUID as {kept}, identical content",
        str(root / "c" / "1.dcm"): f"duplicate: same SOPInstanceUID as {kept}, different content",
        str(root / "d" / "1.dcm"): f"duplicate: same SOPInstanceUID as {kept}, different content",
    }


def test_duplicates_across_sources_keep_the_smallest_path(tmp_path: Path) -> None:
    data = part10(tmp_path / "z" / "1.dcm", image(1))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.dcm").write_bytes(data)
    result = scan_sources(manifest(tmp_path / "z", tmp_path / "a"), KW, jobs=1)
    assert [(i, h.path) for i, h in result.headers] == [(1, str(tmp_path / "a" / "1.dcm"))]
    assert [r.reason.split(",")[-1].strip() for r in result.rejects] == ["identical content"]


def test_dedupe_directly(tmp_path: Path) -> None:
    part10(tmp_path / "x.dcm", image(1))
    h = scan_sources(manifest(tmp_path), KW, jobs=1).headers[0]
    kept, rejects = dedupe([h])
    assert kept == [h] and rejects == []


def test_a_file_under_two_sources_belongs_to_the_first(tmp_path: Path) -> None:
    corpus(tmp_path / "src", n=2)
    result = scan_sources(manifest(tmp_path / "src", tmp_path / "src" / "s0"), KW, jobs=1)
    assert result.files_seen == 3
    assert {i for i, _ in result.headers} == {0}


def test_deterministic_whatever_the_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    paths = corpus(root, n=40)
    (root / "dup.dcm").write_bytes(paths[3].read_bytes())
    (root / "cut.dcm").write_bytes(paths[4].read_bytes()[:-9])
    m = manifest(root)
    monkeypatch.setattr(sources, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(sources, "_CHUNK_MIN", 3)  # several chunks over two worker processes
    calls: list[tuple[int, int]] = []
    one = scan_sources(m, KW, jobs=1)
    two = scan_sources(m, KW, jobs=2, progress=lambda d, t: calls.append((d, t)))
    assert one == two
    assert len(one.headers) == 40 and len(one.rejects) == 3
    assert calls[0] == (0, 43) and calls[-1] == (43, 43) and len(calls) > 3
    assert calls == sorted(calls)


def test_cached_header_round_trips_through_the_state(tmp_path: Path) -> None:
    from xnatmigrate.state import StateStore

    corpus(tmp_path / "src", n=2)
    m = manifest(tmp_path / "src")
    first = scan_sources(m, KW, jobs=1)
    with StateStore(tmp_path / "state") as store:
        store.cache_put(first.cache_updates)
        cache: dict[str, CachedHeader] = store.cache_all()
    again = scan_sources(m, KW, cache=cache, jobs=1)
    assert again.cache_hits == 3 and again.headers == first.headers and again.rejects == first.rejects


def test_every_header_comes_with_its_digest_cold_and_warm(tmp_path: Path) -> None:
    """The planner takes ``FileHeader.digest`` instead of computing ``header_digest`` per file."""
    from xnatmigrate.model import header_digest
    from xnatmigrate.state import StateStore

    corpus(tmp_path / "src", n=4)
    m = manifest(tmp_path / "src")
    first = scan_sources(m, KW, jobs=1)
    assert all(h.digest == header_digest(h.values) for _, h in first.headers)
    with StateStore(tmp_path / "state") as store:
        store.cache_put(first.cache_updates)
        cache = store.cache_all()
    again = scan_sources(m, KW, cache=cache, jobs=1)
    assert again.cache_hits == 5 and again.cache_updates == ()
    assert [h.digest for _, h in again.headers] == [h.digest for _, h in first.headers]
    # A scan that reads fewer keywords than cached filters the values: the cached digest is not
    # theirs, so none is given (the planner computes it).
    wide = {e.path: e for e in scan_sources(m, KW | {"ImageType"}, jobs=1).cache_updates}
    narrow = scan_sources(m, KW, cache=wide, jobs=1)
    assert narrow.cache_hits == 5 and all(h.digest == "" for _, h in narrow.headers)


def test_a_cache_without_digests_learns_them_once(tmp_path: Path) -> None:
    """Entries an older xnatmigrate cached have no digest: the next scan computes and returns them."""
    from dataclasses import replace

    from xnatmigrate.model import header_digest

    corpus(tmp_path / "src", n=2)
    m = manifest(tmp_path / "src")
    old = {e.path: replace(e, digest="") for e in scan_sources(m, KW, jobs=1).cache_updates}
    again = scan_sources(m, KW, cache=old, jobs=1)
    assert again.cache_hits == 3
    assert all(h.digest == header_digest(h.values) for _, h in again.headers)
    learnt = {e.path: e for e in again.cache_updates}
    assert sorted(learnt) == sorted(h.path for _, h in again.headers)  # the reject has no digest
    assert all(e.digest == header_digest(e.header or {}) for e in learnt.values())
    assert scan_sources(m, KW, cache={**old, **learnt}, jobs=1).cache_updates == ()


def test_dedupe_keeps_the_order_of_first_appearance() -> None:
    from xnatmigrate.model import FileHeader

    def h(path: str, uid: str, size: int) -> tuple[int, FileHeader]:  # sizes differ: nothing is read
        return (0, FileHeader(path, size, 1, "", {"SOPInstanceUID": uid}))

    items = [
        h("/b/1", "u1", 1),
        h("/a/2", "u2", 2),
        h("/x/3", "u3", 3),
        h("/c/1", "u1", 4),
        h("/a/1", "u2", 5),
    ]
    kept, rejects = dedupe(items)
    assert [f.path for _, f in kept] == ["/b/1", "/x/3", "/a/1"]
    assert [(r.path, r.reason.split(" as ")[1]) for r in rejects] == [
        ("/c/1", "/b/1, different content"),
        ("/a/2", "/a/1, different content"),
    ]


def test_head_digest_covers_exactly_the_bytes_before_pixel_data(tmp_path: Path) -> None:
    data = part10(tmp_path / "a.dcm", image())
    pixel_tag = data.index(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) explicit VR little endian
    e = read_header(str(tmp_path / "a.dcm"), KW)
    assert e.head_digest == f"{pixel_tag}:{hashlib.sha256(data[:pixel_tag]).hexdigest()[:32]}"
    # An image without Pixel Data (an SR, say): every byte is header.
    data = part10(tmp_path / "b.dcm", image(PixelData=None))
    assert read_header(str(tmp_path / "b.dcm"), KW).head_digest == (
        f"{len(data)}:{hashlib.sha256(data).hexdigest()[:32]}"
    )


def test_head_digest_is_not_claimed_for_a_deflated_data_set(tmp_path: Path) -> None:
    part10(tmp_path / "d.dcm", image(), DeflatedExplicitVRLittleEndian)
    e = read_header(str(tmp_path / "d.dcm"), KW)
    assert e.header is not None and e.head_digest == ""


def test_head_digest_survives_the_scan_cache(tmp_path: Path) -> None:
    from xnatmigrate.state import StateStore

    part10(tmp_path / "src" / "a.dcm", image())
    m = manifest(tmp_path / "src")
    with StateStore(tmp_path / "state") as store:
        cold = scan_sources(m, KW, cache=store.cache_all(), jobs=1)
        store.cache_put(cold.cache_updates)
        warm = scan_sources(m, KW, cache=store.cache_all(), jobs=1)
    assert warm.cache_hits == 1
    [(_, h)] = warm.headers
    assert h.head_digest and h.head_digest == cold.headers[0][1].head_digest


# --------------------------------------------------------------------------------------------
# The working set: studies one at a time, batches, the StateStore as the cache
# --------------------------------------------------------------------------------------------


def _two_sources(root: Path) -> Manifest:
    """Two corpora (one with nuisances: copies of a SOPInstanceUID), a copy of a file of the first in
    the second, and a third source inside the first (its files belong to the first)."""
    from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

    a = build_corpus(root / "a", CorpusSpec(patients=2, images_per_series=3, rows=8, seed=3, nuisances=True))
    build_corpus(root / "b", CorpusSpec(patients=2, images_per_series=3, rows=8, seed=4))
    first = next(f for f in a if f.kind == "image")
    (root / "b" / "copy.dcm").write_bytes(first.path.read_bytes())
    inner = first.path.parent
    return manifest(root / "a", root / "b", inner)


def _by_study(result: sources.ScanResult) -> tuple[tuple[int, Any], ...]:
    return tuple((i, h) for i, uid in result.studies() for h in result.files_of(i, uid))


def test_studies_and_files_of_agree_with_headers(tmp_path: Path) -> None:
    with scan_sources(_two_sources(tmp_path), KW, jobs=1) as result:
        headers = result.headers
        assert len(headers) == result.kept_count > 12
        assert tuple(sorted(_by_study(result), key=lambda ih: (ih[0], ih[1].path))) == headers
        studies = list(result.studies())
        assert studies == sorted({(i, h.study_uid) for i, h in headers}) and len(studies) >= 4
        assert result.study_uids() == sorted({h.study_uid for _, h in headers})
        for i, uid in studies:
            files = result.files_of(i, uid)
            assert [h.path for h in files] == sorted(h.path for h in files)
            assert all(h.study_uid == uid for h in files)
        assert {i for i, _ in headers} == {0, 1}  # the third source's files belong to the first
        assert len(result.warnings) == 1 and "sources[0] and sources[2]" in result.warnings[0]
        dups = [r for r in result.rejects if r.reason.startswith("duplicate:")]
        assert any(r.path.endswith("copy.dcm") and "identical content" in r.reason for r in dups)
        assert len(dups) == 3
        kept, rejected = [h.path for _, h in headers], [r.path for r in result.rejects]
        assert len(set(kept + rejected)) == len(kept) + len(rejected) == result.files_seen


def test_the_result_does_not_depend_on_jobs_or_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _two_sources(tmp_path)
    big = scan_sources(m, KW, jobs=1)
    monkeypatch.setattr(sources, "BATCH", 5)
    monkeypatch.setattr(sources, "_WALK_CHUNK", 3)
    monkeypatch.setattr(sources, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(sources, "_CHUNK_MIN", 2)
    calls: list[tuple[int, int]] = []
    small = scan_sources(m, KW, jobs=1)
    parallel = scan_sources(m, KW, jobs=2, progress=lambda d, t: calls.append((d, t)))
    assert big == small == parallel
    assert _by_study(big) == _by_study(parallel)
    assert calls[0] == (0, big.files_seen) and calls[-1] == (big.files_seen,) * 2 and calls == sorted(calls)
    warm = scan_sources(m, KW, cache={e.path: e for e in big.cache_updates}, jobs=2)
    assert warm.cache_hits == big.files_seen and (warm.headers, warm.rejects) == (big.headers, big.rejects)
    for r in (big, small, parallel, warm):
        r.close()


def test_a_warm_scan_through_the_state_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from xnatmigrate.state import StateStore

    monkeypatch.setattr(sources, "BATCH", 7)
    m = _two_sources(tmp_path / "src")
    with StateStore(tmp_path / "state") as store, scan_sources(m, KW, cache=store, jobs=1) as cold:
        assert cold.cache_updates == () and cold.cache_hits == 0
        written = store.cache_all()
        assert len(written) == cold.files_seen  # every file read, none unreadable
        with scan_sources(m, KW, jobs=1) as plain:
            assert (cold.headers, cold.rejects) == (plain.headers, plain.rejects)
            assert written == {e.path: e for e in plain.cache_updates}
        # An older cache without digests: a warm scan uses it and writes them back.
        store.cache_put(replace(e, digest="") for e in written.values())
        with scan_sources(m, KW, cache=store, jobs=1) as warm:
            assert warm.cache_hits == cold.files_seen and warm.cache_updates == ()
            assert (warm.headers, warm.rejects, warm.warnings) == (cold.headers, cold.rejects, cold.warnings)
        assert store.cache_all() == written
        # With the digests: each cached header's text goes to the working set undecoded.
        with scan_sources(m, KW, cache=store, jobs=1) as again:
            assert again.cache_hits == cold.files_seen
            assert (again.headers, again.rejects) == (cold.headers, cold.rejects)
            assert list(again.studies()) == list(cold.studies())


@pytest.mark.parametrize(
    "uid",
    ["1.2.3", 'odd"quote', "back\\slash", "ünï", "lone\udcff", 'both\\"', ""],
)
def test_a_uid_is_read_from_the_header_text_as_decoding_it_would(uid: str) -> None:
    from xnatmigrate.model import FileHeader, JsonHeader, json_text
    from xnatmigrate.scan import workset

    uid = uid.encode().decode("unicode_escape") if "\\u" in uid else uid
    values = {
        "PatientComments": '"SOPInstanceUID": "decoy", \\"StudyInstanceUID\\": "no"',
        "SOPInstanceUID": uid,
        "StudyInstanceUID": uid + ".9",
    }
    for text in (json_text(values), json_text(values, sort_keys=True, separators=(",", ":"))):
        lazy = JsonHeader(text)
        h = FileHeader("/x", 1, 1, "", lazy)
        assert workset._uid(h, text, "SOPInstanceUID") == uid
        assert workset._uid(h, text, "StudyInstanceUID") == uid + ".9"
        assert lazy == values


def test_the_working_set_is_removed_on_close(tmp_path: Path) -> None:
    import gc

    corpus(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    result = scan_sources(manifest(tmp_path / "src"), KW, jobs=1, workdir=str(work))
    # Unlinked while open: a process killed with -9 leaves no scratch file.
    assert list(work.iterdir()) == [] and result.kept_count == 6
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone already
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert any(str(work) in target and target.endswith("(deleted)") for target in held)
    assert len(result.headers) == 6 and len(list(result.studies())) == 1
    result.close()
    result.close()  # twice is fine
    with scan_sources(manifest(tmp_path / "src"), KW, jobs=1, workdir=str(work)) as again:
        assert list(work.iterdir()) == [] and again.headers == result.headers
    scan_sources(manifest(tmp_path / "src"), KW, jobs=1, workdir=str(work))  # dropped unclosed
    gc.collect()
    assert list(work.iterdir()) == []
