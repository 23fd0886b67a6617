"""Staging a session: every planned file verified and durable below its staging folder, resumable.

Invariants:
- ``stage_session`` returns only after everything below ``staging`` is durable (``syncfs`` or per-file
  fsync, then one fsync per folder); ``publish`` is therefore never given data still in flight.
- ``*.part`` files are scratch: deleted on entry to ``stage_session``, and by the worker that fails.
- Staging holds exactly what the plan lists: anything else found there is removed.
- After a failed ``syncfs`` the files this run wrote are deleted, never trusted on a rerun.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ...errors import ApplyError
from ...model import PlannedFile, PrearchiveSession, Transfer
from .digest import BUFFER_SIZE
from .disk import (
    DestError,
    SourceError,
    bytes_needed,
    dest_error,
    disk_full,
    free_bytes,
    fsync_dir,
    libc,
    source_error,
)
from .paths import PART_SUFFIX, STAGING_DIRNAME, describe, require_staging_path, safe_dests, staging_ancestors
from .perms import Perms, dir_mode, resolve_owner
from .transfer import StagedFile, copy_one, link_one, reuse

#: Worker threads per session. bench/copy_compare.py on 2 vCPUs / virtio ext4, 2,000 files, 425 MB, cold
#: cache: the paired ratio to ``cp -r + sync`` was 1.40 / 1.26 / 1.14 for 2 / 4 / 8 jobs on a loaded
#: machine (0.89 / 0.97 / 0.96 on 265 MB when it was quieter). More threads than CPUs pay off because
#: most of a worker's time is waiting (cold reads, file creation, journal), and 8 was never worse.
DEFAULT_JOBS = 8

Progress = Callable[[int, int], None]


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
    require_staging_path(staging)
    planned = safe_dests(session.files)
    perms = Perms(file_mode, dir_mode(file_mode), resolve_owner(file_owner), file_owner)
    what = describe(session)
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
        raise dest_error(exc, exc.filename or str(staging), session, staging, planned.values()) from exc

    if transfer is Transfer.COPY:
        # Check early rather than fill XNAT's disk to the last byte (XNAT shares it) and fail halfway.
        need = bytes_needed(staging, (f for d, f in planned.items() if d not in existing))
        have = free_bytes(staging)
        if need > have:
            raise disk_full(staging, what, need - have)

    order = list(planned.values())
    results: dict[str, StagedFile] = {}
    written: list[str] = []  # list.append is atomic: workers share it

    def work(f: PlannedFile, wbuf: bytearray) -> StagedFile:
        dst = os.path.join(staging, f.dest)
        if f.dest in existing:
            reused = reuse(f, dst, transfer, perms, wbuf)
            if reused is not None:
                return reused
        if transfer is Transfer.COPY:
            written.append(dst)
            return copy_one(f, dst, perms, wbuf, fsync_each)
        return link_one(f, dst, perms, wbuf)

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
            fsync_dir(os.path.join(staging, d) if d else staging)
        for parent in staging_ancestors(staging):
            fsync_dir(parent)
    except SourceError as exc:
        raise source_error(exc.exc, exc.path) from exc.exc
    except DestError as exc:
        left = [f for f in order if f.dest not in results]
        raise dest_error(exc.exc, exc.path, session, staging, left) from exc.exc
    except OSError as exc:
        left = [f for f in order if f.dest not in results]
        raise dest_error(exc, exc.filename or str(staging), session, staging, left) from exc
    return [results[f.dest] for f in order]


def _syncfs_or_forget(staging: Path, written: list[str]) -> None:
    """``syncfs`` the staging filesystem; on a writeback error delete what this run wrote, then raise.

    NOTE: after a failed writeback the page cache may still hold the right bytes, so a rerun's re-hash
    could pass over data that never reached the disk: the files written now must go, not be trusted.
    """
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = getattr(libc(), "syncfs", None)
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
            raise DestError(OSError(err, os.strerror(err), str(staging)), str(staging))
    finally:
        os.close(fd)


def _with_ancestors(dirs: Iterable[str]) -> Iterable[str]:
    for d in dirs:
        p = PurePosixPath(d)
        yield d
        yield from (str(a) for a in p.parents if str(a) != ".")


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


def _remove(path: str) -> None:
    """Delete a file, symlink or tree; missing is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


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
