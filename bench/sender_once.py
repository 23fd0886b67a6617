"""One timed ``send_files`` call of whichever xnatmigrate is first on PYTHONPATH (for ``sender_compare``).

    PYTHONSAFEPATH=1 PYTHONPATH=TREE python bench/sender_once.py FILES.json HOST PORT JOBS

Run as a script path, not ``-m bench.…``, so an older tree without this file can be measured too;
PYTHONSAFEPATH keeps bench/ itself off ``sys.path`` (its ``site.py`` and ``common.py`` would shadow).
Prints ``<seconds of send_files> <files confirmed> <path of the xnatmigrate package used>``.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    import xnatmigrate
    from xnatmigrate.execute import dicom
    from xnatmigrate.model import PlannedFile, PresentationContext, ScpTarget

    listing, host, port, jobs = argv[0], argv[1], int(argv[2]), int(argv[3])
    with open(listing) as f:
        rows = json.load(f)
    files = [
        PlannedFile(r["path"], r["size"], 0, r["sop_instance"], r["sop_class"], r["ts"], "") for r in rows
    ]
    pairs: dict[str, set[str]] = {}
    for p in files:
        pairs.setdefault(p.sop_class_uid, set()).add(p.transfer_syntax)
    contexts = [PresentationContext(sop, tuple(sorted(ts))) for sop, ts in sorted(pairs.items())]
    line = "Project: bench Subject: S Session: S_1"
    t0 = time.perf_counter()
    outcome = dicom.send_files(
        files,
        ScpTarget(host, port, "XNAT", "XNATMIGRATE"),
        routing="patient_comments",
        line=line,
        contexts=contexts,
        jobs=jobs,
    )
    seconds = time.perf_counter() - t0
    print(f"{seconds:.4f} {len(outcome.confirmed)} {xnatmigrate.__file__}")
    return 0 if not outcome.failures else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
