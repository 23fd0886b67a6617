"""Warm re-plans of an unchanged tiny-shape tree by two (or more) checkouts, alternating, so that a
change's cost is measured beside the code before it on the same machine in the same minutes::

    python -m bench.replan_compare CHECKOUT [CHECKOUT …] [--size 30000] [--rounds 3]

Each ``CHECKOUT`` is a directory ``python -m xnatmigrate`` runs from (this repository, or a worktree
of an older commit: ``git worktree add --detach /tmp/old <commit>``). Each gets its own site (a fresh
database with XNAT's table on ``--admin-dsn``) and state, planned once cold; then the warm plans run
in turns, one per checkout per round. Prints the wall times, their median and the peak RSS
(``/usr/bin/time``). Not a row of ``make bench``: an A/B for the notes (bench/notes.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from . import corpora
from .site import Site, free_port


def _timed(cmd: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``cmd``."""
    run = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", *cmd], cwd=cwd, env=env, capture_output=True, text=True
    )
    if run.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` exited {run.returncode}: {run.stderr[-800:]}")
    secs, kib = run.stderr.strip().splitlines()[-1].split()
    return float(secs), int(kib) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="+")
    ap.add_argument("--size", type=int, default=30_000, help="tiny corpus, files")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--work", default="/tmp/xnatmigrate-replan")
    args = ap.parse_args(argv)
    corpus = corpora.ensure(corpora.bench_dir(None), args.size, shape="tiny")
    sites: list[tuple[str, Site, list[str], dict[str, str]]] = []
    try:
        for i, checkout in enumerate(args.checkouts):
            site = Site(Path(args.work) / f"site-{i}", corpus, args.admin_dsn, free_port())
            env = {**os.environ, **site.env}
            state = site.root / "state"
            cmd = [
                sys.executable,
                "-m",
                "xnatmigrate",
                "plan",
                str(site.manifests["copy"]),
                "--state-dir",
                str(state),
            ]
            _timed(cmd, checkout, env)  # cold: fills the scan cache
            sites.append((checkout, site, cmd, env))
        runs: dict[str, list[tuple[float, float]]] = {c: [] for c in args.checkouts}
        for _ in range(args.rounds):
            for checkout, _site, cmd, env in sites:
                runs[checkout].append(_timed(cmd, checkout, env))
        for checkout, got in runs.items():
            secs = [s for s, _ in got]
            print(
                f"{checkout}: warm re-plan of {args.size:,} files {secs} s, median "
                f"{statistics.median(secs):.2f} s, peak RSS {max(m for _, m in got):.0f} MiB",
                flush=True,
            )
    finally:
        for _, site, _, _ in sites:
            site.close(args.admin_dsn)
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
