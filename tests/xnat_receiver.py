"""XNAT's C-STORE receiver, emulated for tests: route as XNAT's default identifier does, then file each instance
as GradualDicomImporter does — into the prearchive with its row in ``xdat_search.prearchive``, or, on a
direct-archive receiver, straight into the archive with no prearchive row — so the REST stand-in
(tests/xnat_standin.py) then sees the session (xnat-reference.md §2, §3, §5, §9).

Each rule cites the XNAT class and line it follows (NrgXnat/xnat 93d33cbf6, ``web/src/main/java/org/nrg/``;
``GDI`` = GradualDicomImporter). Like the stand-in it imports none of the product's XNAT knowledge: routing is
the test suite's own reading of §5 (``tests.dicom_peers``), file names, scan folders and timestamps are
computed here. Its departures from XNAT are listed with the stand-in's (departures 6, 7, 15, 18).

Rules followed:
- routing (§5, §9): the receiver's own routing expressions first when ``routingExpressionsEnabled``
  (RoutingExpressionFromInstanceProvider:24-49, ExtractorFromRuleProvider), then the comment fields,
  StudyDescription, AccessionNumber, PatientName, PatientID (``tests.dicom_peers.xnat_route``);
- a file joins the row with the same (project, tag, name), whatever its timestamp
  (PrearcDatabase.eitherGetOrCreateSession:2070-2130); a new session gets a fresh ``yyyyMMdd_HHmmssSSS``
  folder and a RECEIVING row whose ``autoarchive`` is the project's code (GDI:506, :687-702);
- layout ``<prearchive>/<P>/<ts>/<label>/SCANS/<scan>/DICOM/<name>``, Unassigned without the project level
  (GDI:269-278), scan folder by Restructurer.determineScanSubdir (GDI:342), name by TemplatizedDicomFileNamer with the
  site's ``dicomFileNameTemplate``; the file goes where the row's ``url`` says (GDI:365);
- direct archive (GDI:101-107, :268-276, :493-501): ``<archive>/<P>/arc001/<label>``, a direct-archive row in
  the stand-in (visible at ``/xapi/direct-archive/...``), the prearchive when XNAT would refuse it;
- the site anonymisation script on receipt unless the session's ``prevent_anon`` (GDI:390-405); a receiver
  with ``anonymizationEnabled`` false sets ``prevent_anon`` (CStoreService:293, :303).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from tests.dicom_peers import COMMENT_FIELDS, Route, XnatRoutingSCP, _assignment, label_chars, xnat_route
from tests.xnat_standin import (
    COLUMNS,
    PREARCHIVE_CODES,
    SITE_CONFIG_DEFAULTS,
    STATUSES,
    DirectArchiveRefused,
    DirectArchiveSession,
    default_receiver,
    make_timestamp,
)

if TYPE_CHECKING:
    from tests.xnat_standin import XnatStandIn

__all__ = [
    "FiledSession",
    "IncomingSession",
    "UnsupportedScript",
    "XnatReceiverSCP",
    "apply_site_script",
    "either_get_or_create_session",
    "file_name",
    "parse_site_script",
    "requests_autoarchive",
    "scan_date",
    "scan_folder",
]

# Restructurer.determineScanSubdir via Files.isValidFilename / Labels.toLabelChars (§2); Java's \w is ASCII.
_VALID_FILENAME = re.compile(r"[A-Za-z0-9_.\-]+")
_NOT_LABEL_CHAR = re.compile(r"[^A-Za-z0-9_\-]")
# TemplatizedDicomFileNamer.VARIABLE_EXTRACTION:171
_TEMPLATE_VAR = re.compile(r"\$\{([A-Za-z0-9]+)\}")
# ExtractorFromRuleProvider.CUSTOM_RULE_PATTERN: (gggg,eeee):regex[:group][ t:target r:replacement]
_CUSTOM_RULE = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\):(.+?)(?::(\d+))?(?: t:(.*) r:(.*))?")
_AA = _assignment("AA")  # ContainedAssignmentExtractor for the AA key (§5), as for Project/Subject/Session
_TRUE = re.compile(r"t(?:rue)?", re.IGNORECASE)  # ClassicDicomObjectIdentifier.requestsAutoarchive
_FALSE = re.compile(r"f(?:alse)?", re.IGNORECASE)


class UnsupportedScript(Exception):
    """A DicomEdit statement the emulated receiver cannot apply (departure 15)."""


def scan_folder(series_number: str | None, series_uid: str | None) -> str:
    """Restructurer.determineScanSubdir (§2): SeriesNumber if a valid file name, else the SeriesInstanceUID
    with every character outside ``[\\w-]`` made ``_``, else ``NA``."""
    if series_number and _VALID_FILENAME.fullmatch(series_number):
        return series_number
    if series_uid:
        return _NOT_LABEL_CHAR.sub("_", series_uid)
    return "NA"


def _java_hash(text: str) -> int:
    """java.lang.String.hashCode over UTF-16 code units, as a signed 32-bit int."""
    data = text.encode("utf-16-be")
    h = 0
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i : i + 2], "big")) & 0xFFFFFFFF
    return h


def _base36(value: int) -> str:
    digits, out = "0123456789abcdefghijklmnopqrstuvwxyz", ""
    while True:
        value, r = divmod(value, 36)
        out = digits[r] + out
        if value == 0:
            return out


def _dicom_string(ds: Dataset, keyword: str) -> str:
    """dcm4che's ``getString(Tag.forName(keyword))``: the first value, padding trimmed; "" when absent."""
    if tag_for_keyword(keyword) is None:
        raise ValueError(
            f"Illegal DICOM header tag specified: {keyword}"
        )  # TemplatizedDicomFileNamer:165-166
    elem = ds.get(keyword)
    if elem is None or elem == "":
        return ""
    value = elem[0] if isinstance(elem, pydicom.multival.MultiValue) else elem
    return "" if isinstance(value, bytes) else str(value).strip()


