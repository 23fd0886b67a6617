"""Part 10 files as the sender reads them: file meta, the routing element spliced in, the payload.

Invariants:
- Source files are never written: they are opened read-only, and the routing element
  (xnat-reference.md §5, rows 3-4) is spliced into the encoded dataset in memory, between the bytes
  read from the file and the bytes put on the wire.
- The fast path never decodes a value: it walks the top-level elements before the routing tag
  (``dicombytes``) and passes everything from there on as views of the bytes read (no copy). What it
  cannot walk (deflated, malformed) raises ``Odd`` and is decoded and re-encoded with pydicom instead.
- A ``Payload`` is exactly ``length`` bytes: its ``pieces``, then (files over ``WHOLE_FILE_LIMIT``)
  ``tail_length`` bytes read from the file at ``tail_offset`` while sending; a file that no longer
  delivers them raises ``SourceChanged``.
- A file of a session with anonymisation scripts is read whole, edited in memory (its ``Edit``) and only
  then has the routing element spliced in: its payload holds the edited bytes (what the edit left as it
  was as views of the bytes read) and nothing read from the file after the edit, and a file the edit
  fails on raises ``NotAnonymised`` (never sent raw).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ...dicombytes import (
    DEFLATED_EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    LONG_LENGTH_VRS,
    TAG,
    UINT16,
    UINT32,
    Buffer,
    Malformed,
    encoding,
    read_tag,
    skip_element,
)
from ...errors import DicomSendError
from ...vocabulary import Routing

LOGGER = logging.getLogger(__name__)

# (0010,4000) PatientComments and (0032,4000) StudyComments, the fields XNAT's identifier reads (§5).
ROUTING_ELEMENTS = {Routing.PATIENT_COMMENTS: 0x00104000, Routing.STUDY_COMMENTS: 0x00324000}

WHOLE_FILE_LIMIT = 64 * 1024 * 1024  # read smaller files at once; stream the rest of larger ones
HEAD_LIMIT = 1024 * 1024  # how far into a large file the routing element may be looked for
READ_BLOCK = 4 * 1024 * 1024  # the tail of a large file is read (and handed on) in blocks this big

#: The fast path cannot handle this encoding; decode and re-encode with pydicom instead.
Odd = Malformed

Piece = bytes | memoryview


@dataclass
class Payload:
    """An encoded dataset: ``pieces`` then, for large files, ``tail_length`` bytes of the file."""

    transfer_syntax: str
    pieces: list[Piece]
    length: int
    path: str
    tail_offset: int = 0
    tail_length: int = 0


class SourceChanged(Exception):
    """The file could not be read to its end while it was being sent."""


class NotAnonymised(DicomSendError):
    """The session's scripts failed on the file (or left what the route relies on changed): not sent."""


#: A session's de-identification of one file: (the file's bytes, its path for messages) → (head, rest):
#: the edited file is ``head`` followed by the file's own bytes from offset ``rest`` on
#: (``anonymize.SessionEdit``). Picklable: it travels to the worker processes with their tasks.
Edit = Callable[[bytes, str], tuple[bytes, int]]


def routing_tag(routing: str, line: str | None) -> int | None:
    """The element ``line`` goes into for ``routing`` (None: send as stored); ValueError if unusable."""
    try:
        kind = Routing(routing)
    except ValueError:
        raise ValueError(f"routing must be one of {[r.value for r in Routing]}, not {routing!r}") from None
    if kind is Routing.NONE:
        return None
    if not line:
        raise ValueError(f"routing {routing!r} needs a routing line")
    if "\n" in line or "\r" in line:
        # §5: no DOTALL flag in ContainedAssignmentExtractor, a newline can defeat the match.
        raise ValueError("the routing line must be a single line (xnat-reference.md §5)")
    try:
        line.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("the routing line must be ASCII (it is written in any character set)") from None
    return ROUTING_ELEMENTS[kind]


