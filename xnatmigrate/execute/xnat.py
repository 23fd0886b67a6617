"""XNAT REST client used by apply, verify and revert (xnat-reference.md §4).

Invariants:
- Stdlib only (``http.client``); one HTTP session per client: ``POST /data/JSESSION`` with Basic auth
  once, then the ``JSESSIONID`` cookie on every call (§4.1). A 401 on the cookie re-authenticates once.
- Connection errors, timeouts and 5xx are retried with exponential backoff; 4xx never are.
- Every failure ends as one ``XnatRestError`` line: what failed (method, path, status, XNAT's text,
  truncated) and what to do. The password never appears in a message, a log line or a repr.
- Paths are exactly the ones §4 documents; NULL-project (Unassigned) sessions use ``Unassigned`` as
  the project segment (§4.4).

NOTE: retried POSTs are not idempotent in XNAT. A lost response to ``/data/services/archive`` may be
retried after XNAT archived the session; the retry then gets 404 (row gone). Callers that archive must
verify the experiment in the archive before treating that 404 as a failure.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import netrc
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .. import __version__
from ..errors import XnatRestError

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

_MAX_TEXT = 200
# 501/505 mean "this server cannot do that": retrying cannot help.
_NOT_RETRYABLE_5XX = frozenset({501, 505})


# XNAT's sessionArchiveTimeoutInterval (600 s, QueueBasedImageCommit:140), plus a margin.
ARCHIVE_TIMEOUT = 630.0


class OutcomeUnknown(XnatRestError):
    """A request that is not idempotent was sent, but its answer never came: XNAT may have acted."""


# --- credentials ------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Credentials:
    """A user and password for HTTP Basic (a password or an alias token's secret, §4.1).

    NOTE: ``repr``/``str`` mask the password; nothing in this module formats it.
    """

    user: str
    password: str = field(compare=False)
    source: str = "explicit"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def mask(self, text: str) -> str:
        """``text`` with any occurrence of the password replaced by ``***``."""
        return text.replace(self.password, "***") if self.password else text

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password='***', source={self.source!r})"

    __str__ = __repr__


def _pair(env: Mapping[str, str], user_var: str, secret_var: str) -> tuple[str, str] | None:
    user, secret = env.get(user_var, ""), env.get(secret_var, "")
    if user and secret:
        return user, secret
    if user or secret:
        have, missing = (user_var, secret_var) if user else (secret_var, user_var)
        raise XnatRestError(
            f"{have} is set but {missing} is not: set both (or neither, to use another source)"
        )
    return None


def credentials_from_env(
    base_url: str, environ: Mapping[str, str] | None = None, netrc_file: str | Path | None = None
) -> Credentials:
    """Resolve XNAT credentials, first match wins.

    1. ``XNAT_USER`` / ``XNAT_PASSWORD``;
    2. ``XNAT_ALIAS`` / ``XNAT_SECRET``: an alias token from ``/data/services/tokens/issue``, used as the
       Basic user/password (§4.1 AliasTokenRestlet);
    3. ``~/.netrc`` (or ``netrc_file``), ``machine`` = host of ``base_url``.

    Raises:
        XnatRestError: nothing found (the message names every variable and the netrc entry), only half
            of a pair is set, or the netrc file is unusable.
    """
    env = os.environ if environ is None else environ
    host = urlsplit(base_url).hostname or base_url
    pair = _pair(env, "XNAT_USER", "XNAT_PASSWORD")
    if pair:
        return Credentials(pair[0], pair[1], "XNAT_USER/XNAT_PASSWORD")
    pair = _pair(env, "XNAT_ALIAS", "XNAT_SECRET")
    if pair:
        return Credentials(pair[0], pair[1], "XNAT_ALIAS/XNAT_SECRET")
    shown = str(netrc_file) if netrc_file is not None else "~/.netrc"
    found = _from_netrc(netrc_file, host, shown)
    if found:
        return found
    raise XnatRestError(
        f"no XNAT credentials for {base_url}: set XNAT_USER and XNAT_PASSWORD, or XNAT_ALIAS and "
        f"XNAT_SECRET (an alias token), or add 'machine {host} login USER password PASSWORD' to {shown}"
    )


def _from_netrc(netrc_file: str | Path | None, host: str, shown: str) -> Credentials | None:
    try:
        # file=None makes the stdlib read ~/.netrc *and* refuse one that others can read.
        parsed = netrc.netrc(None if netrc_file is None else str(netrc_file))
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as exc:
        # NOTE: exc.msg may quote a token of the file (a password): only permission messages are shown.
        msg = exc.msg if ("access" in exc.msg or "owner" in exc.msg) else "syntax error"
        raise XnatRestError(
            f"cannot use {shown} (line {exc.lineno}): {msg}; fix it or set XNAT_USER/XNAT_PASSWORD"
        ) from None
    except OSError as exc:
        raise XnatRestError(
            f"cannot read {shown}: {exc.strerror}; fix it or set XNAT_USER/XNAT_PASSWORD"
        ) from None
    entry = parsed.authenticators(host)
    if entry is None:
        return None
    login, _account, password = entry
    if not login or not password:
        raise XnatRestError(f"{shown}: the entry for machine {host} needs both login and password")
    return Credentials(login, password, f"{shown} machine {host}")


# --- paths ------------------------------------------------------------------------------------------


def _seg(value: str, what: str) -> str:
    if not value or value in (".", ".."):
        raise ValueError(f"empty or relative {what} in an XNAT path: {value!r}")
    return quote(value, safe="")


def prearchive_uri(project: str | None, timestamp: str, folder: str) -> str:
    """``/prearchive/projects/<P|Unassigned>/<ts>/<folder>``: the ``src`` of §4.5 services."""
    p = _seg(project or UNASSIGNED, "project")
    return f"/prearchive/projects/{p}/{_seg(timestamp, 'timestamp')}/{_seg(folder, 'folder')}"


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    body: bytes
    content_type: str
    location: str = ""

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Ctx:
    """What a request is about, for error hints."""

    project: str | None = None
    what: str = ""
    hints: Mapping[int, str] = field(default_factory=dict)


# --- the client -------------------------------------------------------------------------------------


class XnatClient:
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

    def __init__(
        self,
        base_url: str,
        auth: Credentials,
        timeout: float = 30,
        retries: int = 4,
        backoff: float = 0.5,
        *,
        ssl_context: ssl.SSLContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise XnatRestError(f"xnat.url {base_url!r} is not an http(s) URL; set it to the XNAT root URL")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl_context
        self._sleep = sleep
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()  # guards _conns
        self._session_lock = threading.Lock()  # guards _session_id; held while logging in
        self._session_id: str | None = None

    def __repr__(self) -> str:
        return f"XnatClient({self.base_url!r}, auth={self.auth!r})"

    # -- lifecycle --

    def __enter__(self) -> XnatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Invalidate the HTTP session (``DELETE /data/JSESSION``, §4.1) and close the connections."""
        with self._session_lock:
            sid, self._session_id = self._session_id, None
        if sid:
            try:
                self._send("DELETE", "/data/JSESSION", None, cookie=sid)
            except (OSError, http.client.HTTPException):
                pass  # best effort: the session expires on its own
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

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
            self._sleep(min(poll, remaining))

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
            self._sleep(min(poll, remaining))

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

    def receivers(self) -> list[dict[str, Any]]:
        """XNAT's DICOM receivers (``GET /xapi/dicomscp``, DicomSCPApi, §5, §9): aeTitle, port,
        enabled, directArchive, anonymizationEnabled, routingExpressionsEnabled, … each."""
        path = "/xapi/dicomscp"
        data = self._json(self._call("GET", path, None, ctx=_Ctx(what="DICOM receivers")), "GET", path)
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise XnatRestError(f"XNAT GET {path} did not answer a list of receivers; check XNAT's version")
        return data

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

    # -- plumbing --

    def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        *,
        form: Mapping[str, str] | None = None,
        ctx: _Ctx | None = None,
        allow: tuple[int, ...] = (),
        once: bool = False,
        timeout: float | None = None,
    ) -> _Response:
        """One authenticated request; raises XnatRestError unless 2xx or in ``allow``.

        ``once``: a call that is not idempotent (archive) is sent exactly once — never retried on a
        5xx, a lost connection or a timeout, whose outcome is then unknown (``OutcomeUnknown``).
        """
        ctx = ctx or _Ctx()
        full = path + ("?" + urlencode(query) if query else "")
        body = urlencode(form).encode("utf-8") if form is not None else None
        sid = self._ensure_session()
        send = self._send_once if once else self._send_retrying
        resp = send(method, full, body, sid, ctx, timeout=timeout)
        if resp.status == 401:
            # §4.1: the session may have expired or been invalidated; log in again, once. (A 401
            # means XNAT did not run the request, so even a non-idempotent one may be sent again.)
            sid = self._relogin(sid)
            resp = send(method, full, body, sid, ctx, timeout=timeout)
        if 200 <= resp.status < 300 or resp.status in allow:
            return resp
        raise self._error(method, path, resp, ctx)

    def _ensure_session(self) -> str:
        with self._session_lock:
            if self._session_id is None:
                self._session_id = self._login()
            return self._session_id

    def _relogin(self, stale: str) -> str:
        with self._session_lock:
            if self._session_id == stale:  # another thread may have logged in already
                self._session_id = self._login()
            assert self._session_id is not None
            return self._session_id

    def _login(self) -> str:
        """``POST /data/JSESSION`` with Basic auth → the session id as text/plain (§4.1 UserSession)."""
        ctx = _Ctx(what="login")
        resp = self._send_retrying("POST", "/data/JSESSION", b"", None, ctx, basic=True)
        if resp.status != 200:
            raise self._error("POST", "/data/JSESSION", resp, ctx)
        sid = resp.text().strip()
        if not re.fullmatch(r"[A-Za-z0-9._-]{8,200}", sid):
            raise XnatRestError(
                f"XNAT POST /data/JSESSION answered {_summary(sid)!r}, not a session id; "
                f"check xnat.url ({self.base_url}) points to the XNAT root"
            )
        log.debug("XNAT session opened at %s as %s", self.base_url, self.auth.user)
        return sid

    def _send_once(
        self,
        method: str,
        path: str,
        body: bytes | None,
        cookie: str | None,
        ctx: _Ctx,
        basic: bool = False,
        timeout: float | None = None,
    ) -> _Response:
        try:
            return self._send(method, path, body, cookie=cookie, basic=basic, timeout=timeout)
        except ssl.SSLCertVerificationError as exc:
            raise XnatRestError(
                f"cannot verify the TLS certificate of {self.base_url} ({exc.verify_message}); "
                "fix xnat.url or the CA bundle"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else "lost its connection"
            raise OutcomeUnknown(
                f"XNAT {method} {path.split('?')[0]}{' (' + ctx.what + ')' if ctx.what else ''} {kind} "
                f"({type(exc).__name__}); it is not sent again: XNAT may have done it"
            ) from None

    def _send_retrying(
        self,
        method: str,
        path: str,
        body: bytes | None,
        cookie: str | None,
        ctx: _Ctx,
        basic: bool = False,
        timeout: float | None = None,
    ) -> _Response:
        attempt = 0
        while True:
            failure: Exception | None = None
            try:
                resp = self._send(method, path, body, cookie=cookie, basic=basic, timeout=timeout)
            except ssl.SSLCertVerificationError as exc:
                raise XnatRestError(
                    f"cannot verify the TLS certificate of {self.base_url} ({exc.verify_message}); "
                    "fix xnat.url or the CA bundle"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                failure, resp = exc, None
            if resp is not None and not (resp.status >= 500 and resp.status not in _NOT_RETRYABLE_5XX):
                return resp
            if attempt >= self.retries:
                if resp is not None:
                    return resp
                kind = "timed out" if isinstance(failure, TimeoutError) else "failed"
                raise XnatRestError(
                    f"cannot reach {self.base_url}: {method} {path.split('?')[0]} {kind} after "
                    f"{attempt + 1} attempts ({type(failure).__name__}: {self.auth.mask(str(failure))}); "
                    "check xnat.url and that XNAT is up; a rerun resumes"
                ) from None
            delay = self.backoff * (2**attempt)
            why = f"HTTP {resp.status}" if resp is not None else type(failure).__name__
            log.warning(
                "XNAT %s %s: %s; retry %d/%d in %.1fs", method, path, why, attempt + 1, self.retries, delay
            )
            self._sleep(delay)
            attempt += 1

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None,
        *,
        cookie: str | None,
        basic: bool = False,
        timeout: float | None = None,
    ) -> _Response:
        headers = {"User-Agent": f"xnatmigrate/{__version__}", "Accept": "*/*"}
        if basic:
            headers["Authorization"] = self.auth.basic_header()
        if cookie:
            headers["Cookie"] = f"JSESSIONID={cookie}"
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        # A call with its own timeout (a long, synchronous archive) gets a connection of its own.
        conn = self._connection() if timeout is None else self._new_connection(timeout)
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
            raw = conn.getresponse()
            data = raw.read()
        finally:
            if timeout is not None:
                conn.close()
        return _Response(
            raw.status,
            raw.reason or "",
            data,
            raw.getheader("Content-Type", "") or "",
            raw.getheader("Location", "") or "",
        )

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl or ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection(self.timeout)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _error(self, method: str, path: str, resp: _Response, ctx: _Ctx) -> XnatRestError:
        text = _summary(self.auth.mask(resp.text()))
        about = f" ({ctx.what})" if ctx.what else ""
        what = f"XNAT {method} {path}{about} failed: HTTP {resp.status}" + (f" {text}" if text else "")
        return XnatRestError(f"{what}; {self._hint(resp.status, ctx)}", resp.status)

    def _hint(self, status: int, ctx: _Ctx) -> str:
        if status in ctx.hints:
            return ctx.hints[status]
        if status == 401:
            return (
                f"check XNAT_USER/XNAT_PASSWORD (credentials from {self.auth.source}, user {self.auth.user})"
            )
        if status == 403:
            target = f"project {ctx.project}" if ctx.project else "this resource"
            return f"user {self.auth.user} needs edit rights on {target}"
        if status == 404:
            return "not found: check the project and session exist and xnat.url points to the right XNAT"
        if status == 409:
            return "XNAT reports a conflict or a locked session: wait for the running operation, then rerun"
        if status >= 500:
            return "XNAT failed; see its logs (xnat.log, catalina.out); a rerun resumes"
        return "XNAT refused the request; see its message"

    def _json(self, resp: _Response, method: str, path: str) -> Any:
        try:
            return json.loads(resp.body)
        except ValueError:
            raise XnatRestError(
                f"XNAT {method} {path} did not answer JSON ({_summary(resp.text())!r}); "
                f"is xnat.url ({self.base_url}) the XNAT root?"
            ) from None

    def _table(self, resp: _Response, method: str, path: str) -> list[dict[str, str]]:
        """The rows of a §4 table response ``{"ResultSet":{"Result":[...]}}``."""
        data = self._json(resp, method, path)
        result = data.get("ResultSet", {}).get("Result") if isinstance(data, dict) else None
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise XnatRestError(
                f"XNAT {method} {path} did not answer a ResultSet table; check XNAT's version"
            )
        return [{str(k): "" if v is None else str(v) for k, v in r.items()} for r in result]


def _summary(text: str) -> str:
    """XNAT's error text on one line: tags stripped, whitespace collapsed, truncated."""
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"
