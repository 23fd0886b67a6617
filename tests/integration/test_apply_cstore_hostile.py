"""C-STORE receivers that accept but never answer (issue 11 item 7): bounded waits, and a receiver that
makes no progress stops the run with one line naming it, instead of one error per session for hours."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests.dicom_peers import PynetdicomStoreSCP
from tests.integration.test_apply_cstore import NOW, SPEC, write_manifest
from xnatmigrate import api
from xnatmigrate.model import Result
from xnatmigrate.testing.corpus import build_corpus


class BlackHole:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (no A-ASSOCIATE-AC, ever)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    build_corpus(tmp_path / "legacy", SPEC)
    return tmp_path / "legacy"


def plan_for(tmp_path: Path, corpus: Path, port: int):
    m = tmp_path / "m.yaml"
    write_manifest(m, corpus, port)
    return api.plan(m, state_dir=tmp_path / "state", now=NOW, offline=True).plan


@pytest.mark.parametrize(
    ("group", "outcomes"),
    [
        # One group, one send over shared associations: both sessions were in the attempt that failed.
        (None, [Result.FAILED, Result.FAILED]),
        # A group per session: the second is never attempted once the run stopped.
        ("1", [Result.FAILED, Result.SKIPPED]),
    ],
)
def test_a_receiver_that_never_answers_the_association_stops_the_run(
    tmp_path, corpus, monkeypatch, group, outcomes
):
    hole = BlackHole()
    try:
        p = plan_for(tmp_path, corpus, hole.port)
        assert len(p.sessions) == 2
        monkeypatch.setenv("XNATMIGRATE_DICOM_ACSE_TIMEOUT", "1")
        if group:
            monkeypatch.setenv("XNATMIGRATE_GROUP_SESSIONS", group)
        started = time.monotonic()
        report = api.apply(state_dir=tmp_path / "state", poll=0.05)
        took = time.monotonic() - started
    finally:
        hole.close()
    assert report.stopped and f"127.0.0.1:{hole.port}" in report.stopped and "\n" not in report.stopped
    assert "nothing was sent" in report.stopped
    assert [r.outcome for r in report.sessions] == outcomes
    assert took < 15  # one ACSE timeout (1 s), not 30 s per session


def test_a_receiver_that_never_answers_a_c_store_stops_after_n_stalled_attempts(
    tmp_path, corpus, monkeypatch
):
    with PynetdicomStoreSCP(delay=20) as scp:  # accepts associations, answers no C-STORE in time
        p = plan_for(tmp_path, corpus, scp.port)
        monkeypatch.setenv("XNATMIGRATE_DICOM_DIMSE_TIMEOUT", "0.5")
        monkeypatch.setenv("XNATMIGRATE_DICOM_MAX_STALLS", "2")
        started = time.monotonic()
        report = api.apply(state_dir=tmp_path / "state", poll=0.05)
        took = time.monotonic() - started
        attempts = sum(scp.attempts.values())
    assert report.stopped and "made no progress in 2 attempts in a row" in report.stopped
    assert f"XNAT@127.0.0.1:{scp.port}" in report.stopped
    assert "gave no C-STORE response" in report.stopped
    assert [r.outcome for r in report.sessions] == [Result.FAILED, Result.FAILED]  # one group, one send
    assert attempts == 2  # one C-STORE per stalled attempt, then the run stopped
    assert took < 15 and len(p.sessions) == 2


def test_bad_timeout_settings_are_one_line(tmp_path, corpus, monkeypatch):
    with PynetdicomStoreSCP() as scp:
        plan_for(tmp_path, corpus, scp.port)
        monkeypatch.setenv("XNATMIGRATE_DICOM_DIMSE_TIMEOUT", "0")
        report = api.apply(state_dir=tmp_path / "state", poll=0.05)
    assert [r.outcome for r in report.sessions] == [
        Result.FAILED,
        Result.FAILED,
    ]  # a setting: the group fails
    assert report.stopped and "XNATMIGRATE_DICOM_DIMSE_TIMEOUT='0' must be more than 0" in report.stopped
