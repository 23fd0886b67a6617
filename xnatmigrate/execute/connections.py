"""XNAT's database and REST API for one run: each opened on first use, both closed once.

Every executor (apply, verify, revert, refresh) needs the same two handles with the same rules:
open lazily (a finished plan or a dry run touches nothing), fail with one clear line when the
manifest lacks the target, and close whatever was opened.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from ..errors import DatabaseError, XnatRestError
from ..model import XnatTarget
from . import db


class Connections:
    """Lazily opened ``db()`` connection and ``rest()`` client for ``xnat``; a context manager."""

    def __init__(self, xnat: XnatTarget) -> None:
        self.xnat = xnat
        self._stack = ExitStack()
        self._conn: Any = None
        self._client: Any = None

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._conn = None

    @property
    def has_db(self) -> bool:
        return self.xnat.database is not None

    @property
    def has_rest(self) -> bool:
        return bool(self.xnat.url)

    def db(self) -> Any:
        """The psycopg2 connection (reconnects if the server closed it)."""
        if self._conn is None or self._conn.closed:
            if self.xnat.database is None:
                raise DatabaseError("this step needs XNAT's database but the manifest has no xnat.database")
            self._conn = self._stack.enter_context(db.connect(db.resolve_dsn(self.xnat.database)))
        return self._conn

    def rest(self) -> Any:
        """The XNAT REST client (one JSESSION for the run)."""
        if self._client is None:
            if not self.xnat.url:
                raise XnatRestError("this step needs XNAT's REST API but the manifest has no xnat.url")
            from .xnat import XnatClient, credentials_from_env

            self._client = XnatClient(self.xnat.url, credentials_from_env(self.xnat.url))
        return self._client
