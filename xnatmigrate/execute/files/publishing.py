"""Publishing a staged session into XNAT's view with one rename; taking it back out; discarding it.

Invariants:
- A session appears in the visible tree only through one ``rename()`` of a complete, verified, durable
  folder on the same filesystem, and the rename never replaces an existing folder
  (``renameat2(RENAME_NOREPLACE)`` where the filesystem supports it): publishing never merges.
- The renamed entry's folders are fsynced on both sides before ``publish`` / ``unpublish`` return, or,
  for a group (``pending``), by ``fsync_dirs`` before the group's publish records are made.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

from ...errors import ApplyError
from ...model import Outcome
from .disk import DiskError, current_user, disk_full, fsync_dir, libc, mount_point, syncfs
from .paths import prune_staging_parents, require_staging_path


def publish(staging: Path, final: Path, pending: list[Path] | None = None, *, prune: bool = True) -> Outcome:
    """Move a staged session into XNAT's view with one ``rename()``: done, or noop if it is there.

    ``pending``: group commit — the folders to fsync are appended there instead of fsynced now, and
    the caller fsyncs them all (``fsync_dirs``) once the group's renames are done: the first fsync
    commits the journal holding every rename of the group, the others find nothing left to write.

    Folders created above ``final`` get the owner and mode of the staged session folder (so XNAT's user
    can write its session XML next to it and remove the timestamp folder after archiving).

    ``prune=False`` leaves the emptied staging parents (``<timestamp>/<project>``, this session's own)
    for the caller to remove later, off its critical path (``prune_staging_parents``).

    NOTE: never merges: when both folders exist it raises, and the rename itself refuses to replace an
    existing ``final`` (``renameat2(RENAME_NOREPLACE)`` where the filesystem supports it).
    """
    staging, final = Path(staging), Path(final)
    s_there, f_there = staging.is_dir(), os.path.lexists(final)
    if f_there and not s_there:
        return Outcome.NOOP
    if f_there and s_there:
        raise ApplyError(
            f"both staging {staging} and published folder {final} exist; inspect and remove one, then rerun"
        )
    if not s_there:
        raise ApplyError(f"nothing staged at {staging} for {final}; rerun apply to stage it again")
    try:
        like = os.stat(staging)
        created = _makedirs_like(final.parent, like)
        _rename_noreplace(staging, final)
        changed = [final.parent, staging.parent, *(d.parent for d in created)]
        if pending is None:
            fsync_dirs(changed)
        else:
            pending.extend(changed)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ApplyError(
                f"cannot publish {staging} to {final}: not on one filesystem; "
                "point xnat.prearchive at the real mount and rerun"
            ) from exc
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ApplyError(
                f"{final} appeared while publishing {staging}; inspect both and remove one, then rerun"
            ) from exc
        if exc.errno == errno.EROFS:
            raise DiskError(f"{mount_point(final)} is read-only: remount it read-write and rerun") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise DiskError(
                f"{exc.filename or final.parent} is not writable by user {current_user()}: give that user write "
                "access to the prearchive folder (or run apply as XNAT's user) and rerun"
            ) from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(final, str(final), 1 << 20) from exc
        raise ApplyError(
            f"{exc.strerror or exc} while publishing {staging} to {final}: fix it and rerun"
        ) from exc
    if prune:
        prune_staging_parents(staging)
    return Outcome.DONE


#: More distinct folders than this to make durable: one ``syncfs`` instead of a fsync each.
SYNCFS_OVER = 8


def fsync_dirs(dirs: list[Path]) -> None:
    """Make the entries of these folders durable: fsync each once (a folder named twice is fsynced
    once), in the order first named, or, for more than ``SYNCFS_OVER`` folders (a group of X-ray
    sessions: a timestamp folder each), one ``syncfs`` of their filesystem.

    All the folders are on one filesystem (their sessions were renamed between them). A staging folder
    pruned since (emptied by its session's rename) is skipped: the rename that emptied it is in the
    same journal commit as the published side, which is fsynced.
    """
    unique = list(dict.fromkeys(dirs))
    if len(unique) > SYNCFS_OVER:
        for d in unique:
            if os.path.isdir(d):
                syncfs(d)
                return
        return
    for d in unique:
        try:
            fsync_dir(d)
        except FileNotFoundError:
            continue


def discard_staged(staging: Path) -> None:
    """Remove a staged session that must not be published (it is below the staging root, never
    visible to XNAT)."""
    staging = Path(staging)
    require_staging_path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    prune_staging_parents(staging)


def unpublish(final: Path, staging: Path) -> None:
    """Take a published session back out of XNAT's view (one ``rename()`` back into staging).

    For a session whose row could not be written: a folder without a row is invisible to XNAT's UI
    but would be picked up by a restart's ``populateTable`` (xnat-reference.md §1), so it must go.
    """
    staging, final = Path(staging), Path(final)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _rename_noreplace(final, staging)
    fsync_dir(staging.parent)
    fsync_dir(final.parent)
    with contextlib.suppress(OSError):
        final.parent.rmdir()  # the timestamp folder, if the session was its only content


def _makedirs_like(path: Path, like: os.stat_result) -> list[Path]:
    """``makedirs`` giving each new folder the owner and mode of ``like``; returns those created."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        created.append(d)
        os.chmod(d, stat.S_IMODE(like.st_mode))
        st = os.lstat(d)
        if (st.st_uid, st.st_gid) != (like.st_uid, like.st_gid):
            os.chown(d, like.st_uid, like.st_gid)
    return created


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    renameat2 = getattr(libc(), "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this filesystem lacks the flag (e.g. NFS)
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)
