"""One file's header through pydicom's element loop: file meta, transfer syntax, elements up to Pixel Data.

Invariants:
- Read-only, and Pixel Data's value is never read: parsing stops at (7FE0,0010/0008/0009).
- Any bytes may come in: pydicom's failure on them is returned as ``Parsed.error`` (a verdict on the
  file), never raised; only a real read error of the file leaves as ``OSError``.
- ``FdReader`` reads are clamped to the size seen at open, and a deflated data set is inflated to at
  most 64 MiB, so no length in a file can make the scan allocate gigabytes.

Decisions:
- Elements are parsed by pydicom's ``data_element_generator``, the loop inside ``dcmread``; this module
  does what ``read_partial`` does around it (preamble, file meta, transfer syntax, the implicit/explicit
  VR check) without building Dataset objects, which measured as half of ``dcmread``'s time. Our
  ``stop_when`` callback stops at (7FE0,0010/0008/0009) as ``stop_before_pixels`` does, and also notes
  where each top-level element ends, which is how a header cut inside an element is found.
  ``specific_tags`` makes pydicom seek over the values of every element not asked for.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, cast

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag

from ..dicombytes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    encoding,
    looks_explicit,
)
from ..model import BASE_KEYWORDS
from .text import Elements, element_text

# Window of the fallback reader (headers longer than header's first read, e.g. enhanced multi-frame).
_WINDOW = 256 * 1024
# Most bytes a deflated data set is inflated to (its header is all the scan needs).
_INFLATE_MAX = 64 * 1024 * 1024

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
DICOMDIR_OFFSET = 0x00041200  # Type 1 in every DICOMDIR, never in an image


@dataclass(frozen=True)
class Want:
    """What to read: the keywords (BASE_KEYWORDS always included) and their tags."""

    keywords: frozenset[str]
    fields: tuple[tuple[str, int], ...]
    tags: tuple[int, ...]


@lru_cache(maxsize=32)
def want_for(keywords: frozenset[str]) -> Want:
    kws = frozenset(keywords) | frozenset(BASE_KEYWORDS)
    fields = tuple(sorted((kw, t) for kw in kws if (t := tag_for_keyword(kw)) is not None))
    return Want(kws, fields, tuple(sorted({t for _, t in fields} | {DICOMDIR_OFFSET})))


class _Tracker:
    """``stop_when`` callback: stops at Pixel Data and remembers the last top-level element seen.

    pydicom calls it after reading each top-level element header, with the stream at the value's first
    byte; when it returns True, pydicom rewinds the stream to the first byte of that element's tag.
    """

    __slots__ = ("length", "pixel", "pos", "tell", "vr")

    def __init__(self, tell: Callable[[], int]) -> None:
        self.tell = tell
        self.pos = -1
        self.length = 0
        self.vr: str | None = None
        self.pixel = False

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        self.pos = self.tell()
        self.length = length
        self.vr = vr
        self.pixel = tag in PIXEL_TAGS
        return self.pixel


class _IOFailure(Exception):
    """A real read error inside pydicom's parse (pydicom raises OSError for bad data too)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class FdReader:
    """A seekable read-only view of an open file for pydicom, reading through a window.

    NOTE: reads are clamped to the size seen when the file was opened, so a garbage length can never
    make pydicom allocate gigabytes.
    """

    def __init__(self, fd: int, size: int, head: bytes) -> None:
        self._fd = fd
        self._size = size
        self._pos = 0
        self._buf = head
        self._start = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        pos = self._pos
        left = self._size - pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        off = pos - self._start
        if off < 0 or off + n > len(self._buf):
            try:
                self._buf = pread(self._fd, max(n, _WINDOW), pos)
            except OSError as exc:
                raise _IOFailure(exc) from exc
            self._start = pos
            off = 0
        data = self._buf[off : off + n]
        self._pos = pos + len(data)
        return data


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset``; fewer only at end of file."""
    chunks: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def raw_stream_start(head: bytes) -> bool:
    """Whether bytes without a ``DICM`` prefix start a data set, by dcm4che's ``guessTransferSyntax``.

    The first tag must be a known public tag and either be followed by its dictionary VR (explicit VR,
    either byte order) or by an implicit VR little endian length ending within the first 132 bytes.
    """
    if len(head) < 8:
        return False
    window = min(len(head), 132)
    for endian in ("<", ">"):
        group, elem = struct.unpack(endian + "HH", head[:4])
        vrs: tuple[str, ...]
        if elem == 0:
            vrs = ("UL",)  # group length, any group
        else:
            try:
                vrs = tuple(dictionary_VR(group << 16 | elem).split(" or "))
            except KeyError:
                continue
        if head[4:6].decode("latin-1") in vrs:
            return True
        if endian == "<" and 8 + struct.unpack("<I", head[4:8])[0] <= window:
            return True
    return False


def _not_group(group: int) -> Callable[[int, str | None, int], bool]:
    return lambda tag, vr, length: tag >> 16 != group


@dataclass
class Parsed:
    """pydicom's view of a file's header. ``stop`` is the stream position where parsing ended."""

    meta: Elements
    elems: Elements
    ts: str  # as declared in the file meta, else as inferred from the bytes
    little: bool
    deflated: bool
    tracker: _Tracker
    stop: int
    error: Exception | None = None


def run_pydicom(fp: io.BytesIO | FdReader, has_dicm: bool, want: Want) -> Parsed:
    """Parse file meta and data set up to Pixel Data with pydicom's element generator.

    This is ``pydicom.filereader.read_partial`` (what ``dcmread(stop_before_pixels=True)`` runs) minus
    the Dataset objects, which cost half its time, plus our ``stop_when`` tracker.
    """
    tracker = _Tracker(fp.tell)
    parsed = Parsed({}, {}, "", True, False, tracker, 0)
    try:
        _frame(fp, has_dicm, want, parsed)
    except _IOFailure as exc:
        raise exc.error from None
    except Exception as exc:  # any bytes may reach here: pydicom's failure is a verdict on the file
        parsed.error = exc
    parsed.stop = fp.tell()
    return parsed


def _frame(fp: io.BytesIO | FdReader, has_dicm: bool, want: Want, parsed: Parsed) -> None:
    """What ``read_partial`` does around its element loop: preamble, file meta, command set, encoding."""
    stream = cast(BinaryIO, fp)
    fp.seek(132 if has_dicm else 0)
    peek = _peek(fp)
    # File meta (0002,eeee): explicit VR little endian by PS3.10 7.1, but some writers use implicit
    # VR here (pydicom issue 503), hence the same test pydicom applies to a data set's first element.
    if peek[:2] == b"\x02\x00":
        meta = data_element_generator(stream, not looks_explicit(peek[4:6]), True, stop_when=_not_group(2))
        parsed.meta = {e.tag: e for e in meta}
        peek = _peek(fp)
    # A command set (0000,eeee), as in raw DIMSE dumps, is always implicit VR little endian; skipped
    # (specific_tags=[0], a tag never present, makes pydicom seek over the values).
    if peek[:2] == b"\x00\x00" and len(peek) == 6:
        for _ in data_element_generator(stream, True, True, stop_when=_not_group(0), specific_tags=[0]):
            pass
        peek = _peek(fp)

    declared = element_text(parsed.meta.get(0x00020010), ["iso8859"])
    if declared == DEFLATED_EXPLICIT_VR_LE:
        stream = cast(BinaryIO, io.BytesIO(_inflate(fp.read())))
        parsed.deflated = True
        peek = _peek(stream)
    implicit, little = encoding(declared)
    if len(peek) == 6:
        # The data set may contradict its transfer syntax: pydicom believes the bytes, and so do we.
        implicit = not looks_explicit(peek[4:6])
        if not declared and not implicit:
            # No transfer syntax: pydicom's byte order guess. Group 0x0008 written big endian reads
            # 0x0800 little endian; no little endian data set starts with a group that high.
            little = struct.unpack("<H", peek[:2])[0] < 0x0400
    parsed.little = little
    parsed.ts = declared or (IMPLICIT_VR_LE if implicit else (EXPLICIT_VR_LE if little else EXPLICIT_VR_BE))
    tags: list[BaseTag | int] = list(want.tags)
    gen = data_element_generator(stream, implicit, little, stop_when=parsed.tracker, specific_tags=tags)
    parsed.elems = {e.tag: e for e in gen}


def _peek(fp: io.BytesIO | FdReader | BinaryIO) -> bytes:
    """The next 6 bytes (tag and, if explicit, VR), without moving."""
    start = fp.tell()
    data = fp.read(6)
    fp.seek(start)
    return data


def _inflate(data: bytes) -> bytes:
    """A deflated data set (PS3.5 A.5), capped so a decompression bomb cannot exhaust memory."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, _INFLATE_MAX)
    if not inflater.eof and len(out) < _INFLATE_MAX:
        raise EOFError("the deflated data set ends early")
    return out
