"""The golden plan: one manifest over one generated corpus, planned offline at a fixed time.

``test_golden_plan_and_sql`` (tests/integration/test_plan.py) compares ``render(workdir)`` with the
files in tests/golden/ and never writes them. Regenerating is this separate, deliberate command:

    make golden            # or: python -m tests.golden_regen

which writes the very texts the test compares; review the diff before committing it.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path

from xnatmigrate import api
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

GOLDEN = Path(__file__).resolve().parent / "golden"
NOW = datetime(2024, 2, 29, 23, 59, 59, 999000)
SPEC = CorpusSpec(
    patients=2,
    studies_per_patient=2,
    series_per_study=2,
    images_per_series=2,
    rows=8,
    seed=11,
    nuisances=True,
)


def manifest_for(tmp_path: Path, source: Path, extra: str = "", **opts: str) -> Path:
    lines = "\n".join(f"  {k}: {v}" for k, v in opts.items())
    m = tmp_path / "manifest.yaml"
    m.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {tmp_path / "prearchive"}
              prearchive_url_root: /data/xnat/prearchive
              database: {{dsn_env: XNATMIGRATE_TEST_PLAN_DSN}}
              timezone: Europe/Berlin
            defaults:
              build: none
            """
        )
        + (lines + "\n" if lines else "")
        + textwrap.dedent(
            f"""\
            sources:
              - source: {source}
                project: prj001
                subject: "{{{{ PatientName }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}_{{{{ Modality }}}}"
            """
        )
        + extra
    )
    (tmp_path / "prearchive").mkdir(exist_ok=True)
    return m


def build_golden_corpus(tmp_path: Path) -> Path:
    build_corpus(tmp_path / "legacy", SPEC)
    return tmp_path / "legacy"


def normalise(text: str, tmp_path: Path) -> str:
    """Remove what differs between runs: the working folder, mtimes, digests and the plan id."""
    text = text.replace(str(tmp_path), "<tmp>")
    text = re.sub(r'"mtime_ns": \d+', '"mtime_ns": 0', text)
    text = re.sub(r'"ctime_ns": \d+', '"ctime_ns": 0', text)
    text = re.sub(r'"ino": \d+', '"ino": 0', text)
    text = re.sub(r"sha256 [0-9a-f]{64}", "sha256 <digest>", text)
    text = re.sub(r'"manifest_digest": "[0-9a-f]{64}"', '"manifest_digest": "<digest>"', text)
    text = re.sub(r"plan [0-9a-f]{64}", "plan <id>", text)
    return re.sub(r'"plan_id": "[0-9a-f]{64}"', '"plan_id": "<id>"', text)


def render(workdir: Path) -> dict[str, str]:
    """File name in tests/golden/ → its expected text, planned from scratch in the empty ``workdir``."""
    m = manifest_for(workdir, build_golden_corpus(workdir))
    out = api.plan(m, state_dir=workdir / "state", offline=True, now=NOW)
    plan = json.dumps(json.loads(out.plan_path.read_text()), indent=1, sort_keys=True)
    return {
        "plan.json": normalise(plan, workdir) + "\n",
        "plan.sql": normalise(out.sql_path.read_text(), workdir),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xnatmigrate-golden-") as tmp:
        texts = render(Path(tmp))
    GOLDEN.mkdir(exist_ok=True)
    for name, text in texts.items():
        path = GOLDEN / name
        old = path.read_bytes() if path.exists() else None
        path.write_bytes(text.encode())
        print(f"{path}: {'unchanged' if old == text.encode() else 'rewritten'}")
    print("review with: git diff -- tests/golden")
    return 0


if __name__ == "__main__":
    sys.exit(main())