def file_name(ds: Dataset, template: str) -> str:
    """TemplatizedDicomFileNamer.makeFileName:48-61 with the template handling of :79-148.

    ``.dcm`` is added when the template has no extension (:80, :106-112); a missing value is
    ``no-value-for-<Tag>`` (:53), a ``Hash<A>With<B>…`` is ``List.of(values).hashCode()`` as unsigned base 36
    (:93-96) over those same values (§9); leading dots are stripped (GDI.getSafeFile).
    """
    last = template[template.rfind(".") :] if "." in template else ""
    naming = template if last.strip() and re.fullmatch(r"\.[A-z0-9]+", last) else template + ".dcm"
    variables = set(_TEMPLATE_VAR.findall(naming))
    hashes: dict[str, list[str]] = {}
    for var in variables:
        if var.startswith("Hash"):
            if "With" not in var:  # :137-139
                raise ValueError(f"You can't specify a Hash without two values joined by With: {var}")
            hashes[var] = var[4:].split("With")
    values: dict[str, str] = {}
    for var in variables | {op for ops in hashes.values() for op in ops}:
        if not var.startswith("Hash"):
            values[var] = _dicom_string(ds, var) or f"no-value-for-{var}"
    for var, ops in hashes.items():
        h = 1
        for op in ops:  # java.util.List.hashCode
            h = (31 * h + (_java_hash(values[op]) if op in values else 0)) & 0xFFFFFFFF
        values[var] = _base36(h)  # Long.toString(hash & 0xffffffffL, 36)
    name = _TEMPLATE_VAR.sub(lambda m: values.get(m.group(1), m.group(0)), naming)  # StringSubstitutor
    return name.lstrip(".")


_Statement = tuple[tuple[str, str, str] | None, str]
_VARIABLES = ("project", "subject", "session")


def parse_site_script(script: str) -> list[_Statement]:
    """The DicomEdit statements of a site script, in the subset of departure 15 (else ``UnsupportedScript``)."""
    statements: list[_Statement] = []
    for raw in script.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line or re.fullmatch(r'version\s+"[^"]*"', line):
            continue
        cond = None
        m = re.fullmatch(r'(\w+)\s*(!=|=)\s*"([^"]*)"\s*\?\s*(.+)', line)
        if m:
            cond, line = (m.group(1), m.group(2), m.group(3)), m.group(4).strip()
            if cond[0] not in _VARIABLES:
                raise UnsupportedScript(f"unknown variable in condition: {raw}")
        assign = re.fullmatch(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)\s*:=\s*(\w+|\"[^\"]*\")", line)
        delete = re.fullmatch(r"-\s*\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)", line)
        if assign:
            expr = assign.group(3)
            if not expr.startswith('"') and expr not in _VARIABLES:
                raise UnsupportedScript(f"unknown variable: {raw}")
            if keyword_for_tag(int(assign.group(1) + assign.group(2), 16)) == "":
                raise UnsupportedScript(f"private or unknown tag: {raw}")
        elif not delete:
            raise UnsupportedScript(f"stand-in cannot apply DicomEdit statement: {raw}")
        statements.append((cond, line))
    return statements


