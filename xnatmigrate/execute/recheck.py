"""Read again the headers of files about to reach XNAT and compare them with the plan.

A source rewritten after ``plan`` (a PatientID edited in place, an mtime restored with ``touch -r``)
must not reach XNAT under the labels planned from its old header. Each planned file carries the
digest of the header values the plan relied on (``PlannedFile.header_digest``, every keyword the
scan read); this re-reads those keywords from the bytes staged (prearchive) or about to be sent
(C-STORE) and names the first file that no longer gives the planned digest.

Fast path: a file planned with ``head_digest`` (the bytes before its Pixel Data, as the scan read
them) whose first bytes hash to it again holds the very bytes its planned values were parsed from,
so it is not parsed again (a SHA-256 of a few KB instead of a pydicom parse: an X-ray archive's
files are mostly header). Any other outcome, a short read included, falls back to the parse.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..model import CachedHeader, PlannedFile, head_digest, header_digest


def read_header(path: str, keywords: frozenset[str]) -> CachedHeader:
    """The scan's parser (pydicom), imported when a header must be parsed: the fast path needs none."""
    from ..scan import read_header as parse

    return parse(path, keywords)


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
        if f.head_digest and same_head(path, f.head_digest):
            continue
        entry = read_header(path, wanted)
        if entry.header is None:
            out.append(f"{f.source} no longer reads as the DICOM file planned ({entry.reject})")
            continue
        values = {k: v for k, v in entry.header.items() if k in wanted}
        if header_digest(values) != f.header_digest:
            out.append(f"{f.source} has another header than the one planned")
    return out


def same_head(path: str, planned: str) -> bool:
    """Whether the first bytes of ``path`` give the planned ``head_digest`` (False when unsure)."""
    length, _, _ = planned.partition(":")
    try:
        n = int(length)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (ValueError, OSError):
        return False
    try:
        return head_digest(os.pread(fd, n, 0)) == planned
    except OSError:
        return False
    finally:
        os.close(fd)
