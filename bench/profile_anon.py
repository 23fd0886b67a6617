"""Profile the anonymisation of one file (anonymize.edit_bytes) on the standard 10,000 corpus (bench/notes.md).

python -m bench.profile_anon
"""

from __future__ import annotations

import cProfile
import hashlib
import pstats
import time

from xnatmigrate import anonymize
from xnatmigrate.model import PlannedScript

from . import corpora
from .site import ANON_SCRIPT


def main() -> None:
    corpus = corpora.ensure(corpora.bench_dir(None), 10_000)
    files = sorted(corpus.path.rglob("*.dcm"))[:500]
    datas = [f.read_bytes() for f in files]
    script = PlannedScript("site.das", hashlib.sha256(ANON_SCRIPT.encode()).hexdigest(), ANON_SCRIPT)
    chain = anonymize.chain_of(["site.das"], {"site.das": script})
    labels = anonymize.variables("bench", "S", "S_1")
    started = time.perf_counter()
    for data in datas:
        anonymize.edit_bytes(chain, data, labels, None, "f")
    print(f"edit_bytes: {(time.perf_counter() - started) / len(datas) * 1000:.2f} ms per file")
    prof = cProfile.Profile()
    prof.enable()
    for data in datas[:200]:
        anonymize.edit_bytes(chain, data, labels, None, "f")
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
