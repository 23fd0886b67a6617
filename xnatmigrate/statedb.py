"""The SQLite layer under the state ledger: connections whose every failure caused by the state
directory (full, read-only, damaged, busy) is one ``StateError`` line, and paths stored losslessly.

Invariants:
- Only failures of the directory or file become StateError; a constraint violation or a bug keeps
  its ``sqlite3`` exception and traceback.
- ``db_text``/``py_text`` are inverse: any path ``os.fsdecode`` can give is stored and read back as
  the same str (TEXT when it is UTF-8, else its bytes as a BLOB).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, overload

from .errors import StateError

# SQLite primary result codes (sqlite3.h) that are the state directory's condition, not a bug.
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 10, 11, 13, 14, 26


def state_error(exc: sqlite3.Error, path: Path) -> StateError | None:
    """The one line for an SQLite failure caused by the state directory (full, read-only, damaged,
    busy); None for anything else (a constraint, a bug), which keeps its traceback."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = path.parent
    if primary == _SQLITE_FULL:
        return StateError(
            f"the state directory {where} is full (writing {path.name} failed: {exc}); free space "
            "there (or move the whole directory elsewhere and pass --state-dir), then rerun: every "
            "step recorded before this one is kept"
        )
    if primary in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
        return StateError(
            f"cannot write the state file {path} ({exc}): the state directory {where} must be "
            "writable by this user; fix its permissions or mount it read-write, then rerun"
        )
    if primary == _SQLITE_IOERR:
        return StateError(
            f"I/O error on the state file {path} ({exc}): check the disk holding {where}, then rerun"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StateError(
            f"the state file {path} is unreadable ({exc}); it is the ledger of what was "
            "migrated: restore it from backup, or move it aside to start over deliberately"
        )
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StateError(
            f"the state file {path} stayed locked by another process ({exc}); wait for it to "
            "finish, then rerun"
        )
    return None


class _Cursor(sqlite3.Cursor):
    """Every statement and fetch turns a state-directory failure into its StateError."""

    def _fail(self, exc: sqlite3.Error) -> BaseException:
        path = getattr(self.connection, "state_path", None)
        err = state_error(exc, path) if isinstance(path, Path) else None
        return err if err is not None else exc

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> _Cursor:
        try:
            return super().executemany(sql, seq_of_parameters)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def __next__(self) -> Any:
        try:
            return super().__next__()
        except sqlite3.Error as exc:
            raise self._fail(exc) from None


class Connection(sqlite3.Connection):
    """A connection whose statements run on ``_Cursor`` (``state_path`` names the file)."""

    state_path: Path

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        return _Cursor(self).execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> _Cursor:
        return _Cursor(self).executemany(sql, seq_of_parameters)


def connect(path: Path, shown: Path | None = None) -> Connection:
    """Open ``path``; failures name ``shown`` (the state file a temporary one is written for)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, factory=Connection)
    conn.state_path = shown or path
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


@overload
def db_text(text: str) -> str | bytes: ...
@overload
def db_text(text: None) -> None: ...
def db_text(text: str | None) -> str | bytes | None:
    """A path (or a message holding one) as SQLite can store it: TEXT when it is UTF-8, as every
    usual name is; else the file system's bytes (a BLOB), which ``py_text`` turns back into the
    same str. The mapping is one-to-one, so a path stays the scan cache's key."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: a name that is not UTF-8 (os.fsdecode)
        return os.fsencode(text)
    return text


@overload
def py_text(value: str | bytes) -> str: ...
@overload
def py_text(value: None) -> None: ...
def py_text(value: str | bytes | None) -> str | None:
    return os.fsdecode(value) if isinstance(value, bytes) else value
