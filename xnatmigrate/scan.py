"""The read-only header scan: source folders → ``FileHeader`` per DICOM file, ``Reject`` for the rest.

Invariants:
- Read-only: files are opened ``O_RDONLY`` and only their headers are read; Pixel Data is never read
  (its element header and, for encapsulated data, the last 8 bytes of the file are).
- Every walked file ends up in exactly one of ``ScanResult.headers`` / ``ScanResult.rejects`` (a folder
  that cannot be listed is a reject of its own), and no input bytes make ``read_header`` raise: a bad
  file becomes a reject with a reason.
- Deterministic: the result depends on the files only, never on ``jobs``, chunking or cache state.
- A file's path is the source folder joined with its relative path (symlinks in it are kept, never
  resolved), so it is stable between runs and is the key of the scan cache.

Reject reasons (the prefixes are an interface; the planner, tests and users key on them):

- ``not DICOM: …``: no ``DICM`` prefix and the bytes do not start like a data set, pydicom cannot
  parse it, or a stream without file meta lacks a valid SOPClassUID/SOPInstanceUID/StudyInstanceUID.
- ``DICOMDIR: media directory, not an image``: named DICOMDIR, Media Storage SOP Class
  1.2.840.10008.1.3.10, or carries (0004,1200).
- ``no SOPInstanceUID`` / ``no StudyInstanceUID`` / ``no SOPClassUID``: a Part 10 file without it.
- ``unreadable: <strerror>``: cannot be opened or read (permissions, vanished, a directory we could not
  list, not a regular file). Never cached: the next run tries again.
- ``skipped: …``: not walked (see ``_walk``): a FIFO, socket or device; a symbolic link to a folder
  inside the source; a symbolic link leading outside the source without ``follow_links: true``; a
  followed link to a folder already walked.
- ``truncated: header ends early``: the data set stops inside an element before Pixel Data.
- ``truncated: Pixel Data declares N bytes, file has M after it``: cut inside Pixel Data (also Float /
  Double Float Pixel Data); for encapsulated Pixel Data: ``truncated: encapsulated Pixel Data …`` when
  an item runs past the end or the Sequence Delimitation Item is missing.
- ``corrupt: …``: encapsulated Pixel Data holding something other than items.
- ``duplicate: same SOPInstanceUID as <kept path>, identical content|different content``: see ``dedupe``
  (``content not compared (<strerror>)`` if a copy cannot be read at that point).

Decisions:
- Files without preamble/file meta are ACCEPTED, as dcm4che (XNAT's parser) reads such streams and a
  C-STORE re-wraps them anyway, PROVIDED they start the way dcm4che's ``guessTransferSyntax`` requires
  (first tag a known public tag whose explicit VR matches the dictionary, or whose implicit length ends
  within the first 132 bytes) and carry syntactically valid SOPClassUID, SOPInstanceUID and
  StudyInstanceUID. Their transfer syntax is recorded as pydicom infers it (implicit or explicit VR
  little endian; explicit big endian when the first tag reads byte-swapped).
- Elements are parsed by pydicom's ``data_element_generator``, the loop inside ``dcmread``; this module
  does what ``read_partial`` does around it (preamble, file meta, transfer syntax, the implicit/explicit
  VR check) without building Dataset objects, which measured as half of ``dcmread``'s time. Our
  ``stop_when`` callback stops at (7FE0,0010/0008/0009) as ``stop_before_pixels`` does, and also notes
  where each top-level element ends, which is how a header cut inside an element is found.
  ``specific_tags`` makes pydicom seek over the values of every element not asked for.
- Speed: the first 16 KiB are read with one system call and parsed in memory; only when that does not
  reach Pixel Data (and is not the whole file) is the file parsed again through a windowed reader, and
  the first read grows to fit such headers. Folders are walked with ``os.scandir``, paths kept as str.

NOTE: known gaps: elements after a defined-length Pixel Data are not checked; a header cut exactly at an
element boundary, or stray bytes after a final undefined-length sequence, look like a complete header;
a deflated data set (1.2.840.10008.1.2.1.99) is checked only by inflating its header.
NOTE: the cache trusts (size, mtime_ns, ctime_ns, inode): a file rewritten in place keeps its size and
(after ``touch -r``) its mtime, but its ctime changes, and a file replaced by rename has a new inode.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, cast

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.tag import BaseTag

from .dicombytes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    ITEM,
    SEQUENCE_DELIMITER,
    UNDEFINED_LENGTH,
    Malformed,
    element_header,
    encoding,
    looks_explicit,
    read_tag,
)
from .errors import PlanError
from .model import BASE_KEYWORDS, CachedHeader, FileHeader, Manifest, Reject, SourceSpec

__all__ = [
    "ScanResult",
    "dedupe",
    "glob_to_regex",
    "read_header",
    "scan_sources",
    "walk_source",
]

ProgressFn = Callable[[int, int], None]

# Bytes read with the first system call: small, because on a cold disk the bytes read (and the
# kernel's read-ahead they trigger) dominate; grown per process to the largest header met, up to MAX.
_HEAD_MIN, _HEAD_MAX = 16 * 1024, 1024 * 1024
_head_size = [_HEAD_MIN]  # NOTE: a performance hint only; results never depend on it
# Window of the fallback reader (headers that do not fit in _HEAD, e.g. enhanced multi-frame).
_WINDOW = 256 * 1024
# Most bytes a deflated data set is inflated to (its header is all the scan needs).
_INFLATE_MAX = 64 * 1024 * 1024
# Below this many files to read, worker processes cost more than they save.
_PARALLEL_MIN = 300
_CHUNK_MIN, _CHUNK_MAX = 64, 256
# How often the in-process loop reports progress (files).
_PROGRESS_EVERY = 64

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
_DICOMDIR_OFFSET = 0x00041200  # Type 1 in every DICOMDIR, never in an image
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SOPClassUID")

# Value representations whose text is read; every other VR (binary numbers, bulk data, SQ) is skipped.
_ASCII_MULTI = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_MULTI = frozenset({"SH", "LO", "UC"})
_TEXT_SINGLE = frozenset({"ST", "LT", "UT"})
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C}  # reset ISO 2022 code extensions (PS3.5 6.1.2.5.3)
_STRIP = " \t\r\n\f\v\x00"


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanResult:
    """What a scan found. ``headers`` sorted by (source index, path); ``rejects`` by path.

    ``cache_updates`` are the entries read this run (not ``unreadable:`` ones), for the state's cache.
    """

    headers: tuple[tuple[int, FileHeader], ...]
    rejects: tuple[Reject, ...]
    cache_updates: tuple[CachedHeader, ...]
    files_seen: int
    cache_hits: int


# --------------------------------------------------------------------------------------------
# Walking
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob over POSIX relative paths; the pattern is anchored at both ends.

    ``**`` as a whole segment matches any number of directories (zero included), ``*`` any run of
    characters within one segment, ``?`` one character but ``/``, ``[abc]``/``[!abc]`` a class.
    NOTE: unlike a shell, ``*`` also matches names starting with a dot; matching is case-sensitive.
    """
    pat = re.sub(r"/{2,}", "/", pattern)
    while pat.startswith("./"):
        pat = pat[2:]
    pat = pat.lstrip("/")
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            if pat.startswith("**", i) and (i == 0 or pat[i - 1] == "/"):
                after = i + 2
                if after == n:
                    out.append(".*")
                    i = after
                    continue
                if pat[after] == "/":
                    out.append("(?:[^/]+/)*")
                    i = after + 1
                    continue
            out.append("[^/]*")
            while i < n and pat[i] == "*":  # a run of stars inside a segment is one star
                i += 1
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pat[j] in "!^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            end = pat.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pat[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("(?s:" + "".join(out) + r")\Z")


