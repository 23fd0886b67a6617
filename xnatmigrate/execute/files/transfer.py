"""One planned file into staging: copied, hard-linked, or a file left by an earlier run reused.

Invariants:
- A copy gets its final name in staging only after it was verified: SHA-256 of the bytes read from the
  source equals that of the bytes read back from the written file. A hard link is made under its final
  name (atomic: whole or absent) and removed again unless it is the source's inode with the planned size
  and mtime. A rerun still re-checks every final-named file against its source before reusing it
  (re-hashes a copy, re-stats a link), so correctness never rests on a checksum record or on per-file
  fsyncs (see ``stage.stage_session``), nor on a crash landing after a link's check.
- The source is checked against the plan (``sources.check_stat``) before and after it is read.
- ``*.part`` files (copies and edits) are scratch: the worker that fails deletes its own.
- Workers never word an OSError: they raise ``SourceError`` / ``DestError`` for the caller's thread.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ApplyError, StalePlanError
from ...model import PlannedFile, Transfer
from .digest import hash_fd
from .disk import DestError, SourceError
from .paths import PART_SUFFIX
from .perms import Perms
from .sources import check_stat


@dataclass(frozen=True)
class StagedFile:
    """A file verified in staging: ``sha256`` is of the bytes read from ``source`` (equal to those written);
    ``NOT_HASHED`` for a hard link nothing will be verified against (``link_one(digest=False)``)."""

    dest: str
    source: str
    size: int
    sha256: str
    #: A hard link to the source's inode as the plan's scan read it, unchanged since (``link_one``):
    #: its header is the one planned, so ``recheck`` need not read it.
    unchanged: bool = False


#: The ``sha256`` of a hard link staged without reading it (the inbox route: XNAT's importer reads and
#: copies the file, then removes our link; ``verify`` counts what XNAT holds, never our hashes).
NOT_HASHED = ""


def reuse(
    f: PlannedFile, dst: str, transfer: Transfer, perms: Perms, buf: bytearray, *, digest: bool = True
) -> StagedFile | None:
    """A final-named file left by an earlier run, if it still matches its source; else delete it (None).
    ``digest=False``: a hard link to the source's inode is kept without reading it (``link_one``)."""
    # ctime only for copies: our own link moved a hard link's ctime.
    src_fd, src_st = _open_source(f, ctime=transfer is Transfer.COPY)
    try:
        try:
            dst_st = os.lstat(dst)
        except OSError as exc:
            raise DestError(exc, dst) from exc
        same_inode = (dst_st.st_dev, dst_st.st_ino) == (src_st.st_dev, src_st.st_ino)
        if transfer is Transfer.HARDLINK and same_inode:
            sha, n = _read_hash(src_fd, f, buf, ctime=False) if digest else (NOT_HASHED, src_st.st_size)
            if n == f.size:
                _apply_path(perms, dst)
                return StagedFile(f.dest, f.source, f.size, sha)
        elif transfer is Transfer.COPY and not same_inode and dst_st.st_size == f.size:
            # The checksum record may be lost with the crash: compare content, not names or sizes.
            try:
                have = _hash_path(dst, buf)
            except OSError as exc:
                raise DestError(exc, dst) from exc
            sha, n = _read_hash(src_fd, f, buf)
            if have == sha and n == f.size:
                _apply_path(perms, dst)
                return StagedFile(f.dest, f.source, f.size, sha)
    finally:
        os.close(src_fd)
    _discard(dst)
    return None


def _discard(dst: str) -> None:
    """Delete a staged file that does not match its source (gone already: fine)."""
    try:
        os.unlink(dst)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise DestError(exc, dst) from exc