def read_meta(buf: Buffer) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the dataset) of a Part 10 file; Odd if it is not one."""
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise Odd("no Part 10 preamble")
    pos, ts = 132, None
    end = len(buf)
    # PS3.10 7.1: the file meta is group 0002, explicit VR little endian. Headers read inline (see
    # dicombytes.skip_element): this runs for every file sent.
    unpack_tag, unpack_u16, unpack_u32 = (
        TAG[True].unpack_from,
        UINT16[True].unpack_from,
        UINT32[True].unpack_from,
    )
    while pos + 8 <= end:
        group, elem = unpack_tag(buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if not vr.isalpha():
            raise Odd("file meta information is not explicit VR")
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                raise Odd("truncated element")
            (length,) = unpack_u32(buf, pos + 8)
            head = 12
        else:
            (length,) = unpack_u16(buf, pos + 6)
            head = 8
        if elem == 0x0010:
            ts = bytes(buf[pos + head : pos + head + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos += head + length
    if not ts or pos > end:
        raise Odd("no transfer syntax in the file meta information")
    return ts, pos


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


def splice_routing(
    buf: Buffer, start: int, end: int, transfer_syntax: str, tag: int, line: str
) -> tuple[list[Piece], int]:
    """The dataset ``buf[start:end]`` with top-level ``tag`` set to ``line`` (LT), as buffer pieces.

    Only the top-level elements before ``tag`` are walked; everything from ``tag`` on is passed
    through as views of ``buf`` (no copy). A group length element of ``tag``'s group, if present,
    is corrected. Returns (pieces, index into ``buf`` where the untouched remainder starts).

    Raises:
        Odd: deflated or unparsable data; the caller re-encodes with pydicom instead.
    """
    pieces, resume, _ = _splice(buf, start, end, transfer_syntax, tag, line, glen_ok=True)
    return pieces, resume


def _splice(
    buf: Buffer, start: int, end: int, transfer_syntax: str, tag: int, line: str, *, glen_ok: bool
) -> tuple[list[Piece], int, bool]:
    """``splice_routing``, and whether ``tag``'s place was found before ``end`` (an element at or
    after it); a group length of ``tag``'s group found when it was not raises Odd unless ``glen_ok``
    (the caller would have to correct it in bytes it walks next)."""
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        raise Odd("deflated transfer syntax")
    implicit, little = encoding(transfer_syntax)
    e = "<" if little else ">"
    view = memoryview(buf)
    group_of_tag = tag >> 16
    glen_at: int | None = None
    unpack_tag = TAG[little].unpack_from  # inline, once per element: see dicombytes.skip_element
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise Odd("truncated element")
        group, elem = unpack_tag(buf, pos)
        current = group << 16 | elem
        if current >= tag:
            break
        if group == group_of_tag and elem == 0:
            # Group length (retired, still found in old files): UL, value right after an 8-byte header.
            (glen_len,) = struct.unpack_from(
                e + ("I" if implicit else "H"), buf, pos + (4 if implicit else 6)
            )
            if glen_len != 4:
                raise Odd("odd group length element")
            glen_at = pos + 8
        pos = skip_element(buf, pos, end, implicit, little)
    insert_at = pos
    resume_at = pos
    placed = pos < end
    if glen_at is not None and not placed and not glen_ok:
        raise Odd("group length before the data walked next")
    old_size = 0
    if pos < end and read_tag(buf, pos, little) == tag:
        resume_at = skip_element(buf, pos, end, implicit, little)
        old_size = resume_at - pos
    new = _element(tag, line, implicit, little)
    pieces: list[Piece] = []
    if glen_at is not None:
        (glen,) = struct.unpack_from(e + "I", buf, glen_at)
        pieces += [view[start:glen_at], struct.pack(e + "I", glen + len(new) - old_size)]
        pieces.append(view[glen_at + 4 : insert_at])
    else:
        pieces.append(view[start:insert_at])
    pieces.append(new)
    return pieces, resume_at, placed


def splice_routing_split(
    head: bytes, start: int, data: bytes, rest: int, transfer_syntax: str, tag: int, line: str
) -> list[Piece]:
    """``splice_routing`` of the data set ``head[start:]`` followed by ``data[rest:]`` (an edited file,
    ``Edit``): the routing element goes into whichever holds its place, the rest passed through as
    views. Raises Odd as ``splice_routing`` does."""
    pieces, resume, placed = _splice(head, start, len(head), transfer_syntax, tag, line, glen_ok=False)
    if placed or rest >= len(data):
        return [*pieces, memoryview(head)[resume:], memoryview(data)[rest:]]
    after, resume, _ = _splice(data, rest, len(data), transfer_syntax, tag, line, glen_ok=True)
    return [memoryview(head)[start:], *after, memoryview(data)[resume:]]


def _reencode(source: str | bytes, transfer_syntax: str | None, tag: int, line: str) -> tuple[str, bytes]:
    """Decode with pydicom, set the routing element, encode again (deflated and odd files). ``source``
    is the file's path, or its bytes as edited in memory."""
    from pydicom import dcmread
    from pydicom.dataelem import DataElement
    from pydicom.uid import UID
    from pynetdicom.dsutils import encode

    ds = dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, force=True)
    meta_ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts = UID(str(meta_ts or transfer_syntax or IMPLICIT_VR_LE))
    ds[tag] = DataElement(tag, "LT", line)
    data = encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise Odd("pydicom could not encode the dataset")
    return str(ts), data


