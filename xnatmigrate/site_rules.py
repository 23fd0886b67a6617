"""What XNAT's own settings make of a plan (issue 12 §2), decided before anything is applied. PURE.

Each rule reads ``SiteFacts`` (gathered by ``execute.facts.site_facts``) and the planned sessions, and
answers refusals (the plan would do harm or not do what it says) and warnings (XNAT will do something
the manifest does not say). A setting that could not be read decides nothing here: it is listed
under "not checked" by the fact gathering.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import labels
from .model import (
    Build,
    CstoreSession,
    InboxSession,
    Manifest,
    PlannedSession,
    PrearchiveSession,
    Receiver,
    SiteFacts,
)

AUTO_ARCHIVE_CODES = frozenset({4, 5})  # PrearchiveCode AutoArchive, AutoArchiveOverwrite (§3)
# How a plan names XNAT's site script among a session's scripts (anonymize.SITE_SCRIPT_NAME, a sibling
# module this one may not import).
_SITE_SCRIPT = "site"


def file_name_template(site: SiteFacts, scanned: frozenset[str]) -> tuple[str, str | None]:
    """The template files are named by (XNAT's, §2), and a refusal when the tool cannot follow it.

    The site's ``dicomFileNameTemplate`` (SiteConfigPreferences:773) replaces the default when it
    only reads header keywords the scan read (``${Keyword}`` and ``${HashAWithB}``).
    """
    template = site.file_name_template
    if not template or template == labels.XNAT_FILE_NAME_TEMPLATE:
        return labels.XNAT_FILE_NAME_TEMPLATE, None
    needed = labels.template_file_keywords(template)
    leftover = labels.strip_template_vars(template)
    if "$" in leftover or "{" in leftover or not needed or not needed <= scanned:
        missing = sorted(needed - scanned)
        why = f"it reads {', '.join(missing)}, which the scan did not read" if missing else "its syntax"
        return labels.XNAT_FILE_NAME_TEMPLATE, (
            f"the site's dicomFileNameTemplate is {template!r}, and this tool cannot name files as XNAT "
            f"would with it ({why}); set the site's template back to the default, or use method: cstore"
        )
    return template, None


def _cstore_twice(manifest: Manifest, cstore: Sequence[CstoreSession]) -> list[str]:
    """Site anonymisation is on and C-STORE sources have scripts of their own: XNAT applies its site
    script on receipt as well (GradualDicomImporter:390), after the tool's scripts; say so per source,
    and that ``anonymization: site`` there applies XNAT's site script twice."""
    out = []
    for i in sorted({s.source_index for s in cstore if s.anonymize}):
        twice = _SITE_SCRIPT in manifest.sources[i].scripts
        out.append(
            f"sources[{i}] (method: cstore) is edited by its anonymization scripts before it is sent, and XNAT's "
            "receiver applies its own site anonymisation script on receipt as well (GradualDicomImporter:390)"
            + (
                ": anonymization: site there applies XNAT's site script twice; drop site from it unless the "
                "script gives the same result applied twice"
                if twice
                else ""
            )
        )
    return out


def findings(
    manifest: Manifest, sessions: Sequence[PlannedSession], site: SiteFacts
) -> tuple[list[str], list[str]]:
    """(refusals, warnings) of the site's anonymisation, prearchive codes and receivers."""
    refusals: list[str] = []
    warnings: list[str] = []
    pre = [s for s in sessions if isinstance(s, PrearchiveSession)]
    cstore = [s for s in sessions if isinstance(s, CstoreSession)]
    if site.anonymization_enabled:
        raw = sorted(
            {
                s.source_index
                for s in pre
                if manifest.sources[s.source_index].anonymization is None
                and not manifest.sources[s.source_index].scripts
            }
        )
        for i in raw:
            refusals.append(
                f"XNAT's site anonymisation is on (GET /xapi/anonymize/site/enabled), and sources[{i}] "
                "copies files straight into the prearchive, which skips it (XNAT applies it to files it "
                "receives, GradualDicomImporter:390): raw headers would land in XNAT; set anonymization: "
                "site to apply XNAT's site script as the files are staged, anonymization: none if the data "
                "is already de-identified, or use method: cstore"
            )
        if any(isinstance(s, InboxSession) for s in sessions):
            warnings.append(
                "XNAT applies its site anonymisation script to every file its inbox importer takes "
                "(DicomInboxImportRequestListener → GradualDicomImporter:390): the inbox sessions arrive "
                "anonymised by XNAT"
            )
        if cstore:
            warnings.append(
                "XNAT applies its site anonymisation script to every file its receiver takes "
                "(GradualDicomImporter:390): the C-STORE sessions arrive anonymised by XNAT"
            )
        warnings.extend(_cstore_twice(manifest, cstore))
    for s in sessions:
        if s.project is None or s.archive:
            continue
        code = site.prearchive_codes.get(s.project)
        if code not in AUTO_ARCHIVE_CODES:
            continue
        if isinstance(s, CstoreSession):
            refusals.append(
                f"project {s.project} auto-archives (prearchive code {code}): XNAT's receiver keeps the "
                "code in the row (GradualDicomImporter:506) and its scheduled build archives "
                f"{s.session}, while the manifest says archive: false; set archive: true, or the "
                "project's prearchive code to 0"
            )
        elif isinstance(s, InboxSession):
            refusals.append(
                f"project {s.project} auto-archives (prearchive code {code}): XNAT's inbox importer commits "
                "each session it imports (DicomInboxImportRequestListener: PrearcUtils.commitPrearcSession), "
                f"which archives {s.session} when the project auto-archives, while the manifest says "
                "archive: false; set archive: true, or the project's prearchive code to 0"
            )
        elif s.build is Build.SCHEDULER:
            refusals.append(
                f"project {s.project} auto-archives (prearchive code {code}): with build: scheduler, "
                "XNAT's build reads the row's autoarchive Manual as undecided and falls through to the "
                f"project (PrearcSession.isAutoArchive:92-110), so it would archive {s.session} while the "
                "manifest says archive: false; use build: rest (REST builds never auto-archive), or "
                "set archive: true"
            )
    if cstore and site.receivers is not None and manifest.xnat.scp is not None:
        scp = manifest.xnat.scp
        match = _receiver_for(site.receivers, scp.called_aet, scp.port)
        if match is None:
            warnings.append(
                f"XNAT lists no enabled receiver {scp.called_aet} on port {scp.port} (/xapi/dicomscp); "
                "if xnat.scp goes through a port forward this is expected, else the sends will be refused"
            )
        else:
            if match.direct_archive:
                warnings.append(
                    f"XNAT's receiver {match.ae_title}:{match.port} archives directly (directArchive, "
                    "XNAT-6812): the C-STORE sessions skip the prearchive, with no review there; apply "
                    "waits for each in the project's archive"
                )
            if match.routing_expressions and match.expressions:
                warnings.append(
                    f"XNAT's receiver {match.ae_title}:{match.port} routes by its own expressions first "
                    f"({'; '.join(match.expressions)}): they win over the PatientComments routing the tool "
                    "writes (Xnat15PerReceiverDicomProjectIdentifier:103-111)"
                )
    return refusals, warnings


def direct_archive(manifest: Manifest, site: SiteFacts) -> bool:
    """Whether the receiver the manifest sends to writes sessions straight into the archive."""
    scp = manifest.xnat.scp
    if scp is None or site.receivers is None:
        return False
    match = _receiver_for(site.receivers, scp.called_aet, scp.port)
    return bool(match and match.direct_archive)


def _receiver_for(receivers: Sequence[Receiver], ae_title: str, port: int) -> Receiver | None:
    for r in receivers:
        if r.enabled and r.ae_title == ae_title and r.port == port:
            return r
    return None
