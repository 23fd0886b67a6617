"""Where a session is staged and where it is published; which planned destinations are safe.

Layout (xnat-reference.md §2, §7):

    <root>/.xnatmigrate-staging/<timestamp>/<project or _unassigned>/<session>/SCANS/<scan>/DICOM/<name>
    <root>/<project>/<timestamp>/<session>/...      after ``publish`` (``<root>/<timestamp>/...`` Unassigned)

Invariants:
- Nothing is ever written below a name XNAT's trawler reads: the staging root's name contains ``.``
  (ignored by ``FileSystemSessionTrawler``); ``require_staging_path`` refuses any folder not below it
  before anything that deletes what the plan does not list is let loose on it.
- A planned destination is relative, inside its session folder, listed once and never ``*.part``
  (``safe_dests``); anything else refuses the whole session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import ApplyError
from ...model import INBOX_FOLDER_PREFIX, InboxSession, PlannedFile, PrearchiveSession

#: Top-level folder in the prearchive root; its '.' makes XNAT's trawler ignore it (§2).
STAGING_DIRNAME = ".xnatmigrate-staging"
#: Folder standing in for the project of Unassigned sessions (timestamps are unique per plan, so no clash).
UNASSIGNED_DIRNAME = "_unassigned"
PART_SUFFIX = ".part"


def staging_dir(prearchive_root: str, session: PrearchiveSession) -> Path:
    """``<root>/.xnatmigrate-staging/<timestamp>/<project or _unassigned>/<session>``, unique per session."""
    return (
        Path(prearchive_root)
        / STAGING_DIRNAME
        / session.timestamp
        / (session.project or UNASSIGNED_DIRNAME)
        / session.session
    )


def final_dir(prearchive_root: str, session: PrearchiveSession) -> Path:
    """``<root>/<project>/<timestamp>/<session>``, or ``<root>/<timestamp>/<session>`` when Unassigned."""
    root = Path(prearchive_root)
    if session.project:
        return root / session.project / session.timestamp / session.session
    return root / session.timestamp / session.session


def require_staging_path(path: Path) -> None:
    # Everything here deletes what the plan does not list; never let that loose on XNAT's visible tree.
    # An inbox session's folder (<inbox>/<project>/xnatmigrate-<plan>-<session>) is wholly this tool's.
    if path.name.startswith(INBOX_FOLDER_PREFIX) and len(path.parts) > 2:
        return
    if STAGING_DIRNAME not in path.parts[:-1]:
        raise ApplyError(
            f"refusing to stage into {path}: it is not below a {STAGING_DIRNAME} folder; "
            "use files.staging_dir() to name the staging folder"
        )


def safe_dests(files: Sequence[PlannedFile]) -> dict[str, PlannedFile]:
    """Planned files by ``dest``; refuses absolute, escaping, scratch-named or duplicate destinations."""
    out: dict[str, PlannedFile] = {}
    for f in files:
        # By string, as PurePosixPath would judge it (a leading, doubled or trailing "/", a "." or ".."
        # part): a pathlib object per file was most of a hard-linked group's set-up.
        if (
            not f.dest
            or f.dest.startswith("/")
            or any(part in ("", ".", "..") for part in f.dest.split("/"))
            or f.dest.endswith(PART_SUFFIX)
        ):
            raise ApplyError(f"the plan lists an unsafe destination {f.dest!r}; re-run xnatmigrate plan")
        if f.dest in out:
            raise ApplyError(f"the plan lists destination {f.dest!r} twice; re-run xnatmigrate plan")
        out[f.dest] = f
    return out


def describe(session: PrearchiveSession | InboxSession) -> str:
    if isinstance(session, InboxSession):
        return f"{session.label} (inbox)"
    return f"{session.project_label}/{session.timestamp}/{session.session}"


def staging_ancestors(staging: Path) -> list[Path]:
    """Parents of ``staging`` up to and including the prearchive root (those ``makedirs`` may create)."""
    if staging.name.startswith(INBOX_FOLDER_PREFIX):
        return [staging.parent, staging.parent.parent]  # <inbox>/<project>, <inbox>
    out = []
    for parent in staging.parents:
        out.append(parent)
        if parent.name == STAGING_DIRNAME:
            out.append(parent.parent)
            break
    return out


def prune_staging_parents(staging: Path) -> None:
    # Empty <timestamp>/<project> folders are left by publish; the staging root itself stays.
    if staging.name.startswith(INBOX_FOLDER_PREFIX):
        return  # <inbox>/<project> is XNAT's (the admin's) folder: never removed
    for parent in staging.parents:
        if parent.name == STAGING_DIRNAME:
            return
        try:
            os.rmdir(parent)
        except OSError:
            return
