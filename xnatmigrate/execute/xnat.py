"""XNAT REST client used by apply, verify and revert (xnat-reference.md §4).

Invariants:
- Stdlib only (``http.client``); one HTTP session per client: ``POST /data/JSESSION`` with Basic auth
  once, then the ``JSESSIONID`` cookie on every call (§4.1). A 401 on the cookie re-authenticates once.
- Connection errors, timeouts and 5xx are retried with exponential backoff; 4xx never are.
- Every failure ends as one ``XnatRestError`` line: what failed (method, path, status, XNAT's text,
  truncated) and what to do. The password never appears in a message, a log line or a repr.
- ``archive`` (not idempotent) is sent exactly once: a lost answer is ``OutcomeUnknown``, to be
  learnt from XNAT, never retried.
- Paths are exactly the ones §4 documents; NULL-project (Unassigned) sessions use ``Unassigned`` as
  the project segment (§4.4).

NOTE: other POSTs (rebuild) are retried: a repeated rebuild queues the same build again, harmlessly.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

from ..errors import XnatRestError
from .xnat_auth import Credentials as Credentials
from .xnat_auth import credentials_from_env as credentials_from_env
from .xnat_http import ARCHIVE_TIMEOUT as ARCHIVE_TIMEOUT
from .xnat_http import OutcomeUnknown as OutcomeUnknown
from .xnat_http import XnatSession, _Ctx, _summary

__all__ = [
    "DONE_STATUSES",
    "UNASSIGNED",
    "Credentials",
    "XnatClient",
    "credentials_from_env",
    "prearchive_uri",
]

log = logging.getLogger(__name__)

#: The pseudo-project of NULL-project rows in REST paths and listings (§1 ColType.PROJECTNAME, §4.4).
UNASSIGNED = "Unassigned"
#: Statuses a build ends in (§3: PrearchiveRebuildHandler → READY, ERROR; archive conflicts → CONFLICT).
DONE_STATUSES: frozenset[str] = frozenset({"READY", "ERROR", "CONFLICT"})

# --- paths ------------------------------------------------------------------------------------------


def _seg(value: str, what: str) -> str:
    if not value or value in (".", ".."):
        raise ValueError(f"empty or relative {what} in an XNAT path: {value!r}")
    return quote(value, safe="")


def prearchive_uri(project: str | None, timestamp: str, folder: str) -> str:
    """``/prearchive/projects/<P|Unassigned>/<ts>/<folder>``: the ``src`` of §4.5 services."""
    p = _seg(project or UNASSIGNED, "project")
    return f"/prearchive/projects/{p}/{_seg(timestamp, 'timestamp')}/{_seg(folder, 'folder')}"


# --- the client -------------------------------------------------------------------------------------


#: The first pauses of a wait, before it settles at its ``poll`` interval: XNAT's status reads are cheap
#: (one prearchive row, one entry of the import request map) and most builds and imports of a small
#: session end within a second, so a wait looks again soon at first; a long one still polls at ``poll``.
_FIRST_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)


def pauses(poll: float) -> Iterator[float]:
    """The pauses between the status reads of one wait: doubling from 50 ms up to ``poll``, then ``poll``."""
    for pause in _FIRST_PAUSES:
        if pause >= poll:
            break
        yield pause
    while True:
        yield poll


class XnatClient(XnatSession):
    """A thread-safe XNAT REST client (§4). Use as a context manager to end the HTTP session.

    Args:
        base_url: the XNAT root, e.g. ``https://xnat.example.org`` or ``https://host/xnat``.
        auth: from ``credentials_from_env``.
        timeout: seconds per socket operation.
        retries: extra attempts after the first on connection errors, timeouts and 5xx.
        backoff: the first delay; delay n is ``backoff * 2**n``.
        ssl_context: for https; default verification when None.
        sleep: injectable for tests.

    NOTE: each thread keeps its own keep-alive connection; the JSESSIONID is shared.
    """

    def __enter__(self) -> XnatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API (§4) --

    def prearchive_session(self, project: str | None, timestamp: str, folder: str) -> dict[str, str] | None:
        """The session's row as XNAT renders it (§4.4 PrearcSessionResource), or None if it has no row.

        All values are strings (§4 table responses): NULL → "", project NULL → "Unassigned".
        """
        path = "/data" + prearchive_uri(project, timestamp, folder)
        resp = self._call("GET", path, {"format": "json"}, ctx=_Ctx(project), allow=(404,))
        if resp.status == 404:
            return None
        rows = self._table(resp, "GET", path)
        if len(rows) > 1:
            raise XnatRestError(
                f"XNAT GET {path} returned {len(rows)} rows for one session; "
                "remove the duplicate row in xdat_search.prearchive (§7) and rerun"
            )
        return rows[0] if rows else None

    def prearchive_sessions(self, project: str | None, tag: str | None = None) -> list[dict[str, str]]:
        """All prearchive rows of a project (§4.4 PrearcSessionListResource); ``tag`` filters client-side.

        NOTE: XNAT's own ``?tag=`` filter needs an admin; filtering here works for any editor.
        """
        path = f"/data/prearchive/projects/{_seg(project or UNASSIGNED, 'project')}"
        resp = self._call("GET", path, {"format": "json"}, ctx=_Ctx(project))
        rows = self._table(resp, "GET", path)
        return [r for r in rows if tag is None or r.get("tag") == tag]

    def last_log(self, project: str | None, timestamp: str, folder: str) -> str:
        """The last log entry of a session (``.../logs/last``, §4.4), "" if XNAT has none."""
        path = "/data" + prearchive_uri(project, timestamp, folder) + "/logs/last"
        resp = self._call("GET", path, None, ctx=_Ctx(project), allow=(404,))
        return "" if resp.status == 404 else resp.text().strip()

    def rebuild(self, project: str | None, timestamp: str, folder: str) -> list[dict[str, str]]:
        """Queue a build (§4.5 PrearchiveBatchRebuild): asynchronous, the row becomes QUEUED_BUILDING.

        Returns the updated rows XNAT answers with ([] if the body is not a JSON table).
        NOTE: REST rebuilds never auto-archive (§3 autoArchiveBlocked); poll with ``wait_for_status``.
        """
        path = "/data/services/prearchive/rebuild"
        src = prearchive_uri(project, timestamp, folder)
        ctx = _Ctx(project, src, {404: "the session has no prearchive row (rebuild needs one, §4.5)"})
        resp = self._call("POST", path, {"format": "json"}, form={"src": src}, ctx=ctx)
        try:
            return self._table(resp, "POST", path)
        except XnatRestError:
            return []

    def wait_for_status(
        self,
        project: str | None,
        timestamp: str,
        folder: str,
        *,
        done: Iterable[str] = DONE_STATUSES,
        timeout: float = 600.0,
        poll: float = 1.0,
        on_poll: Callable[[dict[str, str]], None] | None = None,
    ) -> dict[str, str]:
        """Poll the session's row until its status is in ``done``; returns that row.

        Raises:
            XnatRestError: on timeout (saying the last status seen), or if the row disappears (XNAT
                deletes it when the timestamp folder is missing, §3 PrearchiveRebuildHandler).
        """
        wanted = frozenset(done)
        uri = prearchive_uri(project, timestamp, folder)
        deadline = time.monotonic() + timeout
        last = "none (no answer yet)"
        waits = pauses(poll)
        while True:
            row = self.prearchive_session(project, timestamp, folder)
            if row is None:
                raise XnatRestError(
                    f"prearchive session {uri} disappeared while waiting for {'/'.join(sorted(wanted))}: "
                    "XNAT deletes the row when the timestamp folder is missing; check the files and rerun"
                )
            if on_poll is not None:
                on_poll(row)
            last = row.get("status", "")
            if last in wanted:
                return row
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise XnatRestError(
                    f"timed out after {timeout:g}s waiting for {uri} to reach {'/'.join(sorted(wanted))}; "
                    f"last status {last}; check XNAT's prearchive page and logs, then rerun"
                )
            self.pause(min(next(waits), remaining))

    def archive(
        self,
        project: str | None,
        timestamp: str,
        folder: str,
        overwrite: str = "none",
        dest: str | None = None,
        extra: Mapping[str, str] | None = None,
        timeout: float = ARCHIVE_TIMEOUT,
    ) -> tuple[str, bool]:
        """Archive one session (``POST /data/services/archive``, §4.5, §9 Archiver).

        Returns (URI, finished): the archive URI and True when XNAT answered 200 (done); the
        ``Location`` (or the source) and False for a 303 (XNAT archives it as auto-archive: poll).

        One ``src`` makes the call synchronous: XNAT answers 200 text/uri-list
        ``/data/archive/projects/P/subjects/S/experiments/E`` when done, or 303 with ``Location``
        when the session is auto-archive (Archiver:131). It can run for XNAT's
        ``sessionArchiveTimeoutInterval`` (600 s, QueueBasedImageCommit:140), so it gets ``timeout``
        of its own. NOTE: sent exactly once — a retry after XNAT archived finds the row gone — and a
        timeout or lost connection raises ``OutcomeUnknown``: learn the outcome from the row and
        the experiment, never by posting again.
        """
        path = "/data/services/archive"
        src = prearchive_uri(project, timestamp, folder)
        form: dict[str, str] = {"src": src, "overwrite": overwrite}
        if dest:
            form["dest"] = dest
        form.update(extra or {})
        ctx = _Ctx(
            project,
            f"archive {src}",
            {
                400: "XNAT refused to archive; Unassigned sessions must be moved to a project first (§4.5)",
                403: "the session is busy (another operation holds it) or the user lacks edit rights",
                404: "XNAT has no prearchive row for it (already archived or deleted?)",
                409: "an experiment with this label already exists (row is now CONFLICT): "
                "use overwrite=append/delete or another label",
            },
        )
        resp = self._call("POST", path, None, form=form, ctx=ctx, allow=(303,), once=True, timeout=timeout)
        if resp.status == 303:
            return resp.location or src, False
        for line in resp.text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):  # text/uri-list comments start with '#'
                return line, True
        raise XnatRestError(
            f"XNAT POST {path} (src={src}) answered {resp.status} without an archive URI; check XNAT's logs"
        )

    def delete_prearchive_session(self, project: str | None, timestamp: str, folder: str) -> bool:
        """Delete a session's files and row (§4.4 DELETE); True when its row is gone afterwards.

        NOTE: XNAT answers 200 for a missing and for a locked row alike (§9), so the answer proves
        nothing: the row is read again, and a locked session XNAT kept gives False.
        """
        path = "/data" + prearchive_uri(project, timestamp, folder)
        ctx = _Ctx(project, hints={409: "the session is locked by a running operation: wait and rerun"})
        self._call("DELETE", path, None, ctx=ctx, allow=(404,))
        return self.prearchive_session(project, timestamp, folder) is None

    def wait_for_session(
        self, project: str | None, study_uid: str, label: str, *, timeout: float = 600.0, poll: float = 1.0
    ) -> dict[str, str]:
        """Poll the project's prearchive listing until XNAT's receiver has made the session.

        XNAT groups received files by (project, tag, name) (§3 eitherGetOrCreateSession), so the row
        with this StudyInstanceUID and label is the one the C-STORE files went into.
        """
        deadline = time.monotonic() + timeout
        shown = project or UNASSIGNED  # an admin's listing holds Unassigned rows too (§9): filter on it
        waits = pauses(poll)
        while True:
            rows = [
                r
                for r in self.prearchive_sessions(project, tag=study_uid)
                if r.get("name") == label and r.get("project") == shown
            ]
            if rows:
                return rows[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise XnatRestError(
                    f"timed out after {timeout:g}s waiting for XNAT's prearchive to show {project or UNASSIGNED}/"
                    f"{label} (study {study_uid}) after sending; check the receiver's routing and XNAT's logs"
                )
            self.pause(min(next(waits), remaining))

    def prearchive_scan_files(self, project: str | None, timestamp: str, folder: str) -> dict[str, int]:
        """Scan ID → number of files of a prearchive session's scan resources.

        ``/scans`` lists ID, xsiType and series_description only (PrearcScansListResource:34-40, §9);
        the counts come from ``.../resources?format=json`` (category, cat_id, label, file_count, …).
        """
        path = "/data" + prearchive_uri(project, timestamp, folder) + "/resources"
        resp = self._call("GET", path, {"format": "json"}, ctx=_Ctx(project))
        out: dict[str, int] = {}
        for r in self._table(resp, "GET", path):
            if r.get("category", "scans") in ("scans", "scan", ""):
                key = r.get("cat_id") or r.get("label") or "?"
                out[key] = out.get(key, 0) + int(r.get("file_count") or 0)
        return out

    def experiment_labels(self, project: str) -> set[str]:
        """Labels of the project's archived experiments (``GET /data/projects/<P>/experiments``)."""
        path = f"/data/projects/{_seg(project, 'project')}/experiments"
        resp = self._call(
            "GET", path, {"format": "json", "columns": "ID,label"}, ctx=_Ctx(project), allow=(404,)
        )
        if resp.status == 404:
            return set()
        return {r["label"] for r in self._table(resp, "GET", path) if r.get("label")}

    def experiment_scan_files(self, project: str, subject: str, label: str) -> dict[str, int] | None:
        """Scan ID → file count of an archived experiment (scans + their resources), None if absent."""
        base = (
            f"/data/projects/{_seg(project, 'project')}/subjects/{_seg(subject, 'subject')}"
            f"/experiments/{_seg(label, 'experiment')}"
        )
        resp = self._call("GET", base + "/scans", {"format": "json"}, ctx=_Ctx(project), allow=(404,))
        if resp.status == 404:
            return None
        out: dict[str, int] = {}
        for scan in self._table(resp, "GET", base + "/scans"):
            rpath = f"{base}/scans/{_seg(scan['ID'], 'scan')}/resources"
            res = self._table(self._call("GET", rpath, {"format": "json"}, ctx=_Ctx(project)), "GET", rpath)
            out[scan["ID"]] = sum(int(r.get("file_count") or 0) for r in res)
        return out

    def delete_experiment(self, project: str, subject: str, label: str) -> bool:
        """Delete an archived experiment and its files (``removeFiles=true``); False if absent."""
        path = (
            f"/data/projects/{_seg(project, 'project')}/subjects/{_seg(subject, 'subject')}"
            f"/experiments/{_seg(label, 'experiment')}"
        )
        return (
            self._call("DELETE", path, {"removeFiles": "true"}, ctx=_Ctx(project), allow=(404,)).status != 404
        )

    def prearchive_code(self, project: str) -> int:
        """The project's prearchive code (§4.3): 0 prearchive, 4 auto-archive, 5 auto-archive+overwrite."""
        path = f"/data/projects/{_seg(project, 'project')}/prearchive_code"
        text = self._call("GET", path, None, ctx=_Ctx(project)).text()
        match = re.search(r"-?\d+", text)
        if not match:
            raise XnatRestError(
                f"XNAT GET {path} answered {_summary(text)!r}, not a prearchive code; check XNAT's version"
            )
        return int(match.group())

    def site_anonymization_enabled(self) -> bool:
        """Whether XNAT applies its site-wide anonymisation script to every file it receives
        (``GET /xapi/anonymize/site/enabled``, AnonymizeApi:95, §9)."""
        path = "/xapi/anonymize/site/enabled"
        data = self._json(self._call("GET", path, None, ctx=_Ctx(what="site anonymisation")), "GET", path)
        if isinstance(data, bool):
            return data
        if isinstance(data, str) and data.strip().lower() in ("true", "false"):
            return data.strip().lower() == "true"
        raise XnatRestError(f"XNAT GET {path} answered {data!r}, not true/false; check XNAT's version")

    def site_anonymization_script(self) -> str:
        """The site-wide anonymisation script, DicomEdit text (``GET /xapi/anonymize/site``,
        AnonymizeApi:72-80, text/plain, §9)."""
        path = "/xapi/anonymize/site"
        resp = self._call("GET", path, None, ctx=_Ctx(what="site anonymisation script"))
        return resp.text()

    def receivers(self) -> list[dict[str, Any]]:
        """XNAT's DICOM receivers (``GET /xapi/dicomscp``, DicomSCPApi, §5, §9): aeTitle, port,
        enabled, directArchive, anonymizationEnabled, routingExpressionsEnabled, … each."""
        path = "/xapi/dicomscp"
        data = self._json(self._call("GET", path, None, ctx=_Ctx(what="DICOM receivers")), "GET", path)
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise XnatRestError(f"XNAT GET {path} did not answer a list of receivers; check XNAT's version")
        return data

    def editable_projects(self) -> set[str]:
        """IDs of the projects this user may edit (``GET /data/projects?restrict=edit``, §4.3)."""
        path = "/data/projects"
        resp = self._call("GET", path, {"format": "json", "restrict": "edit"}, ctx=_Ctx(what="projects"))
        return {r["ID"] for r in self._table(resp, "GET", path) if r.get("ID")}

    def inbox_import(
        self, project: str, subject: str | None, label: str, path: str, *, cleanup: bool = True
    ) -> str:
        """Ask XNAT's inbox importer to import the folder ``path`` (as XNAT sees it) into ``project``.

        ``POST /data/services/import?import-handler=inbox&PROJECT_ID=&SUBJECT_ID=&EXPT_LABEL=&path=
        &cleanupAfterImport=`` (Importer → DicomInboxImporter, §4.6) queues a request and answers its URI
        ``/xapi/dicom/<id>``; returns the id. NOTE: sent exactly once: a lost answer is
        ``OutcomeUnknown`` (the request may be queued): find it with ``inbox_requests``, never post again.
        """
        query = {
            "import-handler": "inbox",
            "PROJECT_ID": project,
            "EXPT_LABEL": label,
            "path": path,
            "cleanupAfterImport": "true" if cleanup else "false",
            "format": "plain",
        }
        if subject:
            query["SUBJECT_ID"] = subject
        ctx = _Ctx(
            project,
            f"inbox import of {path}",
            {
                400: "XNAT refused the path or the project (it must lie below its inboxPath, in a folder "
                "named after a project the user can edit)",
                409: "an experiment with this label already exists in the project",
            },
        )
        resp = self._call("POST", "/data/services/import", query, ctx=ctx, once=True)
        for line in resp.text().splitlines():
            match = re.search(r"/xapi/dicom/(\d+)\s*$", line.strip())
            if match:
                return match.group(1)
        raise XnatRestError(
            f"XNAT POST /data/services/import (inbox, {path}) answered {_summary(resp.text())!r}, not "
            "/xapi/dicom/<id>; check XNAT's version (the inbox importer needs 1.7.6+)"
        )

    def inbox_request(self, request_id: str) -> dict[str, Any] | None:
        """An inbox import request (``GET /xapi/dicom/{id}``, DicomTransactionApi): status Queued |
        Trawling | Importing | Accepted | Processed | Failed | Completed, ``resolution``, ``sessionPath``;
        None when XNAT does not know it (404)."""
        path = f"/xapi/dicom/{_seg(request_id, 'request id')}"
        resp = self._call("GET", path, None, ctx=_Ctx(what="inbox import request"), allow=(404,))
        if resp.status == 404:
            return None
        data = self._json(resp, "GET", path)
        if not isinstance(data, dict):
            raise XnatRestError(f"XNAT GET {path} did not answer an import request; check XNAT's version")
        return data

    def inbox_requests(self) -> list[dict[str, Any]]:
        """Every inbox import request of this user (``GET /xapi/dicom/list/all``, DicomTransactionApi)."""
        path = "/xapi/dicom/list/all"
        data = self._json(self._call("GET", path, None, ctx=_Ctx(what="inbox import requests")), "GET", path)
        if not isinstance(data, list):
            raise XnatRestError(f"XNAT GET {path} did not answer a list; check XNAT's version")
        return [d for d in data if isinstance(d, dict)]

    def site_config(self, key: str) -> str | None:
        """One site preference (``GET /xapi/siteConfig/<key>``, SiteConfigApi); None when XNAT has none."""
        path = f"/xapi/siteConfig/{_seg(key, 'preference')}"
        resp = self._call("GET", path, None, ctx=_Ctx(what=f"site preference {key}"), allow=(404,))
        if resp.status == 404:
            return None
        text = resp.text().strip()
        if text.startswith('"'):
            try:
                value = json.loads(text)
            except ValueError:
                return text
            return value if isinstance(value, str) else text
        return text
