"""``send_files``: the files split over worker processes (or this one), results collected here.

Invariants:
- Confirmations reach ``on_confirmed`` in the calling process, in batches of at most
  ``_BATCH_FILES`` files or ``_BATCH_SECONDS`` seconds, and whatever was confirmed is delivered
  even when the call ends with an exception (Ctrl-C included): resumability depends on it.
- Workers talk to the parent only through ``WorkerMessage`` values on one queue; each worker ends
  with exactly one ``Done``, ``Fatal`` or ``Crashed``, after its last ``Report``. A worker that dies
  without a word has every file it did not report failed, never silently dropped.
- The parent owns Ctrl-C: it sets ``stop``; workers finish their current file and release the
  association, so no response is lost in flight.
- Once reported confirmed, a file stays confirmed: a later failure report for it is ignored.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_mod
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import NamedTuple

from ...errors import DicomSendError, ReceiverError
from ...model import PlannedFile, PresentationContext, ScpTarget
from .part10 import Edit, routing_tag
from .rounds import Options, Stop, Task, context_groups, run_tasks, split

_BATCH_FILES = 50
_BATCH_SECONDS = 0.5
MIN_FILES_PER_WORKER = 50  # below this a worker process costs more than it saves

Confirmed = list[tuple[int, int]]  # (file index, status)
Failed = list[tuple[int, str]]  # (file index, reason)


@dataclass(frozen=True)
class SendOutcome:
    """What one ``send_files`` call achieved.

    ``confirmed``: (SOPInstanceUID, status) for every Success or Warning response.
    ``failures``: (source path, reason) for every file that was not stored after its retries.
    NOTE: a file is in exactly one of the two unless the call raised.
    """

    confirmed: tuple[tuple[str, int], ...]
    failures: tuple[tuple[str, str], ...]


# -- messages from a worker process to the parent ------------------------------------------------


class Report(NamedTuple):
    """A batch of results."""

    worker: int
    ok: Confirmed
    bad: Failed


class Done(NamedTuple):
    """The worker sent everything it was given (or stopped when asked)."""

    worker: int


class Fatal(NamedTuple):
    """No association could be made, or one was rejected for good: the whole call fails with this."""

    worker: int
    message: str


class Crashed(NamedTuple):
    """An unexpected exception (a bug): the whole call fails, the rest stops cleanly."""

    worker: int
    error: str


WorkerMessage = Report | Done | Fatal | Crashed


# -- collecting results in the calling process ---------------------------------------------------


class Collector:
    """Turns (index, status/reason) reports into the outcome and the caller's callbacks."""

    def __init__(
        self,
        files: Sequence[PlannedFile],
        on_confirmed: Callable[[list[tuple[str, int]]], None] | None,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.files = files
        self.on_confirmed = on_confirmed
        self.progress = progress
        self.confirmed: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.pending: list[tuple[str, int]] = []
        self.last = time.monotonic()

    def add(self, ok: Sequence[tuple[int, int]], bad: Sequence[tuple[int, str]]) -> None:
        for idx, status in ok:
            if idx not in self.confirmed:
                self.confirmed[idx] = status
                self.failures.pop(idx, None)
                self.pending.append((self.files[idx].sop_instance_uid, status))
        for idx, reason in bad:
            if idx not in self.confirmed:
                self.failures[idx] = reason
        self.flush()
        if self.progress and (ok or bad):
            self.progress(len(self.confirmed) + len(self.failures), len(self.files))

    def flush(self, force: bool = False) -> None:
        if not self.pending:
            return
        now = time.monotonic()
        if force or len(self.pending) >= _BATCH_FILES or now - self.last >= _BATCH_SECONDS:
            batch, self.pending, self.last = self.pending, [], now
            if self.on_confirmed:
                self.on_confirmed(batch)

    def outcome(self) -> SendOutcome:
        return SendOutcome(
            confirmed=tuple((self.files[i].sop_instance_uid, s) for i, s in sorted(self.confirmed.items())),
            failures=tuple((self.files[i].source, r) for i, r in sorted(self.failures.items())),
        )

    def fail_unreported(self, tasks: Sequence[Task], reason: str) -> None:
        """Fail every file of ``tasks`` nothing was reported for (its worker died)."""
        missing = [
            (idx, reason)
            for t in tasks
            for idx, _ in t.files
            if idx not in self.confirmed and idx not in self.failures
        ]
        if missing:
            self.add([], missing)


class LocalSink:
    """In-process sink: reports straight into the collector (one file at a time, for progress)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def confirmed(self, index: int, status: int) -> None:
        self.collector.add([(index, status)], [])

    def failed(self, index: int, reason: str) -> None:
        self.collector.add([], [(index, reason)])

    def flush(self, force: bool = False) -> None:
        self.collector.flush(force)


class QueueSink:
    """A worker's sink: results in batches, as ``Report`` messages to the parent."""

    def __init__(self, worker: int, q: Queue[WorkerMessage]) -> None:
        self.worker = worker
        self.q = q
        self.ok: Confirmed = []
        self.bad: Failed = []
        self.last = time.monotonic()

    def confirmed(self, index: int, status: int) -> None:
        self.ok.append((index, status))
        self.flush()

    def failed(self, index: int, reason: str) -> None:
        self.bad.append((index, reason))
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not (self.ok or self.bad):
            return
        now = time.monotonic()
        if force or len(self.ok) + len(self.bad) >= _BATCH_FILES or now - self.last >= _BATCH_SECONDS:
            ok, bad = self.ok, self.bad
            self.ok, self.bad, self.last = [], [], now
            self.q.put(Report(self.worker, ok, bad))


# -- the public entry point ----------------------------------------------------------------------


def send_files(
    files: Sequence[PlannedFile],
    scp: ScpTarget,
    *,
    routing: str,
    line: str | None,
    contexts: Sequence[PresentationContext],
    lines: Sequence[str] | None = None,
    edits: Sequence[Edit | None] | None = None,
    jobs: int = 1,
    retries: int = 3,
    backoff: float = 0.5,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    max_stalls: int = 3,
    on_confirmed: Callable[[list[tuple[str, int]]], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SendOutcome:
    """C-STORE ``files`` to ``scp`` over as few associations as possible, with routing written in.

    Args:
        files: the files still to send (the caller drops those already confirmed).
        scp: XNAT's receiver.
        routing: ``patient_comments``, ``study_comments`` (the element ``line`` is written to,
            replacing any value) or ``none`` (datasets are sent byte for byte as stored).
        line: the routing comment, e.g. from ``routing_line``; required unless routing is ``none``.
        lines: one routing comment per file instead of ``line`` for all (a call that sends the files
            of many sessions over shared associations; each session keeps its own routing).
        edits: one de-identification per file (None: sent as stored), applied in memory to the whole
            file before the routing element is written (``part10.load_payload``); a file it fails on
            fails at once, never sent raw. Each must be picklable (worker processes).
        contexts: SOP classes and transfer syntaxes of the files; one presentation context is
            proposed per (SOP class, transfer syntax) pair, so no file is ever transcoded. More than
            128 pairs are split over several associations.
        jobs: parallel associations, each in its own process (threads do not scale here: the GIL).
        retries: further attempts, each on a fresh association, for files answered with a Failure
            status or not answered at all.
        backoff: seconds before the first retry round; doubled for each consecutive failed round.
        acse_timeout: seconds for connecting, association negotiation and release.
        dimse_timeout: seconds to wait for each C-STORE response (and for the peer to take data).
        max_stalls: rounds in a row in which the receiver answered nothing (no C-STORE response,
            or unreachable again) before it is the receiver's fault: ``ReceiverError``.
        on_confirmed: called in this process with batches of (SOPInstanceUID, status).
        progress: called in this process with (files finished, files in this call).

    Returns:
        The confirmed files and the failures (path, reason with the status in hex and its meaning).

    Raises:
        ReceiverError: the receiver cannot be reached when the call starts, rejects an association
            permanently (wrong AE title, ...), or makes no progress ``max_stalls`` rounds in a row:
            the message names it and says what to fix. Once an association was made, a receiver
            unreachable for a round makes failed attempts first (it may be restarting).
        ValueError: bad arguments (unknown routing, missing or multi-line ``line``).

    NOTE: files whose presentation context the receiver rejects fail at once, without retries:
    another association would be negotiated the same way. Fewer workers than ``jobs`` start when
    there are fewer than ``MIN_FILES_PER_WORKER`` files each; one worker runs in this process.
    """
    tag = routing_tag(routing, line)
    if lines is not None:
        if len(lines) != len(files):
            raise ValueError("lines must hold one routing comment per file")
        for one in set(lines):
            routing_tag(routing, one)  # each checked as ``line`` is
    if edits is not None and len(edits) != len(files):
        raise ValueError("edits must hold one entry per file")
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    total = len(files)
    if not total:
        return SendOutcome((), ())
    opts = Options(
        tag=tag,
        line=line or "",
        retries=max(0, retries),
        backoff=max(0.0, backoff),
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        max_stalls=max(1, max_stalls),
        lines=tuple(lines) if lines is not None and tag is not None else (),
        edits=tuple(edits) if edits is not None and any(e is not None for e in edits) else (),
    )
    groups = context_groups(files, contexts)
    workers = max(1, min(jobs, total // MIN_FILES_PER_WORKER))
    tasks: list[list[Task]] = [[] for _ in range(workers)]
    for pairs, indices in groups:
        for w, chunk in enumerate(split(indices, workers)):
            if chunk:
                tasks[w].append(Task(pairs, tuple((i, files[i]) for i in chunk)))
    collector = Collector(files, on_confirmed, progress)
    try:
        if workers == 1:
            sink = LocalSink(collector)
            try:
                run_tasks(tasks[0], scp, opts, sink, threading.Event())
            finally:
                sink.flush(force=True)
        else:
            _run_processes(tasks, scp, opts, collector)
    finally:
        collector.flush(force=True)
    return collector.outcome()


# -- worker processes ----------------------------------------------------------------------------


def _worker_main(
    worker: int, tasks: list[Task], scp: ScpTarget, opts: Options, q: Queue[WorkerMessage], stop: Stop
) -> None:
    """Entry point of a worker process: send, report in batches, then say done (or why not)."""
    # The parent owns Ctrl-C (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    sink = QueueSink(worker, q)
    try:
        run_tasks(tasks, scp, opts, sink, stop)
    except DicomSendError as exc:
        sink.flush(force=True)
        q.put(Fatal(worker, str(exc)))
        return
    except BaseException as exc:  # report, so the parent can fail the rest cleanly
        sink.flush(force=True)
        q.put(Crashed(worker, f"{type(exc).__name__}: {exc}"))
        raise
    sink.flush(force=True)
    q.put(Done(worker))


def _mp_context() -> ForkContext | ForkServerContext | SpawnContext:
    """How worker processes start: ``fork`` when this process runs no other thread, else forkserver.

    fork starts a worker in ~30 ms with everything already imported. Forking a process that runs
    other threads can deadlock the child on a lock one of them held, so a threaded caller (the
    in-process test receivers, say) gets forkserver instead: workers fork from a server that
    imported this module once. NOTE: multiprocessing still re-runs a main *script* (not ``-m``) in
    every forkserver worker (``__main__`` preloading is broken in CPython 3.11), so the CLI's
    modules are preloaded too, and such scripts must guard their top level with
    ``if __name__ == "__main__"`` as for any multiprocessing user.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, *(m for m in ("xnatmigrate.cli",) if m in sys.modules)])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_processes(tasks: list[list[Task]], scp: ScpTarget, opts: Options, collector: Collector) -> None:
    ctx = _mp_context()
    q: Queue[WorkerMessage] = ctx.Queue()
    stop = ctx.Event()
    procs: dict[int, BaseProcess] = {
        w: ctx.Process(
            target=_worker_main,
            args=(w, t, scp, opts, q, stop),
            name=f"xnatmigrate-cstore-{w}",
            daemon=True,
        )
        for w, t in enumerate(tasks)
    }
    for p in procs.values():
        p.start()
    running = set(procs)
    fatal: str | None = None
    bug: str | None = None
    try:
        while running:
            try:
                msg = q.get(timeout=0.2)
            except queue_mod.Empty:
                for w in list(running):
                    if not procs[w].is_alive() and q.empty():
                        running.discard(w)
                        collector.fail_unreported(
                            tasks[w], f"worker process exited with code {procs[w].exitcode}"
                        )
                collector.flush()
                continue
            match msg:
                case Report(_, ok, bad):
                    collector.add(ok, bad)
                case Done(w):
                    running.discard(w)
                case Fatal(w, message):
                    running.discard(w)
                    fatal = fatal or message
                    stop.set()
                case Crashed(w, error):
                    running.discard(w)
                    bug = bug or error
                    stop.set()
    except BaseException:
        stop.set()
        _drain(q, procs, collector, grace=opts.dimse_timeout + opts.acse_timeout)
        raise
    finally:
        for p in procs.values():
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        q.close()
    if bug is not None:
        raise RuntimeError(f"a C-STORE worker process failed: {bug}")
    if fatal is not None:
        raise ReceiverError(fatal)  # workers report only the receiver's own failures as Fatal


def _drain(
    q: Queue[WorkerMessage], procs: dict[int, BaseProcess], collector: Collector, grace: float
) -> None:
    """After Ctrl-C: let the workers finish their current file and deliver every confirmation."""
    deadline = time.monotonic() + grace
    alive = {w for w, p in procs.items() if p.is_alive()}
    while alive and time.monotonic() < deadline:
        try:
            msg = q.get(timeout=0.2)
        except queue_mod.Empty:
            alive = {w for w in alive if procs[w].is_alive()}
            continue
        except KeyboardInterrupt:
            break
        match msg:
            case Report(_, ok, bad):
                collector.add(ok, bad)
            case Done(w) | Fatal(w, _) | Crashed(w, _):
                alive.discard(w)
    collector.flush(force=True)
