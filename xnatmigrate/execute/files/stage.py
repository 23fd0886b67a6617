"""Staging a session: every planned file verified and durable below its staging folder, resumable.

Invariants:
- ``stage_session`` returns only after everything below ``staging`` is durable (one ``syncfs``, which
  covers the folders too, or per-file fsync then one fsync per folder); ``publish`` is therefore never
  given data still in flight.
- ``*.part`` files are scratch: deleted on entry to ``stage_session``, and by the worker that fails.
- Staging holds exactly what the plan lists: anything else found there is removed.
- After a failed ``syncfs`` the files this run wrote are deleted, never trusted on a rerun.
"""

from __future__ import annotations

import os
import queue
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from ...errors import AnonymizationError, ApplyError, StalePlanError, XnatMigrateError
from ...model import InboxSession, PlannedFile, PrearchiveSession, Transfer
from .digest import BUFFER_SIZE
from .disk import (
    DestError,
    SourceError,
    bytes_needed,
    dest_error,
    disk_full,
    free_bytes,
    fsync_dir,
    source_error,
    syncfs,
)
from .paths import (
    PART_SUFFIX,
    STAGING_DIRNAME,
    describe,
    prune_staging_parents,
    require_staging_path,
    safe_dests,
    staging_ancestors,
)
from .perms import Perms, dir_mode, resolve_owner
from .sources import check_sources
from .transfer import Editor, StagedFile, copy_one, edit_one, link_one, reuse, reuse_edited

#: Worker threads per session. bench/copy_compare.py on 2 vCPUs / virtio ext4, 2,000 files, 425 MB, cold
#: cache: the paired ratio to ``cp -r + sync`` was 1.40 / 1.26 / 1.14 for 2 / 4 / 8 jobs on a loaded
#: machine (0.89 / 0.97 / 0.96 on 265 MB when it was quieter). More threads than CPUs pay off because
#: most of a worker's time is waiting (cold reads, file creation, journal), and 8 was never worse.
DEFAULT_JOBS = 8

Progress = Callable[[int, int], None]
_Job = tuple["_Staging", PlannedFile]
_Out = tuple["_Staging", StagedFile | None]


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
    (result,) = stage_batch(
        [(session, Path(staging), transfer)],
        jobs=jobs,
        file_mode=file_mode,
        file_owner=file_owner,
        progress=progress,
        fsync_each=fsync_each,
    )
    if isinstance(result, XnatMigrateError):
        raise result
    return result


class _Staging:
    """One session of a batch: where it goes, what it holds already, how it fails."""

    def __init__(
        self, session: PrearchiveSession | InboxSession, staging: Path, transfer: Transfer, perms: Perms
    ) -> None:
        require_staging_path(staging)
        self.session, self.staging, self.transfer, self.perms = session, staging, transfer, perms
        # Hard links into XNAT's inbox are read by XNAT's importer, not by us: the prearchive route's
        # hashes are what its verify compares, the inbox route's verify counts what XNAT holds.
        self.digest = not (isinstance(session, InboxSession) and transfer is Transfer.HARDLINK)
        self.planned = safe_dests(session.files)
        parents = {d.rpartition("/")[0] for d in self.planned} - {""}  # safe_dests: no leading "/"
        self.dirs = sorted(set(_with_ancestors(parents)), key=lambda d: (d.count("/"), d))  # shallow first
        self.existing: set[str] = set()
        self.results: dict[str, StagedFile] = {}
        self.error: XnatMigrateError | None = None
        self.prepared = False  # its folders are made (prepare)
        self.is_ready = False  # ready() ran
        self.lock = threading.Lock()

    def prepare(self) -> None:
        """Clean leftovers and make the folders (mkdir is cheap; the files come in the shared pool)."""
        try:
            _prepare_root(self.staging)
            self.existing = _clean_staging(self.staging, self.planned, set(self.dirs))
            for d in ["", *self.dirs]:
                path = os.path.join(self.staging, d) if d else str(self.staging)
                os.makedirs(path, exist_ok=True)
                self.perms.apply_path(path, is_dir=True)
            self.prepared = True
        except OSError as exc:
            path = exc.filename or str(self.staging)
            raise dest_error(exc, path, self.session, self.staging, self.planned.values()) from exc

    def ready(self) -> None:
        """Once, by whichever thread comes first: every source still the file planned (else this
        session's error, before anything of it is written), then ``prepare``."""
        if self.is_ready:
            return
        with self.lock:
            if self.is_ready:
                return
            try:
                check_sources(self.session)
            except XnatMigrateError as exc:
                self.error = exc
            else:
                self.prepare()
            finally:
                self.is_ready = True

    def need(self) -> int:
        if self.transfer is not Transfer.COPY:
            return 0
        return bytes_needed(self.staging, (f for d, f in self.planned.items() if d not in self.existing))

    def left(self) -> list[PlannedFile]:
        return [f for d, f in self.planned.items() if d not in self.results]

    def folders(self) -> list[str]:
        """Every folder whose entries this session changed, deepest first, then the staging ancestors."""
        own = [os.path.join(self.staging, d) for d in reversed(self.dirs)]
        return [*own, str(self.staging), *(str(p) for p in staging_ancestors(self.staging))]


