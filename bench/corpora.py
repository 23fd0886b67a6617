"""Deterministic corpora, generated once outside the repository and reused by every run.

Layout under the bench directory (default ``${XNATMIGRATE_BENCH_DIR:-~/.cache/xnatmigrate-bench}``)::

    corpus-<N>/          the images (PatientID/StudyDate_n/Series/IMGnnnn.dcm), nothing else
    corpus-<N>.json      written last: the spec, file count and bytes; no marker = incomplete

Every corpus has 200 images per patient: two studies (a follow-up), four series of 25 images.
Studies cycle MR, MR, MR, CT, so three patients in four have MR follow-ups and one in four has
MR then CT (MR 256² ≈ 130 KB, CT 512² ≈ 520 KB; ≈ 230 KB per image on average).

NOTE: ``xnatmigrate.testing.corpus`` makes every file a pure function of (seed, patient, study,
series, image), so a smaller corpus equals the first patients of a larger one; when a larger corpus
is already there, a smaller one is made of hard links to it instead of being generated again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
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

    @property
    def mb(self) -> float:
        return self.bytes / 1e6


class NoSpace(Exception):
    """Not enough free disk for a corpus; the message says how much is missing."""


def spec_for(size: int, smoke: bool) -> CorpusSpec:
    per = SMOKE_IMAGES_PER_PATIENT if smoke else IMAGES_PER_PATIENT
    if size % per:
        raise ValueError(f"corpus size {size} is not a multiple of {per} images per patient")
    base: dict[str, object] = dict(SMOKE if smoke else BASE)
    return CorpusSpec(patients=size // per, **base)  # type: ignore[arg-type]


def estimate_bytes(spec: CorpusSpec) -> int:
    """Size on disk, within a few percent: pixel data plus ≈ 1.6 KB of header per image."""
    from xnatmigrate.testing.corpus import _MODALITIES

    studies = spec.patients * spec.studies_per_patient
    total = 0
    for i in range(studies):
        mod = _MODALITIES[spec.modalities[i % len(spec.modalities)]]
        rows = spec.rows or mod.default_rows
        total += spec.series_per_study * spec.images_per_series * (rows * rows * 2 + 1600)
    return total


def _marker(root: Path, size: int) -> Path:
    return root / f"corpus-{size}.json"


def _spec_dict(spec: CorpusSpec) -> dict[str, object]:
    d = asdict(spec)
    d["modalities"] = list(spec.modalities)
    return d


def _load(root: Path, size: int, spec: CorpusSpec) -> Corpus | None:
    marker = _marker(root, size)
    if not marker.exists():
        return None
    meta = json.loads(marker.read_text())
    if meta.get("spec") != _spec_dict(spec):
        return None
    return Corpus(root / f"corpus-{size}", int(meta["files"]), int(meta["bytes"]), meta["spec"])


def _count(path: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            files += 1
            total += os.lstat(os.path.join(dirpath, n)).st_size
    return files, total


def _finish(root: Path, size: int, tmp: Path, spec: CorpusSpec, how: str) -> Corpus:
    final = root / f"corpus-{size}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    files, total = _count(final)
    spec_d = _spec_dict(spec)
    meta = {"spec": spec_d, "files": files, "bytes": total, "made": how}
    _marker(root, size).write_text(json.dumps(meta, indent=1) + "\n")
    return Corpus(final, files, total, spec_d)


def _larger(root: Path, size: int, smoke: bool) -> tuple[int, Corpus] | None:
    """A complete corpus of the same shape with more patients, smallest first."""
    found = []
    for marker in root.glob("corpus-*.json"):
        try:
            n = int(marker.stem.split("-", 1)[1])
        except ValueError:
            continue
        if n > size and n % (SMOKE_IMAGES_PER_PATIENT if smoke else IMAGES_PER_PATIENT) == 0:
            c = _load(root, n, spec_for(n, smoke))
            if c is not None:
                found.append((n, c))
    return min(found, key=lambda t: t[0]) if found else None


def ensure(root: Path, size: int, *, smoke: bool = False, log: bool = True) -> Corpus:
    """The corpus of ``size`` images under ``root``: reused, hard-linked from a larger one, or built.

    Raises:
        NoSpace: building it would leave less than 2 GB free.
    """
    spec = spec_for(size, smoke)
    root.mkdir(parents=True, exist_ok=True)
    have = _load(root, size, spec)
    if have is not None:
        return have
    tmp = root / f"corpus-{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    larger = _larger(root, size, smoke)
    if larger is not None:
        n, big = larger
        tmp.mkdir()
        patients = sorted(p for p in big.path.iterdir() if p.is_dir())[: spec.patients]
        # cp -al: a tree of hard links, the same bytes at no disk cost (see the module NOTE).
        subprocess.run(["cp", "-al", *map(str, patients), str(tmp)], check=True)
        if log:
            print(f"corpus {size}: hard links to the first {spec.patients} patients of corpus-{n}")
        return _finish(root, size, tmp, spec, f"hard links into corpus-{n}")
    need = estimate_bytes(spec)
    free = shutil.disk_usage(root).free
    if need + 2_000_000_000 > free:
        raise NoSpace(
            f"corpus of {size} images needs ≈ {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free under {root}"
        )
    if log:
        print(f"corpus {size}: generating ≈ {need / 1e9:.1f} GB under {root} (once; reused later)")
    build_corpus(tmp, spec)
    return _finish(root, size, tmp, spec, "generated")


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