def _hash_path(path: str, buf: bytearray) -> str:
    """SHA-256 of a staged file (its own function so tests can see that reuse re-hashes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, buf)[0]
    finally:
        os.close(fd)


def _open_source(f: PlannedFile, *, ctime: bool = True) -> tuple[int, os.stat_result]:
    """``f``'s source opened read-only and still the file planned (else StalePlanError; SourceError
    when it cannot be opened or stat-ed); the caller closes the descriptor."""
    try:
        fd = os.open(f.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceError(exc, f.source) from exc
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise SourceError(exc, f.source) from exc
        check_stat(f, st, ctime)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _read_hash(src_fd: int, f: PlannedFile, buf: bytearray, ctime: bool = True) -> tuple[str, int]:
    try:
        digest, n = hash_fd(src_fd, buf, 0)
        check_stat(f, os.fstat(src_fd), ctime)
    except OSError as exc:
        raise SourceError(exc, f.source) from exc
    return digest, n


def _read_back(fd: int, into: memoryview, expect: int) -> int:
    """Read ``fd`` from its start into ``into`` (which holds more than ``expect`` bytes); the bytes read,
    up to ``expect + 1`` so that a file longer than expected is seen as such."""
    got = 0
    while got <= expect:
        n = os.preadv(fd, [into[got : expect + 1]], got)
        if not n:
            break
        got += n
    return got


def _apply_path(perms: Perms, path: str) -> None:
    try:
        perms.apply_path(path, is_dir=False)
    except OSError as exc:
        raise DestError(exc, path) from exc


def copy_one(f: PlannedFile, dst: str, perms: Perms, buf: bytearray, fsync_each: bool) -> StagedFile:
    """read → hash → write ``<dst>.part`` → start writeback (or fsync) → re-read and compare → chmod/chown
    → rename to ``dst``."""
    part = dst + PART_SUFFIX
    mv = memoryview(buf)
    src_fd, _ = _open_source(f)
    dst_fd = -1
    done = False
    try:
        try:
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            raise SourceError(exc, f.source) from exc
        try:
            # O_RDWR: the verification re-reads through the same descriptor.
            dst_fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DestError(exc, part) from exc
        h = hashlib.sha256()
        total = chunks = 0
        while True:
            try:
                n = os.readv(src_fd, [mv])
            except OSError as exc:
                raise SourceError(exc, f.source) from exc
            if not n:
                break
            h.update(mv[:n])
            total += n
            chunks += 1
            written = 0
            try:
                while written < n:
                    written += os.write(dst_fd, mv[written:n])
            except OSError as exc:
                raise DestError(exc, part) from exc
        try:
            after = os.fstat(src_fd)
            # We are done with the source: don't let a TB-sized migration evict XNAT's working set.
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise SourceError(exc, f.source) from exc
        if total != f.size:
            raise StalePlanError(
                f"source {f.source} read {total} bytes, planned {f.size}, while copying; re-run xnatmigrate plan"
            )
        check_stat(f, after)
        digest = h.hexdigest()
        try:
            if fsync_each:
                os.fsync(dst_fd)
            else:
                # Starts writeback now without waiting (dirty pages stay cached for the re-read below), so
                # the disk works while we copy on, and the final syncfs has little left to flush.
                os.posix_fadvise(dst_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if chunks == 1 and 2 * total < len(buf):
                # Read in one chunk, still in ``buf``: the read-back lands beside it and is compared byte
                # for byte (memcmp), a tenth of the time of a second SHA-256 and a stricter check.
                same = (
                    _read_back(dst_fd, mv[total:], total) == total and buf[:total] == buf[total : 2 * total]
                )
            else:
                back, back_n = hash_fd(dst_fd, buf, 0)
                same = back == digest and back_n == total
            if not same:
                raise ApplyError(
                    f"verification failed for {part}: written bytes differ from {f.source}; "
                    "check the disk and memory of this machine, then rerun"
                )
            perms.apply_fd(dst_fd)
            os.close(dst_fd)
            dst_fd = -1
            os.rename(part, dst)
        except OSError as exc:
            raise DestError(exc, part) from exc
        done = True
        return StagedFile(f.dest, f.source, f.size, digest)
    finally:
        os.close(src_fd)
        if dst_fd >= 0:
            os.close(dst_fd)
        if not done:
            try:
                os.unlink(part)
            except OSError:
                pass


def link_one(f: PlannedFile, dst: str, perms: Perms, buf: bytearray, *, digest: bool = True) -> StagedFile:
    """stat the source; link it as ``dst`` (no ``.part``: a link is made whole or not at all); check it
    is the source's inode with the planned size and mtime; hash once (``digest``). Anything wrong: the
    link is removed again.

    ``digest=False`` skips the read and the hash (``NOT_HASHED``): no copy was made whose bytes a hash
    could prove. ``StagedFile.unchanged`` says whether the source was, just before the link, the very
    inode the plan's scan read with its ctime (``unchanged_since_plan``): then its header cannot differ
    from the one planned and ``recheck`` need not read it; otherwise it does.

    NOTE: a link left by a crash before the check is harmless: a rerun finds it under its final name and
    ``reuse`` checks it again (inode, size, mtime) before keeping it; nothing is published or imported
    before staging returns.
    NOTE: a write between the stat and the link goes unseen, as one after ``recheck``'s read would (the
    link is the source's inode until XNAT's importer reads it): what is proven is the file as it was
    when apply reached it.
    """
    try:
        src_st = os.stat(f.source)
    except OSError as exc:
        raise SourceError(exc, f.source) from exc
    check_stat(f, src_st, ctime=False)  # a crashed run's link moved its ctime
    unchanged = unchanged_since_plan(f, src_st)  # before our link moves the ctime
    try:
        os.link(f.source, dst)
    except OSError as exc:
        raise DestError(exc, dst) from exc
    done = False
    try:
        try:
            dst_st = os.lstat(dst)
        except OSError as exc:
            raise DestError(exc, dst) from exc
        if (dst_st.st_dev, dst_st.st_ino, dst_st.st_size) != (src_st.st_dev, src_st.st_ino, f.size):
            raise ApplyError(
                f"hard link {dst} is not the source's inode ({f.source}); remove the staging folder and rerun"
            )
        check_stat(f, dst_st, ctime=False)  # mtime and size as planned, from the link's own inode
        if digest:
            try:
                fd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise SourceError(exc, f.source) from exc
            try:
                sha, n = _read_hash(fd, f, buf, ctime=False)  # the link just moved its ctime
            finally:
                os.close(fd)
            if n != f.size:
                raise StalePlanError(
                    f"source {f.source} read {n} bytes, planned {f.size}; re-run xnatmigrate plan"
                )
        else:
            sha = NOT_HASHED
        _apply_path(perms, dst)
        done = True
        return StagedFile(f.dest, f.source, f.size, sha, unchanged)
    finally:
        if not done:
            try:
                os.unlink(dst)
            except OSError:
                pass


def unchanged_since_plan(f: PlannedFile, st: os.stat_result) -> bool:
    """Whether ``st`` is the inode the plan's scan read, not written to since: the same inode number,
    size, mtime and ctime. Every write, truncation and ``utime`` (``touch -r`` included) moves the ctime
    to the current time, so such an inode still holds the bytes the plan parsed. False for a file
    planned without them (hand-made sessions; ``--path-map``, where another mount numbers inodes
    otherwise).

    NOTE: the scan cache trusts the same four values (``scan.sources``); a write within the same coarse
    clock tick as the change before the scan would keep all four (as it keeps size and mtime).
    """
    if f.ino == -1 or f.ctime_ns == -1:
        return False
    return (st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns) == (f.ino, f.ctime_ns, f.size, f.mtime_ns)


# The de-identification of one file (anonymize.edit_bytes bound to the session's scripts and labels).
Editor = Callable[[PlannedFile, bytes], bytes]


def _read_source(f: PlannedFile) -> bytes:
    """The source's bytes, bound to the plan before and after the read (StalePlanError otherwise)."""
    fd, _ = _open_source(f)
    try:
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            after = os.fstat(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise SourceError(exc, f.source) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != f.size:
        raise StalePlanError(
            f"source {f.source} read {len(data)} bytes, planned {f.size}; re-run xnatmigrate plan"
        )
    check_stat(f, after)
    return data


def edit_one(
    f: PlannedFile, dst: str, perms: Perms, buf: bytearray, edit: Editor, fsync_each: bool
) -> StagedFile:
    """read the source → edit (the session's DicomEdit scripts) → write ``<dst>.part`` → re-read and
    compare → chmod/chown → rename to ``dst``. ``sha256``/``size`` are those of the edited bytes."""
    out = edit(f, _read_source(f))
    digest = hashlib.sha256(out).hexdigest()
    part = dst + PART_SUFFIX
    done = False
    try:
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DestError(exc, part) from exc
        try:
            view = memoryview(out)
            written = 0
            while written < len(out):
                written += os.write(fd, view[written:])
            if fsync_each:
                os.fsync(fd)
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            back, back_n = hash_fd(fd, buf, 0)
            if back != digest or back_n != len(out):
                raise ApplyError(
                    f"verification failed for {part}: written bytes differ from the anonymised {f.source}; "
                    "check the disk and memory of this machine, then rerun"
                )
            perms.apply_fd(fd)
        except OSError as exc:
            raise DestError(exc, part) from exc
        finally:
            os.close(fd)
        try:
            os.rename(part, dst)
        except OSError as exc:
            raise DestError(exc, part) from exc
        done = True
        return StagedFile(f.dest, f.source, len(out), digest)
    finally:
        if not done:
            try:
                os.unlink(part)
            except OSError:
                pass


def reuse_edited(f: PlannedFile, dst: str, perms: Perms, buf: bytearray, edit: Editor) -> StagedFile | None:
    """An edited file left by an earlier run, if it equals the source edited again (the scripts are
    deterministic); else delete it (None)."""
    out = edit(f, _read_source(f))
    digest = hashlib.sha256(out).hexdigest()
    try:
        have = _hash_path(dst, buf)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DestError(exc, dst) from exc
    if have == digest:
        _apply_path(perms, dst)
        return StagedFile(f.dest, f.source, len(out), digest)
    _discard(dst)
    return None
