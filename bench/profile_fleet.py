"""Where the fleet row's wall time goes: N workers on one plan, each with a timeline of its phases.

    python -m bench.profile_fleet N [--files 2000] [--unit-files 100] [--delay-ms 20]

The fleet row's set-up (``bench/rows_fleet.py``: the fleet corpus, an embedded PostgreSQL, the delayed
receiver, one plan), but each worker runs as ``python -m bench.profile_fleet --worker apply …``: the
same ``xnatmigrate apply``, with ``execute.fleet``'s phases and Procrastinate's job manager calls
wrapped to write a timestamp at their start and end (nothing else changes). Prints each worker's
timeline in seconds after the first fork: imports done, queueing (``_prepare``), each unit, the
polls while other workers' units run (``_left`` … ``_take_over``), the summary, ``atexit``, the reap.
The notes' fleet figures were taken with it (``XNATMIGRATE_LEASE_S`` in the environment is passed on:
its poll is lease ÷ 10, at most 1 s).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _worker(argv: list[str]) -> int:
    log = open(os.path.join(os.environ["FLEET_PROFILE_DIR"], f"{os.getpid()}.jsonl"), "w")  # noqa: SIM115

    def mark(what: str) -> None:
        log.write(json.dumps({"t": time.time(), "what": what}) + "\n")
        log.flush()

    mark("python started")
    from procrastinate import manager as pmanager

    from xnatmigrate import cli
    from xnatmigrate.execute import fleet

    mark("imported")

    def wrap(owner: Any, name: str) -> None:
        fn = getattr(owner, name)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def a(*args: Any, **kw: Any) -> Any:
                mark(f"{name} start")
                try:
                    return await fn(*args, **kw)
                finally:
                    mark(f"{name} end")

            setattr(owner, name, a)
        else:

            @functools.wraps(fn)
            def s(*args: Any, **kw: Any) -> Any:
                mark(f"{name} start")
                try:
                    return fn(*args, **kw)
                finally:
                    mark(f"{name} end")

            setattr(owner, name, s)

    for name in ("_prepare", "_take_over", "_left", "_summary", "_unit"):
        wrap(fleet._Fleet, name)
    for name in ("fetch_job", "finish_job", "register_worker"):
        wrap(pmanager.JobManager, name)
    import atexit

    atexit.register(lambda: mark("atexit"))
    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        return _worker(args[1:])
    ap = argparse.ArgumentParser(
        prog="python -m bench.profile_fleet", description=(__doc__ or "").splitlines()[0]
    )
    ap.add_argument("workers", type=int)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--unit-files", type=int, default=100)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--corpus-dir", default=None)
    ns = ap.parse_args(args)

    from xnatmigrate.testing.pg import EmbeddedPostgres

    from . import corpora
    from .common import PYTHON
    from .rows_fleet import DelayedSCP, _units, run_all, split, state_url
    from .site import Site, free_port

    corpus = corpora.ensure(corpora.bench_dir(ns.corpus_dir), ns.files, shape="fleet")
    with tempfile.TemporaryDirectory(prefix="fleet-profile-") as tmp, EmbeddedPostgres() as pg:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        site = Site(Path(tmp) / "site", corpus, pg.dsn, free_port())
        try:
            url = state_url(site.dsn, "fleet_profile")
            site.xnatmigrate([*site.plan_cmd("cstore", site.root / "plan"), "--state-url", url])
            cmds = [
                [
                    PYTHON,
                    "-m",
                    "bench.profile_fleet",
                    "--worker",
                    "apply",
                    "--state-dir",
                    str(site.root / f"host{i}"),
                ]
                + ["--state-url", url, "--jobs", "1"]
                for i in range(ns.workers)
            ]
            env = {**site.env, "XNATMIGRATE_UNIT_FILES": str(ns.unit_files), "FLEET_PROFILE_DIR": str(logs)}
            with DelayedSCP(site.port, ns.delay_ms / 1000) as scp:
                got = run_all(cmds, env)
            print(f"wall {got.seconds:.2f} s; at most {scp.tally.max_open} association(s) at once")
            print(json.dumps(split(got, _units(site.dsn, "fleet_profile")), indent=1))
            for pid, reaped in zip(got.pids, got.exits):
                print(f"-- worker pid {pid}")
                units = 0
                for line in (logs / f"{pid}.jsonl").read_text().splitlines():
                    ev = json.loads(line)
                    units += ev["what"] == "_unit start"
                    if ev["what"] in (
                        "fetch_job start",
                        "fetch_job end",
                        "finish_job start",
                        "finish_job end",
                    ):
                        continue
                    print(f"  {ev['t'] - got.started_epoch:8.3f}  {ev['what']}")
                print(f"  {reaped:8.3f}  reaped ({units} units)")
        finally:
            site.close(pg.dsn)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
