"""The scan over real files: pydicom's bundled test files, and the synthetic corpus with its nuisances."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from xnatmigrate.model import BASE_KEYWORDS, Manifest, SourceSpec, XnatTarget
from xnatmigrate.scan import ScanResult, scan_sources, sources
from xnatmigrate.state import StateStore
from xnatmigrate.testing.corpus import NUISANCE_KINDS, CorpusFile, CorpusSpec, build_corpus

KW = frozenset(BASE_KEYWORDS)

# The folder get_testdata_files("*") lists. Listed directly: get_testdata_files also tries to fetch
# pydicom's external test data over the network, which these machines do not have.
TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def manifest(root: Path, exclude: tuple[str, ...] = ()) -> Manifest:
    src = SourceSpec(0, None, str(root), "P", None, "S", exclude=exclude)
    return Manifest("manifest.yaml", "0" * 64, 1, XnatTarget(), (src,))


@pytest.fixture(scope="module")
def bundled() -> ScanResult:
    return scan_sources(manifest(TEST_FILES), KW, jobs=1)


def outcome(result: ScanResult, path: Path) -> str:
    """``planned <transfer syntax>`` or the reject reason, for one file."""
    for _, h in result.headers:
        if h.path == str(path):
            return f"planned {h.transfer_syntax}"
    reasons = [r.reason for r in result.rejects if r.path == str(path)]
    assert len(reasons) == 1, (path, reasons)
    return reasons[0]


def test_every_bundled_file_is_planned_or_rejected(bundled: ScanResult) -> None:
    on_disk = {str(p) for p in TEST_FILES.rglob("*") if p.is_file()}
    planned = [h.path for _, h in bundled.headers]
    rejected = [r.path for r in bundled.rejects]
    assert len(set(planned)) == len(planned) and len(set(rejected)) == len(rejected)
    assert set(planned).isdisjoint(rejected)
    assert set(planned) | set(rejected) == on_disk
    assert bundled.files_seen == len(on_disk) > 100
    assert len(planned) > 50


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CT_small.dcm", "planned 1.2.840.10008.1.2.1"),
        ("MR_small.dcm", "planned 1.2.840.10008.1.2.1"),
        ("rtplan.dcm", f"planned {ImplicitVRLittleEndian}"),
        ("image_dfl.dcm", f"planned {DeflatedExplicitVRLittleEndian}"),
        ("ExplVR_BigEndNoMeta.dcm", f"planned {ExplicitVRBigEndian}"),  # no file meta: inferred
        ("JPEG2000-embedded-sequence-delimiter.dcm", "planned 1.2.840.10008.1.2.4.91"),
        ("dicomdirtests/77654033/CR1/6154", "planned 1.2.840.10008.1.2.1"),
        ("README.txt", "not DICOM: "),
        ("zipMR.gz", "not DICOM: "),
        ("no_meta.dcm", "not DICOM: "),  # pydicom itself finds no element in it
        ("dicomdirtests/DICOMDIR", "DICOMDIR: media directory, not an image"),
        ("dicomdirtests/DICOMDIR-bigEnd", "DICOMDIR: media directory, not an image"),
        ("MR_truncated.dcm", "truncated: Pixel Data declares 8192 bytes, file has 8130 after it"),
        ("rtplan_truncated.dcm", "truncated: header ends early"),
        ("JPEGLSNearLossless_08.dcm", "no StudyInstanceUID"),
        (
            "MR_small_RLE.dcm",
            f"duplicate: same SOPInstanceUID as {TEST_FILES}/MR_small.dcm, different content",
        ),
        (
            "SC_rgb_jpeg_app14_dcmd.dcm",
            f"duplicate: same SOPInstanceUID as {TEST_FILES}/SC_jpeg_no_color_transform_2.dcm, identical content",
        ),
    ],
)
def test_well_known_files(bundled: ScanResult, name: str, expected: str) -> None:
    assert outcome(bundled, TEST_FILES / name).startswith(expected)


def _pydicom_text(value: object) -> str:
    if isinstance(value, MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def test_values_agree_with_dcmread(bundled: ScanResult) -> None:
    for _, h in bundled.headers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some bundled files are deliberately odd
            ds = pydicom.dcmread(h.path, force=True, stop_before_pixels=True)
        for kw in KW:
            theirs = ds.get(kw)
            if theirs is None or _pydicom_text(theirs) in ("", "\\"):
                assert kw not in h.values, (h.path, kw)
            else:
                assert h.values.get(kw) == _pydicom_text(theirs), (h.path, kw)
        declared = ds.file_meta.get("TransferSyntaxUID")
        if declared:
            assert h.transfer_syntax == declared, h.path


def test_parallel_and_cached_scans_agree(
    bundled: ScanResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "_PARALLEL_MIN", 1)
    monkeypatch.setattr(sources, "_CHUNK_MIN", 16)
    parallel = scan_sources(manifest(TEST_FILES), KW, jobs=2)
    assert parallel == bundled
    with StateStore(tmp_path / "state") as store:
        store.cache_put(parallel.cache_updates)
        cache = store.cache_all()
    cached = scan_sources(manifest(TEST_FILES), KW, cache=cache, jobs=2)
    assert cached.cache_hits == bundled.files_seen and cached.cache_updates == ()
    assert (cached.headers, cached.rejects) == (bundled.headers, bundled.rejects)


# --------------------------------------------------------------------------------------------
# The synthetic corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CorpusFile]]:
    root = tmp_path_factory.mktemp("scan") / "corpus"
    return root, build_corpus(root, CorpusSpec(rows=16, seed=11, nuisances=True))


def test_corpus_nuisances(corpus: tuple[Path, list[CorpusFile]]) -> None:
    root, files = corpus
    result = scan_sources(manifest(root), KW, jobs=1)
    images = [f for f in files if f.kind == "image"]
    first = images[0].path
    assert sorted(h.path for _, h in result.headers) == sorted(str(f.path) for f in images)
    expected = {
        "dicomdir": "DICOMDIR: media directory, not an image",
        "no_extension": f"duplicate: same SOPInstanceUID as {first}, identical content",
        "text": "not DICOM: ",
        "png": "not DICOM: ",
        "no_meta": f"duplicate: same SOPInstanceUID as {first}, different content",
        "truncated": "truncated: Pixel Data declares ",
        "not_dicom": "not DICOM: ",
    }
    assert set(expected) == set(NUISANCE_KINDS)
    for f in files:
        if f.kind != "image":
            assert outcome(result, f.path).startswith(expected[f.kind]), f.kind
    assert result.files_seen == len(files)


def test_corpus_stream_without_meta_is_planned_when_it_is_the_only_copy(
    corpus: tuple[Path, list[CorpusFile]],
) -> None:
    root, files = corpus
    first = next(f for f in files if f.kind == "image")
    result = scan_sources(manifest(root, exclude=(str(first.path.relative_to(root)),)), KW, jobs=1)
    no_meta = next(f for f in files if f.kind == "no_meta")
    no_ext = next(f for f in files if f.kind == "no_extension")
    assert outcome(result, no_meta.path) == f"planned {ImplicitVRLittleEndian}"
    assert outcome(result, no_ext.path) == (
        f"duplicate: same SOPInstanceUID as {no_meta.path}, different content"
    )
    header = next(h for _, h in result.headers if h.path == str(no_meta.path))
    assert header.sop_instance_uid == first.sop_uid and header.study_uid == first.study_uid
