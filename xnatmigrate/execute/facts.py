"""Facts about the target that plan needs, read before the pure planner runs.

Read-only: this looks at the prearchive folder, XNAT's database and XNAT's REST API and writes
nothing. A check that cannot run is listed in ``XnatFacts.skipped`` with the reason, never guessed.
"""

from __future__ import annotations

import os
import zoneinfo
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import xnat_table
from ..errors import XnatMigrateError
from ..model import Manifest, Method, Receiver, SiteFacts, XnatFacts
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
    inbox_writable = inbox_same_fs = None
    inbox_sources = [s for s in manifest.sources if s.method is Method.INBOX]
    if inbox_sources and manifest.xnat.inbox:
        inbox = Path(manifest.xnat.inbox)
        inbox_writable = inbox.is_dir() and os.access(inbox, os.R_OK | os.W_OK | os.X_OK)
        if inbox_writable:
            inbox_same_fs = {s.source: files.same_filesystem(s.source, inbox) for s in inbox_sources}
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
        inbox_writable=inbox_writable,
        inbox_same_filesystem=inbox_same_fs,
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
    manifest: Manifest, projects: Sequence[str], offline: bool
) -> tuple[frozenset[tuple[str, str]] | None, tuple[str, ...]] | None:
    """Archived (project, label) pairs for ``projects``, those the draft plan writes into."""
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


def site_facts(
    manifest: Manifest, projects: Sequence[str], offline: bool
) -> tuple[SiteFacts, tuple[str, ...]]:
    """The site settings plan acts on (§9): site anonymisation, the projects' prearchive codes, the
    receivers, the file-name template. Each read that fails is listed as not checked, with why."""
    what = "XNAT's site settings (anonymisation, prearchive codes, receivers, file-name template)"
    if offline:
        return SiteFacts(), (f"{what} (--offline)",)
    if not manifest.xnat.url:
        return SiteFacts(), (f"{what}: xnat.url is not set",)
    from .xnat import XnatClient, credentials_from_env

    skipped: list[str] = []
    anonymization: bool | None = None
    codes: dict[str, int] = {}
    receivers: tuple[Receiver, ...] | None = None
    template: str | None = None
    script: str | None = None
    editable: frozenset[str] | None = None
    try:
        with XnatClient(manifest.xnat.url, credentials_from_env(manifest.xnat.url)) as client:
            try:
                anonymization = client.site_anonymization_enabled()
            except XnatMigrateError as exc:
                skipped.append(f"whether site anonymisation is on ({exc})")
            for p in projects:
                try:
                    codes[p] = client.prearchive_code(p)
                except XnatMigrateError as exc:
                    skipped.append(f"project {p}'s prearchive code ({exc})")
            if manifest.xnat.scp is not None:
                try:
                    receivers = tuple(_receiver(r) for r in client.receivers())
                except XnatMigrateError as exc:
                    skipped.append(f"XNAT's DICOM receivers ({exc})")
            try:
                template = client.site_config("dicomFileNameTemplate")
            except XnatMigrateError as exc:
                skipped.append(f"the site's dicomFileNameTemplate ({exc})")
            if any("site" in src.scripts for src in manifest.sources):
                try:
                    script = client.site_anonymization_script()
                except XnatMigrateError as exc:
                    skipped.append(f"the site anonymisation script ({exc})")
            if any(s.method is Method.INBOX for s in manifest.sources):
                try:
                    editable = frozenset(client.editable_projects())
                except XnatMigrateError as exc:
                    skipped.append(f"the projects the XNAT user can edit ({exc})")
    except XnatMigrateError as exc:
        return SiteFacts(), (f"{what} ({exc})",)
    return (
        SiteFacts(anonymization, codes, receivers, template, site_script=script, editable_projects=editable),
        tuple(skipped),
    )


def _receiver(d: Mapping[str, Any]) -> Receiver:
    expressions = tuple(
        str(d[k])
        for k in ("projectRoutingExpression", "subjectRoutingExpression", "sessionRoutingExpression")
        if d.get(k)
    )
    return Receiver(
        ae_title=str(d.get("aeTitle", "")),
        port=int(d.get("port") or 0),
        enabled=bool(d.get("enabled", True)),
        direct_archive=bool(d.get("directArchive", False)),
        anonymization=bool(d.get("anonymizationEnabled", True)),
        routing_expressions=bool(d.get("routingExpressionsEnabled", False)),
        expressions=expressions,
    )