def stage_batch(
    batch: Sequence[tuple[PrearchiveSession | InboxSession, Path, Transfer]],
    *,
    jobs: int = DEFAULT_JOBS,
    file_mode: int | None = None,
    file_owner: str | None = None,
    progress: Progress | None = None,
    fsync_each: bool = False,
    editors: Mapping[str, Editor] | None = None,
    cancel: threading.Event | None = None,
    prune: Sequence[Path] = (),
) -> list[list[StagedFile] | XnatMigrateError]:
    """Stage several sessions as one group: one worker pool for all their files, one durability barrier.

    Per session, in batch order: its StagedFiles in plan order, or the error that session met (a source
    vanished or changed, checked for the whole session before any of its files is written; an
    unreadable source). The barrier is one ``syncfs`` of the staging filesystem
    (its journal commit covers the new folders and renames; the folders are fsynced one by one only
    when nothing was written, or with ``fsync_each``): on return every
    session returned as staged is durable, as ``stage_session`` promises for one. Small sessions (X-ray
    studies of 1–4 images) so share one barrier and keep every worker busy instead of each paying its own.

    ``editors`` maps a session's action_id to its de-identification: its files are read, edited and
    written (``transfer.edit_one``) instead of copied; an edit that fails fails that session only.

    ``cancel`` (set by another thread: the batch runs in the background while the caller finishes the
    group before it) stops handing out files; those in flight finish, what was written is made durable,
    and ApplyError is raised: the staging folders are left for the rerun to re-check, as after a crash.

    ``prune``: staging folders of sessions published earlier, whose emptied parents are removed
    (``prune_staging_parents``) on a thread of their own while the batch is staged.

    Raises (for the whole batch) DiskError when the filesystem is full, read-only or not writable — every
    later session would fail alike — and the first other destination error, after making durable what
    was finished (kept for the rerun).
    """
    perms = Perms(file_mode, dir_mode(file_mode), resolve_owner(file_owner), file_owner)
    items = [_Staging(session, Path(staging), transfer, perms) for session, staging, transfer in batch]
    # A session staged before (a rerun) is checked and cleaned now, so that the space check below knows
    # what it holds; a new one when a worker first takes one of its files (``_Staging.ready``), so the
    # stat of every source (each waits for the disk on a cold cache) overlaps the copying of others.
    for item in items:
        if os.path.lexists(item.staging):
            item.ready()

    # Check early rather than fill XNAT's disk to the last byte (XNAT shares it) and fail halfway.
    copying = [i for i in items if i.transfer is Transfer.COPY and i.error is None]
    if copying:
        need, have = sum(i.need() for i in copying), free_bytes(copying[0].staging)
        if need > have:
            more = f" and {len(items) - 1} more session(s)" if len(items) > 1 else ""
            raise disk_full(copying[0].staging, describe(copying[0].session) + more, need - have)

    # Emptied parents of sessions published earlier go meanwhile, on a thread of their own.
    def prune_all() -> None:
        for path in prune:
            prune_staging_parents(path)

    pruner = threading.Thread(target=prune_all, name="stage-prune")
    if prune:
        pruner.start()

    order = [(i, f) for i in items for f in i.planned.values()]
    written: list[str] = []  # list.append is atomic: workers share it
    buf = bytearray(BUFFER_SIZE)

    def work(job: tuple[_Staging, PlannedFile], wbuf: bytearray) -> tuple[_Staging, StagedFile | None]:
        item, f = job
        item.ready()
        if item.error is not None:
            return item, None  # that session failed already: its other files are not worth the I/O
        dst = os.path.join(item.staging, f.dest)
        edit = editors.get(item.session.action_id) if editors else None
        try:
            if edit is not None:
                if f.dest in item.existing:
                    reused = reuse_edited(f, dst, perms, wbuf, edit)
                    if reused is not None:
                        return item, reused
                written.append(dst)
                return item, edit_one(f, dst, perms, wbuf, edit, fsync_each)
            if f.dest in item.existing:
                reused = reuse(f, dst, item.transfer, perms, wbuf, digest=item.digest)
                if reused is not None:
                    return item, reused
            if item.transfer is Transfer.COPY:
                written.append(dst)
                return item, copy_one(f, dst, perms, wbuf, fsync_each)
            return item, link_one(f, dst, perms, wbuf, digest=item.digest)
        except SourceError as exc:
            # This session's source, not the shared destination: that session fails, the batch goes on.
            item.error = item.error or source_error(exc.exc, exc.path)
            return item, None
        except (StalePlanError, AnonymizationError) as exc:
            item.error = item.error or exc
            return item, None

    done = 0
    failing: _Staging | None = None
    try:
        try:
            for item, staged in _parallel(order, work, max(1, jobs), buf, cancel):
                if staged is not None:
                    item.results[staged.dest] = staged
                done += 1
                if progress:
                    progress(done, len(order))
            if cancel is not None and cancel.is_set() and done < len(order):
                raise ApplyError("staging was cancelled: the run is stopping; rerun apply to resume it")
            for item in items:
                item.ready()  # a session without files has its folder too
        finally:
            if prune:
                pruner.join()
            # Also after a failure: the files finished before it stay for the rerun, so make them durable.
            if written and not fsync_each:
                # (a file was written, so some session's folders exist: its staging names the filesystem)
                _syncfs_or_forget(next(i.staging for i in items if i.prepared), written)
        # Folder entries (renames, new folders) become durable here: with the syncfs above (which
        # commits the journal holding them) already; else once per folder.
        synced: set[str] = set()
        for item in items if not written or fsync_each else ():
            if not item.prepared:
                continue  # refused before its folders were made: nothing of it to make durable
            failing = item
            for d in item.folders():
                if d not in synced:
                    synced.add(d)
                    fsync_dir(d)
    except DestError as exc:
        item = failing or _owner(items, exc.path)
        raise dest_error(exc.exc, exc.path, item.session, item.staging, item.left()) from exc.exc
    except OSError as exc:
        item = failing or _owner(items, exc.filename or "")
        raise dest_error(
            exc, exc.filename or str(item.staging), item.session, item.staging, item.left()
        ) from exc
    out: list[list[StagedFile] | XnatMigrateError] = []
    for item in items:
        if item.error is not None:
            out.append(item.error)
        else:
            out.append([item.results[f.dest] for f in item.session.files])
    return out


