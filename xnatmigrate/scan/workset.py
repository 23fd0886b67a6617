"""The scan's working set: a temporary SQLite database of the walked paths and the kept headers, so that
a scan holds a batch of files in memory at a time, not the archive.

Invariants:
- Scratch, never durable: a file of its own (``tempfile.mkstemp``), no journal, no fsync, unlinked as
  soon as it is open (its space is freed on ``close``, or when the process dies); nothing outside the
  scan that made it reads it.
- Paths (and the UIDs keyed on) are BLOBs of ``str.encode("utf-8", "surrogatepass")``: a name that is
  not UTF-8 (lone surrogates, ``os.fsdecode``) round-trips, and byte order is code-point order, so
  ``ORDER BY`` equals Python's ``sorted()`` of the str.
- Header values are JSON text (``model.json_text``, which keeps lone surrogates), decoded into the
  decoder's own dicts: what is read back is one study's files, held while that study is planned, so
  sharing values across files (``ValuePool``) would cost more time than the memory it saves.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..model import FileHeader, json_text, plain_header

# Rows fetched per call when reading back (bounded memory, few calls).
_FETCH = 1024

_SCHEMA = (
    # Every (path, source) the walks found; a path under two sources appears twice.
    "CREATE TABLE walked (path BLOB NOT NULL, src INTEGER NOT NULL)",
    # Each walked path once, with the first source that has it.
    "CREATE TABLE owned (path BLOB PRIMARY KEY, src INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE kept (path BLOB PRIMARY KEY, src INTEGER NOT NULL, size INTEGER NOT NULL, "
    "mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL, "
    "transfer_syntax BLOB NOT NULL, sop BLOB NOT NULL, study BLOB NOT NULL, digest TEXT NOT NULL, "
    "head_digest TEXT NOT NULL, header TEXT NOT NULL) WITHOUT ROWID",
)
_INDEXES = (
    "CREATE INDEX kept_study ON kept (src, study, path)",
    "CREATE INDEX kept_sop ON kept (sop)",
)
_COLUMNS = (
    "path, src, size, mtime_ns, ctime_ns, ino, transfer_syntax, sop, study, digest, head_digest, header"
)


# A UID in a header's JSON text: a key is never inside a string (JSON escapes its quotes there).
_UID_IN = {
    k: re.compile('"' + k + r'"\s*:\s*"((?:[^"\\]|\\.)*)"') for k in ("SOPInstanceUID", "StudyInstanceUID")
}


def _uid(h: FileHeader, text: str, key: str) -> str:
    """``h``'s value of ``key``, from ``text`` (its values' JSON) when given: not decoding it all."""
    m = _UID_IN[key].search(text) if text else None
    if m is None:
        return h.values.get(key, "")
    value = m.group(1)
    decoded: str = json.loads(f'"{value}"') if "\\" in value else value
    return decoded


def db_bytes(text: str) -> bytes:
    """A path or UID as the working set stores it (see the module docstring)."""
    return text.encode("utf-8", "surrogatepass")


def py_str(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


class WorkingSet:
    """The temporary database of one scan (see the module docstring); ``close`` removes it."""

    def __init__(self, directory: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(
            prefix="xnatmigrate-scan-", suffix=".db", dir=directory or tempfile.gettempdir()
        )
        os.close(fd)
        try:
            # Autocommit: statements group into explicit BEGIN … COMMIT where it matters (speed).
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
            for statement in _SCHEMA:
                self.db.execute(statement)
        finally:
            # Unlinked at once: SQLite keeps using its open descriptor (no journal, one connection),
            # and a plan killed with -9 leaves no scratch file behind.
            os.unlink(self.path)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.db.close()

    # -- the walk --------------------------------------------------------------------------------

    def add_walked(self, src: int, paths: Iterable[str]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO walked (path, src) VALUES (?, ?)", ((db_bytes(p), src) for p in paths)
        )
        self.db.execute("COMMIT")

    def resolve_owners(self) -> list[tuple[int, int, int, str]]:
        """Give each walked path its first source; the (first, other, count, smallest path) of every
        pair of sources that share paths, sorted. ``walked`` is emptied."""
        self.db.execute("BEGIN")
        self.db.execute("INSERT INTO owned (path, src) SELECT path, MIN(src) FROM walked GROUP BY path")
        rows = self.db.execute(
            "SELECT o.src, w.src, COUNT(*), MIN(w.path) FROM walked w JOIN owned o ON o.path = w.path "
            "WHERE w.src != o.src GROUP BY o.src, w.src ORDER BY o.src, w.src"
        ).fetchall()
        self.db.execute("DELETE FROM walked")
        self.db.execute("COMMIT")
        return [(a, b, n, py_str(p)) for a, b, n, p in rows]

    def owned_count(self) -> int:
        n: int = self.db.execute("SELECT COUNT(*) FROM owned").fetchone()[0]
        return n

    def owned_batches(self, size: int) -> Iterator[list[tuple[str, int]]]:
        """The owned (path, source) in path order, ``size`` at a time (keyset paging: no cursor stays
        open while the caller writes)."""
        last = b""  # below every path (none is empty)
        while True:
            rows = self.db.execute(
                "SELECT path, src FROM owned WHERE path > ? ORDER BY path LIMIT ?", (last, size)
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [(py_str(p), s) for p, s in rows]

    # -- kept headers ----------------------------------------------------------------------------

    def add_kept(self, items: Sequence[tuple[int, FileHeader, str]]) -> None:
        """(source index, header, its values' JSON text or "" to encode them here) per kept file."""
        self.db.execute("BEGIN")
        self.db.executemany(
            f"INSERT INTO kept ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    db_bytes(h.path),
                    src,
                    h.size,
                    h.mtime_ns,
                    h.ctime_ns,
                    h.ino,
                    db_bytes(h.transfer_syntax),
                    db_bytes(_uid(h, text, "SOPInstanceUID")),
                    db_bytes(_uid(h, text, "StudyInstanceUID")),
                    h.digest,
                    h.head_digest,
                    text or json_text(plain_header(h.values)),
                )
                for src, h, text in items
            ),
        )
        self.db.execute("COMMIT")

    def finish_kept(self) -> None:
        """Index the kept rows (once, after every insert: cheaper than keeping the indexes up)."""
        for statement in _INDEXES:
            self.db.execute(statement)

    def copied_sops(self) -> Iterator[str]:
        """The SOPInstanceUIDs that more than one kept file has (usually none), sorted."""
        cur = self.db.execute("SELECT sop FROM kept GROUP BY sop HAVING COUNT(*) > 1 ORDER BY sop")
        for (sop,) in cur.fetchall():
            yield py_str(sop)

    def files_with_sop(self, sop: str) -> list[tuple[str, int]]:
        """(path, size) of the kept files of ``sop``, by path."""
        rows = self.db.execute("SELECT path, size FROM kept WHERE sop = ? ORDER BY path", (db_bytes(sop),))
        return [(py_str(p), n) for p, n in rows.fetchall()]

    def drop(self, paths: Iterable[str]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM kept WHERE path = ?", ((db_bytes(p),) for p in paths))
        self.db.execute("COMMIT")

    def kept_count(self) -> int:
        n: int = self.db.execute("SELECT COUNT(*) FROM kept").fetchone()[0]
        return n

    # -- reading back ----------------------------------------------------------------------------

    def studies(self) -> Iterator[tuple[int, str]]:
        """Distinct (source index, StudyInstanceUID) of the kept files, sorted, streamed."""
        cur = self.db.execute("SELECT DISTINCT src, study FROM kept ORDER BY src, study")
        while rows := cur.fetchmany(_FETCH):
            for src, study in rows:
                yield src, py_str(study)

    def study_uids(self) -> list[str]:
        rows = self.db.execute("SELECT DISTINCT study FROM kept ORDER BY study").fetchall()
        return [py_str(s) for (s,) in rows]

    def files_of(self, src: int, study: str) -> list[FileHeader]:
        cur = self.db.execute(
            f"SELECT {_COLUMNS} FROM kept WHERE src = ? AND study = ? ORDER BY path", (src, db_bytes(study))
        )
        return [h for _, h in _decode(cur)]

    def each_study(self) -> Iterator[tuple[int, str, list[FileHeader]]]:
        """(source index, StudyInstanceUID, its files by path) of every study, sorted, in one read."""
        cur = self.db.execute(f"SELECT {_COLUMNS} FROM kept ORDER BY src, study, path")
        key: tuple[int, bytes] | None = None
        files: list[FileHeader] = []
        for (src, h), study in _decode_with_study(cur):
            if key != (src, study):
                if key is not None:
                    yield key[0], py_str(key[1]), files
                key, files = (src, study), []
            files.append(h)
        if key is not None:
            yield key[0], py_str(key[1]), files

    def all_kept(self) -> Iterator[tuple[int, FileHeader]]:
        """Every kept file, sorted by (source index, path)."""
        cur = self.db.execute(f"SELECT {_COLUMNS} FROM kept ORDER BY src, path")
        return _decode(cur)


def _decode_with_study(cur: sqlite3.Cursor) -> Iterator[tuple[tuple[int, FileHeader], bytes]]:
    """``_decode``, each row with its study as stored."""
    while rows := cur.fetchmany(_FETCH):
        yield from zip(_decode_rows(rows), (r[8] for r in rows), strict=True)


def _decode(cur: sqlite3.Cursor) -> Iterator[tuple[int, FileHeader]]:
    """Rows of ``kept`` as (source index, FileHeader)."""
    while rows := cur.fetchmany(_FETCH):
        yield from _decode_rows(rows)


def _decode_rows(rows: list[Any]) -> Iterator[tuple[int, FileHeader]]:
    """Rows of ``_COLUMNS`` as (source index, FileHeader)."""
    if rows:
        # One decoder call per batch: faster, and the keys of all those headers are one str each.
        values: list[Any] = json.loads("[" + ",".join(r[11] for r in rows) + "]")
        for r, v in zip(rows, values, strict=True):
            yield (
                r[1],
                FileHeader(
                    py_str(r[0]),
                    r[2],
                    r[3],
                    py_str(r[6]),
                    v,
                    r[4],
                    r[5],
                    r[9],
                    r[10],
                ),
            )
