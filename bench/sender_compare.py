"""The C-STORE sender of two source trees side by side, into the same dcmtk ``storescp``, alternating.

    python -m bench.sender_compare --before TREE [--after TREE] [--size 2000] [--rounds 3]
                                   [--warmup 1] [--jobs 1,4] [--corpus-dir DIR]

For a change to the sender itself (issue 10 split ``execute/dicom.py`` into a package): ``--before``
is a checkout of the old revision (``git worktree add /tmp/before <rev>``), ``--after`` the working
tree (default: this repository). Each run is one ``send_files`` call in a fresh interpreter with
that tree first on PYTHONPATH (``bench/sender_once.py``), routing written in (patient_comments), over
the whole bench corpus; storescp is restarted with an empty folder before each run (untimed) and
must have received every file. pynetdicom's own ``Association`` (``bench/pynetdicom_send.py``) and
``storescu +sd +r`` run in the same rounds for scale. Per round the order is before, after (each N),
pynetdicom, storescu, before and after swapping places every other round; the ratio is after ÷
before per round and N, medians printed at the end.

Times: the ``send_files`` call as the sender measures it (interpreter start and imports excluded,
they are the same for both trees), and the whole command for pynetdicom and storescu.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from . import corpora
from .common import PYTHON, BenchError, Run, Series, alternate, run, show
from .site import CALLED_AET, CALLING_AET, DCMTK_ENV, REPO, StoreSCP, free_port

ONCE = Path(__file__).with_name("sender_once.py")
PYND = Path(__file__).with_name("pynetdicom_send.py")


def _listing(corpus: corpora.Corpus, dest: Path) -> Path:
    """The files of the corpus as ``sender_once`` wants them (read once, untimed)."""
    rows = []
    for path in sorted(p for p in corpus.path.rglob("*") if p.is_file()):
        meta = read_file_meta_info(path)
        rows.append(
            {
                "path": str(path),
                "size": path.stat().st_size,
                "sop_instance": str(meta.MediaStorageSOPInstanceUID),
                "sop_class": str(meta.MediaStorageSOPClassUID),
                "ts": str(meta.TransferSyntaxUID),
            }
        )
    dest.write_text(json.dumps(rows))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sender_compare", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=REPO)
    ap.add_argument("--size", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--jobs", default="1,4")
    ap.add_argument("--corpus-dir", default=None)
    ap.add_argument("--no-pynetdicom", action="store_true")
    args = ap.parse_args(argv)
    jobs = [int(j) for j in args.jobs.split(",")]
    root = corpora.bench_dir(args.corpus_dir)
    root.mkdir(parents=True, exist_ok=True)
    corpus = corpora.ensure(root, args.size)
    work = root / "sender-compare"
    work.mkdir(exist_ok=True)
    listing = _listing(corpus, work / "files.json")
    n = corpus.files
    port = free_port()
    shm = Path("/dev/shm")
    out = (shm if shm.is_dir() else work) / "xnatmigrate-sender-compare-rx"

    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    series: dict[tuple[str, int], Series] = {}
    with StoreSCP(port, out, work / "storescp.log") as scp:
        lost: list[int] = []  # per pynetdicom run: associations its threads lost

        def checked(cmd: list[str] | str, env: dict[str, str], inner: bool, expect_tree: Path | None) -> Run:
            r = run(cmd, env=env, keep_stdout=True)
            if isinstance(cmd, list) and cmd[1] == str(PYND):
                lost.append(int(r.stdout.split()[1]))
            got = scp.received()
            if got != n:
                raise BenchError(f"storescp received {got} of {n} files; see {scp.log}")
            if not inner:
                return r
            seconds, _, used = r.stdout.split()
            if expect_tree is not None and not Path(used).resolve().is_relative_to(expect_tree):
                raise BenchError(f"measured {used}, not the tree {expect_tree}")
            return Run(float(seconds), r.maxrss_kib)

        sides = []
        for j in jobs:
            for name, tree in trees.items():
                cmd = [PYTHON, str(ONCE), str(listing), "127.0.0.1", str(port), str(j)]
                env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
                s = series[(name, j)] = Series(f"{name} send_files jobs={j}", show(cmd, env))
                sides.append((s, lambda c=cmd, e=env, t=tree: checked(c, e, True, t), scp.restart))
        if not args.no_pynetdicom:
            cmd = [PYTHON, str(PYND), "127.0.0.1", str(port), CALLED_AET, CALLING_AET, str(corpus.path)]
            env = {"PYTHONSAFEPATH": "1"}
            s = series[("pynetdicom", 1)] = Series("pynetdicom Association loop", show(cmd, env))
            sides.append((s, lambda c=cmd, e=env: checked(c, e, False, None), scp.restart))
        ref_cmd = f"storescu +sd +r -aet {CALLING_AET} -aec {CALLED_AET} 127.0.0.1 {port} {shlex.quote(str(corpus.path))}"
        s = series[("storescu", 1)] = Series("storescu +sd +r", show(ref_cmd, DCMTK_ENV))
        sides.append((s, lambda: checked(ref_cmd, DCMTK_ENV, False, None), scp.restart))
        # The two trees swap places every round (before-after, after-before, ...), so whatever a
        # run leaves behind for the next one (page cache, CPU clocks, storescp) favours neither.
        pair = 2 * len(jobs)
        for r in range(args.warmup + args.rounds):
            order = list(sides)
            if r % 2:
                order[:pair] = [side for k in range(0, pair, 2) for side in (order[k + 1], order[k])]
            alternate(order, 0 if r < args.warmup else 1, 1 if r < args.warmup else 0)

    print(f"{n} files, {corpus.mb:.0f} MB, {args.rounds} round(s) after {args.warmup} warm-up")
    for s in series.values():
        print(f"  {s.label:<32} median {s.median:7.2f} s  runs {', '.join(f'{x:.2f}' for x in s.seconds)}")
    for j in jobs:
        ratios = [a / b for a, b in zip(series[("after", j)].seconds, series[("before", j)].seconds)]
        print(
            f"  after/before jobs={j}: median {statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})"
        )
    if any(lost):
        print(f"  pynetdicom lost {sum(lost)} response(s) to its reactor thread, per run: {lost}")
    ref = series[("storescu", 1)]
    for key in (("pynetdicom", 1), ("after", 1), ("before", 1)):
        if key in series:
            ratios = [a / b for a, b in zip(series[key].seconds, ref.seconds)]
            print(f"  {series[key].label} / storescu: median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