def apply_site_script(
    path: Path, script: str, project: str | None, subject: str | None, session: str
) -> None:
    """Apply a site DicomEdit script to the file at ``path`` (GDI:390-405 via MizerService), the subset of
    departure 15; an Unassigned session's ``project`` is ``"Unassigned"``. Raises ``UnsupportedScript``."""
    statements = parse_site_script(script)
    variables = {"project": project or "Unassigned", "subject": subject or "", "session": session}
    ds = pydicom.dcmread(path)
    for cond, stmt in statements:
        if cond is not None and (variables[cond[0]] != cond[2]) != (cond[1] == "!="):
            continue
        assign = re.fullmatch(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)\s*:=\s*(\w+|\"[^\"]*\")", stmt)
        delete = re.fullmatch(r"-\s*\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)", stmt)
        if assign:
            tag = int(assign.group(1) + assign.group(2), 16)
            expr = assign.group(3)
            value = expr[1:-1] if expr.startswith('"') else variables[expr]
            if tag in ds:
                ds[tag].value = value
            else:
                ds.add_new(tag, dictionary_VR(tag), value)
        elif delete:
            tag = int(delete.group(1) + delete.group(2), 16)
            if tag in ds:
                del ds[tag]
    ds.save_as(path)


def _expression_value(ds: Dataset, rule: str) -> str | None:
    """ExtractorFromRuleProvider.parseDicomRuleToExtractor → MatchedPatternExtractorWithLengthLimit(…, 64).

    The tag's string value, cut to 64 characters, must match the regex as a whole (``matches()``); the
    group (default 1) is the value, then ``replaceAll(target, replacement)`` when ``t:``/``r:`` are given.
    """
    m = _CUSTOM_RULE.fullmatch(rule.strip())
    if m is None:
        return None  # parseDicomRule throws IllegalArgumentException: the expression is unusable
    tag = int(m.group(1) + m.group(2), 16)
    if tag not in ds:
        return None
    elem = ds[tag].value
    first = elem[0] if isinstance(elem, pydicom.multival.MultiValue) else elem
    value = "" if first is None or isinstance(first, bytes) else str(first)
    if not value:
        return None
    value = value[:64]
    hit = re.fullmatch(m.group(3), value)
    if hit is None:
        return None
    out = hit.group(int(m.group(4) or 1))
    if out is not None and m.group(5) is not None and m.group(6) is not None:
        out = re.sub(m.group(5), re.sub(r"\$(\d+)", r"\\g<\1>", m.group(6)), out)
    return out


def requests_autoarchive(ds: Dataset) -> bool | None:
    """ClassicDicomObjectIdentifier.requestsAutoarchive: ``AA:`` in the comment fields (departure 18)."""
    for keyword in COMMENT_FIELDS:
        text = str(ds.get(keyword, "") or "")
        m = _AA.fullmatch(text) if text else None
        if m and m.group(1):
            if _TRUE.fullmatch(m.group(1)):
                return True
            if _FALSE.fullmatch(m.group(1)):
                return False
            return None
    return None


def scan_date(ds: Dataset) -> datetime | None:
    """GDI:300-311: StudyDate with the hours, minutes and seconds of StudyTime."""
    date = _dicom_string(ds, "StudyDate")
    try:
        when = datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return None
    tod = _dicom_string(ds, "StudyTime")
    try:
        return when.replace(hour=int(tod[0:2]), minute=int(tod[2:4]), second=int(tod[4:6]))
    except (ValueError, IndexError):
        return when


