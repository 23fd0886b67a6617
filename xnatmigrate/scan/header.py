"""Reading one file's header: ``read_header``, the verdict on it (a header, or a reject and its reason).

Invariants:
- Read-only: files are opened ``O_RDONLY`` (``O_NONBLOCK``, so a FIFO cannot hang the scan) and only
  their headers are read; Pixel Data is never read (its element header and, for encapsulated data,
  the last 8 bytes of the file, or its item headers, are).
- No input bytes make ``read_header`` raise: a bad file becomes a reject with a reason (the reasons,
  an interface, are listed in the package docstring and checked in that order by ``_judge``).
- Size, mtime, ctime and inode are those of the file as opened (``fstat``): they describe the bytes read.
- The result depends on the file only: ``_head_size`` is a performance hint, never a verdict.

Decisions:
- Files without preamble/file meta are ACCEPTED, as dcm4che (XNAT's parser) reads such streams and a
  C-STORE re-wraps them anyway, PROVIDED they start the way dcm4che's ``guessTransferSyntax`` requires
  (first tag a known public tag whose explicit VR matches the dictionary, or whose implicit length ends
  within the first 132 bytes) and carry syntactically valid SOPClassUID, SOPInstanceUID and
  StudyInstanceUID. Their transfer syntax is recorded as pydicom infers it (implicit or explicit VR
  little endian; explicit big endian when the first tag reads byte-swapped).
- Speed: the first 16 KiB are read with one system call and parsed in memory; only when that does not
  reach Pixel Data (and is not the whole file) is the file parsed again through a windowed reader
  (``parse.FdReader``), and the first read grows to fit such headers.

NOTE: known gaps: elements after a defined-length Pixel Data are not checked; a header cut exactly at an
element boundary, or stray bytes after a final undefined-length sequence, look like a complete header;
a deflated data set (1.2.840.10008.1.2.1.99) is checked only by inflating its header.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib

from pydicom.dataelem import RawDataElement

from ..dicombytes import (
    ITEM,
    SEQUENCE_DELIMITER,
    UNDEFINED_LENGTH,
    Malformed,
    element_header,
    read_tag,
)
from ..model import CachedHeader, head_digest
from .parse import (
    DICOMDIR_OFFSET,
    PIXEL_TAGS,
    FdReader,
    Parsed,
    Want,
    pread,
    raw_stream_start,
    run_pydicom,
    want_for,
)
from .text import element_text, encodings_of

# Bytes read with the first system call: small, because on a cold disk the bytes read (and the
# kernel's read-ahead they trigger) dominate; grown per process to the largest header met, up to MAX.
_HEAD_MIN, _HEAD_MAX = 16 * 1024, 1024 * 1024
_head_size = [_HEAD_MIN]  # NOTE: a performance hint only; results never depend on it

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SOPClassUID")


def _unreadable(path: str, want: Want, exc: OSError, st: os.stat_result | None = None) -> CachedHeader:
    return _reject(path, want, st, f"unreadable: {exc.strerror or exc}")


def _reject(
    path: str, want: Want, st: os.stat_result | None, reason: str, ts: str | None = None
) -> CachedHeader:
    if st is None:
        return CachedHeader(path, -1, -1, want.keywords, ts, None, reason)
    return CachedHeader(
        path, st.st_size, st.st_mtime_ns, want.keywords, ts, None, reason, st.st_ctime_ns, st.st_ino
    )


def read_header(path: str, keywords: frozenset[str]) -> CachedHeader:
    """Read one file's header (``keywords`` ∪ BASE_KEYWORDS); never raises for a bad file.

    Returns a cache entry with ``header`` set (keyword → string) or ``reject`` set (the reason).
    Size and mtime are those of the file as opened (``fstat``), so they describe the bytes read.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's complaints about a bad file are not ours to show
        return _read(path, want_for(frozenset(keywords)))


