"""SHA-256 of files, and a published session checked against the digests recorded at apply.

Invariants:
- Read-only: files are only opened ``O_RDONLY`` (or ``stat``-ed) here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

# 1 MiB: a typical DICOM file (100 KB–1 MB) is read in one call, and the chunk still stays mostly in
# L2 between read, hash and write; larger buffers measured no faster.
BUFFER_SIZE = 1 << 20


def hash_fd(fd: int, buf: bytearray, offset: int | None = None) -> tuple[str, int]:
    """SHA-256 and length of everything readable from ``fd`` (from ``offset`` with pread, else read)."""
    mv = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    while True:
        n = os.readv(fd, [mv]) if offset is None else os.preadv(fd, [mv], offset + total)
        if not n:
            return h.hexdigest(), total
        h.update(mv[:n])
        total += n


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's content."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, bytearray(BUFFER_SIZE))[0]
    finally:
        os.close(fd)


def recorded_differences(
    base: Path, recorded: Mapping[str, tuple[str, int, str]], *, quick: bool = False
) -> Iterator[tuple[Path, str, str]]:
    """Each recorded file (dest → (source, size, sha256)) that differs on disk under ``base``.

    Yields (path, kind, message) with kind ``missing``, ``unreadable``, ``size`` or ``sha256``;
    ``quick`` compares sizes only. Used by verify (reports all) and revert (refuses on change).
    """
    for dest, (_source, size, sha) in sorted(recorded.items()):
        path = Path(base) / dest
        try:
            st = path.stat()
        except FileNotFoundError:
            yield path, "missing", f"missing: {path}"
            continue
        except OSError as exc:
            yield path, "unreadable", f"unreadable ({exc.strerror}): {path}"
            continue
        if st.st_size != size:
            yield path, "size", f"size {st.st_size} != recorded {size}: {path}"
        elif not quick and sha256_file(path) != sha:
            yield path, "sha256", f"SHA-256 differs from the one recorded at apply: {path}"