def _owner(items: Sequence[_Staging], path: str) -> _Staging:
    """The session of the batch a failing path belongs to (the first when none matches)."""
    for item in items:
        if path.startswith(str(item.staging)):
            return item
    return items[0]


def _syncfs_or_forget(staging: Path, written: list[str]) -> None:
    """``syncfs`` the staging filesystem; on a writeback error delete what this run wrote, then raise.

    NOTE: after a failed writeback the page cache may still hold the right bytes, so a rerun's re-hash
    could pass over data that never reached the disk: the files written now must go, not be trusted.
    """
    try:
        syncfs(staging)
    except OSError as exc:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise DestError(exc, str(staging)) from exc


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
    items: Sequence[_Job],
    fn: Callable[[_Job, bytearray], _Out],
    jobs: int,
    buf: bytearray,
    cancel: threading.Event | None = None,
) -> Iterable[_Out]:
    """Yield ``fn(item)`` results as workers finish them; on the first error stop handing out work, let
    the files in flight finish (or clean up), then raise that error in the caller's thread. Once
    ``cancel`` is set no more work is handed out (the caller sees fewer results than items)."""
    if jobs == 1 or len(items) <= 1:
        for item in items:
            if cancel is not None and cancel.is_set():
                return
            yield fn(item, buf)
        return
    lock = threading.Lock()
    stop = threading.Event()
    cancelled = cancel or threading.Event()
    it = iter(items)
    out: queue.SimpleQueue[tuple[_Out | None, BaseException | None]] = queue.SimpleQueue()

    def worker() -> None:
        wbuf = bytearray(BUFFER_SIZE)
        try:
            while not (stop.is_set() or cancelled.is_set()):
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
