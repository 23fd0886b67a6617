"""The prearchive's filesystem: free space, mounts, fsync, libc, and the one-line wording of its errors.

Invariants:
- A full, read-only or unwritable prearchive filesystem is a ``DiskError`` (fatal: the apply run
  stops rather than fail every later session); every message is one line: what happened, what to do.
- OSErrors of the staging workers travel as ``SourceError`` / ``DestError`` and are worded in the
  caller's thread (``source_error`` / ``dest_error``), where free space is read when it is needed.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import pwd
from collections.abc import Iterable
from pathlib import Path

from ...errors import ApplyError, StalePlanError, XnatMigrateError
from ...model import InboxSession, PlannedFile, PrearchiveSession
from .paths import describe


class DiskError(ApplyError):
    """The prearchive's filesystem is full, read-only or not writable: every later session would fail too
    (the apply loop stops the run on it: ``execute.apply._FATAL``)."""


def existing(path: str | os.PathLike[str]) -> Path:
    """The path itself or its nearest existing ancestor (statvfs/stat need something that exists)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its ancestor)."""
    st = os.statvfs(existing(path))
    return st.f_bavail * st.f_frsize


def same_filesystem(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` (or their nearest existing ancestors) are on one device."""
    return os.stat(existing(a)).st_dev == os.stat(existing(b)).st_dev


def mount_point(path: str | os.PathLike[str]) -> str:
    p = existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Make everything written to the filesystem holding ``path`` durable: data, and metadata too
    (new folders, renames), which is why after it no folder needs its own fsync.

    ``syncfs(2)``: ext4 and XFS end it with a journal/log commit, so every directory entry changed
    before the call is on disk when it returns. Raises OSError (EIO: a writeback failed).
    NOTE: it also flushes other writers' dirty data on that filesystem (XNAT's, say).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = getattr(libc(), "syncfs", None)
        if fn is None:  # pragma: no cover - glibc has had syncfs since 2.14
            os.sync()
            return
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


_LIBC: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


class SourceError(Exception):
    """A source-side OSError, carried to the main thread to be worded there."""

    def __init__(self, exc: OSError, path: str) -> None:
        super().__init__(str(exc))
        self.exc, self.path = exc, path


class DestError(Exception):
    """A staging-side OSError, carried to the main thread to be worded there (free space is read then)."""

    def __init__(self, exc: OSError, path: str) -> None:
        super().__init__(str(exc))
        self.exc, self.path = exc, path


def bytes_needed(staging: Path, files: Iterable[PlannedFile]) -> int:
    block = os.statvfs(existing(staging)).f_frsize or 4096
    return sum(math.ceil(f.size / block) * block + block for f in files)


# --------------------------------------------------------------------------------------------
# Error wording (one line: what happened, what to do)
# --------------------------------------------------------------------------------------------


def disk_full(staging: Path, what: str, missing: int) -> DiskError:
    mb = max(1, math.ceil(missing / 1_000_000))
    return DiskError(
        f"disk full on {mount_point(staging)} while staging {what}: free at least {mb} MB and rerun; "
        "staged files are kept for resume"
    )


def dest_error(
    exc: OSError,
    path: str,
    session: PrearchiveSession | InboxSession,
    staging: Path,
    left: Iterable[PlannedFile],
) -> XnatMigrateError:
    what = describe(session)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        missing = bytes_needed(staging, left) - free_bytes(staging)
        return disk_full(staging, what, missing)
    if exc.errno == errno.EROFS:
        return DiskError(
            f"{mount_point(staging)} is read-only while staging {what}: remount it read-write and rerun"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DiskError(
            f"{path} is not writable by user {current_user()} ({exc.strerror}) while staging {what}: "
            "give that user write access to the prearchive folder (or run apply as XNAT's user) and rerun"
        )
    if exc.errno == errno.EXDEV:
        return ApplyError(
            f"cannot hard-link {what}: sources and prearchive are on different filesystems; "
            "use transfer: copy for this source and re-run xnatmigrate plan"
        )
    return ApplyError(
        f"{exc.strerror or exc} on {path} while staging {what}: fix the cause and rerun; "
        "staged files are kept for resume"
    )


def source_error(exc: OSError, path: str) -> XnatMigrateError:
    if isinstance(exc, FileNotFoundError):
        return StalePlanError(f"source {path} has vanished since planning; re-run xnatmigrate plan")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ApplyError(
            f"cannot read source {path}: permission denied for user {current_user()}; "
            "grant read access (or exclude it and re-run xnatmigrate plan)"
        )
    return ApplyError(f"{exc.strerror or exc} reading source {path}: check the source disk and rerun")