class XnatReceiverSCP(XnatRoutingSCP):
    """A routing SCP that files what it receives as XNAT's receiver does.

    Args:
        dsn, prearchive: XNAT's table and prearchive root.
        xnat: the REST stand-in this receiver belongs to. It supplies the projects and their prearchive codes,
            the site preferences (file-name template, anonymisation script and switch, time scale) and the
            direct-archive table; the receiver registers itself in its ``/xapi/dicomscp`` list on start and
            reads its settings from that entry at every instance. Without it the receiver uses XNAT's
            defaults (site script on, default template), the given ``projects`` (code 0) and cannot
            direct-archive (GDI:105-106: no DirectArchiveSessionService).
        direct_archive, anonymization_enabled, routing_expressions_enabled, project_routing_expression,
        subject_routing_expression, session_routing_expression: the DicomSCPInstance settings (:19-32).
    """

    def __init__(
        self,
        *args: Any,
        dsn: str,
        prearchive: Path,
        xnat: XnatStandIn | None = None,
        projects: Iterable[str] = (),
        direct_archive: bool = False,
        anonymization_enabled: bool = True,
        routing_expressions_enabled: bool = False,
        project_routing_expression: str | None = None,
        subject_routing_expression: str | None = None,
        session_routing_expression: str | None = None,
        **kwargs: Any,
    ) -> None:
        projects = set(projects) | (set(xnat.projects) if xnat is not None else set())
        super().__init__(*args, projects=projects, **kwargs)
        self.dsn = dsn
        self.prearchive = Path(prearchive)
        self.xnat = xnat
        self.settings: dict[str, Any] = {
            **default_receiver(),
            "aeTitle": self.ae_title,
            "directArchive": direct_archive,
            "anonymizationEnabled": anonymization_enabled,
            "routingExpressionsEnabled": routing_expressions_enabled,
            "projectRoutingExpression": project_routing_expression,
            "subjectRoutingExpression": subject_routing_expression,
            "sessionRoutingExpression": session_routing_expression,
        }
        self.refused: list[str] = []  # why instances were refused (0xA700 / 0xC000)
        self._file_lock = threading.Lock()

    def start(self) -> XnatReceiverSCP:
        registered = self.port != 0
        super().start()
        if self.xnat is not None and not registered:
            self.settings = self.xnat.register_receiver({**self.settings, "port": self.port})
        return self

    # --- site and project facts ---------------------------------------------------------------------

    def _site(self, name: str) -> str:
        config = self.xnat.site_config if self.xnat is not None else SITE_CONFIG_DEFAULTS
        return config.get(name, SITE_CONFIG_DEFAULTS.get(name, ""))

    def _project_ids(self) -> frozenset[str]:
        return frozenset(self.xnat.projects) | self.projects if self.xnat is not None else self.projects

    def _project_code(self, project: str) -> int:
        return self.xnat.projects.get(project, 0) if self.xnat is not None else 0

    def _seconds(self, seconds: float) -> float:
        return seconds * (self.xnat.time_scale if self.xnat is not None else 1.0)

    # --- routing -------------------------------------------------------------------------------------

    def route(self, ds: Dataset) -> Route:
        known = self._project_ids()
        route = xnat_route(ds, known)
        s = self.settings
        if s.get("routingExpressionsEnabled"):
            # Xnat15PerReceiverDicomProjectIdentifier.getDynamicExtractors:42-51: the receiver's expressions
            # come before everything else; a project candidate nobody can access is skipped (§9).
            def first(expression: str | None, accept: Any = bool) -> str | None:
                for rule in re.split(r"\r\n|[\n\r\u2028\u2029\u0085\u000b\u000c]", expression or ""):  # \R
                    if rule.strip():
                        value = _expression_value(ds, rule)
                        if value and accept(value):
                            return value
                return None

            project = first(s.get("projectRoutingExpression"), lambda v: v in known)
            subject = first(s.get("subjectRoutingExpression"))
            session = first(s.get("sessionRoutingExpression"))
            route = Route(
                project or route.project,
                label_chars(subject) if subject else route.subject,  # CompositeDicomObjectIdentifier
                label_chars(session) if session else route.session,
            )
        with self._file_lock:
            self._file(ds, route)
        return route

    def _on_store(self, event: Any) -> int:
        try:
            return super()._on_store(event)
        except (UnsupportedScript, _Refused, ValueError) as exc:
            # CStoreService:312-320: a ServerException (anonymisation, storage) is 0xA700.
            self.refused.append(str(exc))
            return 0xA700

    def _requests_autoarchive(self, ds: Dataset) -> bool | None:
        return requests_autoarchive(ds)

    # --- filing --------------------------------------------------------------------------------------

    def _file(self, ds: Dataset, route: Route) -> None:
        site_on = self._site("enableSitewideAnonymizationScript").lower() == "true"
        if site_on:
            parse_site_script(self._site("sitewideAnonymizationScript"))  # refuse before storing (dep. 15)
        study = str(ds.StudyInstanceUID)
        project = route.project
        folder = route.session
        timestamp = make_timestamp()  # GDI:261-267
        time.sleep(0.002)  # keep timestamps unique, as wall-clock ms would
        prevent_anon = not self.settings.get("anonymizationEnabled", True)  # CStoreService:293, :303
        # GDI:269-278: Unassigned goes to <prearchive>/<ts>, never direct.
        prearchive_root = (
            (self.prearchive / project / timestamp) if project else (self.prearchive / timestamp)
        )
        direct = bool(self.settings.get("directArchive")) and project is not None and self.xnat is not None
        scan_date = self._scan_date(ds)
        session_url: Path | None = None
        session_prevent_anon: bool | None = prevent_anon
        subject = route.subject
        if direct:
            assert self.xnat is not None and project is not None
            location = self.xnat.archive / project / "arc001" / folder  # GDI:276-278 root archive + arc001
            incoming = DirectArchiveSession(
                id=0,
                project=project,
                subject=subject,
                name=folder,
                folder_name=folder,
                timestamp=timestamp,
                tag=study,
                location=str(location),
                scan_date=scan_date,
                prevent_anon=prevent_anon,
            )
            try:
                da, is_new = self.xnat.direct_archive_get_or_create(incoming)
            except DirectArchiveRefused:
                direct = False  # GDI:497-500: "will proceed through prearchive"
            else:
                session_url = Path(da.location)
                session_prevent_anon = da.prevent_anon
                subject = da.subject
                refresh = self._seconds(15.0)
                if not is_new and (datetime.now() - da.last_built).total_seconds() > refresh:
                    self.xnat.direct_archive_touch(da.id)  # GDI.updateSessionLastMod:472-489
        if not direct:
            session_url, session_prevent_anon, subject = self._prearchive_row(
                ds, route, study, timestamp, prearchive_root, scan_date, prevent_anon
            )
        assert session_url is not None
        scan = scan_folder(
            _dicom_string(ds, "SeriesNumber") or None, _dicom_string(ds, "SeriesInstanceUID") or None
        )
        dest = session_url / "SCANS" / scan / "DICOM" / file_name(ds, self._site("dicomFileNameTemplate"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = ds.copy()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
        meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.file_meta = meta
        out.save_as(dest, enforce_file_format=True)
        if session_prevent_anon is None:
            # GDI:390 unboxes getPreventAnon(): a NULL column is a NullPointerException → ServerException.
            raise _Refused("NullPointerException: prevent_anon is NULL")
        if not session_prevent_anon and site_on:
            apply_site_script(dest, self._site("sitewideAnonymizationScript"), project, subject, folder)

    @staticmethod
    def _scan_date(ds: Dataset) -> datetime | None:
        return scan_date(ds)

    def _prearchive_row(
        self,
        ds: Dataset,
        route: Route,
        study: str,
        timestamp: str,
        prearchive_root: Path,
        scan_date: datetime | None,
        prevent_anon: bool,
    ) -> tuple[Path, bool | None, str | None]:
        """GDI.eitherGetOrCreateSession:490-520 for a C-STORE: returns the session folder (the row's ``url``),
        its ``prevent_anon`` and its subject."""
        project = route.project
        code: str | None = None
        if project is not None:  # GDI.shouldAutoArchive:687-702
            aa = requests_autoarchive(ds)
            if aa is not None:
                code = "AutoArchive" if aa else "Manual"
            else:
                code = PREARCHIVE_CODES[self._project_code(project)]
        incoming = IncomingSession(
            project=project,
            timestamp=timestamp,
            folder=route.session,
            name=route.session,
            subject=route.subject,
            tag=study,
            scan_date=scan_date,
            url=prearchive_root / route.session,  # GDI:317
            prevent_anon=prevent_anon,  # GDI:319
        )
        filed = either_get_or_create_session(self.dsn, incoming, code, self._seconds(15.0))
        return filed.url, filed.prevent_anon, filed.subject


@dataclass
class IncomingSession:
    """The SessionData GDI fills before looking the session up (GDI:294-323)."""

    project: str | None
    timestamp: str
    folder: str
    name: str
    subject: str | None
    tag: str
    scan_date: datetime | None
    url: Path
    prevent_anon: bool
    prevent_auto_commit: bool = False  # GDI:320 (no parameter on C-STORE)
    source: str | None = None  # GDI:318 (URIManager.SOURCE is not set by CStoreService)
    visit: str | None = None
    protocol: str | None = None


@dataclass(frozen=True)
class FiledSession:
    """The row a file joined or created: where its files go (``url``) and what GDI reads back from it."""

    project: str | None
    timestamp: str
    folder: str
    url: Path
    prevent_anon: bool | None
    subject: str | None
    is_new: bool

    @property
    def uri(self) -> str:
        """SessionData.getExternalUrl → PrearcUtils.buildURI:556-558."""
        return f"/prearchive/projects/{self.project or 'Unassigned'}/{self.timestamp}/{self.folder}"


# PrearcDatabase.eitherGetOrCreateSession is ``static synchronized`` (:1981): one at a time per XNAT.
_GET_OR_CREATE = threading.Lock()


def either_get_or_create_session(
    dsn: str, incoming: IncomingSession, autoarchive: str | None, refresh_seconds: float
) -> FiledSession:
    """PrearcDatabase.eitherGetOrCreateSession:1981-2130 and GDI.updateSessionLastMod:472-489.

    ``autoarchive`` is GDI.shouldAutoArchive's code, stored in a new row (:2004); ``refresh_seconds`` the
    15 s after which a file refreshes an existing row's ``lastmod`` (:474). Raises ``_Refused`` when the row
    found has a status outside the enum.
    """
    project = incoming.project
    with _GET_OR_CREATE:
        conn = psycopg.connect(dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT * FROM xdat_search.prearchive "
                    "WHERE project IS NOT DISTINCT FROM %s AND tag = %s AND name = %s",
                    (project, incoming.tag, incoming.name),
                )
                found = cur.fetchone()
                now = datetime.now()  # the JVM's clock (Calendar.getInstance())
                if found is None:
                    values = {
                        "project": project,
                        "timestamp": incoming.timestamp,
                        "lastmod": now,  # GDI:315
                        "uploaded": None,
                        "scan_date": incoming.scan_date,
                        "scan_time": None,
                        "subject": incoming.subject,
                        "folderName": incoming.folder,
                        "name": incoming.name,
                        "tag": incoming.tag,
                        "status": "RECEIVING",  # GDI:314
                        "url": str(incoming.url),
                        "autoarchive": autoarchive,  # eitherGetOrCreateSession:2004
                        "prevent_anon": incoming.prevent_anon,  # GDI:319
                        "prevent_auto_commit": incoming.prevent_auto_commit,  # GDI:320
                        "SOURCE": incoming.source,  # GDI:318
                        "VISIT": incoming.visit,  # GDI:298
                        "PROTOCOL": incoming.protocol,  # GDI:299
                        "TIMEZONE": None,
                    }
                    cols = ", ".join(c.lower() for c in COLUMNS)
                    cur.execute(
                        f"INSERT INTO xdat_search.prearchive ({cols}) VALUES ({', '.join(['%s'] * len(COLUMNS))})",
                        [values[c] for c in COLUMNS],
                    )
                    return FiledSession(
                        project,
                        incoming.timestamp,
                        incoming.folder,
                        incoming.url,
                        incoming.prevent_anon,
                        incoming.subject,
                        True,
                    )
                row = dict(zip(COLUMNS, found))
                if row["status"] not in STATUSES:
                    raise _Refused(f"No enum constant PrearcStatus.{row['status']}")  # fillSession → valueOf
                key = "project IS NOT DISTINCT FROM %s AND timestamp = %s AND foldername = %s"
                params = (row["project"], row["timestamp"], row["folderName"])
                if row["status"] == "BUILDING":  # :2096-2105
                    cur.execute(
                        f"UPDATE xdat_search.prearchive SET status = 'RECEIVING_INTERRUPT', lastmod = %s WHERE {key}",
                        (now, *params),
                    )
                elif row["status"] not in ("RECEIVING", "RECEIVING_INTERRUPT"):
                    # :2106-2115: every status is "interruptable" (PrearcStatus:126-128), locked ones too.
                    cur.execute(
                        f"UPDATE xdat_search.prearchive SET status = 'RECEIVING', lastmod = %s WHERE {key}",
                        (now, *params),
                    )
                last = row["lastmod"]
                # GDI.updateSessionLastMod:472-489 (a NULL lastmod: DateUtils.addSeconds throws; logged)
                if last is not None and (now - last).total_seconds() > refresh_seconds:
                    cur.execute(f"UPDATE xdat_search.prearchive SET lastmod = %s WHERE {key}", (now, *params))
                return FiledSession(
                    row["project"],
                    row["timestamp"],
                    row["folderName"],
                    Path(row["url"]),
                    row["prevent_anon"],
                    row["subject"],
                    False,
                )
        finally:
            conn.close()


class _Refused(Exception):
    """XNAT answers the C-STORE with a failure status (a ServerException: 0xA700)."""
