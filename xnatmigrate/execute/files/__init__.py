"""Stage a session's files outside XNAT's view, then publish them into the prearchive with one rename.

The public face only; the modules, lowest first (each imports only those before it):

- ``paths``: the staging and published folders of a session, safe planned destinations.
- ``disk``: free space, mounts, fsync and libc, ``DiskError`` and the wording of filesystem errors.
- ``sources``: ``check_sources``: each source still the file planned.
- ``perms``: owner and mode of what is staged (``xnat.file_owner`` / ``xnat.file_mode``).
- ``digest``: ``sha256_file``, ``recorded_differences`` (a published session against its record).
- ``transfer``: one file into staging: copied, hard-linked or reused, verified before its final name.
- ``stage``: ``stage_session``: every planned file, in worker threads, durable on return.
- ``publishing``: ``publish`` (one rename into XNAT's view), ``unpublish``, ``discard_staged``.

Layout (xnat-reference.md §2, §7):

    <root>/.xnatmigrate-staging/<timestamp>/<project or _unassigned>/<session>/SCANS/<scan>/DICOM/<name>
    <root>/<project>/<timestamp>/<session>/...      after ``publish`` (``<root>/<timestamp>/...`` Unassigned)

Invariants (each module states its own):
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

from .digest import recorded_differences, sha256_file
from .disk import DiskError, free_bytes, same_filesystem
from .paths import PART_SUFFIX, STAGING_DIRNAME, final_dir, prune_staging_parents, staging_dir
from .publishing import discard_staged, fsync_dirs, publish, unpublish
from .sources import check_sources, check_sources_of
from .stage import DEFAULT_JOBS, stage_batch, stage_session
from .transfer import Editor, StagedFile

__all__ = [
    "DEFAULT_JOBS",
    "PART_SUFFIX",
    "STAGING_DIRNAME",
    "DiskError",
    "StagedFile",
    "check_sources",
    "check_sources_of",
    "discard_staged",
    "final_dir",
    "free_bytes",
    "fsync_dirs",
    "prune_staging_parents",
    "publish",
    "recorded_differences",
    "same_filesystem",
    "sha256_file",
    "Editor",
    "stage_batch",
    "stage_session",
    "staging_dir",
    "unpublish",
]
