"""Read again the headers of files about to reach XNAT and compare them with the plan.

A source rewritten after ``plan`` (a PatientID edited in place, an mtime restored with ``touch -r``)
must not reach XNAT under the labels planned from its old header. Each planned file carries the
digest of the header values the plan relied on (``PlannedFile.header_digest``, every keyword the
scan read); this re-reads those keywords from the bytes staged (prearchive) or about to be sent
(C-STORE) and names the first file that no longer gives the planned digest.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..model import PlannedFile, header_digest
from ..scan import read_header


def changed(files: Iterable[tuple[PlannedFile, str]], keywords: Iterable[str]) -> list[str]:
    """For (planned file, path to read) pairs: why each file whose header differs from the plan does.

    Files planned without a digest (hand-made sessions), or a plan without its scan keywords, are
    not checked.
    """
    wanted = frozenset(keywords)
    if not wanted:
        return []
    out = []
    for f, path in files:
        if not f.header_digest:
            continue
        entry = read_header(path, wanted)
        if entry.header is None:
            out.append(f"{f.source} no longer reads as the DICOM file planned ({entry.reject})")
            continue
        values = {k: v for k, v in entry.header.items() if k in wanted}
        if header_digest(values) != f.header_digest:
            out.append(f"{f.source} has another header than the one planned")
    return out
