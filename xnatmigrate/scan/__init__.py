"""The read-only header scan: source folders → ``FileHeader`` per DICOM file, ``Reject`` for the rest.

The public face only; the modules, lowest first (each imports only those before it):

- ``text``: an element's value as text (the VRs read, Specific Character Set, pydicom's decoding).
- ``parse``: one file's header through pydicom's element loop, up to Pixel Data, without Datasets.
- ``header``: ``read_header``, the verdict on one file: its header, or a reject and the reason.
- ``walk``: include/exclude globs and the folder walk; what is not walked (``skipped:``).
- ``workset``: the scan's temporary on-disk working set (SQLite), so memory does not grow with it.
- ``sources``: ``scan_sources`` (walk, cache, parallel reads, batch by batch) and ``dedupe``.

Invariants (each module states its own):
- Read-only: files are opened ``O_RDONLY`` and only their headers are read; Pixel Data is never read
  (its element header and, for encapsulated data, the last 8 bytes of the file are).
- Every walked file ends up in exactly one of the kept files (``ScanResult.studies``/``files_of``) and
  ``ScanResult.rejects`` (a folder that cannot be listed is a reject of its own), and no input bytes
  make ``read_header`` raise: a bad file becomes a reject with a reason.
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
- ``skipped: …``: not walked (see ``walk.walk_with_rejects``): a FIFO, socket or device; a symbolic
  link to a folder inside the source; a symbolic link leading outside the source without
  ``follow_links: true``; a followed link to a folder already walked.
- ``truncated: header ends early``: the data set stops inside an element before Pixel Data.
- ``truncated: Pixel Data declares N bytes, file has M after it``: cut inside Pixel Data (also Float /
  Double Float Pixel Data); for encapsulated Pixel Data: ``truncated: encapsulated Pixel Data …`` when
  an item runs past the end or the Sequence Delimitation Item is missing.
- ``corrupt: …``: encapsulated Pixel Data holding something other than items.
- ``duplicate: same SOPInstanceUID as <kept path>, identical content|different content``: see ``dedupe``
  (``content not compared (<strerror>)`` if a copy cannot be read at that point).
"""

from __future__ import annotations

from .header import read_header
from .sources import ScanCache, ScanResult, dedupe, scan_sources
from .walk import glob_to_regex, walk_source

__all__ = [
    "ScanCache",
    "ScanResult",
    "dedupe",
    "glob_to_regex",
    "read_header",
    "scan_sources",
    "walk_source",
]