def load_payload(
    path: str, planned_ts: str | None, tag: int | None, line: str, edit: Edit | None = None
) -> Payload:
    """The dataset of ``path`` as it will be sent: its bytes (edited by ``edit`` first, when the session
    has scripts), routing element spliced in.

    NOTE: the file is opened read-only; nothing is ever written back.
    """
    if edit is not None:
        return _edited_payload(path, edit, planned_ts, tag, line)
    size = os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        whole = size <= WHOLE_FILE_LIMIT
        buf = f.read(size if whole else HEAD_LIMIT)
    tail_offset, tail_length = (0, 0) if whole else (len(buf), size - len(buf))
    return _payload(buf, path, planned_ts, tag, line, tail_offset=tail_offset, tail_length=tail_length)


def _edited_payload(path: str, edit: Edit, planned_ts: str | None, tag: int | None, line: str) -> Payload:
    """The file read whole (whatever its size: the scripts edit a whole data set), edited in memory, the
    routing element spliced in; what the edit left as it was (Pixel Data) passed on as views of the bytes
    read, never copied."""
    with open(path, "rb", buffering=0) as f:
        data = f.read()
    try:
        head, rest = edit(data, path)
    except Exception as exc:  # AnonymizationError, or whatever pydicom raises writing a bad value back
        raise NotAnonymised(f"not sent: {exc}") from None
    if rest >= len(data):
        return _payload(head, path, planned_ts, tag, line, edited=True)
    try:
        ts, start = read_meta(head)
        if tag is None:
            pieces: list[Piece] = [memoryview(head)[start:], memoryview(data)[rest:]]
        else:
            pieces = splice_routing_split(head, start, data, rest, ts, tag, line)
    except Odd:
        return _payload(head + data[rest:], path, planned_ts, tag, line, edited=True)
    pieces = [p for p in pieces if len(p)]
    return Payload(ts, pieces, sum(len(p) for p in pieces), path)


def _payload(
    buf: bytes,
    path: str,
    planned_ts: str | None,
    tag: int | None,
    line: str,
    *,
    edited: bool = False,
    tail_offset: int = 0,
    tail_length: int = 0,
) -> Payload:
    """``buf`` (the file's first bytes, ``tail_length`` more of it at ``tail_offset``; or, ``edited``, the
    whole file as edited) as a payload with the routing element spliced in."""
    try:
        ts, start = read_meta(buf)
        if tag is None:
            view = memoryview(buf)[start:]
            return Payload(ts, [view], len(view) + tail_length, path, tail_offset, tail_length)
        pieces, resume = splice_routing(buf, start, len(buf), ts, tag, line)
    except Odd as why:
        if tag is None:
            raise DicomSendError(f"{path}: not a DICOM Part 10 file ({why})") from None
        LOGGER.debug("%s: re-encoding with pydicom (%s)", path, why)
        try:
            ts, data = _reencode(buf if edited else path, planned_ts, tag, line)
        except Exception as exc:  # pydicom raises many types for broken files
            raise DicomSendError(f"{path}: cannot add the routing element: {exc}") from None
        return Payload(ts, [data], len(data), path)
    pieces.append(memoryview(buf)[resume:])
    return Payload(ts, pieces, sum(len(p) for p in pieces) + tail_length, path, tail_offset, tail_length)


def segments(payload: Payload) -> Iterator[Piece]:
    """The payload's pieces, then its tail read from the file in blocks (large files only)."""
    yield from payload.pieces
    if payload.tail_length:
        try:
            with open(payload.path, "rb") as f:
                f.seek(payload.tail_offset)
                left = payload.tail_length
                while left:
                    block = f.read(min(left, READ_BLOCK))
                    if not block:
                        raise SourceChanged("the file shrank while it was being sent")
                    left -= len(block)
                    yield block
        except OSError as exc:
            raise SourceChanged(
                f"reading the file failed while it was being sent: {exc.strerror or exc}"
            ) from None
