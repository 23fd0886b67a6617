"""Peak RSS of a warm ``plan`` and of ``apply`` (prearchive copy) on the tiny shape, for the xnatmigrate
of a given checkout, so that two versions measure the same plans side by side::

    python -m bench.rss_compare CHECKOUT [SIZES] [--admin-dsn DSN]

``CHECKOUT`` is the directory ``python -m xnatmigrate`` runs from (this repository, or a worktree of
an older commit: ``git worktree add --detach /tmp/old <commit>``); ``SIZES`` the tiny corpora in
files (default 30000,300000). Each apply runs against a fresh database with XNAT's table on the
PostgreSQL server ``--admin-dsn`` names (default the local one). Peak RSS is ``/usr/bin/time``'s
``%M`` of the whole command (KiB), printed in MiB. Not a timed row of ``make bench``: memory only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import corpora
from .site import Site, free_port


def _peak_mib(cmd: list[str], cwd: str, env: dict[str, str]) -> float:
    run = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, env=env, capture_output=True, text=True
    )
    if run.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` exited {run.returncode}: {run.stderr[-800:]}")
    return int(run.stderr.strip().splitlines()[-1]) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout")
    ap.add_argument("sizes", nargs="?", default="30000,300000")
    ap.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--work", default="/tmp/xnatmigrate-rss")
    args = ap.parse_args(argv)
    if shutil.which("/usr/bin/time") is None:
        raise SystemExit("/usr/bin/time is missing: apt-get install time")
    for n in (int(s) for s in args.sizes.split(",")):
        corpus = corpora.ensure(corpora.bench_dir(None), n, shape="tiny")
        site = Site(Path(args.work) / f"site-{n}", corpus, args.admin_dsn, free_port())
        try:
            snap = site.make_plan("copy")  # its scan cache makes the measured plan warm
            env = {**os.environ, **site.env}
            py = [sys.executable, "-m", "xnatmigrate"]
            warm = site.root / "plan-warm"
            shutil.copytree(snap, warm)
            plan_mib = _peak_mib(
                [*py, "plan", str(site.manifests["copy"]), "--state-dir", str(warm)], args.checkout, env
            )
            site.reset_target()
            site.restore(snap, site.root / "applied")
            apply_mib = _peak_mib(
                [*py, "apply", "--state-dir", str(site.root / "applied")], args.checkout, env
            )
            print(
                f"{args.checkout} tiny {n:,} files: plan (warm) {plan_mib:.0f} MiB, apply {apply_mib:.0f} MiB",
                flush=True,
            )
        finally:
            site.close(args.admin_dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
