"""C-STORE sender: many files per association, routing written into each dataset on the way out.

Invariants:
- Source files are never written: the routing element (xnat-reference.md §5, rows 3-4) is spliced into
  the encoded dataset in memory, between the bytes read from the file and the bytes put on the wire.
- A file counts as stored only when the receiver answered its C-STORE with Success (0x0000) or one of
  the Warning statuses in ``WARNING_STATUSES``. A Failure status and an *empty* status (no response:
  DIMSE timeout, abort, closed connection) are retried on a fresh association, then reported in
  ``SendOutcome.failures``; they are never treated as success (architecture.md convention 10).
- Every association is a context manager: released on success, aborted on any error, including
  KeyboardInterrupt.
- Confirmations reach ``on_confirmed`` in the calling process, in batches of at most ``_BATCH_FILES``
  files or ``_BATCH_SECONDS`` seconds, and whatever was confirmed is delivered even when the call
  ends with an exception: resumability depends on it.

NOTE: the DICOM Upper Layer requestor here is our own, synchronous, single-threaded one; pynetdicom
supplies the PDU and presentation-context code for association negotiation (its A-ASSOCIATE-RQ/AC/RJ
encoders and decoders, ``negotiate_as_requestor``) and the status tables. pynetdicom's own
``Association`` runs two polling threads per association (1 ms sleeps on each side of every message)
and pushes every P-DATA PDU through queues and its state machine; on 2,000 images that measured
13.6-16 s against dcmtk ``storescu``'s 2.2-2.8 s, whatever the tuning (path-based chunked sending,
TCP_NODELAY, shorter loop delays). Writing the PDUs ourselves with ``socket.sendmsg`` (no copies of
the pixel data) and reading the one small response synchronously is what closes that gap.

NOTE: only C-STORE and C-ECHO as a requestor, one outstanding operation at a time (no asynchronous
operations window), no TLS, no extended negotiation or user identity.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue as queue_mod
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext as _NetContext
from pynetdicom.presentation import negotiate_as_requestor
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from .. import __version__
from ..errors import DicomSendError
from ..labels import routing_line as routing_line  # the one implementation, re-exported
from ..model import PlannedFile, PresentationContext, ScpTarget

LOGGER = logging.getLogger(__name__)

ROUTING_ELEMENTS = {"patient_comments": 0x00104000, "study_comments": 0x00324000}

SUCCESS = 0x0000
#: C-STORE statuses that mean "stored, with a remark" (PS3.4 B.2.3, PS3.7 C): counted by the caller.
WARNING_STATUSES = frozenset({0xB000, 0xB007, 0xB006, 0x0107, 0x0116})

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 per association.
MAX_CONTEXTS = 128

_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_VERIFICATION = "1.2.840.10008.1.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
# Our own implementation identity: a UUID-derived UID under 2.25 (PS3.5 B.2), no registered root needed.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://xnatmigrate/dicom-sender').int}"
IMPLEMENTATION_VERSION = f"XNATMIGRATE_{__version__.replace('.', '')}"[:16]

# What we tell the peer we accept: only small C-STORE responses ever come back.
_RECEIVE_MAX_PDU = 16384
# When the peer announces "no limit" (0), still cut the dataset: fewer, larger PDVs cost nothing.
_UNLIMITED_FRAGMENT = 4 * 1024 * 1024
_FLUSH_BYTES = 4 * 1024 * 1024  # hand the kernel this much per sendmsg
_MAX_IOV = 960  # below IOV_MAX (1024)
_WHOLE_FILE_LIMIT = 64 * 1024 * 1024  # read smaller files at once; stream the rest of larger ones
_HEAD_LIMIT = 1024 * 1024  # how far into a large file the routing element may be looked for
_BATCH_FILES = 50
_BATCH_SECONDS = 0.5
_MIN_FILES_PER_WORKER = 50  # below this a worker process costs more than it saves
_MAX_BACKOFF = 30.0

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendOutcome:
    """What one ``send_files`` call achieved.

    ``confirmed``: (SOPInstanceUID, status) for every Success or Warning response.
    ``failures``: (source path, reason) for every file that was not stored after its retries.
    NOTE: a file is in exactly one of the two unless the call raised.
    """

    confirmed: tuple[tuple[str, int], ...]
    failures: tuple[tuple[str, str], ...]


def send_files(
    files: Sequence[PlannedFile],
    scp: ScpTarget,
    *,
    routing: str,
    line: str | None,
    contexts: Sequence[PresentationContext],
    jobs: int = 1,
    retries: int = 3,
    backoff: float = 0.5,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
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
        contexts: SOP classes and transfer syntaxes of the files; one presentation context is
            proposed per (SOP class, transfer syntax) pair, so no file is ever transcoded. More than
            128 pairs are split over several associations.
        jobs: parallel associations, each in its own process (threads do not scale here: the GIL).
        retries: further attempts, each on a fresh association, for files answered with a Failure
            status or not answered at all.
        backoff: seconds before the first retry round; doubled for each consecutive failed round.
        acse_timeout: seconds for connecting, association negotiation and release.
        dimse_timeout: seconds to wait for each C-STORE response (and for the peer to take data).
        on_confirmed: called in this process with batches of (SOPInstanceUID, status).
        progress: called in this process with (files finished, files in this call).

    Returns:
        The confirmed files and the failures (path, reason with the status in hex and its meaning).

    Raises:
        DicomSendError: the receiver cannot be reached when the call starts, or rejects an
            association permanently (wrong AE title, ...): the message says what to fix. Once an
            association was made, an unreachable receiver makes failures instead (retried first).
        ValueError: bad arguments (unknown routing, missing or multi-line ``line``).

    NOTE: files whose presentation context the receiver rejects fail at once, without retries:
    another association would be negotiated the same way. Fewer workers than ``jobs`` start when
    there are fewer than ``_MIN_FILES_PER_WORKER`` files each; one worker runs in this process.
    """
    tag = _routing_tag(routing, line)
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    total = len(files)
    if not total:
        return SendOutcome((), ())
    opts = _Options(
        tag=tag,
        line=line or "",
        retries=max(0, retries),
        backoff=max(0.0, backoff),
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
    )
    groups = _context_groups(files, contexts)
    workers = max(1, min(jobs, total // _MIN_FILES_PER_WORKER))
    tasks: list[list[_Task]] = [[] for _ in range(workers)]
    for pairs, indices in groups:
        for w, chunk in enumerate(_split(indices, workers)):
            if chunk:
                tasks[w].append(_Task(pairs, tuple((i, files[i]) for i in chunk)))
    collector = _Collector(files, on_confirmed, progress)
    try:
        if workers == 1:
            sink = _LocalSink(collector)
            try:
                _run_tasks(tasks[0], scp, opts, sink, threading.Event())
            finally:
                sink.flush(force=True)
        else:
            _run_processes(tasks, scp, opts, collector)
    finally:
        collector.flush(force=True)
    return collector.outcome()


def echo(scp: ScpTarget, timeout: float = 10) -> None:
    """C-ECHO ``scp``; returns quietly when it answers Success.

    Raises:
        DicomSendError: unreachable, association rejected (the message names the AE title or
            host:port to fix), no answer within ``timeout`` or a non-Success status.
    """
    pair = (_VERIFICATION, _IMPLICIT_LE)
    try:
        with _Association(scp, [pair], timeout, timeout) as assoc:
            if pair not in assoc.accepted:
                raise DicomSendError(
                    f"{scp.host}:{scp.port} (AE {scp.called_aet}) does not accept C-ECHO (Verification)"
                )
            status, comment = assoc.echo()
    except _Lost as exc:
        raise DicomSendError(f"C-ECHO to {scp.host}:{scp.port} failed: {exc}") from None
    except _Unreachable as exc:
        raise DicomSendError(str(exc)) from None
    if status != SUCCESS:
        raise DicomSendError(
            f"C-ECHO to {scp.host}:{scp.port} answered status 0x{status:04X}{f': {comment}' if comment else ''}"
        )


# ----------------------------------------------------------------------------------------------
# Statuses and reasons
# ----------------------------------------------------------------------------------------------


def status_meaning(status: int) -> str:
    """``Failure: Cannot Understand`` style text for a C-STORE status (PS3.4 B.2.3, PS3.7 C)."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", ""))
    if category == "Unknown":
        # Statuses the standard leaves to the implementation; 0xA7xx/0xA9xx/0xCxxx are ranges.
        category = "Failure" if status not in WARNING_STATUSES and status != SUCCESS else category
        text = text or "not a C-STORE status"
    return f"{category}: {text}" if text else category


def _status_reason(status: int, comment: str | None) -> str:
    extra = f"; receiver said: {comment}" if comment else ""
    return f"C-STORE status 0x{status:04X} ({status_meaning(status)}){extra}"


# ----------------------------------------------------------------------------------------------
# Options, tasks, context groups
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    tag: int | None
    line: str
    retries: int
    backoff: float
    acse_timeout: float
    dimse_timeout: float


@dataclass(frozen=True)
class _Task:
    """Files sent over one series of associations, all proposing the same ``pairs``."""

    pairs: tuple[tuple[str, str], ...]
    files: tuple[tuple[int, PlannedFile], ...]


def _routing_tag(routing: str, line: str | None) -> int | None:
    if routing == "none":
        return None
    if routing not in ROUTING_ELEMENTS:
        raise ValueError(f"routing must be one of {sorted(ROUTING_ELEMENTS)} or 'none', not {routing!r}")
    if not line:
        raise ValueError(f"routing {routing!r} needs a routing line")
    if "\n" in line or "\r" in line:
        # §5: no DOTALL flag in ContainedAssignmentExtractor, a newline can defeat the match.
        raise ValueError("the routing line must be a single line (xnat-reference.md §5)")
    try:
        line.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("the routing line must be ASCII (it is written in any character set)") from None
    return ROUTING_ELEMENTS[routing]


def _context_groups(
    files: Sequence[PlannedFile], contexts: Sequence[PresentationContext]
) -> list[tuple[tuple[tuple[str, str], ...], list[int]]]:
    """Files grouped so that each group needs at most 128 (SOP class, transfer syntax) pairs.

    The pairs come from ``contexts`` plus any pair a file needs that ``contexts`` lacks (a plan
    is trusted, not relied upon). Pairs no file uses are not proposed.
    """
    order: dict[tuple[str, str], list[int]] = {}
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


def _split(items: list[int], n: int) -> list[list[int]]:
    """``n`` contiguous slices of near-equal size (contiguous keeps series together)."""
    size, extra = divmod(len(items), n)
    out, pos = [], 0
    for k in range(n):
        step = size + (1 if k < extra else 0)
        out.append(items[pos : pos + step])
        pos += step
    return out


# ----------------------------------------------------------------------------------------------
# Reading files and splicing the routing element
# ----------------------------------------------------------------------------------------------


class _Odd(Exception):
    """The fast path cannot handle this encoding; decode and re-encode with pydicom instead."""


@dataclass
class _Payload:
    """An encoded dataset: ``pieces`` then, for large files, ``tail_length`` bytes of the file."""

    transfer_syntax: str
    pieces: list[bytes | memoryview]
    length: int
    path: str
    tail_offset: int = 0
    tail_length: int = 0


def _meta(buf: bytes | memoryview) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the dataset) of a Part 10 file; _Odd if it is not one."""
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise _Odd("no Part 10 preamble")
    pos, ts = 132, None
    end = len(buf)
    while pos + 8 <= end:
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if not vr.isalpha():
            raise _Odd("file meta information is not explicit VR")
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            head = 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            head = 8
        if elem == 0x0010:
            ts = bytes(buf[pos + head : pos + head + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos += head + length
    if not ts or pos > end:
        raise _Odd("no transfer syntax in the file meta information")
    return ts, pos


def _encoding(ts: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the dataset; every other syntax is explicit VR LE (PS3.5 A)."""
    return ts == _IMPLICIT_LE, ts != _EXPLICIT_BE


def _element(tag: int, line: str, implicit: bool, little: bool) -> bytes:
    """``tag`` as an LT element holding ``line``, space-padded to even length (PS3.5 6.2)."""
    value = line.encode("ascii")
    if len(value) % 2:
        value += b" "
    end = "<" if little else ">"
    if implicit:
        return struct.pack(end + "HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError("routing line too long")
    return struct.pack(end + "HH2sH", tag >> 16, tag & 0xFFFF, b"LT", len(value)) + value


def _skip_element(buf: bytes | memoryview, pos: int, end: int, implicit: bool, little: bool) -> int:
    """Offset just after the element at ``pos`` (sequences of undefined length walked through)."""
    e = "<" if little else ">"
    if pos + 8 > end:
        raise _Odd("truncated element")
    if implicit:
        (length,) = struct.unpack_from(e + "I", buf, pos + 4)
        head, vr = 8, b"SQ"
    else:
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from(e + "I", buf, pos + 8)
            head = 12
        elif vr.isalpha() and vr.isupper():
            (length,) = struct.unpack_from(e + "H", buf, pos + 6)
            head = 8
        else:
            raise _Odd(f"unknown VR {vr!r}")
    if length != _UNDEFINED:
        nxt = pos + head + length
        if nxt > end:
            raise _Odd("element runs past the data read")
        return int(nxt)
    if vr not in (b"SQ", b"UN"):
        raise _Odd("undefined length outside a sequence")
    # PS3.5 6.2.2: a UN of undefined length holds an implicit VR little endian sequence.
    inner_implicit, inner_little = (True, True) if vr == b"UN" else (implicit, little)
    return _skip_sequence(buf, pos + head, end, inner_implicit, inner_little)


def _skip_sequence(buf: bytes | memoryview, pos: int, end: int, implicit: bool, little: bool) -> int:
    e = "<" if little else ">"
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from(e + "HHI", buf, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise _Odd("malformed sequence")
        pos += 8
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # item of undefined length: elements up to the item delimiter
            if pos + 8 > end:
                raise _Odd("truncated item")
            group, elem = struct.unpack_from(e + "HH", buf, pos)
            if group << 16 | elem == _ITEM_END:
                pos += 8
                break
            pos = _skip_element(buf, pos, end, implicit, little)
    raise _Odd("sequence runs past the data read")


def splice_routing(
    buf: bytes | memoryview, start: int, end: int, transfer_syntax: str, tag: int, line: str
) -> tuple[list[bytes | memoryview], int]:
    """The dataset ``buf[start:end]`` with top-level ``tag`` set to ``line`` (LT), as buffer pieces.

    Only the top-level elements before ``tag`` are walked; everything from ``tag`` on is passed
    through as views of ``buf`` (no copy). A group length element of ``tag``'s group, if present,
    is corrected. Returns (pieces, index into ``buf`` where the untouched remainder starts).

    Raises:
        _Odd: deflated or unparsable data; the caller re-encodes with pydicom instead.
    """
    if transfer_syntax == _DEFLATED:
        raise _Odd("deflated transfer syntax")
    implicit, little = _encoding(transfer_syntax)
    e = "<" if little else ">"
    view = memoryview(buf)
    group_of_tag = tag >> 16
    glen_at: int | None = None
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise _Odd("truncated element")
        group, elem = struct.unpack_from(e + "HH", buf, pos)
        current = group << 16 | elem
        if current >= tag:
            break
        if group == group_of_tag and elem == 0:
            # Group length (retired, still found in old files): UL, value right after an 8-byte header.
            (glen_len,) = struct.unpack_from(
                e + ("I" if implicit else "H"), buf, pos + (4 if implicit else 6)
            )
            if glen_len != 4:
                raise _Odd("odd group length element")
            glen_at = pos + 8
        pos = _skip_element(buf, pos, end, implicit, little)
    insert_at = pos
    resume_at = pos
    old_size = 0
    if pos < end:
        group, elem = struct.unpack_from(e + "HH", buf, pos)
        if group << 16 | elem == tag:
            resume_at = _skip_element(buf, pos, end, implicit, little)
            old_size = resume_at - pos
    new = _element(tag, line, implicit, little)
    pieces: list[bytes | memoryview] = []
    if glen_at is not None:
        (glen,) = struct.unpack_from(e + "I", buf, glen_at)
        pieces += [view[start:glen_at], struct.pack(e + "I", glen + len(new) - old_size)]
        pieces.append(view[glen_at + 4 : insert_at])
    else:
        pieces.append(view[start:insert_at])
    pieces.append(new)
    return pieces, resume_at


def _reencode(path: str, transfer_syntax: str | None, tag: int, line: str) -> tuple[str, bytes]:
    """Decode with pydicom, set the routing element, encode again (deflated and odd files)."""
    from pydicom import dcmread
    from pydicom.dataelem import DataElement
    from pydicom.uid import UID
    from pynetdicom.dsutils import encode

    ds = dcmread(path, force=True)
    meta_ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts = UID(str(meta_ts or transfer_syntax or _IMPLICIT_LE))
    ds[tag] = DataElement(tag, "LT", line)
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise _Odd("pydicom could not encode the dataset")
    return str(ts), data


def load_payload(path: str, planned_ts: str | None, tag: int | None, line: str) -> _Payload:
    """The dataset of ``path`` as it will be sent: raw bytes, routing element spliced in.

    NOTE: the file is opened read-only; nothing is ever written back.
    """
    size = os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        whole = size <= _WHOLE_FILE_LIMIT
        buf = f.read(size if whole else _HEAD_LIMIT)
    tail_offset, tail_length = (0, 0) if whole else (len(buf), size - len(buf))
    try:
        ts, start = _meta(buf)
        if tag is None:
            view = memoryview(buf)[start:]
            return _Payload(ts, [view], len(view) + tail_length, path, tail_offset, tail_length)
        pieces, resume = splice_routing(buf, start, len(buf), ts, tag, line)
    except _Odd as why:
        if tag is None:
            raise DicomSendError(f"{path}: not a DICOM Part 10 file ({why})") from None
        LOGGER.debug("%s: re-encoding with pydicom (%s)", path, why)
        try:
            ts, data = _reencode(path, planned_ts, tag, line)
        except Exception as exc:  # pydicom raises many types for broken files
            raise DicomSendError(f"{path}: cannot add the routing element: {exc}") from None
        return _Payload(ts, [data], len(data), path)
    pieces.append(memoryview(buf)[resume:])
    return _Payload(ts, pieces, sum(len(p) for p in pieces) + tail_length, path, tail_offset, tail_length)


class _SourceChanged(Exception):
    """The file could not be read to its end while it was being sent."""


def _segments(payload: _Payload) -> Iterator[bytes | memoryview]:
    """The payload's pieces, then its tail read from the file in blocks (large files only)."""
    yield from payload.pieces
    if payload.tail_length:
        try:
            with open(payload.path, "rb") as f:
                f.seek(payload.tail_offset)
                left = payload.tail_length
                while left:
                    block = f.read(min(left, _FLUSH_BYTES))
                    if not block:
                        raise _SourceChanged("the file shrank while it was being sent")
                    left -= len(block)
                    yield block
        except OSError as exc:
            raise _SourceChanged(
                f"reading the file failed while it was being sent: {exc.strerror or exc}"
            ) from None


# ----------------------------------------------------------------------------------------------
# The association (DICOM Upper Layer, requestor side, synchronous)
# ----------------------------------------------------------------------------------------------


class _Lost(Exception):
    """The association ended or broke while waiting for a response: an empty status."""


class _Unreachable(Exception):
    """No association could be made (refused, unreachable, timed out, transient rejection)."""


class _Rejected(DicomSendError):
    """The receiver permanently rejected the association: fix the configuration."""


_PDATA_HEADER = struct.Struct(">BBIIBB")


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in implicit VR little endian with its group length (PS3.7 6.3.1, E)."""
    body = b"".join(struct.pack("<HHI", 0, el, len(v)) + v for el, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _parse_command(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[group << 16 | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


class _Association:
    """One association to ``scp`` proposing ``pairs``; a context manager that always ends it.

    ``accepted`` maps each accepted (SOP class, transfer syntax) pair to its context ID;
    ``rejected`` maps the others to the reason. Leaving the ``with`` block normally releases the
    association; leaving it by any exception (KeyboardInterrupt too) aborts it.
    """

    def __init__(
        self, scp: ScpTarget, pairs: Sequence[tuple[str, str]], acse_timeout: float, dimse_timeout: float
    ) -> None:
        self.scp = scp
        self.pairs = list(pairs)
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.sock: socket.socket | None = None
        self.accepted: dict[tuple[str, str], int] = {}
        self.rejected: dict[tuple[str, str], str] = {}
        self.fragment = 16378
        self._msg_id = 0

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> _Association:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()

    @property
    def where(self) -> str:
        return f"{self.scp.host}:{self.scp.port}"

    def open(self) -> None:
        scp = self.scp
        try:
            sock = socket.create_connection((scp.host, scp.port), timeout=self.acse_timeout)
        except ConnectionRefusedError:
            raise _Unreachable(
                f"connection refused by {self.where}: is XNAT's DICOM receiver running there? "
                "Check xnat.scp.host and xnat.scp.port"
            ) from None
        except TimeoutError:
            raise _Unreachable(
                f"no answer from {self.where} within {self.acse_timeout:g} s; check xnat.scp.host, "
                "xnat.scp.port and any firewall"
            ) from None
        except OSError as exc:
            raise _Unreachable(
                f"cannot reach {self.where}: {exc.strerror or exc}; check xnat.scp.host and xnat.scp.port"
            ) from None
        self.sock = sock
        try:
            # Nagle + delayed ACK stall every C-STORE request by up to 40 ms; XNAT sets it on its side.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._negotiate()
        except BaseException:
            self._close()
            raise

    def _negotiate(self) -> None:
        scp = self.scp
        rq_contexts = []
        for n, (sop_class, ts) in enumerate(self.pairs):
            cx = _NetContext()
            cx.context_id = 2 * n + 1
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = [ts]
            rq_contexts.append(cx)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = _APPLICATION_CONTEXT
        try:
            primitive.calling_ae_title = scp.calling_aet
            primitive.called_ae_title = scp.called_aet
        except ValueError as exc:
            raise _Rejected(f"invalid AE title in xnat.scp: {exc}") from None
        primitive.presentation_context_definition_list = rq_contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = _RECEIVE_MAX_PDU
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION
        primitive.user_information = [max_length, impl_uid, impl_name]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        assert self.sock is not None
        self.sock.settimeout(self.acse_timeout)
        try:
            self.sock.sendall(rq.encode())
            pdu_type, pdu = self._read_pdu()
        except (_Lost, OSError) as exc:
            raise _Unreachable(f"{self.where} did not complete association negotiation: {exc}") from None
        if pdu_type == 0x03:
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu)
            self._rejected(rj)
        if pdu_type == 0x07:
            raise _Unreachable(f"{self.where} aborted the association request")
        if pdu_type != 0x02:
            raise _Unreachable(f"{self.where} answered the association request with PDU type {pdu_type}")
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        accepted = ac.to_primitive()
        for item in accepted.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
                # The PDU length counts the 4-byte PDV length, context ID and control header.
                self.fragment = peer_max - 6 if peer_max else _UNLIMITED_FRAGMENT
        results = negotiate_as_requestor(rq_contexts, accepted.presentation_context_definition_results_list)
        proposed = {cx.context_id: (sop, ts) for cx, (sop, ts) in zip(rq_contexts, self.pairs)}
        for cx in results:
            cid = cx.context_id or 0
            pair = proposed.get(cid, (str(cx.abstract_syntax), ""))
            if cx.result == 0x00 and cx.transfer_syntax and str(cx.transfer_syntax[0]) == pair[1]:
                self.accepted[pair] = cid
            else:
                self.rejected[pair] = cx.status
        if self.fragment < 1:
            raise _Unreachable(f"{self.where} announced an unusable maximum PDU length")
        LOGGER.debug("association to %s: %d context(s) accepted", self.where, len(self.accepted))

    def _rejected(self, rj: A_ASSOCIATE_RJ) -> None:
        scp = self.scp
        source, reason = rj.source, rj.reason_diagnostic
        try:
            why = rj.reason_str
        except ValueError:
            why = f"reason {reason}"
        if source == 1 and reason == 7:
            # §5: dcm4che2 rejects an unknown called AE with reason 7.
            raise _Rejected(
                f"{self.where} rejected the association: called AE title '{scp.called_aet}' not recognised; "
                "set xnat.scp.called_aet to the AE title of XNAT's receiver on that port "
                "(GET /xapi/dicomscp lists them; the default is XNAT)"
            )
        if source == 1 and reason == 3:
            # §5: XNAT 1.8.5+ whitelist miss.
            raise _Rejected(
                f"{self.where} rejected the association: calling AE title '{scp.calling_aet}' not "
                "recognised; add it to the receiver's whitelist or change xnat.scp.calling_aet"
            )
        if rj.result == 2:
            raise _Unreachable(
                f"{self.where} rejected the association for now ({why}); if it limits associations, "
                "send with fewer parallel jobs"
            )
        raise _Rejected(f"{self.where} rejected the association ({why}); check xnat.scp")

    def release(self) -> None:
        """A-RELEASE; falls back to an abort when the peer does not answer in time."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.acse_timeout)
            self.sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type == 0x06:
                    break
                if pdu_type == 0x05:  # release collision (PS3.8 7.2.2): the requestor answers
                    self.sock.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                    break
                if pdu_type == 0x07:
                    break
        except (OSError, _Lost):
            self.abort()
            return
        self._close()

    def abort(self) -> None:
        """A-ABORT (best effort) and close; safe to call at any time."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    # -- messages ---------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        assert self.sock is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise _Lost("the receiver closed the connection")
            got += k
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        head = self._recv_exact(6)
        (length,) = struct.unpack_from(">I", head, 2)
        if length > 64 * 1024 * 1024:
            raise _Lost(f"the receiver sent an implausible PDU ({length} bytes)")
        return head[0], head + self._recv_exact(length)

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def _sendv(self, bufs: list[bytes | memoryview]) -> None:
        assert self.sock is not None
        i = 0
        while i < len(bufs):
            sent = self.sock.sendmsg(bufs[i : i + _MAX_IOV])
            while sent:
                size = len(bufs[i])
                if sent >= size:
                    sent -= size
                    i += 1
                else:
                    bufs[i] = memoryview(bufs[i])[sent:]
                    sent = 0

    def _send_message(self, context_id: int, command: bytes, payload: _Payload | None) -> None:
        bufs: list[bytes | memoryview] = [
            _PDATA_HEADER.pack(4, 0, len(command) + 6, len(command) + 2, context_id, 0x03),
            command,
        ]
        if payload is not None:
            frag, total, done = self.fragment, payload.length, 0
            parts: list[bytes | memoryview] = []
            size = pending = 0
            for segment in _segments(payload):
                seg = memoryview(segment)
                off, n = 0, len(seg)
                while off < n:
                    take = min(frag - size, n - off)
                    parts.append(seg[off : off + take])
                    size += take
                    off += take
                    done += take
                    if size == frag or done == total:
                        last = done == total
                        bufs.append(
                            _PDATA_HEADER.pack(4, 0, size + 6, size + 2, context_id, 2 if last else 0)
                        )
                        bufs.extend(parts)
                        pending += size
                        parts, size = [], 0
                        if pending >= _FLUSH_BYTES or len(bufs) >= _MAX_IOV:
                            self._sendv(bufs)
                            bufs, pending = [], 0
            if done != total:
                raise _SourceChanged("the file changed size while it was being sent")
        self._sendv(bufs)

    def _response(self, msg_id: int, command_field: int) -> tuple[int, str | None]:
        """Status and error comment of the response to ``msg_id``; _Lost when none comes."""
        assert self.sock is not None
        self.sock.settimeout(self.dimse_timeout)
        fragments: list[bytes] = []
        while True:
            try:
                pdu_type, pdu = self._read_pdu()
            except TimeoutError:
                self.abort()
                raise _Lost(
                    f"no response within {self.dimse_timeout:g} s (DIMSE timeout); association aborted"
                ) from None
            except OSError as exc:
                self._close()
                raise _Lost(f"connection lost: {exc.strerror or exc}") from None
            if pdu_type == 0x07:
                ab = A_ABORT_RQ()
                ab.decode(pdu)
                self._close()
                raise _Lost(
                    f"the receiver aborted the association (source {ab.source}, reason {ab.reason_diagnostic})"
                )
            if pdu_type == 0x05:
                with contextlib.suppress(OSError):
                    self.sock.sendall(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                self._close()
                raise _Lost("the receiver released the association")
            if pdu_type != 0x04:
                self.abort()
                raise _Lost(f"unexpected PDU type {pdu_type} from the receiver; association aborted")
            pos = 6
            while pos + 6 <= len(pdu):
                (item_len,) = struct.unpack_from(">I", pdu, pos)
                control = pdu[pos + 5]
                data = pdu[pos + 6 : pos + 4 + item_len]
                pos += 4 + item_len
                if not control & 0x01:
                    continue  # a dataset fragment; C-STORE/C-ECHO responses carry none
                fragments.append(data)
                if control & 0x02:
                    cmd = _parse_command(b"".join(fragments))
                    fragments = []
                    field = struct.unpack("<H", cmd.get(0x00000100, b"\0\0")[:2])[0]
                    answered = struct.unpack("<H", cmd.get(0x00000120, b"\0\0")[:2])[0]
                    if field != command_field or answered != msg_id:
                        self.abort()
                        raise _Lost(
                            f"the receiver answered message {answered} (command 0x{field:04X}) instead of "
                            f"message {msg_id}; association aborted"
                        )
                    raw_status = cmd.get(0x00000900)
                    if raw_status is None or len(raw_status) < 2:
                        self.abort()
                        raise _Lost("the response carries no status; association aborted")
                    status = struct.unpack("<H", raw_status[:2])[0]
                    comment = cmd.get(0x00000902)
                    text = comment.rstrip(b"\0 ").decode("ascii", "replace") if comment else None
                    return status, text or None

    def store(self, sop_class: str, sop_instance: str, payload: _Payload) -> tuple[int, str | None]:
        """C-STORE one dataset; (status, error comment), or _Lost for an empty status."""
        context_id = self.accepted[(sop_class, payload.transfer_syntax)]
        msg_id = self._next_id()
        command = _command(
            [
                (0x0002, _uid(sop_class)),
                (0x0100, b"\x01\x00"),  # C-STORE-RQ
                (0x0110, struct.pack("<H", msg_id)),
                (0x0700, b"\x00\x00"),  # priority MEDIUM
                (0x0800, b"\x00\x00"),  # a dataset follows
                (0x1000, _uid(sop_instance)),
            ]
        )
        try:
            self._send_message(context_id, command, payload)
        except _SourceChanged as exc:
            self.abort()  # half a message is on the wire: this association cannot go on
            raise _Lost(f"{exc}; association aborted") from None
        except TimeoutError:
            self.abort()
            raise _Lost(
                f"the receiver took no data for {self.dimse_timeout:g} s (DIMSE timeout); association aborted"
            ) from None
        except OSError as exc:
            self._close()
            raise _Lost(f"connection lost while sending: {exc.strerror or exc}") from None
        return self._response(msg_id, 0x8001)

    def echo(self) -> tuple[int, str | None]:
        context_id = self.accepted[(_VERIFICATION, _IMPLICIT_LE)]
        msg_id = self._next_id()
        command = _command(
            [
                (0x0002, _uid(_VERIFICATION)),
                (0x0100, b"\x30\x00"),  # C-ECHO-RQ
                (0x0110, struct.pack("<H", msg_id)),
                (0x0800, b"\x01\x01"),  # no dataset
            ]
        )
        try:
            self._send_message(context_id, command, None)
        except OSError as exc:
            self._close()
            raise _Lost(f"connection lost while sending: {exc.strerror or exc}") from None
        return self._response(msg_id, 0x8030)


# ----------------------------------------------------------------------------------------------
# Sending a task with retries (runs in the caller's process or in a worker process)
# ----------------------------------------------------------------------------------------------


class _Sink:
    """Where a sender reports: ``confirmed`` (index, status) and ``failed`` (index, reason)."""

    def confirmed(self, index: int, status: int) -> None:
        raise NotImplementedError

    def failed(self, index: int, reason: str) -> None:
        raise NotImplementedError

    def flush(self, force: bool = False) -> None:
        raise NotImplementedError


class _Batching(_Sink):
    def __init__(self) -> None:
        self.ok: list[tuple[int, int]] = []
        self.bad: list[tuple[int, str]] = []
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
            self.deliver(ok, bad)

    def deliver(self, ok: list[tuple[int, int]], bad: list[tuple[int, str]]) -> None:
        raise NotImplementedError


def _run_tasks(tasks: Sequence[_Task], scp: ScpTarget, opts: _Options, sink: _Sink, stop: Any) -> None:
    """Send every task; raises DicomSendError only when no association could be made at all."""
    connected = False
    for task in tasks:
        connected = _send_task(task, scp, opts, sink, stop, connected)
        if stop.is_set():
            return


def _send_task(task: _Task, scp: ScpTarget, opts: _Options, sink: _Sink, stop: Any, connected: bool) -> bool:
    """Rounds over fresh associations until every file is confirmed or out of attempts.

    Returns whether an association was ever established (from now on, unreachable = retry).
    """
    attempts: dict[int, int] = {}
    todo = list(task.files)
    failed_rounds = 0
    while todo and not stop.is_set():
        if failed_rounds:
            stop.wait(min(opts.backoff * 2 ** (failed_rounds - 1), _MAX_BACKOFF))
            if stop.is_set():
                return connected
        retry: list[tuple[int, PlannedFile]] = []
        progress = False

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
            with _Association(scp, task.pairs, opts.acse_timeout, opts.dimse_timeout) as assoc:
                connected = True
                for pos, item in enumerate(todo):
                    if stop.is_set():
                        retry.extend(todo[pos:])
                        break
                    idx, f = item
                    try:
                        payload = load_payload(f.source, f.transfer_syntax, opts.tag, opts.line)
                    except (OSError, DicomSendError) as exc:
                        sink.failed(idx, f"cannot read the file: {getattr(exc, 'strerror', None) or exc}")
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
                        status, comment = assoc.store(f.sop_class_uid, f.sop_instance_uid, payload)
                    except _Lost as exc:
                        give_up(item, f"no C-STORE status (empty response): {exc}")
                        retry.extend(todo[pos + 1 :])
                        break
                    if status == SUCCESS or status in WARNING_STATUSES:
                        sink.confirmed(idx, status)
                        progress = True
                    else:
                        give_up(item, _status_reason(status, comment))
        except _Rejected:
            raise
        except _Unreachable as exc:
            if not connected:
                raise DicomSendError(str(exc)) from None
            for item in todo:
                give_up(item, str(exc))
        todo = retry
        # Something got through: retry soon; nothing did: back off further each round.
        failed_rounds = 1 if progress else failed_rounds + 1
    return connected


# ----------------------------------------------------------------------------------------------
# Collecting results in the calling process
# ----------------------------------------------------------------------------------------------


class _Collector:
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


class _LocalSink(_Sink):
    """In-process sink: reports straight into the collector (one file at a time, for progress)."""

    def __init__(self, collector: _Collector) -> None:
        self.collector = collector

    def confirmed(self, index: int, status: int) -> None:
        self.collector.add([(index, status)], [])

    def failed(self, index: int, reason: str) -> None:
        self.collector.add([], [(index, reason)])

    def flush(self, force: bool = False) -> None:
        self.collector.flush(force)


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------


class _QueueSink(_Batching):
    def __init__(self, worker: int, q: Any) -> None:
        super().__init__()
        self.worker = worker
        self.q = q

    def deliver(self, ok: list[tuple[int, int]], bad: list[tuple[int, str]]) -> None:
        self.q.put(("r", self.worker, ok, bad))


def _worker_main(worker: int, tasks: list[_Task], scp: ScpTarget, opts: _Options, q: Any, stop: Any) -> None:
    """Entry point of a worker process: send, report in batches, then say done (or why not)."""
    # The parent owns Ctrl-C: it sets ``stop`` and the worker finishes its current file, then
    # releases the association, so no response is lost in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    sink = _QueueSink(worker, q)
    try:
        _run_tasks(tasks, scp, opts, sink, stop)
    except DicomSendError as exc:
        sink.flush(force=True)
        q.put(("x", worker, str(exc)))
        return
    except BaseException as exc:  # report, so the parent can fail the rest cleanly
        sink.flush(force=True)
        q.put(("e", worker, f"{type(exc).__name__}: {exc}"))
        raise
    sink.flush(force=True)
    q.put(("d", worker, None))


def _mp_context() -> Any:
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


def _run_processes(tasks: list[list[_Task]], scp: ScpTarget, opts: _Options, collector: _Collector) -> None:
    ctx = _mp_context()
    q = ctx.Queue()
    stop = ctx.Event()
    procs = {
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
                        _fail_unreported(
                            w, tasks[w], collector, f"worker process exited with code {procs[w].exitcode}"
                        )
                collector.flush()
                continue
            kind, w, *rest = msg
            if kind == "r":
                collector.add(rest[0], rest[1])
            elif kind == "d":
                running.discard(w)
            elif kind == "x":
                running.discard(w)
                fatal = fatal or rest[0]
                stop.set()
            elif kind == "e":
                running.discard(w)
                bug = bug or rest[0]
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
        raise DicomSendError(fatal)


def _drain(q: Any, procs: dict[int, Any], collector: _Collector, grace: float) -> None:
    """After Ctrl-C: let the workers finish their current file and deliver every confirmation."""
    deadline = time.monotonic() + grace
    alive = {w for w, p in procs.items() if p.is_alive()}
    while alive and time.monotonic() < deadline:
        try:
            kind, w, *rest = q.get(timeout=0.2)
        except queue_mod.Empty:
            alive = {w for w in alive if procs[w].is_alive()}
            continue
        except KeyboardInterrupt:
            break
        if kind == "r":
            collector.add(rest[0], rest[1])
        else:
            alive.discard(w)
    collector.flush(force=True)


def _fail_unreported(worker: int, tasks: list[_Task], collector: _Collector, reason: str) -> None:
    missing = [
        (idx, reason)
        for t in tasks
        for idx, _ in t.files
        if idx not in collector.confirmed and idx not in collector.failures
    ]
    if missing:
        collector.add([], missing)
