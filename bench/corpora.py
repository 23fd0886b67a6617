"""Deterministic corpora, generated once outside the repository and reused by every run.

Layout under the bench directory (default ``${XNATMIGRATE_BENCH_DIR:-~/.cache/xnatmigrate-bench}``)::

    corpus-<N>/            the standard shape: the images (PatientID/StudyDate_n/Series/IMGnnnn.dcm)
    corpus-<N>.json        written last: the spec, file count and bytes; no marker = incomplete
    corpus-<shape>-<N>/    the other shapes (issue 13), same layout, same marker beside them
    corpus-<shape>-<N>.json

Shapes (``SHAPES``; sizes are always images = files, nothing else is in a corpus):

- ``standard``: 200 images per patient: two studies (a follow-up), four series of 25 images. Studies
  cycle MR, MR, MR, CT, so three patients in four have MR follow-ups and one in four has MR then CT
  (MR 256² ≈ 130 KB, CT 512² ≈ 520 KB; ≈ 230 KB per image on average).
- ``xray``: many small studies: one study per patient of 4 radiographs (4 series of one image each, as
  CR/DX modalities usually send them), alternating CR and DX, 256² ≈ 130 KB each. 20,000 images =
  5,000 studies. Every study has exactly 4 images (not 1-4), so the size is the issue's row exactly.
- ``huge``: one patient, one MR study of 4 series × N/4 images (256², ≈ 130 KB): 10,000 images = one
  session of 1.3 GB.
- ``tiny``: a big archive of tiny files: one study per patient, 2 series × 25 images, MR/CT
  alternating, 32² pixels (≈ 3.7 KB per file, one 4 KiB block). 300,000 images = 6,000 studies.
- ``fleet``: the tiny shape's studies (seed 16) for the fleet row: 2,000 images = 40 studies of 50.

NOTE: ``xnatmigrate.testing.corpus`` makes every file a pure function of (seed, patient, study,
series, image), so a smaller corpus of a shape that grows by patients equals the first patients of a
larger one; when a larger corpus is already there, a smaller one is made of hard links to it instead
of being generated again (not ``huge``, which grows by images per series: each size is generated).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

IMAGES_PER_PATIENT = 200
BASE = {
    "studies_per_patient": 2,
    "series_per_study": 4,
    "images_per_series": 25,
    "modalities": ("MR", "MR", "MR", "CT"),
    "seed": 0,
}
# Smoke: a few hundred small images, same shape (rows 32 for both modalities).
SMOKE = {**BASE, "series_per_study": 2, "rows": 32}
SMOKE_IMAGES_PER_PATIENT = 100


@dataclass(frozen=True)
class Shape:
    """A named corpus shape: CorpusSpec fields besides the count that grows with the size."""

    name: str
    base: Mapping[str, object]
    #: Sizes are multiples of this: images per patient, or (``by_patient=False``) series per study.
    unit: int
    by_patient: bool = True
    text: str = ""
    smoke: Mapping[str, object] = field(default_factory=dict)
    smoke_unit: int = 0

    def spec(self, size: int, smoke: bool = False) -> CorpusSpec:
        base = dict(self.smoke if smoke and self.smoke else self.base)
        unit = self.smoke_unit if smoke and self.smoke_unit else self.unit
        if size < unit or size % unit:
            what = "images per patient" if self.by_patient else "series"
            raise ValueError(f"{self.name} corpus size {size} is not a multiple of {unit} {what}")
        if self.by_patient:
            return CorpusSpec(patients=size // unit, **base)  # type: ignore[arg-type]
        return CorpusSpec(patients=1, images_per_series=size // unit, **base)  # type: ignore[arg-type]

    def name_of(self, size: int) -> str:
        return f"corpus-{size}" if self.name == "standard" else f"corpus-{self.name}-{size}"


SHAPES: dict[str, Shape] = {
    "standard": Shape(
        "standard",
        BASE,
        IMAGES_PER_PATIENT,
        text="200 images per patient, two studies each (a follow-up), four series of 25 images; "
        "studies cycle MR 256², MR, MR, CT 512²",
        smoke=SMOKE,
        smoke_unit=SMOKE_IMAGES_PER_PATIENT,
    ),
    "xray": Shape(
        "xray",
        {
            "studies_per_patient": 1,
            "series_per_study": 4,
            "images_per_series": 1,
            "modalities": ("CR", "DX"),
            "seed": 13,
        },
        4,
        text="one study per patient of 4 radiographs (4 series of one image), CR and DX alternating, "
        "256² (≈ 130 KB)",
        smoke={
            "studies_per_patient": 1,
            "series_per_study": 4,
            "images_per_series": 1,
            "modalities": ("CR", "DX"),
            "rows": 32,
            "seed": 13,
        },
    ),
    "huge": Shape(
        "huge",
        {"studies_per_patient": 1, "series_per_study": 4, "modalities": ("MR",), "seed": 14},
        4,
        by_patient=False,
        text="one patient, one MR study of 4 series of N/4 images, 256² (≈ 130 KB)",
        smoke={
            "studies_per_patient": 1,
            "series_per_study": 4,
            "modalities": ("MR",),
            "rows": 32,
            "seed": 14,
        },
    ),
    "tiny": Shape(
        "tiny",
        {
            "studies_per_patient": 1,
            "series_per_study": 2,
            "images_per_series": 25,
            "modalities": ("MR", "CT"),
            "rows": 32,
            "seed": 15,
        },
        50,
        text="one study per patient, 2 series of 25 images, MR/CT alternating, 32² (≈ 3.7 KB per file)",
        smoke={
            "studies_per_patient": 1,
            "series_per_study": 2,
            "images_per_series": 5,
            "modalities": ("MR", "CT"),
            "rows": 16,
            "seed": 15,
        },
        smoke_unit=10,
    ),
    # The fleet row (bench/rows_fleet.py): the tiny files again (bytes negligible, so the receiver's
    # fixed delay per instance is what a worker waits on), few enough that one worker takes ≈ 40 s.
    "fleet": Shape(
        "fleet",
        {
            "studies_per_patient": 1,
            "series_per_study": 2,
            "images_per_series": 25,
            "modalities": ("MR", "CT"),
            "rows": 32,
            "seed": 16,
        },
        50,
        text="one study per patient, 2 series of 25 images, MR/CT alternating, 32² (≈ 3.7 KB per file)",
        smoke={
            "studies_per_patient": 1,
            "series_per_study": 2,
            "images_per_series": 5,
            "modalities": ("MR", "CT"),
            "rows": 16,
            "seed": 16,
        },
        smoke_unit=10,
    ),
}


def bench_dir(arg: str | None) -> Path:
    """``--corpus-dir``, else ``$XNATMIGRATE_BENCH_DIR``, else ``~/.cache/xnatmigrate-bench``."""
    return Path(
        arg or os.environ.get("XNATMIGRATE_BENCH_DIR") or Path.home() / ".cache" / "xnatmigrate-bench"
    ).resolve()


@dataclass(frozen=True)
class Corpus:
    path: Path
    files: int
    bytes: int
    spec: dict[str, object]
    #: Allocated on disk (st_blocks): 4 KiB per tiny file however small; 0 in markers older than it.
    disk_bytes: int = 0
    shape: str = "standard"

    @property
    def mb(self) -> float:
        return self.bytes / 1e6

    @property
    def disk(self) -> int:
        """Bytes a copy of the corpus takes on disk (at least its apparent size)."""
        return max(self.disk_bytes, self.bytes)

    @property
    def sessions(self) -> int:
        """Studies in the corpus: one XNAT session each (the bench's label is PatientID_StudyDate)."""
        return int(str(self.spec["patients"])) * int(str(self.spec["studies_per_patient"]))


class NoSpace(Exception):
    """Not enough free disk (or inodes) for a corpus; the message says how much is missing."""


def spec_for(size: int, smoke: bool, shape: str = "standard") -> CorpusSpec:
    return SHAPES[shape].spec(size, smoke)


_BLOCK = 4096


def estimate_bytes(spec: CorpusSpec) -> int:
    """Allocated size on disk, within a few percent: pixel data plus ≈ 1.6 KB of header per image,
    each file rounded up to whole 4 KiB blocks, plus a block per series folder."""
    from xnatmigrate.testing.corpus import _MODALITIES

    studies = spec.patients * spec.studies_per_patient
    total = 0
    for i in range(studies):
        mod = _MODALITIES[spec.modalities[i % len(spec.modalities)]]
        rows = spec.rows or mod.default_rows
        per_file = math.ceil((rows * rows * 2 + 1600) / _BLOCK) * _BLOCK
        total += spec.series_per_study * (spec.images_per_series * per_file + _BLOCK)
    return total


def _marker(root: Path, name: str) -> Path:
    return root / f"{name}.json"


def _spec_dict(spec: CorpusSpec) -> dict[str, object]:
    d = asdict(spec)
    d["modalities"] = list(spec.modalities)
    return d


def _load(root: Path, name: str, spec: CorpusSpec, shape: str) -> Corpus | None:
    marker = _marker(root, name)
    if not marker.exists():
        return None
    meta = json.loads(marker.read_text())
    if meta.get("spec") != _spec_dict(spec):
        return None
    return Corpus(
        root / name,
        int(meta["files"]),
        int(meta["bytes"]),
        meta["spec"],
        int(meta.get("disk_bytes", 0)),
        shape,
    )


def _count(path: Path) -> tuple[int, int, int]:
    files = total = disk = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(dirpath, n))
            files += 1
            total += st.st_size
            disk += st.st_blocks * 512
    return files, total, disk


