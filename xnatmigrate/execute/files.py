"""Stage a session's files outside XNAT's view, then publish them into the prearchive with one rename.

Layout (xnat-reference.md §2, §7):

    <root>/.xnatmigrate-staging/<timestamp>/<project or _unassigned>/<session>/SCANS/<scan>/DICOM/<name>
    <root>/<project>/<timestamp>/<session>/...      after ``publish`` (``<root>/<timestamp>/...`` Unassigned)

Invariants:
- Nothing is ever written below a name XNAT's trawler reads: the staging root's name contains ``.``
  (ignored by ``FileSystemSessionTrawler``), and a session appears in the visible tree only through one
  ``rename()`` of a complete, verified, durable folder on the same filesystem.
- A file gets its final name in staging only after it was verified: SHA-256 of the bytes read from the
  source equals that of the bytes read back from the written file (copy), or it is the source's inode
  (hardlink). A rerun still re-hashes every final-named file against its source before reusing it, so
  correctness never rests on a checksum record or on per-file fsyncs (see ``stage_session``).
- ``stage_session`` returns only after everything below ``staging`` is durable (``syncfs`` or per-file
  fsync, then one fsync per folder); ``publish`` is therefore never given data still in flight.
- ``*.part`` files are scratch: deleted on entry to ``stage_session``, and by the worker that fails.
- Staging holds exactly what the plan lists: anything else found there is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import hashlib
import math
import os
import pwd
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ApplyError, StalePlanError, XnatMigrateError
from ..model import Outcome, PlannedFile, PlannedSession, PrearchiveSession, Transfer

__all__ = [
    "DEFAULT_JOBS",
    "STAGING_DIRNAME",
    "DiskError",
    "StagedFile",
    "check_sources",
    "check_sources_of",
    "final_dir",
    "free_bytes",
    "publish",
    "same_filesystem",
    "sha256_file",
    "stage_session",
    "staging_dir",
]

#: Top-level folder in the prearchive root; its '.' makes XNAT's trawler ignore it (§2).
STAGING_DIRNAME = ".xnatmigrate-staging"
#: Folder standing in for the project of Unassigned sessions (timestamps are unique per plan, so no clash).
UNASSIGNED_DIRNAME = "_unassigned"
PART_SUFFIX = ".part"
#: Worker threads per session. bench/copy_compare.py on 2 vCPUs / virtio ext4, 2,000 files, 425 MB, cold
#: cache: the paired ratio to ``cp -r + sync`` was 1.40 / 1.26 / 1.14 for 2 / 4 / 8 jobs on a loaded
#: machine (0.89 / 0.97 / 0.96 on 265 MB when it was quieter). More threads than CPUs pay off because
#: most of a worker's time is waiting (cold reads, file creation, journal), and 8 was never worse.
DEFAULT_JOBS = 8
# 1 MiB: a typical DICOM file (100 KB–1 MB) is read in one call, and the chunk still stays mostly in
# L2 between read, hash and write; larger buffers measured no faster.
BUFFER_SIZE = 1 << 20

Progress = Callable[[int, int], None]


class DiskError(ApplyError):
    """The prearchive's filesystem is full, read-only or not writable: every later session would fail too.

    NOTE: ``fatal`` tells the apply loop to stop the run instead of failing session after session.
    """

    fatal = True


@dataclass(frozen=True)
class StagedFile:
    """A file verified in staging: ``sha256`` is of the bytes read from ``source`` (equal to those written)."""

    dest: str
    source: str
    size: int
    sha256: str


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def staging_dir(prearchive_root: str, session: PrearchiveSession) -> Path:
    """``<root>/.xnatmigrate-staging/<timestamp>/<project or _unassigned>/<session>``, unique per session."""
    return (
        Path(prearchive_root)
        / STAGING_DIRNAME
        / session.timestamp
        / (session.project or UNASSIGNED_DIRNAME)
        / session.session
    )


def final_dir(prearchive_root: str, session: PrearchiveSession) -> Path:
    """``<root>/<project>/<timestamp>/<session>``, or ``<root>/<timestamp>/<session>`` when Unassigned."""
    root = Path(prearchive_root)
    if session.project:
        return root / session.project / session.timestamp / session.session
    return root / session.timestamp / session.session


def _require_staging_path(path: Path) -> None:
    # Everything here deletes what the plan does not list; never let that loose on XNAT's visible tree.
    if STAGING_DIRNAME not in path.parts[:-1]:
        raise ApplyError(
            f"refusing to stage into {path}: it is not below a {STAGING_DIRNAME} folder; "
            "use files.staging_dir() to name the staging folder"
        )


def _safe_dests(files: Sequence[PlannedFile]) -> dict[str, PlannedFile]:
    """Planned files by ``dest``; refuses absolute, escaping, scratch-named or duplicate destinations."""
    out: dict[str, PlannedFile] = {}
    for f in files:
        p = PurePosixPath(f.dest)
        if (
            p.is_absolute()
            or not p.parts
            or any(part in ("", ".", "..") for part in p.parts)
            or f.dest.endswith(PART_SUFFIX)
            or str(p) != f.dest
        ):
            raise ApplyError(f"the plan lists an unsafe destination {f.dest!r}; re-run xnatmigrate plan")
        if f.dest in out:
            raise ApplyError(f"the plan lists destination {f.dest!r} twice; re-run xnatmigrate plan")
        out[f.dest] = f
    return out


def _describe(session: PrearchiveSession) -> str:
    return f"{session.project_label}/{session.timestamp}/{session.session}"


# --------------------------------------------------------------------------------------------
# Small filesystem helpers
# --------------------------------------------------------------------------------------------


def _existing(path: str | os.PathLike[str]) -> Path:
    """The path itself or its nearest existing ancestor (statvfs/stat need something that exists)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path`` (or its ancestor)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def same_filesystem(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when ``a`` and ``b`` (or their nearest existing ancestors) are on one device."""
    return os.stat(_existing(a)).st_dev == os.stat(_existing(b)).st_dev


def _mount_point(path: str | os.PathLike[str]) -> str:
    p = _existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _hash_fd(fd: int, buf: bytearray, offset: int | None = None) -> tuple[str, int]:
    """SHA-256 and length of everything readable from ``fd`` (from ``offset`` with pread, else read)."""
    mv = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    while True:
        n = os.readv(fd, [mv]) if offset is None else os.preadv(fd, [mv], offset + total)
        if not n:
            return h.hexdigest(), total
        h.update(mv[:n])
        total += n


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's content."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _hash_fd(fd, bytearray(BUFFER_SIZE))[0]
    finally:
        os.close(fd)


def _fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Delete a file, symlink or tree; missing is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def check_sources(session: PlannedSession) -> None:
    """Every source is still the file planned; else StalePlanError naming the first culprit.

    NOTE: with hard links the ctime is not compared: linking (by this run or a crashed one) changes
    the source's own ctime. Its inode, size and mtime still are, and its header (apply re-reads it).
    """
    hardlinked = isinstance(session, PrearchiveSession) and session.transfer is Transfer.HARDLINK
    check_sources_of(session.files, ctime=not hardlinked)


def check_sources_of(files: Iterable[PlannedFile], *, ctime: bool = True) -> None:
    """``check_sources`` for any list of planned files (C-STORE resumes send a subset)."""
    bad: list[str] = []
    for f in files:
        try:
            st = os.stat(f.source)
        except FileNotFoundError:
            bad.append(f"{f.source} has vanished")
            continue
        except PermissionError as exc:
            raise ApplyError(
                f"cannot stat source {f.source} ({exc.strerror}) as user {_user()}: "
                "grant read access to the source folders and rerun"
            ) from exc
        why = _stale(f, st, ctime)
        if why:
            bad.append(why)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StalePlanError(f"source {bad[0]} since planning{more}; re-run xnatmigrate plan")


def _changed(f: PlannedFile, size: int, mtime_ns: int) -> str:
    if size != f.size:
        return f"{f.source} changed size ({f.size} → {size} bytes)"
    return f"{f.source} was modified (mtime {f.mtime_ns} → {mtime_ns} ns)"


def _stale(f: PlannedFile, st: os.stat_result, ctime: bool) -> str | None:
    """Why ``st`` is not the file planned as ``f`` (size, mtime, inode, and ctime unless hard-linked)."""
    if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
        return _changed(f, st.st_size, st.st_mtime_ns)
    if f.ino != -1 and st.st_ino != f.ino:
        return f"{f.source} was replaced by another file (inode {f.ino} → {st.st_ino})"
    if ctime and f.ctime_ns != -1 and st.st_ctime_ns != f.ctime_ns:
        return f"{f.source} changed since the plan (its ctime moved: rewritten in place, or its metadata changed)"
    return None


def _check_stat(f: PlannedFile, st: os.stat_result, ctime: bool = True) -> None:
    why = _stale(f, st, ctime)
    if why:
        raise StalePlanError(f"source {why} since planning; re-run xnatmigrate plan")


# --------------------------------------------------------------------------------------------
# Ownership and modes
# --------------------------------------------------------------------------------------------


def _resolve_owner(owner: str | None) -> tuple[int, int] | None:
    """``"user[:group]"`` (names or numbers) → (uid, gid); gid -1 leaves the group alone, like chown."""
    if not owner:
        return None
    user, _, group = owner.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ApplyError(
            f"file_owner {owner!r}: no user {user!r} on this machine; fix xnat.file_owner in the manifest"
        ) from None
    gid = -1
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ApplyError(
                f"file_owner {owner!r}: no group {group!r} on this machine; fix xnat.file_owner in the manifest"
            ) from None
    return uid, gid


def _dir_mode(file_mode: int | None) -> int | None:
    # Readable → searchable, and the owner can always write: XNAT moves files out of these folders.
    if file_mode is None:
        return None
    return file_mode | ((file_mode & 0o444) >> 2) | 0o300


@dataclass(frozen=True)
class _Perms:
    file_mode: int | None
    dir_mode: int | None
    owner: tuple[int, int] | None
    owner_text: str | None

    def apply_fd(self, fd: int, st: os.stat_result | None = None) -> None:
        if self.file_mode is not None and (st is None or stat.S_IMODE(st.st_mode) != self.file_mode):
            os.fchmod(fd, self.file_mode)
        if self.owner is not None and (st is None or not _owned(st, self.owner)):
            self._chown(lambda uid, gid: os.fchown(fd, uid, gid))

    def apply_path(self, path: str, *, is_dir: bool) -> None:
        """chmod/chown a path (no-op when already right: hard links share the source's inode)."""
        st = os.lstat(path)
        mode = self.dir_mode if is_dir else self.file_mode
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        if self.owner is not None and not _owned(st, self.owner):
            self._chown(lambda uid, gid: os.chown(path, uid, gid))

    def _chown(self, do: Callable[[int, int], None]) -> None:
        assert self.owner is not None
        try:
            do(*self.owner)
        except PermissionError as exc:
            raise ApplyError(
                f"cannot give files to {self.owner_text}: user {_user()} may not chown (needs root or "
                "CAP_CHOWN); run apply as root, or drop xnat.file_owner and grant access otherwise"
            ) from exc


def _owned(st: os.stat_result, owner: tuple[int, int]) -> bool:
    uid, gid = owner
    return st.st_uid == uid and (gid == -1 or st.st_gid == gid)


# --------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------


class _SourceError(Exception):
    """A source-side OSError, carried to the main thread to be worded there."""

    def __init__(self, exc: OSError, path: str) -> None:
        super().__init__(str(exc))
        self.exc, self.path = exc, path


class _DestError(Exception):
    """A staging-side OSError, carried to the main thread to be worded there (free space is read then)."""

    def __init__(self, exc: OSError, path: str) -> None:
        super().__init__(str(exc))
        self.exc, self.path = exc, path


def stage_session(
    session: PrearchiveSession,
    staging: Path,
    *,
    transfer: Transfer = Transfer.COPY,
    jobs: int = DEFAULT_JOBS,
    file_mode: int | None = None,
    file_owner: str | None = None,
    progress: Progress | None = None,
    fsync_each: bool = False,
) -> list[StagedFile]:
    """Put every planned file of ``session`` into ``staging``, verified and durable; resumable.

    ``transfer`` is ``copy`` (read → hash → write → re-read and compare → rename) or ``hardlink`` (link,
    check it is the source's inode, hash once). ``progress(done, total)`` counts files, from this thread.

    Durability: by default each written file gets its writeback started at once (``fadvise``), and one
    ``syncfs`` at the end makes everything durable before this returns. ``fsync_each`` instead fsyncs
    every file before its rename, so even after a power cut a final name means complete content; the
    default does not need that, because a rerun re-hashes every final-named file before reusing it, and
    nothing is published before the ``syncfs``. On ext4 the per-file fsyncs (a journal commit each,
    batched only across concurrent workers) measured 5–30% slower (bench/copy_compare.py).

    NOTE: ``syncfs`` also flushes other writers' dirty data on that filesystem (XNAT's, say); with each
    file's writeback already started there is little of ours left for it to wait on.

    Returns one StagedFile per planned file, in plan order. On return every file and folder below
    ``staging`` is durable. Raises StalePlanError when a source vanished or changed, DiskError when the
    filesystem is full, read-only or not writable, ApplyError otherwise; finished files stay for a rerun.

    NOTE: with ``hardlink``, ``file_mode``/``file_owner`` change the source file too (one inode).
    NOTE: the read-back compares what ``write()`` put in the page cache; corruption below it (media,
    controller) would need an O_DIRECT re-read, which this does not pay for.
    """
    try:
        transfer = Transfer(transfer)  # a bare string from a caller outside the plan: checked here
    except ValueError:
        raise ApplyError(f"unknown transfer {transfer!r}; use copy or hardlink") from None
    staging = Path(staging)
    _require_staging_path(staging)
    planned = _safe_dests(session.files)
    perms = _Perms(file_mode, _dir_mode(file_mode), _resolve_owner(file_owner), file_owner)
    what = _describe(session)
    buf = bytearray(BUFFER_SIZE)

    parents = {str(PurePosixPath(d).parent) for d in planned} - {"."}
    dirs = sorted(set(_with_ancestors(parents)), key=lambda d: (d.count("/"), d))  # shallow first
    try:
        _prepare_root(staging)
        existing = _clean_staging(staging, planned, set(dirs))
        for d in ["", *dirs]:
            path = os.path.join(staging, d) if d else str(staging)
            os.makedirs(path, exist_ok=True)
            perms.apply_path(path, is_dir=True)
    except OSError as exc:
        raise _dest_error(exc, exc.filename or str(staging), session, staging, planned.values()) from exc

    if transfer is Transfer.COPY:
        # Check early rather than fill XNAT's disk to the last byte (XNAT shares it) and fail halfway.
        need = _bytes_needed(staging, (f for d, f in planned.items() if d not in existing))
        have = free_bytes(staging)
        if need > have:
            raise _disk_full(staging, what, need - have)

    order = list(planned.values())
    results: dict[str, StagedFile] = {}
    written: list[str] = []  # list.append is atomic: workers share it

    def work(f: PlannedFile, wbuf: bytearray) -> StagedFile:
        dst = os.path.join(staging, f.dest)
        if f.dest in existing:
            reused = _reuse(f, dst, transfer, perms, wbuf)
            if reused is not None:
                return reused
        if transfer is Transfer.COPY:
            written.append(dst)
            return _copy_one(f, dst, perms, wbuf, fsync_each)
        return _link_one(f, dst, perms, wbuf)

    try:
        try:
            for staged in _parallel(order, work, max(1, jobs), buf):
                results[staged.dest] = staged
                if progress:
                    progress(len(results), len(order))
        finally:
            # Also after a failure: the files finished before it stay for the rerun, so make them durable.
            if written and not fsync_each:
                _syncfs_or_forget(staging, written)
        # Folder entries (renames, new folders) become durable here, once per folder.
        for d in [*reversed(dirs), ""]:
            _fsync_dir(os.path.join(staging, d) if d else staging)
        for parent in _staging_ancestors(staging):
            _fsync_dir(parent)
    except _SourceError as exc:
        raise _source_error(exc.exc, exc.path) from exc.exc
    except _DestError as exc:
        left = [f for f in order if f.dest not in results]
        raise _dest_error(exc.exc, exc.path, session, staging, left) from exc.exc
    except OSError as exc:
        left = [f for f in order if f.dest not in results]
        raise _dest_error(exc, exc.filename or str(staging), session, staging, left) from exc
    return [results[f.dest] for f in order]


def _syncfs_or_forget(staging: Path, written: list[str]) -> None:
    """``syncfs`` the staging filesystem; on a writeback error delete what this run wrote, then raise.

    NOTE: after a failed writeback the page cache may still hold the right bytes, so a rerun's re-hash
    could pass over data that never reached the disk: the files written now must go, not be trusted.
    """
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = getattr(_libc(), "syncfs", None)
        if fn is None:  # pragma: no cover - glibc has had syncfs since 2.14
            os.sync()
            return
        if fn(fd) != 0:
            err = ctypes.get_errno()
            for path in written:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise _DestError(OSError(err, os.strerror(err), str(staging)), str(staging))
    finally:
        os.close(fd)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _with_ancestors(dirs: Iterable[str]) -> Iterable[str]:
    for d in dirs:
        p = PurePosixPath(d)
        yield d
        yield from (str(a) for a in p.parents if str(a) != ".")


def _staging_ancestors(staging: Path) -> list[Path]:
    """Parents of ``staging`` up to and including the prearchive root (those ``makedirs`` may create)."""
    out = []
    for parent in staging.parents:
        out.append(parent)
        if parent.name == STAGING_DIRNAME:
            out.append(parent.parent)
            break
    return out


def _prepare_root(staging: Path) -> None:
    # The prearchive root is XNAT's; creating it would hide a wrong ``xnat.prearchive`` setting.
    for parent in staging.parents:
        if parent.name == STAGING_DIRNAME:
            if not parent.parent.is_dir():
                raise ApplyError(
                    f"prearchive root {parent.parent} does not exist; fix xnat.prearchive in the manifest"
                )
            break


def _clean_staging(staging: Path, planned: Mapping[str, PlannedFile], planned_dirs: set[str]) -> set[str]:
    """Remove ``*.part`` and anything the plan does not list; return the planned dests already present."""
    present: set[str] = set()
    if not staging.is_dir():
        if staging.exists() or staging.is_symlink():
            os.unlink(staging)
        return present
    for dirpath, dirnames, filenames in os.walk(staging):
        rel_dir = os.path.relpath(dirpath, staging)
        for name in list(dirnames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            if rel not in planned_dirs or os.path.islink(full):
                _remove(full)
                dirnames.remove(name)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            if rel in planned and not name.endswith(PART_SUFFIX) and stat.S_ISREG(os.lstat(full).st_mode):
                present.add(rel)
            else:
                _remove(full)
    return present


def _bytes_needed(staging: Path, files: Iterable[PlannedFile]) -> int:
    block = os.statvfs(_existing(staging)).f_frsize or 4096
    return sum(math.ceil(f.size / block) * block + block for f in files)


def _parallel(
    items: Sequence[PlannedFile],
    fn: Callable[[PlannedFile, bytearray], StagedFile],
    jobs: int,
    buf: bytearray,
) -> Iterable[StagedFile]:
    """Yield ``fn(item)`` results as workers finish them; on the first error stop handing out work, let
    the files in flight finish (or clean up), then raise that error in the caller's thread."""
    if jobs == 1 or len(items) <= 1:
        for item in items:
            yield fn(item, buf)
        return
    lock = threading.Lock()
    stop = threading.Event()
    it = iter(items)
    out: queue.SimpleQueue[tuple[StagedFile | None, BaseException | None]] = queue.SimpleQueue()

    def worker() -> None:
        wbuf = bytearray(BUFFER_SIZE)
        try:
            while not stop.is_set():
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                try:
                    out.put((fn(item, wbuf), None))
                except BaseException as exc:
                    stop.set()
                    out.put((None, exc))
                    return
        finally:
            out.put((None, None))  # this worker is gone

    threads = [
        threading.Thread(target=worker, name=f"stage-{i}", daemon=True) for i in range(min(jobs, len(items)))
    ]
    for t in threads:
        t.start()
    first: BaseException | None = None
    running = len(threads)
    try:
        while running:
            result, exc = out.get()
            if result is not None:
                if first is None:
                    yield result
            elif exc is not None:
                first = first or exc
            else:
                running -= 1
    finally:
        stop.set()  # also on KeyboardInterrupt / generator close: workers finish their file and exit
        for t in threads:
            t.join()
    if first is not None:
        raise first


def _reuse(f: PlannedFile, dst: str, transfer: Transfer, perms: _Perms, buf: bytearray) -> StagedFile | None:
    """A final-named file left by an earlier run, if it still matches its source; else delete it (None)."""
    try:
        src_fd = os.open(f.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _SourceError(exc, f.source) from exc
    try:
        try:
            src_st = os.fstat(src_fd)
        except OSError as exc:
            raise _SourceError(exc, f.source) from exc
        _check_stat(f, src_st, ctime=transfer is Transfer.COPY)  # our own link moved a hard link's ctime
        try:
            dst_st = os.lstat(dst)
        except OSError as exc:
            raise _DestError(exc, dst) from exc
        same_inode = (dst_st.st_dev, dst_st.st_ino) == (src_st.st_dev, src_st.st_ino)
        if transfer is Transfer.HARDLINK and same_inode:
            digest, n = _read_hash(src_fd, f, buf, ctime=False)
            if n == f.size:
                _apply_path(perms, dst)
                return StagedFile(f.dest, f.source, f.size, digest)
        elif transfer is Transfer.COPY and not same_inode and dst_st.st_size == f.size:
            # The checksum record may be lost with the crash: compare content, not names or sizes.
            try:
                have = _hash_path(dst, buf)
            except OSError as exc:
                raise _DestError(exc, dst) from exc
            digest, n = _read_hash(src_fd, f, buf)
            if have == digest and n == f.size:
                _apply_path(perms, dst)
                return StagedFile(f.dest, f.source, f.size, digest)
    finally:
        os.close(src_fd)
    try:
        os.unlink(dst)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _DestError(exc, dst) from exc
    return None


def _hash_path(path: str, buf: bytearray) -> str:
    """SHA-256 of a staged file (its own function so tests can see that reuse re-hashes)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _hash_fd(fd, buf)[0]
    finally:
        os.close(fd)


def _read_hash(src_fd: int, f: PlannedFile, buf: bytearray, ctime: bool = True) -> tuple[str, int]:
    try:
        digest, n = _hash_fd(src_fd, buf, 0)
        _check_stat(f, os.fstat(src_fd), ctime)
    except OSError as exc:
        raise _SourceError(exc, f.source) from exc
    return digest, n


def _apply_path(perms: _Perms, path: str) -> None:
    try:
        perms.apply_path(path, is_dir=False)
    except OSError as exc:
        raise _DestError(exc, path) from exc


def _copy_one(f: PlannedFile, dst: str, perms: _Perms, buf: bytearray, fsync_each: bool) -> StagedFile:
    """read → hash → write ``<dst>.part`` → start writeback (or fsync) → re-read and compare → chmod/chown
    → rename to ``dst``."""
    part = dst + PART_SUFFIX
    mv = memoryview(buf)
    try:
        src_fd = os.open(f.source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _SourceError(exc, f.source) from exc
    dst_fd = -1
    done = False
    try:
        try:
            _check_stat(f, os.fstat(src_fd))
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            raise _SourceError(exc, f.source) from exc
        try:
            # O_RDWR: the verification re-reads through the same descriptor.
            dst_fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _DestError(exc, part) from exc
        h = hashlib.sha256()
        total = 0
        while True:
            try:
                n = os.readv(src_fd, [mv])
            except OSError as exc:
                raise _SourceError(exc, f.source) from exc
            if not n:
                break
            h.update(mv[:n])
            total += n
            written = 0
            try:
                while written < n:
                    written += os.write(dst_fd, mv[written:n])
            except OSError as exc:
                raise _DestError(exc, part) from exc
        try:
            after = os.fstat(src_fd)
            # We are done with the source: don't let a TB-sized migration evict XNAT's working set.
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise _SourceError(exc, f.source) from exc
        if total != f.size:
            raise StalePlanError(
                f"source {f.source} read {total} bytes, planned {f.size}, while copying; re-run xnatmigrate plan"
            )
        _check_stat(f, after)
        digest = h.hexdigest()
        try:
            if fsync_each:
                os.fsync(dst_fd)
            else:
                # Starts writeback now without waiting (dirty pages stay cached for the re-read below), so
                # the disk works while we copy on, and the final syncfs has little left to flush.
                os.posix_fadvise(dst_fd, 0, 0, os.POSIX_FADV_DONTNEED)
            back, back_n = _hash_fd(dst_fd, buf, 0)
            if back != digest or back_n != total:
                raise ApplyError(
                    f"verification failed for {part}: written bytes differ from {f.source}; "
                    "check the disk and memory of this machine, then rerun"
                )
            perms.apply_fd(dst_fd)
            os.close(dst_fd)
            dst_fd = -1
            os.rename(part, dst)
        except OSError as exc:
            raise _DestError(exc, part) from exc
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


def _link_one(f: PlannedFile, dst: str, perms: _Perms, buf: bytearray) -> StagedFile:
    """link the source as ``<dst>.part``; check it is the source's inode; hash once; rename to ``dst``."""
    part = dst + PART_SUFFIX
    done = False
    try:
        try:
            src_st = os.stat(f.source)
        except OSError as exc:
            raise _SourceError(exc, f.source) from exc
        _check_stat(f, src_st, ctime=False)  # a crashed run's link moved its ctime
        try:
            os.link(f.source, part)
            part_st = os.lstat(part)
        except OSError as exc:
            raise _DestError(exc, part) from exc
        if (part_st.st_dev, part_st.st_ino, part_st.st_size) != (src_st.st_dev, src_st.st_ino, f.size):
            raise ApplyError(
                f"hard link {part} is not the source's inode ({f.source}); remove the staging folder and rerun"
            )
        try:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _SourceError(exc, f.source) from exc
        try:
            digest, n = _read_hash(fd, f, buf, ctime=False)  # the link just moved its ctime
        finally:
            os.close(fd)
        if n != f.size:
            raise StalePlanError(
                f"source {f.source} read {n} bytes, planned {f.size}; re-run xnatmigrate plan"
            )
        _apply_path(perms, part)
        try:
            os.rename(part, dst)
        except OSError as exc:
            raise _DestError(exc, part) from exc
        done = True
        return StagedFile(f.dest, f.source, f.size, digest)
    finally:
        if not done:
            try:
                os.unlink(part)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Error wording (one line: what happened, what to do)
# --------------------------------------------------------------------------------------------


def _disk_full(staging: Path, what: str, missing: int) -> DiskError:
    mb = max(1, math.ceil(missing / 1_000_000))
    return DiskError(
        f"disk full on {_mount_point(staging)} while staging {what}: free at least {mb} MB and rerun; "
        "staged files are kept for resume"
    )


def _dest_error(
    exc: OSError, path: str, session: PrearchiveSession, staging: Path, left: Iterable[PlannedFile]
) -> XnatMigrateError:
    what = _describe(session)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        missing = _bytes_needed(staging, left) - free_bytes(staging)
        return _disk_full(staging, what, missing)
    if exc.errno == errno.EROFS:
        return DiskError(
            f"{_mount_point(staging)} is read-only while staging {what}: remount it read-write and rerun"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DiskError(
            f"{path} is not writable by user {_user()} ({exc.strerror}) while staging {what}: "
            "give that user write access to the prearchive folder (or run apply as XNAT's user) and rerun"
        )
    if exc.errno == errno.EXDEV:
        return ApplyError(
            f"cannot hard-link {what}: sources and prearchive are on different filesystems; "
            "use transfer: copy for this source and re-run xnatmigrate plan"
        )
    return ApplyError(
        f"{exc.strerror or exc} on {path} while staging {what}: fix the cause and rerun; "
        "staged files are kept for resume"
    )


def _source_error(exc: OSError, path: str) -> XnatMigrateError:
    if isinstance(exc, FileNotFoundError):
        return StalePlanError(f"source {path} has vanished since planning; re-run xnatmigrate plan")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ApplyError(
            f"cannot read source {path}: permission denied for user {_user()}; "
            "grant read access (or exclude it and re-run xnatmigrate plan)"
        )
    return ApplyError(f"{exc.strerror or exc} reading source {path}: check the source disk and rerun")


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


def publish(staging: Path, final: Path) -> Outcome:
    """Move a staged session into XNAT's view with one ``rename()``: done, or noop if it is there.

    Folders created above ``final`` get the owner and mode of the staged session folder (so XNAT's user
    can write its session XML next to it and remove the timestamp folder after archiving).

    NOTE: never merges: when both folders exist it raises, and the rename itself refuses to replace an
    existing ``final`` (``renameat2(RENAME_NOREPLACE)`` where the filesystem supports it).
    """
    staging, final = Path(staging), Path(final)
    s_there, f_there = staging.is_dir(), os.path.lexists(final)
    if f_there and not s_there:
        return Outcome.NOOP
    if f_there and s_there:
        raise ApplyError(
            f"both staging {staging} and published folder {final} exist; inspect and remove one, then rerun"
        )
    if not s_there:
        raise ApplyError(f"nothing staged at {staging} for {final}; rerun apply to stage it again")
    try:
        like = os.stat(staging)
        created = _makedirs_like(final.parent, like)
        _rename_noreplace(staging, final)
        _fsync_dir(final.parent)
        _fsync_dir(staging.parent)
        for d in created:
            _fsync_dir(d.parent)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ApplyError(
                f"cannot publish {staging} to {final}: not on one filesystem; "
                "point xnat.prearchive at the real mount and rerun"
            ) from exc
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ApplyError(
                f"{final} appeared while publishing {staging}; inspect both and remove one, then rerun"
            ) from exc
        if exc.errno == errno.EROFS:
            raise DiskError(f"{_mount_point(final)} is read-only: remount it read-write and rerun") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise DiskError(
                f"{exc.filename or final.parent} is not writable by user {_user()}: give that user write "
                "access to the prearchive folder (or run apply as XNAT's user) and rerun"
            ) from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(final, str(final), 1 << 20) from exc
        raise ApplyError(
            f"{exc.strerror or exc} while publishing {staging} to {final}: fix it and rerun"
        ) from exc
    _prune_staging_parents(staging)
    return Outcome.DONE


def discard_staged(staging: Path) -> None:
    """Remove a staged session that must not be published (it is below the staging root, never
    visible to XNAT)."""
    staging = Path(staging)
    _require_staging_path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    _prune_staging_parents(staging)


def unpublish(final: Path, staging: Path) -> None:
    """Take a published session back out of XNAT's view (one ``rename()`` back into staging).

    For a session whose row could not be written: a folder without a row is invisible to XNAT's UI
    but would be picked up by a restart's ``populateTable`` (xnat-reference.md §1), so it must go.
    """
    staging, final = Path(staging), Path(final)
    staging.parent.mkdir(parents=True, exist_ok=True)
    _rename_noreplace(final, staging)
    _fsync_dir(staging.parent)
    _fsync_dir(final.parent)
    with contextlib.suppress(OSError):
        final.parent.rmdir()  # the timestamp folder, if the session was its only content


def _makedirs_like(path: Path, like: os.stat_result) -> list[Path]:
    """``makedirs`` giving each new folder the owner and mode of ``like``; returns those created."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        created.append(d)
        os.chmod(d, stat.S_IMODE(like.st_mode))
        st = os.lstat(d)
        if (st.st_uid, st.st_gid) != (like.st_uid, like.st_gid):
            os.chown(d, like.st_uid, like.st_gid)
    return created


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this filesystem lacks the flag (e.g. NFS)
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _prune_staging_parents(staging: Path) -> None:
    # Empty <timestamp>/<project> folders are left by publish; the staging root itself stays.
    for parent in staging.parents:
        if parent.name == STAGING_DIRNAME:
            return
        try:
            os.rmdir(parent)
        except OSError:
            return


# --------------------------------------------------------------------------------------------
# Checking a published session
# --------------------------------------------------------------------------------------------


def recorded_differences(
    base: Path, recorded: Mapping[str, tuple[str, int, str]], *, quick: bool = False
) -> Iterator[tuple[Path, str, str]]:
    """Each recorded file (dest → (source, size, sha256)) that differs on disk under ``base``.

    Yields (path, kind, message) with kind ``missing``, ``unreadable``, ``size`` or ``sha256``;
    ``quick`` compares sizes only. Used by verify (reports all) and revert (refuses on change).
    """
    for dest, (_source, size, sha) in sorted(recorded.items()):
        path = Path(base) / dest
        try:
            st = path.stat()
        except FileNotFoundError:
            yield path, "missing", f"missing: {path}"
            continue
        except OSError as exc:
            yield path, "unreadable", f"unreadable ({exc.strerror}): {path}"
            continue
        if st.st_size != size:
            yield path, "size", f"size {st.st_size} != recorded {size}: {path}"
        elif not quick and sha256_file(path) != sha:
            yield path, "sha256", f"SHA-256 differs from the one recorded at apply: {path}"