def _prune_regex(pattern: str) -> re.Pattern[str] | None:
    """For an exclude ``X/**``: the folders (relative paths) matching X, whose whole subtree is excluded."""
    if pattern.endswith("/**") and len(pattern) > 3:
        return glob_to_regex(pattern[:-3])
    return None


def _walk(src: SourceSpec) -> tuple[list[str], list[Reject]]:
    """Files of one source after include/exclude, sorted, plus what was not walked and why.

    Entries that are not regular files or folders are never read, and each one the globs would
    have taken is a ``skipped: …`` reject: FIFOs, sockets and devices (reading could block or never
    end); symbolic links to folders inside the source (walked where they are); symbolic links
    leading outside the source, unless the source sets ``follow_links: true``; with it, a link to a
    folder already walked (a loop, or a second way in). A dangling link is kept, so the scan reports
    it as unreadable.
    """
    root = os.path.abspath(src.source)
    real_root = os.path.realpath(root)
    includes = [glob_to_regex(p) for p in src.include]
    excludes = [glob_to_regex(p) for p in src.exclude]
    prunes = [r for r in (_prune_regex(p) for p in src.exclude) if r is not None]
    files: list[str] = []
    errors: list[Reject] = []
    # Folders entered, by (device, inode): only needed when links are followed (loops).
    entered: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(root, "")]

    def wanted(rel: str) -> bool:
        return any(r.match(rel) for r in includes) and not any(r.match(rel) for r in excludes)

    def pruned(rel: str) -> bool:
        return any(r.match(rel) for r in prunes) or any(r.match(rel) for r in excludes)

    def outside(target: str) -> bool:
        return target != real_root and not target.startswith(real_root.rstrip(os.sep) + os.sep)

    while stack:
        folder, prefix = stack.pop()
        subdirs: list[tuple[str, str]] = []
        try:
            it = os.scandir(folder)
            if src.follow_links:
                st = os.stat(folder)
                entered.add((st.st_dev, st.st_ino))
        except OSError as exc:
            if folder == root:
                raise PlanError(
                    f"sources[{src.index}]: cannot list {root} ({exc.strerror or exc}); "
                    "fix the path, or mount it"
                ) from None
            errors.append(Reject(folder, f"unreadable: {exc.strerror or exc} (folder not listed)"))
            continue
        with it:
            for entry in it:
                rel = prefix + entry.name
                try:
                    if entry.is_symlink():
                        if not os.path.exists(entry.path):
                            pass  # dangling: kept, the scan reports it as unreadable
                        elif entry.is_dir():
                            if not pruned(rel):
                                why = _folder_link(entry.path, real_root, src.follow_links, outside, entered)
                                if why is None:
                                    subdirs.append((entry.path, rel + "/"))
                                else:
                                    errors.append(Reject(entry.path, why))
                            continue
                        elif wanted(rel):
                            target = os.path.realpath(entry.path)
                            if outside(target) and not src.follow_links:
                                errors.append(Reject(entry.path, _outside(target)))
                            elif not entry.is_file():
                                errors.append(
                                    Reject(entry.path, _special(os.stat(entry.path).st_mode, target))
                                )
                            else:
                                files.append(entry.path)
                            continue
                        else:
                            continue
                    elif entry.is_dir(follow_symlinks=False):
                        if not any(r.match(rel) for r in prunes):
                            subdirs.append((entry.path, rel + "/"))
                        continue
                    elif not entry.is_file(follow_symlinks=False):
                        if wanted(rel):
                            errors.append(
                                Reject(entry.path, _special(entry.stat(follow_symlinks=False).st_mode))
                            )
                        continue
                except OSError:
                    pass  # cannot even stat it: keep it, reading it will say why
                if wanted(rel):
                    files.append(entry.path)
        stack.extend(reversed(subdirs))
    files.sort()
    errors.sort(key=lambda r: r.path)
    return files, errors


