"""XnatClient against a tiny scripted HTTP server: auth sources, session reuse, retries, messages."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from xnatmigrate.errors import XnatRestError
from xnatmigrate.execute.xnat import (
    Credentials,
    OutcomeUnknown,
    XnatClient,
    credentials_from_env,
    prearchive_uri,
)

PASSWORD = "s3cret-Pa55"
CREDS = Credentials("alice", PASSWORD, "XNAT_USER/XNAT_PASSWORD")


# --- a scripted server ------------------------------------------------------------------------------


class Scripted:
    """Answers from per-(method, path) queues; the last answer of a queue repeats. Records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.routes: dict[tuple[str, str], list[tuple[int, str | bytes, float]]] = {}
        self.sessions = 0
        self.lock = threading.Lock()

    def on(
        self, method: str, path: str, *answers: tuple[int, str | bytes] | tuple[int, str | bytes, float]
    ) -> None:
        self.routes[(method, path)] = [(a[0], a[1], a[2] if len(a) > 2 else 0.0) for a in answers]  # type: ignore[misc]

    def answer(self, method: str, path: str, headers: Any) -> tuple[int, bytes, float]:
        with self.lock:
            queue = self.routes.get((method, path.split("?")[0]))
            if queue is not None:
                status, body, delay = queue.pop(0) if len(queue) > 1 else queue[0]
                return status, body.encode() if isinstance(body, str) else body, delay
            if (method, path) == ("POST", "/data/JSESSION"):
                expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
                if headers.get("Authorization") != expected:
                    return 401, b"<html><body>Login failed</body></html>", 0.0
                self.sessions += 1
                return 200, f"SESSIONID{self.sessions:04d}".encode(), 0.0
            if method == "DELETE" and path == "/data/JSESSION":
                return 200, b"", 0.0
        return 404, b"not scripted", 0.0