def _read(path: str, want: Want) -> CachedHeader:
    if os.path.basename(path).upper() == "DICOMDIR":
        try:
            return _reject(path, want, os.stat(path), "DICOMDIR: media directory, not an image")
        except OSError as exc:
            return _unreadable(path, want, exc)
    try:
        # O_NONBLOCK: a FIFO passed in by mistake must not hang the scan (no effect on regular files).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return _unreadable(path, want, exc)
    fst: os.stat_result | None = None
    try:
        fst = st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _reject(path, want, st, "unreadable: not a regular file")
        head = pread(fd, min(st.st_size, _head_size[0]) if st.st_size else _HEAD_MIN, 0)
        return _parse(path, fd, st, head, want)
    except OSError as exc:
        return _unreadable(path, want, exc, fst)
    finally:
        os.close(fd)


def _parse(path: str, fd: int, st: os.stat_result, head: bytes, want: Want) -> CachedHeader:
    size = st.st_size
    whole = len(head) >= size
    if len(head) < min(size, _head_size[0]):  # shrank since fstat: believe the bytes
        size, whole = len(head), True
    has_dicm = head[128:132] == b"DICM"
    if not has_dicm and not raw_stream_start(head):
        return _reject(path, want, st, "not DICOM: no DICM prefix and the bytes do not start a data set")

    parsed = run_pydicom(io.BytesIO(head), has_dicm, want)
    if not whole and (parsed.error is not None or not parsed.tracker.pixel or parsed.deflated):
        # The first bytes did not settle it: parse again with the whole file behind the reader, and
        # read more at once from now on (headers within one collection are alike).
        parsed = run_pydicom(FdReader(fd, size, head), has_dicm, want)
        if parsed.tracker.pixel and not parsed.deflated:
            _head_size[0] = max(_head_size[0], min(_HEAD_MAX, 1 << (parsed.stop + 12).bit_length()))
    return _judge(path, fd, st, size, head, has_dicm, parsed, want)


def _judge(
    path: str,
    fd: int,
    st: os.stat_result,
    size: int,
    head: bytes,
    has_dicm: bool,
    parsed: Parsed,
    want: Want,
) -> CachedHeader:
    """The verdict on a parsed file, in the order of the reasons in the package docstring."""
    exc = parsed.error
    if exc is not None:
        eof = isinstance(exc, EOFError | struct.error | OSError) or (
            isinstance(exc, zlib.error) and "incomplete" in str(exc)
        )
        if eof and (has_dicm or parsed.meta):
            return _reject(path, want, st, "truncated: header ends early")
        detail = f"{type(exc).__name__}: {exc}"[:200]
        return _reject(path, want, st, f"not DICOM: pydicom cannot parse it ({detail})")

    ts = parsed.ts
    if (
        element_text(parsed.meta.get(0x00020002), ["iso8859"]) == _MEDIA_DIRECTORY
        or DICOMDIR_OFFSET in parsed.elems
    ):
        return _reject(path, want, st, "DICOMDIR: media directory, not an image", ts)

    encodings = encodings_of(parsed.elems)
    values: dict[str, str] = {}
    for kw, tag in want.fields:
        text = element_text(parsed.elems.get(tag), encodings)
        if text is not None:
            values[kw] = text

    if not has_dicm and not parsed.meta:
        bad = [kw for kw in _REQUIRED if not _UID.fullmatch(values.get(kw, ""))]
        if bad:
            return _reject(
                path, want, st, f"not DICOM: no file meta, and no valid {'/'.join(bad)} in what parses", ts
            )

    # A deflated data set's positions are in the inflated stream: no offset checks are possible.
    if not parsed.deflated and _header_cut(parsed, has_dicm, size):
        return _reject(path, want, st, "truncated: header ends early", ts)

    for kw in _REQUIRED:
        if kw not in values:
            return _reject(path, want, st, f"no {kw}", ts)

    if parsed.tracker.pixel and not parsed.deflated:
        problem = _pixel_problem(fd, size, head, parsed)
        if problem:
            return _reject(path, want, st, problem, ts)
    # The bytes the values came from (a deflated data set's positions are in the inflated stream):
    # apply re-hashes them instead of parsing again. Read again when the first read held fewer: how
    # much it held follows ``_head_size``, a hint, and the entry must not depend on a hint.
    digest = ""
    if not parsed.deflated:
        upto = head[: parsed.stop] if parsed.stop <= len(head) else pread(fd, parsed.stop, 0)
        digest = head_digest(upto) if len(upto) == parsed.stop else ""
    return CachedHeader(
        path,
        st.st_size,
        st.st_mtime_ns,
        want.keywords,
        ts,
        values,
        None,
        st.st_ctime_ns,
        st.st_ino,
        head_digest=digest,
    )