def _outside(target: str) -> str:
    return (
        f"skipped: symbolic link leading outside the source, to {target}; set follow_links: true "
        "on this source to follow it"
    )


def _special(mode: int, target: str | None = None) -> str:
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "not a regular file"
    )
    via = f"symbolic link to {target}, " if target else ""
    return f"skipped: {via}{kind}, not a regular file: it is not read (reading could block or never end)"


def _folder_link(
    path: str,
    real_root: str,
    follow: bool,
    outside: Callable[[str], bool],
    entered: set[tuple[int, int]],
) -> str | None:
    """Why the symbolic link ``path`` to a folder is not walked, or None to walk it."""
    target = os.path.realpath(path)
    if not outside(target):
        return f"skipped: symbolic link to the folder {target}, inside the source: walked there, not twice"
    if not follow:
        return _outside(target)
    st = os.stat(path)
    if (st.st_dev, st.st_ino) in entered:
        return f"skipped: symbolic link to the folder {target}, already walked (a loop, or a second way in)"
    entered.add((st.st_dev, st.st_ino))
    return None


def walk_source(src: SourceSpec) -> list[str]:
    """Absolute paths of the source's files that match an include and no exclude, sorted.

    Globs see the path relative to the source folder with ``/`` separators. Raises PlanError when the
    source folder itself cannot be listed (a user error to fix, not a file to reject).
    """
    return _walk(src)[0]


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Want:
    """What to read: the keywords (BASE_KEYWORDS always included) and their tags."""

    keywords: frozenset[str]
    fields: tuple[tuple[str, int], ...]
    tags: tuple[int, ...]