@pytest.fixture
def server() -> Iterator[tuple[Scripted, str]]:
    script = Scripted()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with script.lock:
                script.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
            status, payload, delay = script.answer(self.command, self.path, self.headers)
            if delay:
                time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if payload[:1] in b"{[" else "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the timeout tests leave the client gone before the answer: a broken pipe is expected

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield script, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client(url: str, sleeps: Sleeps | None = None, **kw: Any) -> XnatClient:
    return XnatClient(url, CREDS, sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def table(*rows: dict[str, str]) -> str:
    return json.dumps({"ResultSet": {"Result": list(rows), "totalRecords": str(len(rows))}})


def non_login(script: Scripted) -> list[dict[str, Any]]:
    return [r for r in script.requests if r["path"] != "/data/JSESSION"]


# --- credentials ------------------------------------------------------------------------------------


def test_user_password_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_USER", "alice")
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    monkeypatch.setenv("XNAT_ALIAS", "tok")
    monkeypatch.setenv("XNAT_SECRET", "sec")
    creds = credentials_from_env("https://xnat.example.org")
    assert (creds.user, creds.password, creds.source) == ("alice", PASSWORD, "XNAT_USER/XNAT_PASSWORD")


def test_alias_token_when_no_user() -> None:
    creds = credentials_from_env("https://xnat.example.org", {"XNAT_ALIAS": "a1b2", "XNAT_SECRET": "zz"})
    assert (creds.user, creds.password, creds.source) == ("a1b2", "zz", "XNAT_ALIAS/XNAT_SECRET")


def test_half_a_pair_is_an_error() -> None:
    with pytest.raises(XnatRestError, match="XNAT_USER is set but XNAT_PASSWORD is not"):
        credentials_from_env("https://x", {"XNAT_USER": "alice"})
    with pytest.raises(XnatRestError, match="XNAT_SECRET is set but XNAT_ALIAS is not"):
        credentials_from_env("https://x", {"XNAT_SECRET": "zz"})


def test_netrc_entry_for_the_url_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text(
        f"machine other.org login bob password nope\nmachine xnat.example.org login carol password {PASSWORD}\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    creds = credentials_from_env("https://xnat.example.org:8443/xnat", {})
    assert (creds.user, creds.password) == ("carol", PASSWORD)
    assert creds.source == "~/.netrc machine xnat.example.org"


def test_netrc_readable_by_others_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine xnat.example.org login carol password {PASSWORD}\n")
    netrc.chmod(0o644)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(XnatRestError, match=r"~/\.netrc.*access too permissive") as err:
        credentials_from_env("https://xnat.example.org", {})
    assert PASSWORD not in str(err.value)


def test_netrc_syntax_error_does_not_echo_the_file(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine xnat.example.org login carol password {PASSWORD} bogus {PASSWORD}x\n")
    with pytest.raises(XnatRestError, match="syntax error") as err:
        credentials_from_env("https://xnat.example.org", {}, netrc_file=netrc)
    assert PASSWORD not in str(err.value)


def test_no_credentials_says_what_to_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc there
    with pytest.raises(XnatRestError) as err:
        credentials_from_env("https://xnat.example.org/xnat", {})
    msg = str(err.value)
    for needle in (
        "XNAT_USER",
        "XNAT_PASSWORD",
        "XNAT_ALIAS",
        "XNAT_SECRET",
        "machine xnat.example.org",
        "~/.netrc",
    ):
        assert needle in msg


def test_repr_masks_the_password() -> None:
    assert PASSWORD not in repr(CREDS) and PASSWORD not in str(CREDS)
    assert "***" in repr(CREDS)
    assert PASSWORD not in repr(XnatClient("http://127.0.0.1:1", CREDS))


def test_bad_base_url() -> None:
    with pytest.raises(XnatRestError, match="not an http"):
        XnatClient("xnat.example.org", CREDS)


# --- session ----------------------------------------------------------------------------------------


def test_logs_in_once_then_uses_the_cookie(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (200, "4"))
    c = client(url)
    assert c.prearchive_code("P1") == 4 and c.prearchive_code("P1") == 4
    login, *rest = script.requests
    assert (login["method"], login["path"]) == ("POST", "/data/JSESSION")
    assert login["headers"]["Authorization"].startswith("Basic ")
    assert len(rest) == 2
    for r in rest:
        assert r["headers"]["Cookie"] == "JSESSIONID=SESSIONID0001"
        assert "Authorization" not in r["headers"]
        assert r["path"] == "/data/projects/P1/prearchive_code"


def test_401_on_the_cookie_logs_in_again_once(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (401, "expired"), (200, "4"))
    assert client(url).prearchive_code("P1") == 4
    logins = [r for r in script.requests if r["path"] == "/data/JSESSION"]
    assert len(logins) == 2
    assert script.requests[-1]["headers"]["Cookie"] == "JSESSIONID=SESSIONID0002"


def test_persistent_401_is_one_clear_error(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (401, "nope"))
    with pytest.raises(XnatRestError) as err:
        client(url).prearchive_code("P1")
    assert err.value.status == 401
    assert "check XNAT_USER/XNAT_PASSWORD" in str(err.value)
    assert len([r for r in script.requests if r["path"] == "/data/JSESSION"]) == 2


def test_wrong_password_fails_at_login_without_leaking_it(server: tuple[Scripted, str]) -> None:
    _, url = server
    wrong = Credentials("alice", "wrong-pass-xyz", "XNAT_USER/XNAT_PASSWORD")
    with pytest.raises(XnatRestError) as err:
        XnatClient(url, wrong, sleep=Sleeps()).prearchive_code("P1")
    msg = str(err.value)
    assert err.value.status == 401 and "POST /data/JSESSION" in msg and "Login failed" in msg
    assert "wrong-pass-xyz" not in msg and "\n" not in msg


def test_close_invalidates_the_session(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (200, "4"))
    with client(url) as c:
        c.prearchive_code("P1")
    last = script.requests[-1]
    assert (last["method"], last["path"], last["headers"]["Cookie"]) == (
        "DELETE",
        "/data/JSESSION",
        "JSESSIONID=SESSIONID0001",
    )


# --- retries ----------------------------------------------------------------------------------------


def test_5xx_is_retried_with_exponential_backoff(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (503, "busy"), (502, "busy"), (200, "4"))
    sleeps = Sleeps()
    assert client(url, sleeps).prearchive_code("P1") == 4
    assert sleeps == [0.5, 1.0]
    assert len(non_login(script)) == 3


def test_5xx_exhausted_ends_in_one_line(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on(
        "POST", "/data/services/prearchive/rebuild", (500, "<html><h1>Oops</h1>" + "x" * 500 + "</html>")
    )
    sleeps = Sleeps()
    with pytest.raises(XnatRestError) as err:
        client(url, sleeps).rebuild("P1", "20240131_101112123", "S1")
    msg = str(err.value)
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    assert len(non_login(script)) == 5
    assert err.value.status == 500
    assert msg.startswith(
        "XNAT POST /data/services/prearchive/rebuild (/prearchive/projects/P1/20240131_101112123/S1)"
    )
    assert "HTTP 500 Oops" in msg and "<h1>" not in msg and "…" in msg
    assert "see its logs" in msg and "rerun resumes" in msg
    assert len(msg) < 450 and "\n" not in msg


def test_4xx_is_not_retried(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/prearchive/projects/P1", (403, "Forbidden"))
    sleeps = Sleeps()
    with pytest.raises(XnatRestError) as err:
        client(url, sleeps).prearchive_sessions("P1")
    assert sleeps == [] and len(non_login(script)) == 1
    assert err.value.status == 403 and "user alice needs edit rights on project P1" in str(err.value)


def test_501_is_not_retried(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (501, "not implemented"))
    sleeps = Sleeps()
    with pytest.raises(XnatRestError):
        client(url, sleeps).prearchive_code("P1")
    assert sleeps == []


def test_connection_refused_is_retried_then_explained() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    sleeps = Sleeps()
    with pytest.raises(XnatRestError) as err:
        client(f"http://127.0.0.1:{port}", sleeps, retries=2).prearchive_code("P1")
    msg = str(err.value)
    assert sleeps == [0.5, 1.0]
    assert msg.startswith(f"cannot reach http://127.0.0.1:{port}") and "check xnat.url" in msg
    assert err.value.status is None and PASSWORD not in msg


def test_timeout_is_retried(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (200, "4", 1.0), (200, "4"))
    sleeps = Sleeps()
    assert client(url, sleeps, timeout=0.3).prearchive_code("P1") == 4
    assert sleeps == [0.5]


def test_timeout_exhausted_says_timed_out(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (200, "4", 1.0))
    with pytest.raises(XnatRestError, match=r"timed out after 2 attempts.*check xnat.url"):
        client(url, timeout=0.2, retries=1).prearchive_code("P1")


# --- methods ----------------------------------------------------------------------------------------


def test_prearchive_session_row_or_none(server: tuple[Scripted, str]) -> None:
    script, url = server
    row = {"project": "Unassigned", "timestamp": "20240131_101112123", "folderName": "S 1", "status": "READY"}
    script.on("GET", "/data/prearchive/projects/Unassigned/20240131_101112123/S%201", (200, table(row)))
    c = client(url)
    assert c.prearchive_session(None, "20240131_101112123", "S 1") == row
    assert c.prearchive_session("P1", "20240131_101112123", "S2") is None  # unscripted → 404


def test_prearchive_sessions_filters_by_tag(server: tuple[Scripted, str]) -> None:
    script, url = server
    rows = [{"tag": "1.2.3", "folderName": "A"}, {"tag": "1.2.4", "folderName": "B"}]
    script.on("GET", "/data/prearchive/projects/P1", (200, table(*rows)))
    c = client(url)
    assert c.prearchive_sessions("P1") == rows
    assert c.prearchive_sessions("P1", tag="1.2.4") == rows[1:]


def test_not_a_table_is_explained(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/prearchive/projects/P1", (200, "<html>Login page</html>"))
    with pytest.raises(XnatRestError, match=r"did not answer JSON .*Login page.*is xnat.url"):
        client(url).prearchive_sessions("P1")


def test_rebuild_posts_the_src_form(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/data/services/prearchive/rebuild", (200, table({"status": "QUEUED_BUILDING"})))
    assert client(url).rebuild(None, "20240131_101112123", "S1") == [{"status": "QUEUED_BUILDING"}]
    req = non_login(script)[0]
    assert req["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(req["body"].decode()) == {
        "src": ["/prearchive/projects/Unassigned/20240131_101112123/S1"]
    }


def test_archive_returns_the_uri_and_sends_the_form(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on(
        "POST", "/data/services/archive", (200, "/data/archive/projects/P1/subjects/S/experiments/E\r\n")
    )
    uri = client(url).archive(
        "P1", "20240131_101112123", "E", overwrite="append", dest="/archive/projects/P1"
    )
    assert uri == ("/data/archive/projects/P1/subjects/S/experiments/E", True)
    assert parse_qs(non_login(script)[0]["body"].decode()) == {
        "src": ["/prearchive/projects/P1/20240131_101112123/E"],
        "overwrite": ["append"],
        "dest": ["/archive/projects/P1"],
    }


def test_archive_conflict_hint(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/data/services/archive", (409, "Session already exists, retry with overwrite enabled"))
    with pytest.raises(XnatRestError, match=r"HTTP 409 Session already exists.*overwrite=append"):
        client(url).archive("P1", "20240131_101112123", "E")


def test_password_echoed_by_xnat_is_masked(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/data/services/prearchive/rebuild", (400, f"bad value {PASSWORD}"))
    with pytest.raises(XnatRestError) as err:
        client(url).rebuild("P1", "20240131_101112123", "S1")
    assert PASSWORD not in str(err.value) and "bad value ***" in str(err.value)


def test_wait_for_status_polls_until_done(server: tuple[Scripted, str]) -> None:
    script, url = server
    path = "/data/prearchive/projects/P1/20240131_101112123/S1"
    script.on(
        "GET",
        path,
        (200, table({"status": "QUEUED_BUILDING"})),
        (200, table({"status": "BUILDING"})),
        (200, table({"status": "READY"})),
    )
    seen: list[str] = []
    sleeps = Sleeps()
    c = client(url, sleeps)
    assert c.waited == 0.0
    row = c.wait_for_status(
        "P1", "20240131_101112123", "S1", poll=0.25, on_poll=lambda r: seen.append(r["status"])
    )
    assert row == {"status": "READY"} and seen == ["QUEUED_BUILDING", "BUILDING", "READY"]
    assert sleeps == [0.05, 0.1]  # looks again soon first (pauses), never longer than poll
    # Waiting on XNAT is counted: the pauses (slept by the fake here) and the requests themselves.
    assert c.waited > 0.05 + 0.1


@pytest.mark.parametrize(
    ("poll", "first"),
    [
        (1.0, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]),
        (0.25, [0.05, 0.1, 0.2, 0.25, 0.25, 0.25, 0.25]),
        (0.05, [0.05] * 7),
        (0.01, [0.01] * 7),
    ],
)
def test_a_wait_pauses_briefly_first_then_settles_at_its_poll_interval(
    poll: float, first: list[float]
) -> None:
    from itertools import islice

    from xnatmigrate.execute.xnat import pauses

    assert list(islice(pauses(poll), 7)) == first


def test_wait_for_status_timeout_says_last_status(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on(
        "GET", "/data/prearchive/projects/P1/20240131_101112123/S1", (200, table({"status": "BUILDING"}))
    )
    c = XnatClient(url, CREDS)
    with pytest.raises(XnatRestError, match=r"timed out after 0.3s .*READY.*last status BUILDING"):
        c.wait_for_status("P1", "20240131_101112123", "S1", timeout=0.3, poll=0.1)


def test_wait_for_status_row_gone(server: tuple[Scripted, str]) -> None:
    _, url = server
    with pytest.raises(XnatRestError, match="disappeared"):
        client(url).wait_for_status("P1", "20240131_101112123", "S1")


def test_small_getters(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("GET", "/data/projects/P1/prearchive_code", (200, "4"))
    script.on("GET", "/data/prearchive/projects/P1/20240131_101112123/S1/logs/last", (200, "boom\n"))
    c = client(url)
    assert c.prearchive_code("P1") == 4
    assert c.last_log("P1", "20240131_101112123", "S1") == "boom"
    # XNAT answers a DELETE with 200 whether or not it removed the row (§9): the row is read again.
    script.on("DELETE", "/data/prearchive/projects/P1/20240131_101112123/S9", (200, ""))
    script.on(
        "GET", "/data/prearchive/projects/P1/20240131_101112123/S9", (200, table({"status": "_DELETING"}))
    )
    assert c.delete_prearchive_session("P1", "20240131_101112123", "S9") is False
    script.on("GET", "/data/prearchive/projects/P1/20240131_101112123/S9", (200, table()))
    assert c.delete_prearchive_session("P1", "20240131_101112123", "S9") is True
    script.on("GET", "/data/projects/P2/prearchive_code", (200, "<html>Login</html>"))
    with pytest.raises(XnatRestError, match="not a prearchive code"):
        c.prearchive_code("P2")


def test_prearchive_uri_quotes_and_rejects_empty() -> None:
    assert (
        prearchive_uri(None, "20240131_101112123", "a b")
        == "/prearchive/projects/Unassigned/20240131_101112123/a%20b"
    )
    with pytest.raises(ValueError):
        prearchive_uri("P1", "", "S1")
    with pytest.raises(ValueError):
        prearchive_uri("P1", "20240131_101112123", "..")


def test_base_path_prefix_is_kept(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/xnat/data/JSESSION", (200, "SESSIONPREFIX1"))
    script.on("GET", "/xnat/data/projects/P1/prearchive_code", (200, "4"))
    assert client(url + "/xnat/").prearchive_code("P1") == 4
    assert [r["path"] for r in script.requests] == [
        "/xnat/data/JSESSION",
        "/xnat/data/projects/P1/prearchive_code",
    ]


def test_archive_303_means_xnat_archives_it_itself(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/data/services/archive", (303, ""))
    uri, finished = client(url).archive("P1", "20240131_101112123", "E")
    assert finished is False and uri == "/prearchive/projects/P1/20240131_101112123/E"


@pytest.mark.parametrize("status", [500, 503])
def test_archive_is_never_sent_twice(server: tuple[Scripted, str], status: int) -> None:
    """Not idempotent (§9): a 5xx is an answer, not a reason to POST again."""
    script, url = server
    script.on("POST", "/data/services/archive", (status, "boom"), (200, "/data/archive/x\r\n"))
    with pytest.raises(XnatRestError):
        client(url).archive("P1", "20240131_101112123", "E")
    assert sum(1 for r in non_login(script) if r["path"].startswith("/data/services/archive")) == 1


def test_archive_timeout_is_an_unknown_outcome_not_a_retry(server: tuple[Scripted, str]) -> None:
    script, url = server
    script.on("POST", "/data/services/archive", (200, "/data/archive/x\r\n", 1.5))
    with pytest.raises(OutcomeUnknown, match="timed out"):
        client(url).archive("P1", "20240131_101112123", "E", timeout=0.3)
    assert sum(1 for r in non_login(script) if r["path"].startswith("/data/services/archive")) == 1


def test_prearchive_file_counts_come_from_resources(server: tuple[Scripted, str]) -> None:
    script, url = server
    base = "/data/prearchive/projects/P1/20240131_101112123/S1"
    script.on(
        "GET",
        base + "/resources",
        (
            200,
            table(
                {"category": "scans", "cat_id": "1", "label": "DICOM", "file_count": "3", "file_size": "9"},
                {"category": "scans", "cat_id": "2", "label": "DICOM", "file_count": "2", "file_size": "9"},
            ),
        ),
    )
    assert client(url).prearchive_scan_files("P1", "20240131_101112123", "S1") == {"1": 3, "2": 2}
