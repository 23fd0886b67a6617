"""The reference header scan: a bare single-process pydicom loop (``python -m bench.pydicom_loop DIR``).

What a user would write instead of ``xnatmigrate plan``: walk, ``dcmread(stop_before_pixels=True)``,
collect the StudyInstanceUID. Prints the number of files and of studies.
"""

from __future__ import annotations

import os
import sys

import pydicom


def main(argv: list[str]) -> int:
    studies: set[str] = set()
    files = 0
    for dirpath, _, names in os.walk(argv[0]):
        for name in names:
            ds = pydicom.dcmread(os.path.join(dirpath, name), stop_before_pixels=True)
            studies.add(str(ds.StudyInstanceUID))
            files += 1
    print(files, len(studies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
