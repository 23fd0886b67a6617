"""The scan of a manifest: walk every source, reuse the cache or read headers in parallel, dedupe.

The result lives in a temporary on-disk working set (``workset``): the scan goes through the walked
paths in path order, ``BATCH`` at a time (cache look-up, stat, reads, cache write-back), so it holds a
batch of files in memory, plus the rejects and the paths under two sources, never the archive.

Invariants:
- Every walked file ends up in exactly one of the kept files (``ScanResult.studies`` / ``files_of`` /
  ``headers``) and ``ScanResult.rejects``.
- Deterministic: the result depends on the files only, never on ``jobs``, batching, chunking or cache
  state.
- ``unreadable:`` rejects are never cached: the next run tries again.

NOTE: the cache trusts (size, mtime_ns, ctime_ns, inode): a file rewritten in place keeps its size and
(after ``touch -r``) its mtime, but its ctime changes, and a file replaced by rename has a new inode.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from ..errors import PlanError
from ..model import CachedHeader, FileHeader, Manifest, Reject, header_digest
from .header import read_header
from .parse import Want, want_for
from .walk import iter_walk
from .workset import WorkingSet

ProgressFn = Callable[[int, int], None]

# Below this many files to read, worker processes cost more than they save.
_PARALLEL_MIN = 300
_CHUNK_MIN, _CHUNK_MAX = 64, 256
# How often the in-process loop reports progress (files).
_PROGRESS_EVERY = 64
# Files per batch of the scan (cache look-up, stat, reads, write-back): what it holds at once.
BATCH = 2048
# Walked paths inserted into the working set per statement.
_WALK_CHUNK = 4096


@runtime_checkable
class ScanCache(Protocol):
    """The state's scan cache as the scan uses it (``state.StateStore`` is one)."""

    def cache_get(self, paths: Sequence[str], /) -> dict[str, CachedHeader]:
        """The entries of those of ``paths`` it has."""

    def cache_put(self, entries: Iterable[CachedHeader], /) -> None:
        """Record ``entries`` (replacing those of the same paths)."""


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


def _duplicate(path: str, size: int, kept: str, kept_size: int) -> Reject:
    """The reject of a copy of ``kept`` (same SOPInstanceUID): whether its bytes are the same (sizes
    first; contents read only for same-size pairs)."""
    if size != kept_size:
        how = "different content"
    else:
        try:
            how = "identical content" if _same_content(kept, path) else "different content"
        except OSError as exc:
            how = f"content not compared ({exc.strerror or exc})"
    return Reject(path, f"duplicate: same SOPInstanceUID as {kept}, {how}")


def dedupe(headers: Iterable[tuple[int, FileHeader]]) -> tuple[list[tuple[int, FileHeader]], list[Reject]]:
    """Keep one file per SOPInstanceUID: the one with the smallest path; reject the others.

    Each rejected copy says whether its bytes equal the kept file's (sizes compared first; contents are
    read only for same-size pairs). Order of ``headers`` is kept for the survivors.
    """
    items = list(headers)
    # The first file of each SOPInstanceUID; a list only for those with copies (few, or none).
    first: dict[str, tuple[int, FileHeader]] = {}
    copies: dict[str, list[tuple[int, FileHeader]]] = {}
    for item in items:
        uid = item[1].sop_instance_uid
        seen = first.setdefault(uid, item)
        if seen is not item:
            copies.setdefault(uid, [seen]).append(item)
    if not copies:
        return items, []
    dropped: set[tuple[int, str]] = set()
    rejects: list[Reject] = []
    for uid in first:  # in the order of their first file, as the rejects always were
        group = copies.get(uid)
        if group is None:
            continue
        group.sort(key=lambda ih: (ih[1].path, ih[0]))
        kept = group[0][1]
        for idx, h in group[1:]:
            dropped.add((idx, h.path))
            rejects.append(_duplicate(h.path, h.size, kept.path, kept.size))
    kept_items = [(i, h) for i, h in items if (i, h.path) not in dropped]
    return kept_items, rejects


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------


def _read(path: str, keywords: frozenset[str]) -> CachedHeader:
    """``read_header`` with the header's digest (``model.header_digest``), kept in the cache."""
    e = read_header(path, keywords)
    return e if e.header is None else replace(e, digest=header_digest(e.header))


