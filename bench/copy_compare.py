"""Compare ``files.stage_session`` with ``cp -r SRC DST && sync`` (and hardlink with ``cp -al``).

    python bench/copy_compare.py --corpus DIR [--build 2000 --rows 256] [--rounds 3] [--jobs 1,2,4,8]
                                 [--variants copy,copy-fsync,hardlink] [--drop-caches] [--json out.json]

``--build N`` first writes an N-image MR corpus with ``xnatmigrate.testing.corpus`` when DIR is empty
(random ~130 KB files if that module is missing). Work folders go next to the corpus (same filesystem,
so hard links work). Each round runs every variant once, each right after its reference (A B A B ...),
so drift of a shared machine hits both alike; the ratio reported is the median of those paired ratios.
``--drop-caches`` writes 3 to /proc/sys/vm/drop_caches before every run (root only; the output says
whether it was refused), so each run reads its sources from disk.

Variants: ``copy`` (the default: writeback started per file, one syncfs at the end), ``copy-fsync``
(``fsync_each=True``: an fsync per file, from the workers), ``hardlink``. Ours is timed in-process as
``stage_session(...)`` + ``os.sync()``; the sync has nothing left to do and only keeps the timing
symmetric with the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xnatmigrate.execute import files
from xnatmigrate.model import PlannedFile, PlannedScan, PrearchiveSession
from xnatmigrate.testing.sessions import prearchive_session


def build_corpus(root: Path, n: int, rows: int) -> None:
    try:
        from xnatmigrate.testing.corpus import CorpusSpec, build_corpus
    except ImportError:
        for i in range(n):
            p = root / f"s{i // 100}" / f"IMG{i:05d}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(rows * rows * 2 + 1_234))
        return
    series = max(1, n // 100)
    spec = CorpusSpec(
        patients=1,
        studies_per_patient=1,
        series_per_study=series,
        images_per_series=n // series,
        modalities=("MR",),
        rows=rows,
    )
    build_corpus(root, spec)


def session_for(corpus: Path, ts: str) -> PrearchiveSession:
    """One planned session holding every file of the corpus, one scan per source folder."""
    by_dir: dict[Path, list[Path]] = {}
    for p in sorted(p for p in corpus.rglob("*") if p.is_file()):
        by_dir.setdefault(p.parent, []).append(p)
    scans = []
    for i, paths in enumerate(by_dir.values()):
        planned = []
        for p in paths:
            st = p.stat()
            planned.append(
                PlannedFile(str(p), st.st_size, st.st_mtime_ns, "", "", "", f"SCANS/{i}/DICOM/{p.name}")
            )
        scans.append(PlannedScan(str(i), str(i), str(i), "MR", tuple(planned)))
    return prearchive_session(
        scans, project="BENCH", timestamp=ts, label="S1", action_id="bench", study_uid="1.2"
    )


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--build", type=int, default=0, help="write an N-image corpus first if --corpus is empty")
    ap.add_argument("--rows", type=int, default=256, help="image size for --build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default="1,2,4,8")
    ap.add_argument("--variants", default="copy,hardlink")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    corpus = args.corpus.resolve()
    if args.build and not (corpus.exists() and any(corpus.iterdir())):
        build_corpus(corpus, args.build, args.rows)
    work = corpus.parent / f"{corpus.name}.bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    session = session_for(corpus, "20240101_000000000")
    staging = files.staging_dir(str(work), session)
    nbytes = session.bytes

    def reference(variant: str) -> tuple[str, list[str]]:
        flag = "-al" if variant == "hardlink" else "-r"
        return f"cp {flag} + sync", ["cp", flag, str(corpus), str(work / "dst")]

    def run(what: str | tuple[str, int]) -> float:
        shutil.rmtree(work / "dst", ignore_errors=True)
        shutil.rmtree(work / files.STAGING_DIRNAME, ignore_errors=True)
        os.sync()
        if args.drop_caches:
            dropped.append(drop_caches())
        t0 = time.perf_counter()
        if isinstance(what, str):
            subprocess.run(reference(what)[1], check=True)
        else:
            variant, jobs = what
            files.stage_session(
                session,
                staging,
                transfer="hardlink" if variant == "hardlink" else "copy",
                jobs=jobs,
                fsync_each=variant == "copy-fsync",
            )
        os.sync()
        return time.perf_counter() - t0

    dropped: list[bool] = []
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    variants = args.variants.split(",")
    jobs_list = [int(j) for j in args.jobs.split(",")]
    for _ in range(args.rounds):
        for variant in variants:
            for jobs in jobs_list:
                ref_name = reference(variant)[0]
                name = f"{variant} jobs={jobs}"
                t_ref = run(variant)
                t_ours = run((variant, jobs))
                times.setdefault(ref_name, []).append(t_ref)
                times.setdefault(name, []).append(t_ours)
                ratios.setdefault(name, []).append(t_ours / t_ref)
    shutil.rmtree(work, ignore_errors=True)

    caches = "no" if not args.drop_caches else "yes" if all(dropped) else "refused (sources may be cached)"
    print(
        f"corpus {corpus}: {session.file_count} files, {nbytes / 1e6:.0f} MB; {args.rounds} rounds; "
        f"drop caches before each run: {caches}"
    )
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(ratios[name]) if name in ratios else None
        rows.append({"variant": name, "median_s": med, "runs_s": ts, "paired_ratio": ratio})
        tail = f"  paired ratio ×{ratio:.2f}" if ratio is not None else ""
        print(f"  {name:18s} median {med:6.2f} s  {nbytes / 1e6 / med:7.0f} MB/s  (n={len(ts)}){tail}")
    if args.json:
        report = {"files": session.file_count, "bytes": nbytes, "rounds": args.rounds, "drop_caches": caches}
        args.json.write_text(json.dumps({**report, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
