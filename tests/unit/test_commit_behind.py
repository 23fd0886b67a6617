"""The inbox route's commit behind the next request (execute/apply.py ``_CommitBehind``): one commit in
flight at most, every one finished (or its error raised) before the main thread goes on."""

from __future__ import annotations

import threading

import pytest

from xnatmigrate.execute.apply import _CommitBehind


def test_each_commit_finishes_before_the_next_starts_and_before_wait_returns():
    in_flight, most, done = [0], [0], []
    gate = threading.Lock()

    def commit() -> None:
        with gate:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        threading.Event().wait(0.01)  # long enough for a second commit to overlap, were it started
        with gate:
            in_flight[0] -= 1
        done.append(threading.current_thread())  # the object held: its id is not reused

    behind = _CommitBehind(commit)
    for n in range(1, 6):
        behind.start()
        behind.wait()
        assert len(done) == n  # wait() returned only once this commit was over
    behind.start()
    behind.close()
    assert len(done) == 6 and most[0] == 1
    assert {t.name for t in done} == {"commit-behind"}  # not the caller's thread
    assert len({id(t) for t in done}) == 1  # one thread for them all


def test_a_failed_commit_is_raised_in_the_caller_once():
    calls = []

    def commit() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")

    behind = _CommitBehind(commit)
    behind.start()
    with pytest.raises(OSError, match="disk full"):
        behind.wait()
    behind.wait()  # raised once, not again
    behind.start()
    behind.close()
    assert len(calls) == 2


def test_close_raises_the_last_commits_error_and_ends_the_thread():
    def commit() -> None:
        raise RuntimeError("the ledger is gone")

    behind = _CommitBehind(commit)
    behind.start()
    before = {t.name for t in threading.enumerate()}
    assert "commit-behind" in before
    with pytest.raises(RuntimeError, match="the ledger is gone"):
        behind.close()
    assert "commit-behind" not in {t.name for t in threading.enumerate()}


def test_close_without_a_commit_starts_no_thread():
    behind = _CommitBehind(lambda: None)
    behind.wait()
    behind.close()
    assert "commit-behind" not in {t.name for t in threading.enumerate()}
