"""The benchmark harness cannot rot: ``python -m bench.run --smoke`` runs every comparison once,
every archive shape of issue 13 (xray, huge, tiny) on a few dozen files, and the fleet row of issue 16
with 1 and 2 workers.

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
DCMTK_ROWS = [
    "plan-cold-dcmtk",
    "cstore-best",
    "cstore-one",
    "cstore-recipe",
    "cstore-pynetdicom",
    "cstore-anon",
]
# Issue 13's shapes; tiny-plan-cold has no reference (it measures peak RSS).
SHAPE_TIMED = ["xray-apply-copy", "huge-apply-copy", "tiny-plan-warm", "tiny-apply-copy"]
SHAPE_DCMTK = ["xray-cstore", "huge-cstore"]


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
    for key in TIMED + SHAPE_TIMED + (DCMTK_ROWS + SHAPE_DCMTK if DCMTK else []):
        row = rows[key]
        assert not row["skipped"], (key, row["skipped"])
        assert row["ours"]["seconds"] and all(s > 0 for s in row["ours"]["seconds"]), key
        if key not in ("reapply", "tiny-plan-cold"):
            assert row["ref"]["seconds"] and row["ratio"] is not None and row["ratio"] > 0, key
    assert rows["reapply"]["extra"]["rchar"] > 0
    assert rows["tiny-plan-cold"]["ours"]["maxrss_mib"] > 0
    assert sorted(r["size"] for r in data["rows"] if r["key"] == "tiny-apply-copy") == [20, 60]
    assert "ms_per_session" in rows["xray-apply-copy"]["extra"]
    if not DCMTK:
        for key in DCMTK_ROWS[1:]:
            assert rows[key]["skipped"].startswith("dcmtk not installed"), key
        for key in SHAPE_DCMTK:
            assert rows[key]["skipped"].startswith("dcmtk not installed"), key
    for key, workers in (("fleet-1", 1), ("fleet-2", 2)):  # no dcmtk: its receiver is bench's own
        row = rows[key]
        assert not row["skipped"], (key, row["skipped"])
        assert row["ours"]["seconds"] and all(s > 0 for s in row["ours"]["seconds"]), key
        assert 1 <= row["extra"]["max_associations"] <= workers, key
        assert row["extra"]["stores_by_run"] == [40], key
    assert rows["fleet-2"]["ratio"] > 0 and rows["fleet-2"]["extra"]["speedup"] > 0
    text = out.read_text()
    assert "| 1 | plan, cold, vs pydicom loop |" in text and "## Commands" in text
    for section in ("### xray", "### huge", "### tiny", "### fleet"):
        assert section in text, section
    assert "| peak RSS of plan (cold), 60 vs 20 tiny files |" in text
    assert "| warm re-plan 100,000 files (tiny shape, unchanged tree) |" in text