def _finish(root: Path, name: str, tmp: Path, spec: CorpusSpec, how: str, shape: str) -> Corpus:
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    files, total, disk = _count(final)
    spec_d = _spec_dict(spec)
    meta = {"spec": spec_d, "files": files, "bytes": total, "disk_bytes": disk, "made": how}
    _marker(root, name).write_text(json.dumps(meta, indent=1) + "\n")
    return Corpus(final, files, total, spec_d, disk, shape)


def _larger(root: Path, size: int, smoke: bool, shape: Shape) -> tuple[int, Corpus] | None:
    """A complete corpus of the same shape with more patients, smallest first."""
    if not shape.by_patient:
        return None
    prefix = shape.name_of(0)[: -len("0")]
    found = []
    for marker in root.glob(f"{prefix}*.json"):
        try:
            n = int(marker.stem[len(prefix) :])
        except ValueError:  # another shape's marker (corpus-xray-… under the standard prefix)
            continue
        if n <= size:
            continue
        try:
            spec = shape.spec(n, smoke)
        except ValueError:
            continue
        c = _load(root, shape.name_of(n), spec, shape.name)
        if c is not None:
            found.append((n, c))
    return min(found, key=lambda t: t[0]) if found else None


def made(root: Path, size: int, shape: str = "standard") -> str:
    """How the corpus was made (its marker's ``made``), for the report."""
    marker = _marker(root, SHAPES[shape].name_of(size))
    return str(json.loads(marker.read_text()).get("made", "")) if marker.exists() else ""


