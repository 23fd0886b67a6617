"""XNAT's database and REST API for one run: each opened on first use, both closed once.

Every executor (apply, verify, revert, refresh) needs the same two handles with the same rules:
open lazily (a finished plan or a dry run touches nothing), fail with one clear line when the
manifest lacks the target, and close whatever was opened.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING

from ..errors import DatabaseError, StateError, XnatRestError
from ..model import XnatTarget
from ..state import AppliedSession
from .xnat import XnatClient, credentials_from_env

if TYPE_CHECKING:  # psycopg is imported when XNAT's database is first asked for (the inbox route never)
    from .db import Connection as DbConnection


class Connections:
    """Lazily opened ``db()`` connection and ``rest()`` client for ``xnat``; a context manager."""

    def __init__(self, xnat: XnatTarget) -> None:
        self.xnat = xnat
        self._stack = ExitStack()
        self._conn: DbConnection | None = None
        self._client: XnatClient | None = None

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._conn = None
        self._client = None

    @property
    def has_db(self) -> bool:
        return self.xnat.database is not None

    @property
    def has_rest(self) -> bool:
        return bool(self.xnat.url)

    def db(self) -> DbConnection:
        """The psycopg connection (reconnects if the server closed it)."""
        if self._conn is None or self._conn.closed:
            if self.xnat.database is None:
                raise DatabaseError("this step needs XNAT's database but the manifest has no xnat.database")
            from . import db

            self._conn = self._stack.enter_context(db.connect(db.resolve_dsn(self.xnat.database)))
        return self._conn

    def rest(self) -> XnatClient:
        """The XNAT REST client (one JSESSION for the run)."""
        if self._client is None:
            if not self.xnat.url:
                raise XnatRestError("this step needs XNAT's REST API but the manifest has no xnat.url")
            self._client = self._stack.enter_context(
                XnatClient(self.xnat.url, credentials_from_env(self.xnat.url))
            )
        return self._client

    @property
    def xnat_seconds(self) -> float:
        """Seconds the REST client spent waiting on XNAT (requests and polls); 0 if it never opened."""
        return self._client.waited if self._client is not None else 0.0

    def db_if_any(self) -> DbConnection | None:
        return self.db() if self.has_db else None

    def rest_if_any(self) -> XnatClient | None:
        return self.rest() if self.has_rest else None


class Targets:
    """One ``Connections`` per distinct target the ledger's sessions went to; a context manager.

    NOTE: a session's own recorded target wins; ``fallback`` (the saved plan's target) serves only
    sessions of a ledger written before targets were recorded.
    """

    def __init__(self, fallback: XnatTarget | None) -> None:
        self.fallback = fallback
        self._open: dict[XnatTarget, Connections] = {}

    def __enter__(self) -> Targets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()

    def of(self, s: AppliedSession) -> Connections:
        target = s.target or self.fallback
        if target is None:
            raise StateError(
                f"the ledger does not record where {s.label} went and the state directory has no "
                "plan.json: run the command from the state directory its apply used (--state-dir)"
            )
        conns = self._open.get(target)
        if conns is None:
            conns = self._open[target] = Connections(target)
        return conns