def _header_cut(parsed: Parsed, has_dicm: bool, size: int) -> bool:
    """Whether the header before Pixel Data (file meta included) runs past the end of the file."""
    gl = parsed.meta.get(0x00020000)
    if (
        isinstance(gl, RawDataElement)
        and isinstance(gl.value, bytes)
        and len(gl.value) == 4
        and (132 if has_dicm else 0) + 12 + struct.unpack("<I", gl.value)[0] > size
    ):
        return True
    t = parsed.tracker
    if t.pixel or t.pos < 0 or t.length == UNDEFINED_LENGTH:
        return False
    # Parsing ended because fewer than 8 bytes were left: the last element must end exactly at EOF.
    return t.pos + t.length != size


def _pixel_problem(fd: int, size: int, head: bytes, parsed: Parsed) -> str | None:
    """Check the Pixel Data element against the file size without reading the pixels."""
    pos = parsed.stop  # pydicom rewinds to the first byte of the element's tag
    raw = head[pos : pos + 12] if pos + 12 <= len(head) else pread(fd, 12, pos)
    endian = "<" if parsed.little else ">"
    if len(raw) < 8:
        return "truncated: header ends early"
    if read_tag(raw, 0, parsed.little) not in PIXEL_TAGS:
        return None  # not where pydicom said: nothing to check (the data set was garbage anyway)
    # Implicit VR as pydicom read it (no VR seen), else by the VR there; a 2-byte length is not valid
    # for Pixel Data, but parseable.
    try:
        hdr, _, length = element_header(raw, 0, len(raw), parsed.tracker.vr is None, parsed.little)
    except Malformed:
        return "truncated: header ends early"
    after = size - pos - hdr
    if length != UNDEFINED_LENGTH:
        if length > after:
            return f"truncated: Pixel Data declares {length} bytes, file has {after} after it"
        return None
    return _encapsulated_problem(fd, size, pos + hdr, endian)


def _encapsulated_problem(fd: int, size: int, start: int, endian: str) -> str | None:
    """Encapsulated Pixel Data: items up to a Sequence Delimitation Item, all inside the file."""
    delimiter = struct.pack(endian + "HHI", 0xFFFE, 0xE0DD, 0)
    if size - start >= 8 and pread(fd, 8, size - 8) == delimiter:
        return None  # the common case: the delimiter is the file's last 8 bytes
    # Something follows the pixel data, or the file is cut: walk the item headers (8 bytes each).
    pos = start
    while True:
        raw = pread(fd, 8, pos)
        if len(raw) < 8:
            return (
                "truncated: encapsulated Pixel Data has no Sequence Delimitation Item "
                f"(file ends {size - start} bytes after the element header)"
            )
        group, elem, length = struct.unpack(endian + "HHI", raw)
        tag = group << 16 | elem
        if tag == SEQUENCE_DELIMITER:
            return None
        if tag != ITEM or length == UNDEFINED_LENGTH:
            return (
                f"corrupt: encapsulated Pixel Data holds ({group:04X},{elem:04X}) at byte {pos}, not an item"
            )
        if pos + 8 + length > size:
            return (
                f"truncated: encapsulated Pixel Data item declares {length} bytes, "
                f"file has {size - pos - 8} after it"
            )
        pos += 8 + length
