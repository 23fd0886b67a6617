"""The scan of a manifest: walk every source, reuse the cache or read headers in parallel, dedupe.

Invariants:
- Every walked file ends up in exactly one of ``ScanResult.headers`` / ``ScanResult.rejects``.
- Deterministic: the result depends on the files only, never on ``jobs``, chunking or cache state.
- ``unreadable:`` rejects are never cached: the next run tries again.

NOTE: the cache trusts (size, mtime_ns, ctime_ns, inode): a file rewritten in place keeps its size and
(after ``touch -r``) its mtime, but its ctime changes, and a file replaced by rename has a new inode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace

from ..model import CachedHeader, FileHeader, Manifest, Reject, ValuePool, header_digest
from .header import read_header
from .parse import Want, want_for
from .walk import walk_with_rejects

ProgressFn = Callable[[int, int], None]

# Below this many files to read, worker processes cost more than they save.
_PARALLEL_MIN = 300
_CHUNK_MIN, _CHUNK_MAX = 64, 256
# How often the in-process loop reports progress (files).
_PROGRESS_EVERY = 64


@dataclass(frozen=True)
class ScanResult:
    """What a scan found. ``headers`` sorted by (source index, path); ``rejects`` by path.

    ``cache_updates`` are the entries read this run (not ``unreadable:`` ones), for the state's cache,
    and the cached ones it had no digest for (written by an older xnatmigrate), now with it.
    """

    headers: tuple[tuple[int, FileHeader], ...]
    rejects: tuple[Reject, ...]
    cache_updates: tuple[CachedHeader, ...]
    files_seen: int
    cache_hits: int
    warnings: tuple[str, ...] = ()  # e.g. files under two sources, and which source won


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


def _read(path: str, keywords: frozenset[str]) -> CachedHeader:
    """``read_header`` with the header's digest (``model.header_digest``), kept in the cache."""
    e = read_header(path, keywords)
    return e if e.header is None else replace(e, digest=header_digest(e.header))


def _read_chunk(paths: Sequence[str], keywords: frozenset[str]) -> list[CachedHeader]:
    """Worker entry point: read a chunk of files."""
    return [_read(p, keywords) for p in paths]


def _shared(e: CachedHeader, pool: ValuePool, path: str, sizes: dict[int, int]) -> CachedHeader:
    """``e`` with its header's keys and values shared with the other files' (``ValuePool``), its
    path the walk's ``path`` object (a worker's entry comes back with a copy of it), its size one
    int per distinct size and its ctime its mtime when equal (as ``StateStore.cache_all`` makes them):
    the scan holds every entry at once."""
    if e.header is None:
        return e
    ts = pool.text(e.transfer_syntax) if e.transfer_syntax is not None else None
    return replace(
        e,
        path=path if e.path == path else e.path,
        size=sizes.setdefault(e.size, e.size),
        ctime_ns=e.mtime_ns if e.ctime_ns == e.mtime_ns else e.ctime_ns,
        header=pool.header(e.header),
        transfer_syntax=ts,
    )


def _read_many(
    paths: Sequence[str], want: Want, jobs: int | None, report: Callable[[int], None]
) -> dict[str, CachedHeader]:
    """Read ``paths`` in process or in a process pool; ``report(n)`` after every n files done."""
    out: dict[str, CachedHeader] = {}
    pool_of_values = ValuePool()
    sizes: dict[int, int] = {}  # few distinct sizes (a series' images are alike): one int each
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
            out[p] = _shared(_read(p, want.keywords), pool_of_values, p, sizes)
            if i % _PROGRESS_EVERY == 0 or i == len(paths):
                report(i - reported)
                reported = i
        return out
    with pool:
        chunk_of: dict[Future[list[CachedHeader]], Sequence[str]] = {
            pool.submit(_read_chunk, c, want.keywords): c for c in chunks
        }
        pending = set(chunk_of)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                entries = fut.result()
                for p, e in zip(chunk_of.pop(fut), entries, strict=True):
                    out[p] = _shared(e, pool_of_values, p, sizes)  # keyed by the walk's own str
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
    want = want_for(frozenset(keywords))
    owner: dict[str, int] = {}
    walk_rejects: list[Reject] = []
    overlaps: dict[tuple[int, int], list[str]] = {}
    for src in manifest.sources:
        files, errors = walk_with_rejects(src)
        for p in files:
            first = owner.setdefault(p, src.index)
            if first != src.index:
                overlaps.setdefault((first, src.index), []).append(p)
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
    backfill: list[CachedHeader] = []
    rejects = list(walk_rejects)
    for p in paths:
        e = entries[p]
        if e.reject is not None or e.header is None:
            rejects.append(Reject(p, e.reject or "unreadable: no header recorded"))
            continue
        # The cache entry read exactly these keywords (the usual warm case): share its dict, and
        # its digest is the digest of these values.
        if e.keywords == want.keywords:
            values, digest = e.header, e.digest
            if not digest:  # cached without one: computed once, and the cache learns it
                digest = header_digest(values)
                backfill.append(replace(e, digest=digest))
        else:
            values, digest = {k: v for k, v in e.header.items() if k in want.keywords}, ""
        headers.append(
            (
                owner[p],
                FileHeader(
                    p,
                    e.size,
                    e.mtime_ns,
                    e.transfer_syntax or "",
                    values,
                    e.ctime_ns,
                    e.ino,
                    digest,
                    e.head_digest,
                ),
            )
        )

    kept, dup_rejects = dedupe(headers)
    rejects.extend(dup_rejects)
    kept.sort(key=lambda ih: (ih[0], ih[1].path))
    rejects.sort(key=lambda r: (r.path, r.reason))
    updates = tuple(fresh[p] for p in todo if not (fresh[p].reject or "").startswith("unreadable:"))
    updates += tuple(backfill)
    return ScanResult(
        headers=tuple(kept),
        rejects=tuple(rejects),
        cache_updates=updates,
        files_seen=total,
        cache_hits=hits,
        warnings=tuple(
            f"{len(ps)} file(s) are under both sources[{a}] and sources[{b}] (e.g. {min(ps)}): they are "
            f"migrated with sources[{a}], the first listed; narrow one source with include/exclude if "
            "that is not what you meant"
            for (a, b), ps in sorted(overlaps.items())
        ),
    )
