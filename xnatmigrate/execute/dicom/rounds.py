"""Sending tasks in retry rounds, each round on a fresh association (in any process).

Invariants:
- A file is reported to the sink exactly once: ``confirmed`` for Success or a Warning status,
  ``failed`` once it is out of attempts (or at once when retrying cannot help: unreadable file,
  presentation context rejected). Every other file of a task stays to be retried, until ``stop``.
- A Failure status and an empty status (DIMSE timeout, abort, closed connection) count as failed
  attempts, retried on a fresh association after a backoff that doubles with each round in which
  nothing got through; they are never success.
- Unreachable before any association was ever made raises ``DicomSendError`` (a configuration or
  network problem to report at once); afterwards it only fails the attempt (the receiver may be
  restarting). ``Rejected`` is always raised.
- The next file is loaded (read, and edited when its session has scripts) once a request is sent and
  before its response is read (``Association.store``'s ``meanwhile``): the work overlaps the receiver's;
  a file loaded ahead of a lost association is simply loaded again in the next round.
- A receiver that takes nothing (no C-STORE response, or unreachable again) ``max_stalls`` rounds in
  a row while files remain raises ``ReceiverError`` naming it: the run stops instead of waiting out
  every file's retries (a hung receiver would otherwise cost retries × DIMSE timeout per file).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ...dicombytes import MAX_CONTEXTS
from ...errors import DicomSendError, ReceiverError
from ...model import PlannedFile, PresentationContext, ScpTarget
from . import dimse
from .association import Association, Lost, Pair, Rejected, Unreachable
from .part10 import Edit, NotAnonymised, Payload, load_payload

_MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Options:
    """How every association of one ``send_files`` call behaves (picklable: sent to workers)."""

    tag: int | None
    line: str
    retries: int
    backoff: float
    acse_timeout: float
    dimse_timeout: float
    max_stalls: int = 3  # rounds in a row in which the receiver took nothing: then it is the receiver
    lines: tuple[str, ...] = ()  # per file index, when the call spans sessions; else ``line`` for all
    # Per file index, the session's de-identification (None: sent as stored); () when no file has one.
    # One object per session: pickle sends each once, however many files name it.
    edits: tuple[Edit | None, ...] = ()

    def line_of(self, index: int) -> str:
        return self.lines[index] if self.lines else self.line

    def edit_of(self, index: int) -> Edit | None:
        return self.edits[index] if self.edits else None


@dataclass(frozen=True)
class Task:
    """Files sent over one series of associations, all proposing the same ``pairs``."""

    pairs: tuple[Pair, ...]
    files: tuple[tuple[int, PlannedFile], ...]


class Sink(Protocol):
    """Where a sender reports: ``confirmed`` (index, status) and ``failed`` (index, reason)."""

    def confirmed(self, index: int, status: int) -> None: ...

    def failed(self, index: int, reason: str) -> None: ...

    def flush(self, force: bool = False) -> None: ...


class Stop(Protocol):
    """A ``threading.Event`` or ``multiprocessing.Event``: set when the caller wants to stop."""

    def is_set(self) -> bool: ...

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def context_groups(
    files: Sequence[PlannedFile], contexts: Sequence[PresentationContext]
) -> list[tuple[tuple[Pair, ...], list[int]]]:
    """Files grouped so that each group needs at most 128 (SOP class, transfer syntax) pairs.

    The pairs come from ``contexts`` plus any pair a file needs that ``contexts`` lacks (a plan
    is trusted, not relied upon). Pairs no file uses are not proposed.
    """
    order: dict[Pair, list[int]] = {}
    for c in contexts:
        for ts in c.transfer_syntaxes:
            order.setdefault((c.sop_class_uid, ts), [])
    for i, f in enumerate(files):
        order.setdefault((f.sop_class_uid, f.transfer_syntax), []).append(i)
    used = [(pair, idx) for pair, idx in order.items() if idx]
    groups = []
    for start in range(0, len(used), MAX_CONTEXTS):
        chunk = used[start : start + MAX_CONTEXTS]
        groups.append((tuple(p for p, _ in chunk), sorted(i for _, idx in chunk for i in idx)))
    return groups


def split(items: list[int], n: int) -> list[list[int]]:
    """``n`` contiguous slices of near-equal size (contiguous keeps series together)."""
    size, extra = divmod(len(items), n)
    out, pos = [], 0
    for k in range(n):
        step = size + (1 if k < extra else 0)
        out.append(items[pos : pos + step])
        pos += step
    return out


#: Files whose reading the kernel is asked to start (``POSIX_FADV_WILLNEED``) ahead of the one being
#: sent, so that a source not in the page cache is read while the sender waits for a response.
READ_AHEAD = 4


def _will_need(path: str) -> None:
    """Ask the kernel to read ``path`` into the page cache in the background (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # its own turn reports it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


#: (position in the round's list, (file index, file), its payload or None, the error reading it).
Loaded = tuple[int, tuple[int, PlannedFile], Payload | None, Exception | None]


def _read_ahead(todo: list[tuple[int, PlannedFile]], opts: Options) -> Generator[Loaded, None, None]:
    """(position, item, its payload or None, the error reading it) in ``todo``'s order, the kernel
    asked to read each file ``READ_AHEAD`` turns before its own (a thread reading ahead instead cost
    5 % on page-cached sources, bench/notes.md)."""
    for pos in range(min(READ_AHEAD, len(todo))):
        _will_need(todo[pos][1].source)
    for pos, item in enumerate(todo):
        if pos + READ_AHEAD < len(todo):
            _will_need(todo[pos + READ_AHEAD][1].source)
        idx, f = item
        try:
            payload = load_payload(
                f.source, f.transfer_syntax, opts.tag, opts.line_of(idx), opts.edit_of(idx)
            )
            yield pos, item, payload, None
        except (OSError, DicomSendError) as exc:
            yield pos, item, None, exc


def run_tasks(tasks: Sequence[Task], scp: ScpTarget, opts: Options, sink: Sink, stop: Stop) -> None:
    """Send every task; raises DicomSendError only when no association could be made at all."""
    connected = False
    for task in tasks:
        connected = _send_task(task, scp, opts, sink, stop, connected)
        if stop.is_set():
            return


def _send_task(task: Task, scp: ScpTarget, opts: Options, sink: Sink, stop: Stop, connected: bool) -> bool:
    """Rounds over fresh associations until every file is confirmed or out of attempts.

    Returns whether an association was ever established (from now on, unreachable = retry).
    """
    attempts: dict[int, int] = {}
    todo = list(task.files)
    failed_rounds = 0
    stalls, last_stall = 0, ""
    while todo and not stop.is_set():
        if failed_rounds:
            stop.wait(min(opts.backoff * 2 ** (failed_rounds - 1), _MAX_BACKOFF))
            if stop.is_set():
                return connected
        retry: list[tuple[int, PlannedFile]] = []
        progress = False
        stalled = False  # the receiver, not a file, failed this round (no answer, lost association)

        def give_up(
            item: tuple[int, PlannedFile], reason: str, retry: list[tuple[int, PlannedFile]] = retry
        ) -> None:
            """Count a failed attempt: again in the next round, or a failure once out of retries."""
            idx = item[0]
            attempts[idx] = attempts.get(idx, 0) + 1
            if attempts[idx] > opts.retries:
                tries = attempts[idx]
                sink.failed(idx, reason if tries == 1 else f"{reason} (gave up after {tries} attempts)")
            else:
                retry.append(item)

        try:
            with (
                Association(scp, task.pairs, opts.acse_timeout, opts.dimse_timeout) as assoc,
                contextlib.closing(_read_ahead(todo, opts)) as loaded,
            ):
                connected = True
                # The next file is loaded (read, edited) while the receiver stores this one.
                ahead: list[Loaded] = []

                def load_next(ahead: list[Loaded] = ahead, loaded: Iterator[Loaded] = loaded) -> None:
                    ahead.extend(itertools.islice(loaded, 1))

                while True:
                    if not ahead:
                        load_next()
                    if not ahead:
                        break
                    pos, item, payload, error = ahead.pop()
                    if stop.is_set():
                        retry.extend(todo[pos:])
                        break
                    idx, f = item
                    if payload is None:
                        # A file its scripts fail on is never sent (raw); retrying cannot help either.
                        why = str(error) if isinstance(error, NotAnonymised) else None
                        sink.failed(
                            idx, why or f"cannot read the file: {getattr(error, 'strerror', None) or error}"
                        )
                        continue
                    pair = (f.sop_class_uid, payload.transfer_syntax)
                    if pair not in assoc.accepted:
                        why = assoc.rejected.get(pair)
                        sink.failed(
                            idx,
                            f"the receiver did not accept SOP class {pair[0]} in transfer syntax {pair[1]}"
                            + (f" ({why})" if why else " (the file differs from the plan: re-run plan)"),
                        )
                        continue
                    try:
                        status, comment = assoc.store(
                            f.sop_class_uid, f.sop_instance_uid, payload, meanwhile=load_next
                        )
                    except Lost as exc:
                        give_up(item, f"no C-STORE status (empty response): {exc}")
                        retry.extend(todo[pos + 1 :])
                        stalled = True
                        last_stall = f"accepted the association but gave no C-STORE response ({exc})"
                        break
                    if dimse.stored(status):
                        sink.confirmed(idx, status)
                        progress = True
                    else:
                        give_up(item, dimse.status_reason(status, comment))
        except Rejected:
            raise
        except Unreachable as exc:
            if not connected:
                raise ReceiverError(f"{exc}; nothing was sent") from None
            for item in todo:
                give_up(item, str(exc))
            stalled = True
            last_stall = f"could not be reached again ({exc})"
        stalls = 0 if progress or not stalled else stalls + 1
        # Files still to try and a receiver that took nothing N rounds running: it is the receiver.
        if stalls >= opts.max_stalls and retry and not stop.is_set():
            raise ReceiverError(
                f"the receiver {scp.called_aet}@{scp.host}:{scp.port} made no progress in {stalls} attempts in a "
                f"row: it {last_stall}; check XNAT's DICOM receiver (its logs, disk, load), then rerun apply: "
                "confirmed files are kept"
            )
        todo = retry
        # Something got through: retry soon; nothing did: back off further each round.
        failed_rounds = 1 if progress else failed_rounds + 1
    return connected
