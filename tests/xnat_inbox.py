"""XNAT's DICOM inbox importer, emulated for the REST stand-in (tests/xnat_standin.py): ``POST
/data/services/import?import-handler=inbox`` and the ``/xapi/dicom`` transactions (xnat-reference.md §4.6).

Read in XNAT's source (xnat-web, via the fork oncai/xnat; paths under ``src/main/java/org/nrg/``), cited by
class and method (line numbers were not available for these files):
- ``xnat/archive/DicomInboxImporter.call``: the request is validated synchronously, then queued (JMS);
- ``xnat/services/messaging/archive/DicomInboxImportRequestListener.onRequest`` and its inner
  ``DicomInboxImportRequestImporter.call``/``visitFile``: the asynchronous walk, GradualDicomImporter per file,
  then ``PrearcUtils.commitPrearcSession`` per session;
- ``xnat/services/messaging/archive/DicomInboxImportRequest``: the entity ``/xapi/dicom/{id}`` answers, statuses
  ``Queued, Trawling, Importing, Accepted, Processed, Failed, Completed``;
- ``xapi/rest/dicom/DicomTransactionApi``: ``{id}``, ``list/active``, ``list/all`` (own requests unless admin; an
  unknown or foreign id is 404).

Each file goes through the emulated GradualDicomImporter of tests/xnat_receiver.py (``either_get_or_create_session``,
``file_name``, ``scan_folder``, ``apply_site_script``, ``requests_autoarchive``, ``scan_date``), with the request's
``PROJECT_ID``/``SUBJECT_ID``/``EXPT_LABEL`` taking the place of the identifier's values (§4.6 gradual-DICOM
parameters). Departures (also listed in the stand-in's docstring, 20): files are copied byte for byte (GDI
writes the parsed object again); archives (``.zip``/``.tar``/``.tgz``) in the inbox, the ``identifier`` and
``namer`` parameters are not implemented (501 / Failed); ``commitPrearcSession`` (not read) is taken to be
PrearcSessionResource's ``action=commit``: a synchronous build, then an archive when ``isAutoArchive``, a failed
build failing the request as an exception would.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.errors import InvalidDicomError

from tests.dicom_peers import xnat_route
from tests.xnat_receiver import (
    IncomingSession,
    UnsupportedScript,
    apply_site_script,
    either_get_or_create_session,
    file_name,
    parse_site_script,
    requests_autoarchive,
    scan_date,
    scan_folder,
)

if TYPE_CHECKING:
    from tests.xnat_standin import XnatStandIn

# DicomInboxImporter.call: the one message of most refusals (400).
BAD_PATH = (
    "You must specify a valid path to a file or directory. It must be under the main inbox directory within a "
    "subdirectory whose name matches the ID of a project you have edit access to."
)
ACTIVE = ("Queued", "Trawling", "Importing", "Accepted", "Processed")  # not Completed or Failed


class InboxRefused(Exception):
    """A ClientException of DicomInboxImporter.call: HTTP ``status`` with XNAT's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InboxRequest:
    """DicomInboxImportRequest (an AbstractHibernateEntity: id, enabled, created, timestamp, disabled)."""

    id: int
    username: str
    parameters: dict[str, str]
    session_path: str
    cleanup_after_import: bool = True  # the entity's default, and DicomInboxImporter's _cleanupAfterImport
    status: str = "Queued"  # set in the constructor (Lombok issue 1347 workaround)
    resolution: str | None = None
    created: datetime = field(default_factory=datetime.now)
    timestamp: datetime = field(default_factory=datetime.now)

    def to_json(self) -> dict[str, Any]:
        def ms(value: datetime) -> int:
            return int(value.timestamp() * 1000)  # Jackson's default for dates (departure 12)

        return {
            "id": self.id,
            "enabled": True,
            "created": ms(self.created),
            "timestamp": ms(self.timestamp),
            "disabled": 0,
            "username": self.username,
            "parameters": dict(self.parameters),
            "sessionPath": self.session_path,
            "status": self.status,
            "cleanupAfterImport": self.cleanup_after_import,
            "resolution": self.resolution,
        }