@lru_cache(maxsize=32)
def _want(keywords: frozenset[str]) -> _Want:
    kws = frozenset(keywords) | frozenset(BASE_KEYWORDS)
    fields = tuple(sorted((kw, t) for kw in kws if (t := tag_for_keyword(kw)) is not None))
    return _Want(kws, fields, tuple(sorted({t for _, t in fields} | {_DICOMDIR_OFFSET})))


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
        self.pixel = tag in _PIXEL_TAGS
        return self.pixel


class _IOFailure(Exception):
    """A real read error inside pydicom's parse (pydicom raises OSError for bad data too)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _FdReader:
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
                self._buf = _pread(self._fd, max(n, _WINDOW), pos)
            except OSError as exc:
                raise _IOFailure(exc) from exc
            self._start = pos
            off = 0
        data = self._buf[off : off + n]
        self._pos = pos + len(data)
        return data


def _pread(fd: int, n: int, offset: int) -> bytes:
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


def _raw_stream_start(head: bytes) -> bool:
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


Elements = dict[int, "RawDataElement | DataElement"]


@dataclass
class _Parsed:
    """pydicom's view of a file's header. ``stop`` is the stream position where parsing ended."""

    meta: Elements
    elems: Elements
    ts: str  # as declared in the file meta, else as inferred from the bytes
    little: bool
    deflated: bool
    tracker: _Tracker
    stop: int
    error: Exception | None = None


def _run_pydicom(fp: io.BytesIO | _FdReader, has_dicm: bool, want: _Want) -> _Parsed:
    """Parse file meta and data set up to Pixel Data with pydicom's element generator.

    This is ``pydicom.filereader.read_partial`` (what ``dcmread(stop_before_pixels=True)`` runs) minus
    the Dataset objects, which cost half its time, plus our ``stop_when`` tracker.
    """
    tracker = _Tracker(fp.tell)
    parsed = _Parsed({}, {}, "", True, False, tracker, 0)
    try:
        _frame(fp, has_dicm, want, parsed)
    except _IOFailure as exc:
        raise exc.error from None
    except Exception as exc:  # any bytes may reach here: pydicom's failure is a verdict on the file
        parsed.error = exc
    parsed.stop = fp.tell()
    return parsed


def _frame(fp: io.BytesIO | _FdReader, has_dicm: bool, want: _Want, parsed: _Parsed) -> None:
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

    declared = _text(parsed.meta.get(0x00020010), ["iso8859"])
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


def _peek(fp: io.BytesIO | _FdReader | BinaryIO) -> bytes:
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


def _text(elem: RawDataElement | DataElement | None, encodings: list[str]) -> str | None:
    """The element's value as one string (multiple values ``\\``-joined), or None if empty/binary/SQ."""
    if elem is None:
        return None
    if isinstance(elem, DataElement):  # pydicom converts only sequences of undefined length itself
        return None
    raw = elem.value
    if not raw or not isinstance(raw, bytes):
        return None
    vr = elem.VR
    if vr is None or vr == "UN":
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    try:
        if vr in _ASCII_MULTI or vr == "UR":
            text = raw.decode("latin-1")
        elif vr == "PN":
            text = decode_bytes(raw, encodings, {0x5E, 0x3D, 0x5C})
        elif vr in _TEXT_MULTI:
            text = decode_bytes(raw, encodings, _TEXT_DELIMS | {0x5C})
        elif vr in _TEXT_SINGLE:
            text = decode_bytes(raw, encodings, _TEXT_DELIMS)
        else:
            return None
    except (LookupError, UnicodeError, ValueError):
        text = raw.decode("latin-1")  # a broken character set must not lose the value
    if vr in _TEXT_SINGLE or vr == "UR":
        text = text.strip(_STRIP)
        return text or None
    parts = [p.strip(_STRIP) for p in text.split("\\")]
    return "\\".join(parts) if any(parts) else None


def _encodings(elems: Elements) -> list[str]:
    """Python codecs for (0008,0005) Specific Character Set (pydicom's mapping and repairs)."""
    terms = _text(elems.get(0x00080005), ["iso8859"])
    if not terms:
        return ["iso8859"]
    try:
        # An empty first value means the default repertoire (PS3.3 C.12.1.1.2).
        return convert_encodings([t or "ISO_IR 6" for t in terms.split("\\")])
    except Exception:  # pydicom repairs or warns about most bad terms; a scan never fails on one
        return ["iso8859"]


def _unreadable(path: str, want: _Want, exc: OSError, st: os.stat_result | None = None) -> CachedHeader:
    return _reject(path, want, st, f"unreadable: {exc.strerror or exc}")


