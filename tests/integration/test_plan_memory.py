"""What planning holds per file (issue 13): the growth of the traced peak between two sizes of the
bench's tiny shape, so that a structure added per file (or a dict per header again) shows up.

tracemalloc counts Python allocations only, the same ones on every run of one interpreter: the
figure is deterministic up to a few bytes per file, unlike RSS. The scan reads in this process
(``jobs=1``), offline. On CPython 3.11, 500 → 2,000 files: cold 993 and warm 953 bytes per file with a
dict per header, 820 and 744 with ``HeaderValues`` and the worker entries' paths and ints shared;
52 and 31 once the scan's files are in its on-disk working set, the planner reads them a study at a
time and spools each session to a file (what is left grows per study and per session: a study's
summary, a session without its files, a spooled line's offset). A path alone costs more than 100.
"""

from __future__ import annotations

import functools
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from xnatmigrate import api, labels, state
from xnatmigrate.scan import sources, workset
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

pytestmark = pytest.mark.slow

# Traced peak growth per planned file, cold and warm (bytes): anything held per file (a path, a
# header, a planned file) fails it (see the module docstring).
PER_FILE_BOUND = 150


def _manifest(root: Path, corpus: Path) -> Path:
    (root / "prearchive").mkdir(exist_ok=True)
    m = root / f"{corpus.name}.yaml"
    m.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {root / "prearchive"}
              database: {{dsn_env: XNATMIGRATE_MEMORY_TEST_DSN}}
            defaults:
              method: prearchive
              transfer: copy
              build: none
            sources:
              - source: {corpus}
                project: bench
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
    )
    return m


def _peaks(root: Path, patients: int) -> tuple[int, int, int]:
    """(files, traced peak of a cold plan, of a warm re-plan) of ``patients`` tiny-shape studies."""
    corpus = root / f"corpus-{patients}"
    spec = CorpusSpec(
        patients=patients,
        studies_per_patient=1,
        series_per_study=2,
        images_per_series=25,
        modalities=("MR", "CT"),
        rows=32,
        seed=15,
    )
    files = len(build_corpus(corpus, spec))
    m, state = _manifest(root, corpus), root / f"state-{patients}"
    peaks = []
    for _ in ("cold", "warm"):
        tracemalloc.start()
        try:
            api.plan(m, state_dir=state, offline=True, jobs=1)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return files, peaks[0], peaks[1]


def test_planning_holds_less_than_the_bound_per_file_cold_and_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scan cache is read in batches of this many rows; a batch's rows and text are transient,
    # bounded by the batch at any real size but all of the cache at these: the batch is made
    # smaller than both sizes so that the slope is what every further file costs.
    monkeypatch.setattr(state, "_CACHE_BATCH", 64)
    # The same for the scan's batches and its working set's reads (issue 13).
    monkeypatch.setattr(sources, "BATCH", 64)
    monkeypatch.setattr(workset, "_FETCH", 64)
    # And the bounded memo of the file names' hash operands (4,096 entries, one per file for the
    # per-file operand): it fills up between these sizes and would read as growth per file.
    monkeypatch.setattr(labels, "_java_hash", functools.lru_cache(maxsize=64)(labels.java_string_hash))
    _peaks(tmp_path, 1)  # imports, first-call caches
    n1, cold1, warm1 = _peaks(tmp_path, 10)
    n2, cold2, warm2 = _peaks(tmp_path, 40)
    assert (n1, n2) == (500, 2000)
    cold, warm = (cold2 - cold1) / (n2 - n1), (warm2 - warm1) / (n2 - n1)
    assert cold < PER_FILE_BOUND, f"a cold plan holds {cold:.0f} bytes per file (bound {PER_FILE_BOUND})"
    assert warm < PER_FILE_BOUND, f"a warm re-plan holds {warm:.0f} bytes per file (bound {PER_FILE_BOUND})"