class InboxImporter:
    """The inbox importer of one stand-in: validation on POST, then the JMS listener on a thread."""

    def __init__(self, xnat: XnatStandIn) -> None:
        self.xnat = xnat
        self.requests: dict[int, InboxRequest] = {}
        self.delay = 0.05  # seconds spent in each status on the way (test knob: the asynchronous steps)
        self.failing: dict[str, str] = {}  # folder name → reason: its request Fails with that reason
        self._lock = threading.Lock()
        self._next = 1

    # --- POST /data/services/import?import-handler=inbox ------------------------------------------

    def submit(self, params: dict[str, str], user: str) -> InboxRequest:
        """DicomInboxImporter.call: check, create the request (Queued), queue it; raises InboxRefused."""
        xnat = self.xnat
        cleanup = True
        if "cleanupAfterImport" in params:
            cleanup = params["cleanupAfterImport"].lower() == "true"  # Boolean.valueOf
        if "path" not in params:
            raise InboxRefused(400, BAD_PATH)
        inbox_path = xnat.site_config["inboxPath"]
        normalized = os.path.normpath(params["path"]) if params["path"] else "."  # Paths.normalize
        if not normalized.startswith(inbox_path):  # a string prefix test, as XNAT's
            raise InboxRefused(400, BAD_PATH)
        rel = normalized[len(inbox_path) :].lstrip("\\").lstrip("/")  # replaceFirst ^inboxPath, ^\\, ^/
        cuts = [i for i in (rel.find("\\"), rel.find("/")) if i != -1]
        subdirectory = rel[: min(cuts)] if cuts else rel
        session_path = Path(normalized)
        if not session_path.exists():
            raise InboxRefused(400, BAD_PATH)
        project = params.get("PROJECT_ID", "")
        if not xnat.can_edit(user, subdirectory):  # getXnatProjectdatasById + Permissions.canEditProject
            raise InboxRefused(400, BAD_PATH)
        if not xnat.can_edit(user, project):
            raise InboxRefused(400, "You do not have permission to edit the specified destination project.")
        if session_path.is_file():
            name = session_path.name.lower()
            if not name.endswith((".zip", ".tgz", ".tar", ".tar.gz.")):  # ARCHIVE_EXTENSIONS, typo included
                raise InboxRefused(
                    400,
                    f"User inbox file {session_path.name} does not have an archive extension - [.zip, .tgz, "
                    ".tar, .tar.gz.].  It will be skipped. The path must be to either a directory or an archive "
                    "file.",
                )
            raise InboxRefused(501, "stand-in: archives in the inbox are not implemented (departure 20)")
        if not any(session_path.iterdir()):
            raise InboxRefused(400, "Specified directory does not contain any files.")
        parameters = dict(params)
        if "EXPT_LABEL" in parameters:
            parameters.pop("session", None)  # so that the imported session is not renamed
            if xnat.experiment_exists(project, parameters["EXPT_LABEL"]):
                raise InboxRefused(409, "Experiment with that label already exists in that project.")
        elif "session" in parameters:
            if xnat.experiment_exists(project, parameters["session"]):
                raise InboxRefused(409, "Session already exists in that project.")
            parameters["EXPT_LABEL"] = parameters["session"]
        with self._lock:
            request = InboxRequest(self._next, user, parameters, str(session_path.absolute()), cleanup)
            self.requests[request.id] = request
            self._next += 1
        xnat.spawn(self._on_request, request, name="xnat-standin-inbox")  # XDAT.sendJmsRequest
        return request

    # --- GET /xapi/dicom/... ---------------------------------------------------------------------

    def get(self, request_id: int, user: str) -> InboxRequest | None:
        """DicomTransactionApi.getDicomInboxImportRequest: the request, or None (404) if unknown or not the
        user's (every stand-in user is a site admin, departure 11, so only unknown ids are None)."""
        with self._lock:
            return self.requests.get(request_id)

    def listing(self, active: bool) -> list[InboxRequest]:
        with self._lock:
            found = sorted(self.requests.values(), key=lambda r: r.id)
        return [r for r in found if r.status in ACTIVE] if active else found

    # --- the listener ----------------------------------------------------------------------------

    def _set(self, request: InboxRequest, status: str, resolution: str | None = None) -> None:
        with self._lock:
            request.status = status
            request.timestamp = datetime.now()
            if resolution is not None:
                request.resolution = resolution
        time.sleep(self.delay)

    def _on_request(self, request: InboxRequest) -> None:
        """DicomInboxImportRequestListener.onRequest."""
        path = request.session_path
        try:
            self._set(request, "Accepted")  # _service.setToAccepted
            for key in ("identifier", "namer"):
                if key in request.parameters:
                    raise NotImplementedError(
                        f"stand-in: the {key} parameter is not implemented (departure 20)"
                    )
            if not Path(path).exists():  # DicomInboxImportRequestImporter's constructor
                self._set(request, "Failed", f"No session folder was found at the specified location :{path}")
                return
            if not Path(path).is_dir():
                self._set(request, "Failed", f"The location specified must be a folder but isn't: {path}")
                return
            uris = self._import(request)
            if uris is None:
                return  # failed already
            for uri in uris:  # commitPrearcSession per session; Completed after each
                self._commit(uri, request.parameters)
                self._set(
                    request, "Completed", "Completed importing request with results: " + ", ".join(uris)
                )
            # No URI (no file was a DICOM object): the request stays Processed, as in XNAT.
        except Exception as exc:  # onRequest's last catch
            self._set(
                request,
                "Failed",
                f"The request to import data located at {path} failed due to an exception of type "
                f"{type(exc).__name__}:\n{exc}",
            )
            if not isinstance(exc, (NotImplementedError, _CommitFailed)):
                with self.xnat.locked():
                    self.xnat.errors.append(f"inbox {path}: {traceback.format_exc()}")

    def _import(self, request: InboxRequest) -> list[str] | None:
        """DicomInboxImportRequestImporter.call: walk (following links), one GradualDicomImporter per file, a
        file that fails is logged and skipped; Processed; then the folder is deleted if cleanupAfterImport."""
        self._set(request, "Importing")  # _service.setToImporting
        folder = Path(request.session_path)
        reason = self.failing.get(folder.name)
        if reason is not None:  # a test knob: the IOException branch, with its message
            self._set(
                request,
                "Failed",
                f"An error occurred reading data while processing the session located at {folder}:\n{reason}",
            )
            return None
        uris: dict[str, None] = {}  # LinkedHashSet
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                try:
                    uri = self._gradual_import(Path(dirpath) / name, request.parameters)
                except (InvalidDicomError, UnsupportedScript, _NullPreventAnon, ValueError, OSError) as exc:
                    self.xnat.task_log.append(f"inbox: skipped {dirpath}/{name}: {exc}")  # visitFile: logged
                    continue
                uris[uri] = None
        self._set(request, "Processed")  # _service.setToProcessed
        if request.cleanup_after_import:
            # FileUtils.deleteDirQuietly(_sessionPath); the path was checked to be below inboxPath on POST.
            inbox = Path(self.xnat.site_config["inboxPath"])
            if folder.resolve().is_relative_to(inbox.resolve()) and folder.resolve() != inbox.resolve():
                shutil.rmtree(folder, ignore_errors=True)
        return list(uris)

    def _gradual_import(self, path: Path, params: dict[str, str]) -> str:
        """GradualDicomImporter.call for one stored file, with the request's parameters (§4.6 table)."""
        xnat = self.xnat
        ds = pydicom.dcmread(path)  # a non-DICOM file raises: ClientException, logged by visitFile
        site_on = xnat.anonymize_site_enabled
        if site_on:
            parse_site_script(xnat.anonymize_site_script)  # refuse before storing (departure 15)
        route = xnat_route(ds, frozenset(xnat.projects))
        project = params.get("PROJECT_ID") or route.project
        subject = params.get("SUBJECT_ID") or route.subject
        label = params.get("EXPT_LABEL") or route.session or "dicom_upload"
        folder = params.get("PREARC_SESSION_FOLDER") or label
        timestamp = params.get("PREARC_TIMESTAMP") or _timestamp()
        root = (xnat.prearchive / project / timestamp) if project else (xnat.prearchive / timestamp)
        code: str | None = None
        if project is not None:  # GDI.shouldAutoArchive: the AA parameter, the headers, the project's code
            aa = params.get("AA", params.get("auto-archive"))
            asked = {"true": True, "false": False}.get((aa or "").lower())
            if asked is None:
                asked = requests_autoarchive(ds)
            if asked is not None:
                code = "AutoArchive" if asked else "Manual"
            else:
                code = {0: "Manual", 4: "AutoArchive", 5: "AutoArchiveOverwrite"}[
                    xnat.projects.get(project, 0)
                ]
        incoming = IncomingSession(
            project=project,
            timestamp=timestamp,
            folder=folder,
            name=label,
            subject=subject,
            tag=str(ds.StudyInstanceUID),
            scan_date=scan_date(ds),
            url=root / folder,
            prevent_anon=params.get("prevent_anon", "").lower() == "true",
            prevent_auto_commit=params.get("prevent_auto_commit", "").lower() == "true",
            source=params.get("SOURCE"),
            visit=params.get("VISIT"),
            protocol=params.get("SUBTYPE"),
        )
        filed = either_get_or_create_session(xnat.dsn, incoming, code, 15.0 * xnat.time_scale)
        series = ds.get("SeriesNumber")
        scan = scan_folder(
            str(series) if series not in (None, "") else None, str(ds.get("SeriesInstanceUID", "")) or None
        )
        dest = filed.url / "SCANS" / scan / "DICOM" / file_name(ds, xnat.site_config["dicomFileNameTemplate"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)  # copied: the inbox keeps its file until the clean-up (departure 20)
        if filed.prevent_anon is None:
            raise _NullPreventAnon("NullPointerException: prevent_anon is NULL")  # GDI:390 unboxing
        if not filed.prevent_anon and site_on:
            apply_site_script(dest, xnat.anonymize_site_script, filed.project, filed.subject, label)
        return filed.uri

    def _commit(self, uri: str, params: dict[str, str]) -> None:
        """PrearcUtils.commitPrearcSession (departure 20: PrearcSessionResource action=commit)."""
        parts = uri.strip("/").split("/")  # prearchive/projects/<P>/<ts>/<folder>
        key = (None if parts[2] == "Unassigned" else parts[2], parts[3], parts[4])
        if not self.xnat.commit_session(key, params):
            raise _CommitFailed(f"the build of {uri} failed")


class _NullPreventAnon(Exception):
    pass


class _CommitFailed(Exception):
    pass


_TS_LOCK = threading.Lock()


def _timestamp() -> str:
    """GDI:261-267 ``yyyyMMdd_HHmmssSSS``, unique per call as wall-clock ms would be."""
    from tests.xnat_standin import make_timestamp

    with _TS_LOCK:
        ts = make_timestamp()
        time.sleep(0.002)
    return ts
