"""The HTTP session under the XNAT REST client (xnat-reference.md §4.1): one JSESSION, keep-alive
connections per thread, retries, and one-line errors.

Invariants:
- Stdlib only (``http.client``); ``POST /data/JSESSION`` with Basic auth once, then the ``JSESSIONID``
  cookie on every call. A 401 on the cookie re-authenticates once.
- Connection errors, timeouts and 5xx are retried with exponential backoff; 4xx never are; a call
  sent with ``once`` (not idempotent) is never retried, and a lost answer is ``OutcomeUnknown``.
- Every failure ends as one ``XnatRestError`` line: what failed (method, path, status, XNAT's text,
  truncated) and what to do. The password never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from .. import __version__
from ..errors import XnatRestError
from .xnat_auth import Credentials

log = logging.getLogger("xnatmigrate.execute.xnat")

_MAX_TEXT = 200
# 501/505 mean "this server cannot do that": retrying cannot help.
_NOT_RETRYABLE_5XX = frozenset({501, 505})


# XNAT's sessionArchiveTimeoutInterval (600 s, QueueBasedImageCommit:140), plus a margin.
ARCHIVE_TIMEOUT = 630.0


class OutcomeUnknown(XnatRestError):
    """A request that is not idempotent was sent, but its answer never came: XNAT may have acted."""


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


class XnatSession:
    """The HTTP side of ``XnatClient``: connections, the JSESSION, retries, errors (see module docstring).

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
        self._waited = 0.0  # seconds spent waiting on XNAT (guarded by _lock): see ``waited``
        # Called before each pause of a poll (a progress line saying the run waits on XNAT).
        self.on_pause: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"XnatClient({self.base_url!r}, auth={self.auth!r})"

    # -- lifecycle --

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
        started = time.monotonic()
        try:
            return self._call_untimed(
                method, path, query, form=form, ctx=ctx, allow=allow, once=once, timeout=timeout
            )
        finally:
            self._add_wait(time.monotonic() - started)

    @property
    def waited(self) -> float:
        """Seconds this client spent waiting on XNAT: its requests (retries and logins included) and the
        pauses of its polls (``pause``), summed over threads. What a long run spends on XNAT's side."""
        with self._lock:
            return self._waited

    def pause(self, seconds: float) -> None:
        """Sleep between two status reads of a wait on XNAT (counted in ``waited``)."""
        if self.on_pause is not None:
            self.on_pause()
        self._sleep(seconds)
        self._add_wait(seconds)

    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self._waited += seconds

    def _call_untimed(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        *,
        form: Mapping[str, str] | None,
        ctx: _Ctx | None,
        allow: tuple[int, ...],
        once: bool,
        timeout: float | None,
    ) -> _Response:
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

    def _tls_error(self, exc: ssl.SSLCertVerificationError) -> XnatRestError:
        return XnatRestError(
            f"cannot verify the TLS certificate of {self.base_url} ({exc.verify_message}); "
            "fix xnat.url or the CA bundle"
        )

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
            raise self._tls_error(exc) from None
        except (OSError, http.client.HTTPException) as exc:
            if timeout is None:
                self._drop_connection()  # the thread's keep-alive connection is broken: never reuse it
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
                raise self._tls_error(exc) from None
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