def _reject(
    path: str, want: _Want, st: os.stat_result | None, reason: str, ts: str | None = None
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
        return _read(path, _want(frozenset(keywords)))


def _read(path: str, want: _Want) -> CachedHeader:
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
        head = _pread(fd, min(st.st_size, _head_size[0]) if st.st_size else _HEAD_MIN, 0)
        return _parse(path, fd, st, head, want)
    except OSError as exc:
        return _unreadable(path, want, exc, fst)
    finally:
        os.close(fd)


def _parse(path: str, fd: int, st: os.stat_result, head: bytes, want: _Want) -> CachedHeader:
    size = st.st_size
    whole = len(head) >= size
    if len(head) < min(size, _head_size[0]):  # shrank since fstat: believe the bytes
        size, whole = len(head), True
    has_dicm = head[128:132] == b"DICM"
    if not has_dicm and not _raw_stream_start(head):
        return _reject(path, want, st, "not DICOM: no DICM prefix and the bytes do not start a data set")

    parsed = _run_pydicom(io.BytesIO(head), has_dicm, want)
    if not whole and (parsed.error is not None or not parsed.tracker.pixel or parsed.deflated):
        # The first bytes did not settle it: parse again with the whole file behind the reader, and
        # read more at once from now on (headers within one collection are alike).
        parsed = _run_pydicom(_FdReader(fd, size, head), has_dicm, want)
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
    parsed: _Parsed,
    want: _Want,
) -> CachedHeader:
    """The verdict on a parsed file, in the order of the reasons in the module docstring."""
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
        _text(parsed.meta.get(0x00020002), ["iso8859"]) == _MEDIA_DIRECTORY
        or _DICOMDIR_OFFSET in parsed.elems
    ):
        return _reject(path, want, st, "DICOMDIR: media directory, not an image", ts)

    encodings = _encodings(parsed.elems)
    values: dict[str, str] = {}
    for kw, tag in want.fields:
        text = _text(parsed.elems.get(tag), encodings)
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
    return CachedHeader(
        path, st.st_size, st.st_mtime_ns, want.keywords, ts, values, None, st.st_ctime_ns, st.st_ino
    )


def _header_cut(parsed: _Parsed, has_dicm: bool, size: int) -> bool:
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


def _pixel_problem(fd: int, size: int, head: bytes, parsed: _Parsed) -> str | None:
    """Check the Pixel Data element against the file size without reading the pixels."""
    pos = parsed.stop  # pydicom rewinds to the first byte of the element's tag
    raw = head[pos : pos + 12] if pos + 12 <= len(head) else _pread(fd, 12, pos)
    endian = "<" if parsed.little else ">"
    if len(raw) < 8:
        return "truncated: header ends early"
    if read_tag(raw, 0, parsed.little) not in _PIXEL_TAGS:
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
    if size - start >= 8 and _pread(fd, 8, size - 8) == delimiter:
        return None  # the common case: the delimiter is the file's last 8 bytes
    # Something follows the pixel data, or the file is cut: walk the item headers (8 bytes each).
    pos = start
    while True:
        raw = _pread(fd, 8, pos)
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


def _read_chunk(paths: Sequence[str], keywords: frozenset[str]) -> list[CachedHeader]:
    """Worker entry point: read a chunk of files."""
    return [read_header(p, keywords) for p in paths]


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def dedupe(headers: Iterable[tuple[int, FileHeader]]) -> tuple[list[tuple[int, FileHeader]], list[Reject]]:
    """Keep one file per SOPInstanceUID: the one with the smallest path; reject the others.

    Each rejected copy says whether its bytes equal the kept file's (sizes compared first; contents are
    read only for same-size pairs). Order of ``headers`` is kept for the survivors.
    """
    items = list(headers)
    groups: dict[str, list[tuple[int, FileHeader]]] = defaultdict(list)
    for item in items:
        groups[item[1].sop_instance_uid].append(item)
    dropped: set[tuple[int, str]] = set()
    rejects: list[Reject] = []
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda ih: (ih[1].path, ih[0]))
        kept = group[0][1]
        for idx, h in group[1:]:
            dropped.add((idx, h.path))
            if h.size != kept.size:
                how = "different content"
            else:
                try:
                    how = "identical content" if _same_content(kept.path, h.path) else "different content"
                except OSError as exc:
                    how = f"content not compared ({exc.strerror or exc})"
            rejects.append(Reject(h.path, f"duplicate: same SOPInstanceUID as {kept.path}, {how}"))
    kept_items = [(i, h) for i, h in items if (i, h.path) not in dropped]
    return kept_items, rejects


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------


