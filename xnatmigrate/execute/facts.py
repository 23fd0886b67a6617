"""Facts about the target that plan needs, read before the pure planner runs.

Read-only: this looks at the prearchive folder, XNAT's database and XNAT's REST API and writes
nothing. A check that cannot run is listed in ``XnatFacts.skipped`` with the reason, never guessed.
"""

from __future__ import annotations

import os
import zoneinfo
from collections.abc import Sequence
from pathlib import Path

from .. import xnat_table
from ..errors import XnatMigrateError
from ..model import Manifest, Method, Plan, XnatFacts
from . import files


def gather_facts(manifest: Manifest, study_uids: Sequence[str], offline: bool) -> XnatFacts:
    """Read what the planner needs from the prearchive folder and XNAT's database."""
    refusals: list[str] = []
    skipped: list[str] = []
    pre_sources = [s for s in manifest.sources if s.method is Method.PREARCHIVE]
    writable = free = same_fs = None
    taken: set[str] = set()
    root = manifest.xnat.prearchive
    if pre_sources and root:
        rootp = Path(root)
        writable = rootp.is_dir() and os.access(rootp, os.W_OK | os.X_OK)
        if writable:
            free = files.free_bytes(rootp)
            same_fs = {s.source: files.same_filesystem(s.source, rootp) for s in pre_sources}
            taken |= _timestamp_dirs(rootp)
    profile = None
    rows = None
    if offline:
        skipped.append("XNAT's database (--offline): table profile, existing prearchive rows")
    elif manifest.xnat.database is not None:
        try:
            from . import db

            dsn = db.resolve_dsn(manifest.xnat.database)
            with db.connect(dsn) as conn, conn.cursor() as cur:
                profile, mismatch = db.table_profile(cur)
                if mismatch:
                    refusals.append(mismatch)
                else:
                    rows = db.existing_rows(cur, study_uids)
                    taken |= db.used_timestamps(cur)
        except XnatMigrateError as exc:
            skipped.append(f"XNAT's database ({exc}): table profile, existing prearchive rows")
    return XnatFacts(
        local_timezone=local_timezone(),
        table_profile=profile,
        existing_rows=rows,
        archived=None,
        taken_timestamps=frozenset(taken),
        prearchive_writable=writable,
        free_bytes=free,
        same_filesystem=same_fs,
        refusals=tuple(refusals),
        skipped=tuple(skipped),
    )


def _timestamp_dirs(root: Path) -> set[str]:
    """Timestamp folders already under the prearchive root and its project folders (§2)."""
    out: set[str] = set()
    try:
        top = list(os.scandir(root))
    except OSError:
        return out
    for entry in top:
        if not entry.is_dir(follow_symlinks=False) or "." in entry.name:
            continue
        if xnat_table.is_timestamp_folder(entry.name):
            out.add(entry.name)
            continue
        try:
            out |= {e.name for e in os.scandir(entry.path) if xnat_table.is_timestamp_folder(e.name)}
        except OSError:
            continue
    return out


def archived_facts(
    manifest: Manifest, draft: Plan, offline: bool
) -> tuple[frozenset[tuple[str, str]] | None, tuple[str, ...]] | None:
    """Archived (project, label) pairs for the projects the draft plan writes into."""
    projects = sorted({s.project for s in draft.sessions if s.project})
    if not projects:
        return None
    what = "archived sessions with the same label"
    if offline:
        return None  # noted in the facts before planning
    if manifest.xnat.url:
        try:
            from .xnat import XnatClient, credentials_from_env

            found: set[tuple[str, str]] = set()
            with XnatClient(manifest.xnat.url, credentials_from_env(manifest.xnat.url)) as client:
                for p in projects:
                    found |= {(p, label) for label in client.experiment_labels(p)}
            return frozenset(found), ()
        except XnatMigrateError as exc:
            return None, (f"{what} through XNAT's REST API ({exc})",)
    if manifest.xnat.database is not None:
        try:
            from . import db

            with db.connect(db.resolve_dsn(manifest.xnat.database)) as conn, conn.cursor() as cur:
                labels_found = db.archived_labels(cur, projects)
            if labels_found is None:
                return None, (
                    f"{what}: XNAT's experiment tables are not in this database and xnat.url is not set",
                )
            return labels_found, ()
        except XnatMigrateError as exc:
            return None, (f"{what} ({exc})",)
    return None, (f"{what}: neither xnat.url nor xnat.database is set",)


def local_timezone() -> str | None:
    """This machine's IANA time zone name (TZ, /etc/timezone, /etc/localtime's target), or None.

    NOTE: the default for XNAT's JVM zone when the manifest sets no ``xnat.timezone``: XNAT usually
    runs on, or beside, the machine that holds its prearchive.
    """
    candidates: list[str] = []
    if os.environ.get("TZ"):
        candidates.append(os.environ["TZ"].lstrip(":"))
    try:
        candidates.append(Path("/etc/timezone").read_text().strip())
    except OSError:
        pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in candidates:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            continue
        return name
    return None