def ensure(
    root: Path, size: int, *, smoke: bool = False, log: bool = True, shape: str = "standard"
) -> Corpus:
    """The corpus of ``size`` images of ``shape`` under ``root``: reused, hard-linked from a larger one,
    or built.

    Raises:
        NoSpace: building it would leave less than 2 GB, or fewer than 100,000 inodes, free.
    """
    sh = SHAPES[shape]
    spec = sh.spec(size, smoke)
    name = sh.name_of(size)
    root.mkdir(parents=True, exist_ok=True)
    have = _load(root, name, spec, shape)
    if have is not None:
        return have
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    label = f"corpus {size}" if shape == "standard" else f"{shape} corpus {size}"
    need_inodes = spec.image_count + spec.patients * (
        1 + spec.studies_per_patient * (1 + spec.series_per_study)
    )
    free_inodes = os.statvfs(root).f_favail
    if need_inodes + 100_000 > free_inodes:
        raise NoSpace(f"{label} needs ≈ {need_inodes:,} inodes, {free_inodes:,} free under {root}")
    larger = _larger(root, size, smoke, sh)
    if larger is not None:
        n, big = larger
        tmp.mkdir()
        patients = sorted(p for p in big.path.iterdir() if p.is_dir())[: spec.patients]
        # cp -al: a tree of hard links, the same bytes at no disk cost (see the module NOTE). Batched:
        # a tiny corpus has thousands of patient folders.
        for i in range(0, len(patients), 1000):
            subprocess.run(["cp", "-al", *map(str, patients[i : i + 1000]), str(tmp)], check=True)
        if log:
            print(f"{label}: hard links to the first {spec.patients} patients of {sh.name_of(n)}")
        return _finish(root, name, tmp, spec, f"hard links into {sh.name_of(n)}", shape)
    need = estimate_bytes(spec)
    free = shutil.disk_usage(root).free
    if need + 2_000_000_000 > free:
        raise NoSpace(f"{label} images needs ≈ {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free under {root}")
    if log:
        print(f"{label}: generating ≈ {need / 1e9:.1f} GB under {root} (once; reused later)", flush=True)
    build_corpus(tmp, spec)
    return _finish(root, name, tmp, spec, "generated", shape)


def subset(corpus: Corpus, dest: Path, n: int) -> Path:
    """The first ``n`` files of ``corpus`` (path order) as hard links in one flat folder."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    picked: list[str] = []
    for dirpath, dirs, names in os.walk(corpus.path):
        dirs.sort()
        picked += [os.path.join(dirpath, nm) for nm in sorted(names)]
        if len(picked) >= n:
            break
    for i, p in enumerate(picked[:n]):
        os.link(p, dest / f"IMG{i:05d}.dcm")
    return dest