def _read_many(
    paths: Sequence[str], want: _Want, jobs: int | None, report: Callable[[int], None]
) -> dict[str, CachedHeader]:
    """Read ``paths`` in process or in a process pool; ``report(n)`` after every n files done."""
    out: dict[str, CachedHeader] = {}
    workers = jobs if jobs is not None else (os.cpu_count() or 1)
    # Several chunks per worker balance uneven files; 64–256 paths keep IPC small next to the work.
    size = max(_CHUNK_MIN, min(_CHUNK_MAX, -(-len(paths) // (max(workers, 1) * 4))))
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    pool: ProcessPoolExecutor | None = None
    if workers > 1 and len(paths) >= _PARALLEL_MIN:
        try:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)))
        except (OSError, NotImplementedError):  # no POSIX semaphores here (some sandboxes): read in process
            pool = None
    if pool is None:
        reported = 0
        for i, p in enumerate(paths, 1):
            out[p] = read_header(p, want.keywords)
            if i % _PROGRESS_EVERY == 0 or i == len(paths):
                report(i - reported)
                reported = i
        return out
    with pool:
        pending: set[Future[list[CachedHeader]]] = {
            pool.submit(_read_chunk, c, want.keywords) for c in chunks
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                entries = fut.result()
                for e in entries:
                    out[e.path] = e
                report(len(entries))
    return out


def scan_sources(
    manifest: Manifest,
    keywords: frozenset[str],
    cache: Mapping[str, CachedHeader] | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> ScanResult:
    """Walk every source, read each file's header (or reuse the cache), reject what cannot migrate.

    Args:
        manifest: the sources to walk (include/exclude applied per source).
        keywords: the DICOM keywords to read; BASE_KEYWORDS are always read as well.
        cache: the state's scan cache; an entry is reused, without opening the file, when its size,
            mtime_ns, ctime_ns and inode equal the file's (``os.stat``) and its keywords cover what is read.
        jobs: worker processes (default: CPU count); 1, or fewer than ~300 files to read, reads in
            this process.
        progress: called as ``progress(done, total)`` once per chunk of files, and at the end.

    NOTE: a file under two sources belongs to the first (lowest index); it is read and counted once.
    NOTE: duplicates (same SOPInstanceUID) are resolved across the whole manifest (see ``dedupe``).
    """
    want = _want(frozenset(keywords))
    owner: dict[str, int] = {}
    walk_rejects: list[Reject] = []
    for src in manifest.sources:
        files, errors = _walk(src)
        for p in files:
            owner.setdefault(p, src.index)
        walk_rejects.extend(errors)
    paths = sorted(owner)
    total = len(paths)

    entries: dict[str, CachedHeader] = {}
    todo: list[str] = []
    if cache:
        for p in paths:
            e = cache.get(p)
            if e is not None and want.keywords <= e.keywords:
                try:
                    st = os.stat(p)
                except OSError:
                    todo.append(p)
                    continue
                if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (
                    e.size,
                    e.mtime_ns,
                    e.ctime_ns,
                    e.ino,
                ):
                    entries[p] = e
                    continue
            todo.append(p)
    else:
        todo = paths
    hits = len(entries)

    done = hits
    if progress is not None:
        progress(done, total)

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    fresh = _read_many(todo, want, jobs, report)
    entries.update(fresh)

    headers: list[tuple[int, FileHeader]] = []
    rejects = list(walk_rejects)
    for p in paths:
        e = entries[p]
        if e.reject is not None or e.header is None:
            rejects.append(Reject(p, e.reject or "unreadable: no header recorded"))
            continue
        # The cache entry read exactly these keywords (the usual warm case): share its dict.
        values = (
            e.header
            if e.keywords == want.keywords
            else {k: v for k, v in e.header.items() if k in want.keywords}
        )
        headers.append(
            (owner[p], FileHeader(p, e.size, e.mtime_ns, e.transfer_syntax or "", values, e.ctime_ns, e.ino))
        )

    kept, dup_rejects = dedupe(headers)
    rejects.extend(dup_rejects)
    kept.sort(key=lambda ih: (ih[0], ih[1].path))
    rejects.sort(key=lambda r: (r.path, r.reason))
    updates = tuple(fresh[p] for p in todo if not (fresh[p].reject or "").startswith("unreadable:"))
    return ScanResult(
        headers=tuple(kept),
        rejects=tuple(rejects),
        cache_updates=updates,
        files_seen=total,
        cache_hits=hits,
    )
