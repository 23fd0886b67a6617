"""Profile ``apply`` (copy) on the xray shape in process under cProfile (bench/notes.md, issue 13).

N=2000 python -m bench.profile_apply      # the first N/4 studies of the xray corpus
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from pathlib import Path

from xnatmigrate import api
from xnatmigrate.testing.pg import EmbeddedPostgres

from . import corpora
from .site import Site, free_port


def main() -> None:
    n = int(os.environ.get("N", "2000"))
    root = Path(os.environ.get("WORK", "/tmp/xnatmigrate-profile"))
    corpus = corpora.ensure(corpora.bench_dir(None), n, shape="xray")
    with EmbeddedPostgres() as pg:
        site = Site(root, corpus, pg.dsn, free_port())
        os.environ.update(site.env)
        snap = site.make_plan("copy")
        state = root / "state"
        site.restore(snap, state)
        prof = cProfile.Profile()
        started = time.monotonic()
        prof.enable()
        report = api.apply(state_dir=state)
        prof.disable()
        print(
            f"apply of {n} files: {time.monotonic() - started:.2f} s under cProfile, {len(report.failures)} failed"
        )
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(35)
        stats.sort_stats("tottime").print_stats(20)
        site.close(pg.dsn)


if __name__ == "__main__":
    main()
