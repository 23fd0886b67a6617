"""``plan`` on a filesystem that fills up under its scratch files: one line, no plan, and the next
plan where there is room is the plan it would have been (issue 13: the scan's working set and the
spooled sessions are written beside the state)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from xnatmigrate import api
from xnatmigrate.errors import PlanError
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus


@pytest.fixture
def small_fs(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A 600 KB tmpfs: room for the state, not for 2,000 files' scratch."""
    return mount_tmpfs("600k")


def _manifest(root: Path) -> Path:
    corpus = root / "corpus"
    spec = CorpusSpec(
        patients=40, studies_per_patient=1, series_per_study=2, images_per_series=25, rows=8, seed=15
    )
    build_corpus(corpus, spec)
    (root / "prearchive").mkdir()
    m = root / "m.yaml"
    m.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {root / "prearchive"}
              database: {{dsn: "postgresql://127.0.0.1/unused"}}
            defaults: {{method: prearchive, transfer: copy, build: none}}
            sources:
              - source: {corpus}
                project: p
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
    )
    return m


def test_a_full_disk_under_the_scratch_files_is_one_line_and_leaves_no_plan(
    small_fs: Path, tmp_path: Path
) -> None:
    m = _manifest(tmp_path)
    state = small_fs / "state"
    with pytest.raises(PlanError) as ei:
        api.plan(m, state_dir=state, offline=True, jobs=1)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"plan could not write its files in {state} (database or disk is full): free space")
    # No plan, and no scratch file left behind: only the ledger (its scan cache).
    assert sorted(p.name for p in state.iterdir()) == ["state.db"]
    # Where there is room, the same manifest plans whole.
    done = api.plan(m, state_dir=tmp_path / "roomy", offline=True, jobs=1)
    assert sum(s.file_count for s in done.plan.sessions) == 2000 and not done.plan.rejected
