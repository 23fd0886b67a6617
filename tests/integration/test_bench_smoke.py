"""The benchmark harness cannot rot: ``python -m bench.run --smoke`` runs every comparison once.

Asserts only that each comparison ran and produced numbers, never a timing (issue 7).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DCMTK = all(shutil.which(t) for t in ("storescu", "storescp", "dcmdump"))
TIMED = ["plan-cold", "plan-warm", "apply-copy", "apply-hardlink", "reapply"]
DCMTK_ROWS = ["plan-cold-dcmtk", "cstore-best", "cstore-one", "cstore-recipe", "cstore-pynetdicom"]


@pytest.mark.slow
def test_bench_smoke_runs_every_comparison(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    for key in TIMED + (DCMTK_ROWS if DCMTK else []):
        row = rows[key]
        assert not row["skipped"], (key, row["skipped"])
        assert row["ours"]["seconds"] and all(s > 0 for s in row["ours"]["seconds"]), key
        if key != "reapply":
            assert row["ref"]["seconds"] and row["ratio"] is not None and row["ratio"] > 0, key
    assert rows["reapply"]["extra"]["rchar"] > 0
    if not DCMTK:
        for key in DCMTK_ROWS[1:]:
            assert rows[key]["skipped"].startswith("dcmtk not installed"), key
    text = out.read_text()
    assert "| 1 | plan, cold, vs pydicom loop |" in text and "## Commands" in text
