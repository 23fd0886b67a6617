"""Fixtures shared by every test.

PostgreSQL: ``pg_admin_dsn`` is the server (``XNATMIGRATE_TEST_DSN`` if set, else one embedded server per
test process, so each pytest-xdist worker has its own); ``pg_dsn`` / ``pg_db_17`` give each test a fresh
database holding XNAT's real ``xdat_search.prearchive`` table, dropped afterwards; ``state_url`` gives
each test a fresh state schema (``--state-url``) in a database of its own, never XNAT's. Tests that use
them are marked ``pg`` automatically (``make test-pg`` selects them).
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from psycopg.conninfo import conninfo_to_dict

from xnatmigrate.testing.pg import TABLE_PROFILES, EmbeddedPostgres, PgDb, temporary_database

PG_FIXTURES = frozenset({"pg_admin_dsn", "pg_dsn", "pg_db_17", "state_url", "state_db_dsn"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pg: uses a PostgreSQL server (added automatically by the pg fixtures)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if PG_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.pg)


# --- environment ----------------------------------------------------------------------------------

# DSNs, logins and the crash hook: a test that sets one without monkeypatch leaks it into every later
# test of its xdist worker. Set them with monkeypatch.setenv (session-wide: pytest.MonkeyPatch.context())
# or pass env= to a subprocess.
_GUARDED_ENV = re.compile(r"^(XNATMIGRATE_|XNAT_|PG)|DSN|PASSWORD|SECRET|TOKEN", re.IGNORECASE)


def _guarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if _GUARDED_ENV.search(k)}


@pytest.fixture(autouse=True)
def _no_leaked_environment() -> Iterator[None]:
    """Fail a test that leaves a DSN, credential or XNATMIGRATE_* variable changed behind it."""
    before = _guarded_env()
    yield
    after = _guarded_env()
    leaked = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not leaked, f"the test changed os.environ without monkeypatch: {', '.join(leaked)}"


# --- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """DSN of a server where the tests may CREATE DATABASE (session-wide, per xdist worker)."""
    external = os.environ.get("XNATMIGRATE_TEST_DSN")
    if external:
        yield external
        return
    with EmbeddedPostgres() as server:
        yield server.dsn


@pytest.fixture(params=TABLE_PROFILES, ids=[f"pg{p}" for p in TABLE_PROFILES])
def pg_dsn(request: pytest.FixtureRequest, pg_admin_dsn: str) -> Iterator[PgDb]:
    """A fresh database with the prearchive table, once per XNAT DDL profile."""
    with temporary_database(pg_admin_dsn, request.param) as db:
        yield db


@pytest.fixture
def pg_db_17(pg_admin_dsn: str) -> Iterator[PgDb]:
    """A fresh database with the 1.7 (no unique constraint) prearchive table, for single-profile tests."""
    with temporary_database(pg_admin_dsn, "1.7") as db:
        yield db


@pytest.fixture
def site(tmp_path, pg_dsn, monkeypatch):
    """A Site (tests/sites.py) with the REST stand-in running and its environment set."""
    from tests.sites import Site
    from tests.xnat_standin import XnatStandIn

    s = Site(tmp_path / "site", pg_dsn.dsn)
    with XnatStandIn(pg_dsn.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
        xnat.build_delay = 0.05
        s.write_manifest(xnat.url)
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)
        s.xnat = xnat  # type: ignore[attr-defined]
        yield s


# --- the ledger in PostgreSQL (--state-url) ---------------------------------------------------------


@pytest.fixture(scope="session")
def state_db_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A database for state schemas (apart from the XNAT databases of ``pg_dsn``), per xdist worker."""
    with temporary_database(pg_admin_dsn, None, prefix="xmstate") as db:
        yield db.dsn


def state_url_of(dsn: str, schema: str) -> str:
    """``dsn`` (URL or key=value) as a ``--state-url`` of ``schema``, without its password."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v and k != "password"}
    user, dbname = params.pop("user", ""), params.pop("dbname", "")
    return f"postgresql://{user + '@' if user else ''}/{dbname}?{urlencode({**params, 'schema': schema})}"


def fresh_schema() -> str:
    return f"xm_state_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def state_url(state_db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``--state-url`` of a fresh schema (created by the first plan); a password goes in PGPASSWORD."""
    password = conninfo_to_dict(state_db_dsn).get("password")
    if password:
        monkeypatch.setenv("PGPASSWORD", password)
    return state_url_of(state_db_dsn, fresh_schema())


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``mount_tmpfs(size)``: a tmpfs of that size (mount's ``size=``, e.g. "2m") at tmp_path/mnt,
    unmounted afterwards; the test skips with the reason where mounting needs root."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode}); needs root"
            )
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
