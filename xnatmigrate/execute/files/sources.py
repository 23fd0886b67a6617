"""Whether each source is still the file planned: size, mtime, inode, and ctime unless hard-linked.

Invariants:
- Read-only: sources are only ``stat``-ed here.
- Any difference is a ``StalePlanError`` naming the first culprit (a re-plan is the fix); a source that
  cannot be ``stat``-ed for lack of permission is an ``ApplyError`` naming the user.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ...errors import ApplyError, StalePlanError
from ...model import InboxSession, PlannedFile, PlannedSession, PrearchiveSession, Transfer
from .disk import current_user


def check_sources(session: PlannedSession) -> None:
    """Every source is still the file planned; else StalePlanError naming the first culprit.

    NOTE: with hard links the ctime is not compared: linking (by this run or a crashed one) changes
    the source's own ctime. Its inode, size and mtime still are, and its header (apply re-reads it).
    """
    hardlinked = (
        isinstance(session, (PrearchiveSession, InboxSession)) and session.transfer is Transfer.HARDLINK
    )
    check_sources_of(session.files, ctime=not hardlinked)


def check_sources_of(files: Iterable[PlannedFile], *, ctime: bool = True) -> None:
    """``check_sources`` for any list of planned files (C-STORE resumes send a subset)."""
    bad: list[str] = []
    for f in files:
        try:
            st = os.stat(f.source)
        except FileNotFoundError:
            bad.append(f"{f.source} has vanished")
            continue
        except PermissionError as exc:
            raise ApplyError(
                f"cannot stat source {f.source} ({exc.strerror}) as user {current_user()}: "
                "grant read access to the source folders and rerun"
            ) from exc
        why = _stale(f, st, ctime)
        if why:
            bad.append(why)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        hint = (
            " (or, on a host that mounts the sources elsewhere than the planning host, map them with "
            "apply --path-map FROM=TO)"
            if "has vanished" in bad[0]
            else ""
        )
        raise StalePlanError(f"source {bad[0]} since planning{more}; re-run xnatmigrate plan{hint}")


def _changed(f: PlannedFile, size: int, mtime_ns: int) -> str:
    if size != f.size:
        return f"{f.source} changed size ({f.size} → {size} bytes)"
    return f"{f.source} was modified (mtime {f.mtime_ns} → {mtime_ns} ns)"


def _stale(f: PlannedFile, st: os.stat_result, ctime: bool) -> str | None:
    """Why ``st`` is not the file planned as ``f`` (size, mtime, inode, and ctime unless hard-linked)."""
    if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
        return _changed(f, st.st_size, st.st_mtime_ns)
    if f.ino != -1 and st.st_ino != f.ino:
        return f"{f.source} was replaced by another file (inode {f.ino} → {st.st_ino})"
    if ctime and f.ctime_ns != -1 and st.st_ctime_ns != f.ctime_ns:
        return f"{f.source} changed since the plan (its ctime moved: rewritten in place, or its metadata changed)"
    return None


def check_stat(f: PlannedFile, st: os.stat_result, ctime: bool = True) -> None:
    why = _stale(f, st, ctime)
    if why:
        raise StalePlanError(f"source {why} since planning; re-run xnatmigrate plan")