def _read_chunk(paths: Sequence[str], keywords: frozenset[str]) -> list[CachedHeader]:
    """Worker entry point: read a chunk of files."""
    return [_read(p, keywords) for p in paths]


class _Reader:
    """Reads files in this process or in one process pool, made at the first batch big enough for it
    and kept for the batches after (a pool per batch would pay its start-up every time)."""

    def __init__(self, want: Want, jobs: int | None) -> None:
        self.want = want
        self.workers = jobs if jobs is not None else (os.cpu_count() or 1)
        self.pool: ProcessPoolExecutor | None = None
        self.no_pool = self.workers <= 1  # or no POSIX semaphores here (some sandboxes)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _pool_for(self, n: int, chunks: int) -> ProcessPoolExecutor | None:
        if self.pool is None and not self.no_pool and n >= _PARALLEL_MIN:
            try:
                self.pool = ProcessPoolExecutor(max_workers=self.workers)
            except (OSError, NotImplementedError):
                self.no_pool = True
        return self.pool if self.pool is not None and chunks > 0 else None

    def submit(self, paths: Sequence[str]) -> _Reads:
        """Start reading ``paths`` in the pool (in process: nothing yet); ``collect`` the result."""
        # Several chunks per worker balance uneven files; 64–256 paths keep IPC small next to the work.
        size = max(_CHUNK_MIN, min(_CHUNK_MAX, -(-len(paths) // (max(self.workers, 1) * 4))))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        pool = self._pool_for(len(paths), len(chunks))
        if pool is None:
            return _Reads(paths, {})
        return _Reads(paths, {pool.submit(_read_chunk, c, self.want.keywords): c for c in chunks})

    def collect(self, reads: _Reads, report: Callable[[int], None]) -> dict[str, CachedHeader]:
        """The entries of ``reads``' paths; ``report(n)`` after every n files done."""
        out: dict[str, CachedHeader] = {}
        if not reads.chunks:
            reported = 0
            for i, p in enumerate(reads.paths, 1):
                out[p] = _read(p, self.want.keywords)
                if i % _PROGRESS_EVERY == 0 or i == len(reads.paths):
                    report(i - reported)
                    reported = i
            return out
        pending = set(reads.chunks)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                entries = fut.result()
                for p, e in zip(reads.chunks[fut], entries, strict=True):
                    out[p] = e  # a batch's entries are held only until it is written
                report(len(entries))
        return out


@dataclass(frozen=True)
class _Reads:
    """A batch's files being read: in the pool (``chunks``: future → its paths), or not yet."""

    paths: Sequence[str]
    chunks: dict[Future[list[CachedHeader]], Sequence[str]]


@dataclass
class _Batch:
    """One batch on its way: the (path, source) walked, the entries the cache still vouches for, and
    the reads of the others."""

    items: list[tuple[str, int]]
    entries: dict[str, CachedHeader]
    reads: _Reads


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


class ScanResult:
    """What a scan found: the handle on its working set (``close`` it, or use it as a context
    manager; a finaliser closes it too). Kept files are read back from disk on each call.

    ``rejects`` are sorted by (path, reason). ``cache_updates`` (only when the scan was given a
    mapping or no cache) are the entries read this run (not ``unreadable:`` ones) and the cached ones
    it had no digest for (written by an older xnatmigrate), now with it; with a ``ScanCache`` they
    were written to it batch by batch and this is ``()``.
    """

    def __init__(
        self,
        workset: WorkingSet,
        rejects: tuple[Reject, ...],
        cache_updates: tuple[CachedHeader, ...],
        files_seen: int,
        cache_hits: int,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self._ws = workset
        self._finalizer = weakref.finalize(self, workset.close)
        self.rejects = rejects
        self.cache_updates = cache_updates
        self.files_seen = files_seen
        self.cache_hits = cache_hits
        self.warnings = warnings  # e.g. files under two sources, and which source won
        self.kept_count = workset.kept_count()
        self._headers: tuple[tuple[int, FileHeader], ...] | None = None

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> ScanResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def studies(self) -> Iterator[tuple[int, str]]:
        """The distinct (source index, StudyInstanceUID) of the kept files, sorted, streamed."""
        return self._ws.studies()

    def files_of(self, source_index: int, study_uid: str) -> list[FileHeader]:
        """That study's kept files (of that source), sorted by path, decoded afresh on each call."""
        return self._ws.files_of(source_index, study_uid)

    def each_study(self) -> Iterator[tuple[int, str, list[FileHeader]]]:
        """(source index, StudyInstanceUID, its kept files by path) of every study, sorted: one
        sequential read of the working set (``studies`` then ``files_of`` each is one query per study)."""
        return self._ws.each_study()

    def study_uids(self) -> list[str]:
        """The distinct StudyInstanceUIDs of the kept files, sorted."""
        return self._ws.study_uids()

    @property
    def headers(self) -> tuple[tuple[int, FileHeader], ...]:
        """Every kept file, sorted by (source index, path): all in memory, for tests and small callers
        (read once and kept: its callers read it more than once)."""
        if self._headers is None:
            self._headers = tuple(self._ws.all_kept())
        return self._headers

    def _key(self) -> tuple[object, ...]:
        return (
            self.headers,
            self.rejects,
            self.cache_updates,
            self.files_seen,
            self.cache_hits,
            self.warnings,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScanResult):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable handle: equal by content, not hashable

    def __repr__(self) -> str:
        return (
            f"ScanResult(kept_count={self.kept_count}, rejects={len(self.rejects)}, "
            f"files_seen={self.files_seen}, cache_hits={self.cache_hits})"
        )


# --------------------------------------------------------------------------------------------
# The scan
# --------------------------------------------------------------------------------------------


def _walk_all(manifest: Manifest, ws: WorkingSet) -> tuple[list[Reject], tuple[str, ...]]:
    """Walk every source into ``ws``; the walk's rejects and the overlap warnings."""
    rejects: list[Reject] = []
    for src in manifest.sources:
        stream = iter_walk(src, rejects)
        while chunk := list(itertools.islice(stream, _WALK_CHUNK)):
            ws.add_walked(src.index, chunk)
    warnings = tuple(
        f"{n} file(s) are under both sources[{a}] and sources[{b}] (e.g. {first}): they are "
        f"migrated with sources[{a}], the first listed; narrow one source with include/exclude if "
        "that is not what you meant"
        for a, b, n, first in ws.resolve_owners()
    )
    return rejects, warnings


def _fresh(e: CachedHeader, want: Want, p: str) -> bool:
    """Whether the cache entry ``e`` covers what is read and still holds for the file ``p``."""
    if not want.keywords <= e.keywords:
        return False
    try:
        st = os.stat(p)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (e.size, e.mtime_ns, e.ctime_ns, e.ino)


def _file_header(p: str, e: CachedHeader, want: Want, backfill: list[CachedHeader]) -> tuple[FileHeader, str]:
    """The kept file of the entry ``e`` (a header, no reject) and its values' JSON text when the
    cache gave it ("": to be encoded); a digest the cache lacked goes to ``backfill``."""
    assert e.header is not None
    # The cache entry read exactly these keywords (the usual warm case): its digest is the digest
    # of these values.
    if e.keywords == want.keywords:
        values, digest, text = e.header, e.digest, e.header_json
        if not digest:  # cached without one: computed once, and the cache learns it
            digest = header_digest(values)
            backfill.append(replace(e, digest=digest))
    else:
        values, digest, text = {k: v for k, v in e.header.items() if k in want.keywords}, "", ""
    header = FileHeader(
        p, e.size, e.mtime_ns, e.transfer_syntax or "", values, e.ctime_ns, e.ino, digest, e.head_digest
    )
    return header, text


def _dedupe_in(ws: WorkingSet) -> list[Reject]:
    """``dedupe`` over the working set: the SOP UIDs with copies found in SQL, the copies dropped."""
    rejects: list[Reject] = []
    for sop in list(ws.copied_sops()):
        (kept, kept_size), *copies = ws.files_with_sop(sop)
        rejects.extend(_duplicate(path, size, kept, kept_size) for path, size in copies)
        ws.drop(p for p, _ in copies)
    return rejects


def scratch_error(exc: BaseException, where: str) -> PlanError:
    """The one line for a scratch file of ``plan`` (the working set, the spooled sessions) that
    could not be written in ``where`` (full, read-only, I/O error)."""
    return PlanError(
        f"plan could not write its files in {where} ({exc}): free space there (its scratch files and "
        "plan.json take about as much again as plan.json), or plan with --state-dir on a filesystem "
        "with room (TMPDIR when the state is in PostgreSQL); no plan was written and XNAT was not touched"
    )


def scan_sources(
    manifest: Manifest,
    keywords: frozenset[str],
    cache: Mapping[str, CachedHeader] | ScanCache | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
    workdir: str | None = None,
) -> ScanResult:
    """Walk every source, read each file's header (or reuse the cache), reject what cannot migrate.

    Args:
        manifest: the sources to walk (include/exclude applied per source).
        keywords: the DICOM keywords to read; BASE_KEYWORDS are always read as well.
        cache: the state's scan cache, a mapping (its updates are then ``ScanResult.cache_updates``)
            or a ``ScanCache`` (looked up and written batch by batch); an entry is reused, without
            opening the file, when its size, mtime_ns, ctime_ns and inode equal the file's
            (``os.stat``) and its keywords cover what is read.
        jobs: worker processes (default: CPU count); 1, or fewer than ~300 files to read in a
            batch, reads in this process.
        progress: called as ``progress(done, total)`` at the start, once per chunk of files, and at
            the end.
        workdir: the folder of the temporary working set (default: ``tempfile.gettempdir()``).

    NOTE: a file under two sources belongs to the first (lowest index); it is read and counted once.
    NOTE: duplicates (same SOPInstanceUID) are resolved across the whole manifest (see ``dedupe``).
    """
    want = want_for(frozenset(keywords))
    store: ScanCache | None = None
    mapping: Mapping[str, CachedHeader] | None = None
    if isinstance(cache, ScanCache):
        store = cache
    elif cache:
        mapping = cache
    ws = WorkingSet(workdir)
    reader = _Reader(want, jobs)
    try:
        rejects, warnings = _walk_all(manifest, ws)
        total = ws.owned_count()
        done = 0
        if progress is not None:
            progress(done, total)

        def report(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        hits = 0
        # Only without a ScanCache (a mapping, or none): the updates are returned, as they always were.
        updates: list[CachedHeader] = []
        backfills: list[CachedHeader] = []

        def start(items: list[tuple[str, int]]) -> _Batch:
            """Look ``items`` up in the cache and start reading the files it cannot vouch for."""
            nonlocal hits
            paths = [p for p, _ in items]
            if store is not None:
                cached = store.cache_get(paths)
            elif mapping is not None:
                cached = {p: e for p in paths if (e := mapping.get(p)) is not None}
            else:
                cached = {}
            entries = {p: e for p in paths if (e := cached.get(p)) is not None and _fresh(e, want, p)}
            hits += len(entries)
            if entries:
                report(len(entries))
            return _Batch(items, entries, reader.submit([p for p in paths if p not in entries]))

        def finish(batch: _Batch) -> None:
            """Wait for the batch's reads; write its kept files, rejects and cache updates."""
            fresh = reader.collect(batch.reads, report)
            entries = batch.entries
            entries.update(fresh)
            kept: list[tuple[int, FileHeader, str]] = []
            backfill: list[CachedHeader] = []
            for p, src in batch.items:
                e = entries[p]
                if e.reject is not None or e.header is None:
                    rejects.append(Reject(p, e.reject or "unreadable: no header recorded"))
                else:
                    kept.append((src, *_file_header(p, e, want, backfill)))
            ws.add_kept(kept)
            # In path order (``fresh`` is in the order reads finished): the result is deterministic.
            new = [
                e for p in batch.reads.paths if not ((e := fresh[p]).reject or "").startswith("unreadable:")
            ]
            if store is not None:
                if new or backfill:
                    store.cache_put(new + backfill)
            else:
                updates.extend(new)
                backfills.extend(backfill)

        # One batch ahead: the pool reads batch k+1 while this process writes batch k (two batches
        # held at most).
        ahead: _Batch | None = None
        for items in ws.owned_batches(BATCH):
            started = start(items)
            if ahead is not None:
                finish(ahead)
            ahead = started
        if ahead is not None:
            finish(ahead)
        ws.finish_kept()
        rejects.extend(_dedupe_in(ws))
        rejects.sort(key=lambda r: (r.path, r.reason))
        return ScanResult(ws, tuple(rejects), tuple(updates + backfills), total, hits, warnings)
    except sqlite3.Error as exc:
        ws.close()
        raise scratch_error(exc, os.path.dirname(ws.path)) from None
    except BaseException:
        ws.close()
        raise
    finally:
        reader.close()
