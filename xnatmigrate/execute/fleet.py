"""One plan, many hosts (issue 16): ``apply`` with a PostgreSQL ledger is one worker of a fleet.

The sessions of the plan not yet applied are cut into work units; each unit is one job of the task
library Procrastinate (its tables in the ledger's own schema, jobs taken with ``FOR UPDATE SKIP
LOCKED``), in a queue of the plan's own. Any number of ``apply`` processes, on any hosts, take units
until none is left to do or doing, each unit applied by ``execute.apply`` on its sessions, then exit.

Invariants:
- A unit is whole studies: every session of one StudyInstanceUID is in one unit, so no study is ever
  worked on by two workers at once. Units follow plan order and hold up to ``unit_files`` files (a
  bigger study is a unit of its own).
- Units are queued under the plan's advisory lock, in the transaction that records them, and only
  when the plan's queue has none to do or doing: a rerun after a finished round queues the sessions
  still not applied (a failure retried); a finished plan queues nothing (re-apply is a no-op).
- A unit acts only under its own advisory lock, held on the ledger connection of the worker applying
  it. Procrastinate's lease (each worker's heartbeat; ``lease_s``) decides when a silent worker's unit
  is given to another; the advisory lock decides when the taker may act: a slow worker still connected
  keeps its unit and the taker puts it back in the queue (a retry) and takes others; a worker cut off loses its lock when the server drops its
  connection (TCP keepalives, ``statepg.KEEPALIVE_S``). A unit of a process of this host that is gone
  (kill -9) is taken over at once, without waiting for its lease.
- A unit taken over resumes from the ledger as a rerun does (check → act → record), so the end state
  equals an uninterrupted apply's.
- Each worker holds the ledger's apply lock shared: a revert (exclusive) cannot start while a fleet
  works, nor a worker while a revert runs.
- Procrastinate's schema is created once per ledger, by the version recorded with it; a host with
  another version is refused (its SQL functions may differ) with the version to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import random
import re
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexceptions
from procrastinate import jobs as pjobs
from procrastinate import manager as pmanager
from procrastinate import worker as pworker
from procrastinate.schema import SchemaManager

from ..errors import StateError
from ..model import CstoreSession, Plan, PlannedSession, Result, SessionState
from ..state import StateStore
from . import db, settings, statepg
from .apply import ApplyReport, FleetSummary, Options, SessionResult, apply_plan

log = logging.getLogger(__name__)

UNIT_FILES_ENV = "XNATMIGRATE_UNIT_FILES"
UNIT_MB_ENV = "XNATMIGRATE_UNIT_MB"
DEFAULT_UNIT_MB = 2048  # and at most this much data per unit: what one worker loses to a crash stays small
LEASE_ENV = "XNATMIGRATE_LEASE_S"
DEFAULT_UNIT_FILES = 1000  # a unit's files: small enough to spread a plan over hosts, big enough to amortise
DEFAULT_LEASE_S = 60.0  # as statepg.KEEPALIVE_S: a vanished host's unit lock is freed about as soon
TASK = "xnatmigrate.apply_unit"
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: the unit goes on elsewhere; rerun when the database is back
_VERSION_KEY = "procrastinate_version"  # meta: the Procrastinate version that made the queue's schema

_UNITS_DDL = """
CREATE TABLE IF NOT EXISTS fleet_units (
    plan_id TEXT NOT NULL, round INTEGER NOT NULL, unit INTEGER NOT NULL, job_id BIGINT,
    sessions_json TEXT NOT NULL, sessions INTEGER NOT NULL, files BIGINT NOT NULL, bytes BIGINT NOT NULL,
    host TEXT, pid INTEGER, pid_start TEXT, started TIMESTAMPTZ, finished TIMESTAMPTZ, outcome TEXT,
    seconds DOUBLE PRECISION, xnat_seconds DOUBLE PRECISION, changed INTEGER, failed INTEGER,
    PRIMARY KEY (plan_id, round, unit));
CREATE TABLE IF NOT EXISTS fleet_pace (kind TEXT PRIMARY KEY, next_at TIMESTAMPTZ NOT NULL);
CREATE TABLE IF NOT EXISTS fleet_builds (
    plan_id TEXT NOT NULL, kind TEXT NOT NULL, bucket INTEGER NOT NULL, files BIGINT NOT NULL,
    started TIMESTAMPTZ NOT NULL, seconds DOUBLE PRECISION NOT NULL, slots INTEGER NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS fleet_builds_recent ON fleet_builds (plan_id, kind, started);
CREATE INDEX IF NOT EXISTS fleet_builds_first ON fleet_builds (plan_id, kind, bucket, started)
"""
# Added to fleet_units after its first release (a ledger queued before has them NULL).
_UNITS_COLUMNS = {"failures_json": "TEXT"}

# The governor's reading of build times (settings.GOVERNOR_SLOW_BUILDS): "now" is the last RECENT_BUILDS
# builds (archives) of a kind; "usual" the plan's first FIRST_BUILDS of that kind and size, on every host.
RECENT_BUILDS = 5
FIRST_BUILDS = 5
MIN_BUILDS = 3  # fewer to compare: no reading yet
BUILD_FLOOR_S = 0.25  # a build quicker than this (an empty session, a stand-in) is compared as this long
BUILD_KINDS = ("build", "archive")


@dataclass(frozen=True)
class FleetOptions:
    unit_files: int = DEFAULT_UNIT_FILES
    unit_mb: int = DEFAULT_UNIT_MB
    lease_s: float = DEFAULT_LEASE_S
    poll_s: float = 1.0
    workers: int = 1  # units this process applies at once (``apply --workers``)

    @classmethod
    def from_env(cls, workers: int | None = None) -> FleetOptions:
        names = f"${UNIT_FILES_ENV}, ${UNIT_MB_ENV} and ${LEASE_ENV}"
        try:
            unit = int(os.environ.get(UNIT_FILES_ENV) or DEFAULT_UNIT_FILES)
            mb = int(os.environ.get(UNIT_MB_ENV) or DEFAULT_UNIT_MB)
            lease = float(os.environ.get(LEASE_ENV) or DEFAULT_LEASE_S)
        except ValueError:
            raise StateError(f"{names} must be numbers; fix them, then rerun") from None
        if unit < 1 or mb < 1 or lease < 1:
            raise StateError(f"{names} must be at least 1; fix them, then rerun")
        if workers is not None and workers < 1:
            raise StateError("--workers must be at least 1")
        return cls(
            unit_files=unit, unit_mb=mb, lease_s=lease, poll_s=min(1.0, lease / 10), workers=workers or 1
        )


# XNAT building a session (PrearcUtils.PrearcStatus, xnat_table): what the governor counts.
BUILDING_STATUSES = ("BUILDING", "QUEUED_BUILDING", "_BUILDING")


class _Slots:
    """A counting semaphore across hosts: ``limit`` advisory locks per kind, held on one ledger
    connection (a dead holder's go with its connection)."""

    def __init__(
        self,
        store: StateStore,
        schema: str,
        plan_id: str,
        stop: threading.Event,
        poll: float,
        status: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.schema, self.plan_id, self.stop, self.poll = store, schema, plan_id, stop, poll
        self.status = status  # told while it waits for a slot

    def take(self, kind: str, limit: int, want: int = 1) -> list[int]:
        """Up to ``want`` of the ``limit`` slots of ``kind`` (at least one: waits for it)."""
        keys = [statepg.lock_key(self.schema, f"slot\0{self.plan_id}\0{kind}\0{i}") for i in range(limit)]
        while True:
            got: list[int] = []
            for key in random.sample(keys, len(keys)):
                if len(got) >= want:
                    break
                if self.store.db.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()[0]:
                    got.append(key)
            if got:
                return got
            if self.stop.is_set():
                raise _Again("this worker is stopping")
            if self.status is not None:
                self.status(f"waiting for one of the fleet's {limit} {kind} slot(s)")
            time.sleep(self.poll)

    def give(self, keys: list[int]) -> None:
        for key in keys:
            self.store.db.execute("SELECT pg_advisory_unlock(?)", (key,))

    @contextlib.contextmanager
    def held(self, kind: str, limit: int) -> Iterator[None]:
        keys = self.take(kind, limit)
        try:
            yield
        finally:
            self.give(keys)


def size_bucket(files: int) -> int:
    """Sessions within a factor of two of each other's size compare their build times."""
    return max(1, files).bit_length()


def slowdown(usual: Mapping[int, float], recent: Sequence[tuple[int, float]]) -> float | None:
    """How many times as long as usual the ``recent`` builds of one kind took, as (size bucket,
    seconds): the median of each one's seconds over its bucket's usual seconds (both at least
    BUILD_FLOOR_S). None with fewer than MIN_BUILDS of them comparable."""
    ratios = [max(sec, BUILD_FLOOR_S) / max(usual[b], BUILD_FLOOR_S) for b, sec in recent if b in usual]
    return statistics.median(ratios) if len(ratios) >= MIN_BUILDS else None


class BuildTimes:
    """The fleet's builds and archives as ``fleet_builds`` records them, read as the governor reads
    them. Invariant: a bucket's usual time, once the plan has FIRST_BUILDS of it, never changes (the
    first builds stay the first), so it is read once per process."""

    def __init__(self, plan_id: str) -> None:
        self.plan_id = plan_id
        self.usual: dict[tuple[str, int], float] = {}

    def slowdown(self, store: StateStore) -> float | None:
        """The slowest kind's ``slowdown``; None while no kind has a reading."""
        worst: float | None = None
        for kind in BUILD_KINDS:
            recent = [
                (int(b), float(sec))
                for b, sec in store.db.execute(
                    "SELECT bucket, seconds FROM fleet_builds WHERE plan_id = ? AND kind = ? "
                    "ORDER BY started DESC LIMIT ?",
                    (self.plan_id, kind, RECENT_BUILDS),
                ).fetchall()
            ]
            usual: dict[int, float] = {}
            for b in {b for b, _ in recent}:
                got = self._usual(store, kind, b)
                if got is not None:
                    usual[b] = got
            ratio = slowdown(usual, recent)
            if ratio is not None and (worst is None or ratio > worst):
                worst = ratio
        return worst

    def _usual(self, store: StateStore, kind: str, bucket: int) -> float | None:
        if (kind, bucket) in self.usual:
            return self.usual[(kind, bucket)]
        first = [
            float(r[0])
            for r in store.db.execute(
                "SELECT seconds FROM fleet_builds WHERE plan_id = ? AND kind = ? AND bucket = ? "
                "ORDER BY started LIMIT ?",
                (self.plan_id, kind, bucket, FIRST_BUILDS),
            ).fetchall()
        ]
        if len(first) < MIN_BUILDS:
            return None
        value = statistics.median(first)
        if len(first) == FIRST_BUILDS:
            self.usual[(kind, bucket)] = value
        return value


def units_of(
    sessions: Sequence[PlannedSession], applied: set[str], unit_files: int, unit_bytes: int | None = None
) -> list[list[int]]:
    """Plan indexes of the sessions not in ``applied``, cut into units of whole studies, in plan order,
    each up to ``unit_files`` files and ``unit_bytes`` bytes (a unit is never empty; a study bigger
    than that is one unit)."""
    return sized_units(sessions, applied, unit_files, unit_bytes)[0]


def sized_units(
    sessions: Sequence[PlannedSession], applied: set[str], unit_files: int, unit_bytes: int | None = None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """``units_of``, with each unit's (files, bytes): the plan's sessions are parsed once."""
    study_unit: dict[str, int] = {}
    units: list[list[int]] = []
    sizes: list[tuple[int, int]] = []
    for i, s in enumerate(sessions):
        if s.action_id in applied:
            continue
        u = study_unit.get(s.study_uid)
        if u is None:
            full = (
                bool(sizes)
                and sizes[-1][0] > 0
                and (
                    sizes[-1][0] + s.file_count > unit_files
                    or (unit_bytes is not None and sizes[-1][1] + s.bytes > unit_bytes)
                )
            )
            if not units or full:
                units.append([])
                sizes.append((0, 0))
            u = study_unit[s.study_uid] = len(units) - 1
        units[u].append(i)
        n, b = sizes[u]
        sizes[u] = (n + s.file_count, b + s.bytes)
    return units, sizes


def queue_of(plan_id: str) -> str:
    return f"xnatmigrate-{plan_id[:20]}"


def unit_key(schema: str, plan_id: str, rnd: int, unit: int) -> int:
    return statepg.lock_key(schema, f"unit\0{plan_id}\0{rnd}\0{unit}")


def join(store: StateStore) -> None:
    """Take the ledger's apply lock shared (``statepg.PgDatabase.lock``), or LockedError naming the
    holder of it exclusively (a revert)."""
    db = store.db
    assert isinstance(db, statepg.PgDatabase), "a fleet needs the ledger in PostgreSQL"
    db.lock(f"apply workers (the latest on host {socket.gethostname()} pid {os.getpid()})", shared=True)


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), or None when there is none: with
    the pid it names one process, never a later one given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[1].split()[19].decode()


class _Units(pmanager.JobManager):
    """Procrastinate's job manager, but for the one case a lease makes normal: a unit finished (or sent
    back) by the worker it was taken from, and then by its taker, which found it done: the second
    finish is a no-op, not an error (the unit's lock made sure only one of them acted). It also notes
    each heartbeat that reached the database, for the watchdog (``_Fleet._watch``)."""

    beat = 0.0  # time.monotonic() of the last heartbeat the database took

    async def update_heartbeat(self, worker_id: int) -> None:
        await super().update_heartbeat(worker_id)
        self.beat = time.monotonic()

    async def finish_job(self, job: pjobs.Job, status: pjobs.Status, delete_job: bool) -> None:
        try:
            await super().finish_job(job, status, delete_job)
        except pexceptions.ConnectorException as exc:
            if not _moved_on(exc):
                raise
            log.info("unit job %s was finished by the worker it was taken from", job.id)

    async def retry_job(self, job: pjobs.Job, *args: Any, **kwargs: Any) -> None:
        try:
            await super().retry_job(job, *args, **kwargs)
        except pexceptions.ConnectorException as exc:
            if not _moved_on(exc):
                raise
            log.info("unit job %s was finished by the worker it was taken from", job.id)


def _moved_on(exc: BaseException) -> bool:
    """The job's row was no longer in the status this worker left it in (procrastinate_finish_job_v1,
    procrastinate_retry_job_v2 raise then)."""
    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.RaiseException) and (
        'not in "doing" or "todo" status' in str(cause) or "invalid status to retry" in str(cause)
    )


class _Again(Exception):
    """The unit goes back to the queue (a retry by Procrastinate): this worker is stopping, or the unit
    is locked by a worker still alive."""


class _Fleet:
    def __init__(self, plan: Plan, url: str, opts: Options, fleet: FleetOptions) -> None:
        self.plan = plan
        self.url = url
        self.target = statepg.parse_state_url(url)
        self.schema = self.target.schema
        self.opts = opts
        self.fleet = fleet
        self.queue = queue_of(plan.plan_id)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = _proc_start(self.pid)
        self.stop = threading.Event()
        self.fatal: BaseException | None = None
        self.lock = threading.Lock()
        self.report = ApplyReport(plan.plan_id)
        self.done_files = 0
        self.in_flight: dict[int, tuple[int, int]] = {}  # unit → (files done, files) of units running
        self.units_run = 0
        self.budget = settings.Budget.from_env()
        self.build_times = BuildTimes(plan.plan_id)
        self.build_limit: tuple[float, int] | None = None  # (when read, the fleet's build slots then)
        self.started_work = 0.0
        self.worker: pworker.Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=self.target.dsn,
                kwargs={
                    "options": f"-c search_path={self.schema}",
                    "application_name": "xnatmigrate fleet",
                    **_client_keepalives(fleet.lease_s),
                },
                min_size=1,
                max_size=3,
            )
        )
        self.units = self.app.job_manager = _Units(self.app.connector)
        self.working = False  # a Procrastinate worker is running: its heartbeats are watched
        self.app.task(
            name=TASK,
            pass_context=True,
            retry=procrastinate.RetryStrategy(wait=int(max(1, fleet.poll_s)), retry_exceptions=[_Again]),
        )(self.unit)

    # -- the process ------------------------------------------------------------------------------

    def run(self) -> ApplyReport:
        started = time.monotonic()
        previous = signal.getsignal(signal.SIGINT)
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            signal.signal(signal.SIGINT, self._interrupt)
        watchdog = threading.Thread(target=self._watch, name="xnatmigrate lease watchdog", daemon=True)
        watchdog.start()
        try:
            asyncio.run(self._main())
        finally:
            self.working = False
            if in_main:
                signal.signal(signal.SIGINT, previous)
            self.report.seconds = time.monotonic() - started
        if self.fatal is not None:
            raise self.fatal
        if self.stop.is_set():
            raise KeyboardInterrupt
        return self.report

    def _watch(self) -> None:
        """A worker whose heartbeats have not reached the database for three quarters of a lease is
        about to lose its unit to another worker: it ends at once, as kill -9 would, before any taker
        may start (takers wait a whole lease from the same last heartbeat), and instead of hanging on
        a connection that will never answer (a network cut neither end sees). What it did is in the
        ledger; the unit's lock goes with its connection."""
        while True:
            time.sleep(min(1.0, self.fleet.lease_s / 10))
            if not self.working:
                continue
            silent = time.monotonic() - max(self.units.beat, self.started_work)
            if silent > 0.75 * self.fleet.lease_s:
                print(
                    f"error: no heartbeat reached the state database ({self.target.where}) for {silent:.0f} s, "
                    f"most of the lease ({self.fleet.lease_s:g} s): another worker will take this unit over, "
                    "so this one stops now. Check the network to the database, then rerun `xnatmigrate "
                    "apply`: every step recorded is kept",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_LEASE_LOST)

    def _interrupt(self, _sig: int, _frame: object) -> None:
        """Ctrl-C: the unit in flight stops before its next group and goes back to the queue; a
        second Ctrl-C ends the process at once (as kill -9 would: the ledger covers it)."""
        if self.stop.is_set():
            os._exit(130)
        self.stop.set()
        self._stop_worker()

    def _stop_worker(self) -> None:
        if self.worker is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.worker.stop)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            async with self.app.open_async():
                nothing = await self._prepare()
                if nothing:
                    self._all_applied()
                    self.report.fleet = await self._summary()
                    return
                while not self.stop.is_set() and self.fatal is None:
                    await self._take_over()
                    self.worker = pworker.Worker(
                        self.app,
                        queues=[self.queue],
                        name=f"{self.host}:{self.pid}",
                        concurrency=self.fleet.workers,
                        wait=False,
                        listen_notify=False,
                        install_signal_handlers=False,
                        update_heartbeat_interval=max(0.5, self.fleet.lease_s / 6),
                        stalled_worker_timeout=self.fleet.lease_s,
                    )
                    self.started_work = time.monotonic()
                    self.working = True
                    try:
                        await self.worker.run()  # type: ignore[no-untyped-call]
                    finally:
                        self.working = False
                    self.worker = None
                    if self.stop.is_set() or self.fatal is not None or not await self._left():
                        break
                    await self._idle()  # a unit doing elsewhere, or due later
                self.report.fleet = await self._summary()
        except (psycopg.Error, OSError) as exc:
            if self.fatal is None:
                self.fatal = _queue_error(exc, self.target)

    # -- queueing -----------------------------------------------------------------------------------

    async def _prepare(self) -> bool:
        """Procrastinate's schema and the units table when missing, then a round of units unless one
        is under way; True when every session of the plan is applied already."""
        pool = self.app.connector.pool  # type: ignore[attr-defined]
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (statepg.lock_key(self.schema, "fleet"),))
            await self._ensure_schema(conn)
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._plan_key(),))
            cur = await conn.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = %s AND status IN ('todo', 'doing')",
                (self.queue,),
            )
            row = await cur.fetchone()
            budget_key = f"fleet_budget:{self.plan.plan_id}"
            if row and row[0]:
                # A round under way: join it, on the budget its first worker recorded.
                cur = await conn.execute("SELECT value FROM meta WHERE key = %s", (budget_key,))
                got = await cur.fetchone()
                if got:
                    self.budget = settings.Budget(**json.loads(got[0]))
                return False
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [
                        (budget_key, json.dumps(dataclasses.asdict(self.budget))),
                        (f"fleet_sessions:{self.plan.plan_id}", str(len(self.plan.sessions))),
                    ],
                )
            cur = await conn.execute(
                "SELECT action_id FROM sessions WHERE status = %s", (SessionState.APPLIED.value,)
            )
            applied = {r[0] for r in await cur.fetchall()}
            units, sizes = sized_units(
                self.plan.sessions, applied, self.fleet.unit_files, self.fleet.unit_mb << 20
            )
            if not units:
                return True
            cur = await conn.execute(
                "SELECT coalesce(max(round), 0) + 1 FROM fleet_units WHERE plan_id = %s", (self.plan.plan_id,)
            )
            row = await cur.fetchone()
            rnd = int(row[0]) if row else 1
            rows = [
                (self.plan.plan_id, rnd, u, json.dumps(idx), len(idx), files, size)
                for u, (idx, (files, size)) in enumerate(zip(units, sizes, strict=True))
            ]
            async with conn.cursor() as c:
                await c.executemany(
                    "INSERT INTO fleet_units (plan_id, round, unit, sessions_json, sessions, files, bytes) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )
            name = f"{self.plan.plan_id[:20]}:{rnd}"
            deferred = await self.app.job_manager.batch_defer_jobs_async(
                [
                    pjobs.Job(
                        id=None,
                        queue=self.queue,
                        lock=f"{name}:{u}",
                        queueing_lock=f"{name}:{u}",
                        task_name=TASK,
                        task_kwargs={"plan_id": self.plan.plan_id, "round": rnd, "unit": u},
                    )
                    for u in range(len(units))
                ],
                connection=conn,
            )
            async with conn.cursor() as c:
                await c.executemany(
                    "UPDATE fleet_units SET job_id = %s WHERE plan_id = %s AND round = %s AND unit = %s",
                    [(j.id, self.plan.plan_id, rnd, u) for u, j in enumerate(deferred)],
                )
            return False

    async def _ensure_schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        mine = metadata.version("procrastinate")
        cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            await conn.execute(SchemaManager.get_schema())
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_VERSION_KEY, mine),
            )
        else:
            cur = await conn.execute("SELECT value FROM meta WHERE key = %s", (_VERSION_KEY,))
            got = await cur.fetchone()
            theirs = got[0] if got else "an unknown version"
            if theirs != mine:
                raise StateError(
                    f"the work queue in {self.target.where} (schema {self.schema}) was made by Procrastinate "
                    f"{theirs} and this host has {mine}: install the same on every host of the migration "
                    f"(pip install 'procrastinate=={theirs}'), then rerun"
                )
        await conn.execute(_UNITS_DDL)
        cur = await conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = 'fleet_units'"
        )
        have = {r[0] for r in await cur.fetchall()}
        for name, kind in _UNITS_COLUMNS.items():
            if name not in have:
                await conn.execute(f"ALTER TABLE fleet_units ADD COLUMN {name} {kind}")

    def _plan_key(self) -> int:
        return statepg.lock_key(self.schema, f"fleet\0{self.plan.plan_id}")

    async def _idle(self) -> None:
        """Between two Procrastinate workers: back as soon as a unit can be taken or none is left to
        do or doing (a short query every 50 ms), at the latest after ``poll_s`` (a stalled unit's
        take-over is looked for then)."""
        deadline = time.monotonic() + self.fleet.poll_s
        while time.monotonic() < deadline and not self.stop.is_set():
            await asyncio.sleep(0.05)
            row = await self.app.connector.execute_query_one_async(
                "SELECT count(*) FILTER (WHERE status IN ('todo', 'doing')) AS left, "
                "count(*) FILTER (WHERE status = 'todo' AND (scheduled_at IS NULL OR scheduled_at <= now())) "
                "AS ready FROM procrastinate_jobs WHERE queue_name = %(q)s",
                q=self.queue,
            )
            if not row["left"] or row["ready"]:
                return

    async def _left(self) -> int:
        row = await self.app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM procrastinate_jobs WHERE queue_name = %(q)s AND status IN ('todo', 'doing')",
            q=self.queue,
        )
        return int(row["n"])

    async def _take_over(self) -> None:
        """Units whose worker went silent for longer than the lease, and units of this host's processes
        that are gone, back to the queue (another host may have done it first: that is fine)."""
        jm = self.app.job_manager
        stalled = {
            j.id
            for j in await jm.get_stalled_jobs(queue=self.queue, seconds_since_heartbeat=self.fleet.lease_s)
            if j.id is not None
        }
        rows = await self.app.connector.execute_query_all_async(
            "SELECT u.job_id, u.pid, u.pid_start FROM fleet_units u JOIN procrastinate_jobs j ON j.id = u.job_id "
            "WHERE u.plan_id = %(p)s AND u.host = %(h)s AND u.finished IS NULL AND j.status = 'doing'",
            p=self.plan.plan_id,
            h=self.host,
        )
        for r in rows:
            if r["pid"] != self.pid and _proc_start(r["pid"]) != r["pid_start"]:
                stalled.add(r["job_id"])
        for job_id in stalled:
            try:
                await jm.retry_job_by_id_async(job_id, retry_at=datetime.datetime.now(datetime.UTC))
            except Exception as exc:  # taken over by another host meanwhile
                log.debug("unit job %s not retried: %s", job_id, exc)

    async def _summary(self) -> FleetSummary:
        rows = await self.app.connector.execute_query_all_async(
            "SELECT status::text AS status, count(*) AS n FROM procrastinate_jobs WHERE queue_name = %(q)s "
            "GROUP BY status",
            q=self.queue,
        )
        by = {r["status"]: int(r["n"]) for r in rows}
        hosts = await self.app.connector.execute_query_all_async(
            "SELECT DISTINCT host FROM fleet_units WHERE plan_id = %(p)s AND host IS NOT NULL ORDER BY host",
            p=self.plan.plan_id,
        )
        # Every session of this plan an apply started was registered under its id (register_session).
        got = await self.app.connector.execute_query_one_async(
            "SELECT count(*) AS n FROM sessions WHERE plan_id = %(p)s AND status = %(s)s",
            p=self.plan.plan_id,
            s=SessionState.APPLIED.value,
        )
        applied = int(got["n"])
        return FleetSummary(
            queue=self.queue,
            units=sum(by.values()),
            units_done=by.get("succeeded", 0),
            units_failed=by.get("failed", 0),
            units_run_here=self.units_run,
            sessions=len(self.plan.sessions),
            applied=applied,
            hosts=tuple(h["host"] for h in hosts),
            budget=self.budget.describe(),
        )

    def _all_applied(self) -> None:
        for s in self.plan.sessions:
            self.report.sessions.append(
                SessionResult(s.action_id, s.label, Result.NOOP, message="already applied")
            )

    # -- a unit (on Procrastinate's worker thread) ----------------------------------------------------

    def unit(self, context: procrastinate.JobContext, plan_id: str, round: int, unit: int) -> None:
        if self.stop.is_set() or self.fatal is not None:
            raise _Again("this worker is stopping")
        if plan_id != self.plan.plan_id:
            raise _Again(f"a unit of plan {plan_id[:12]}, not {self.plan.plan_id[:12]}")
        try:
            with StateStore(create=False, opener=statepg.opener(self.url)) as store:
                self._unit(store, round, unit, context.job.id)
        except _Again:
            raise
        except KeyboardInterrupt:
            raise _Again("interrupted") from None
        except BaseException as exc:
            # A failure of the ledger or of this host: the unit goes back for another worker or a rerun.
            with self.lock:
                if self.fatal is None:
                    self.fatal = exc
            self._stop_worker()
            raise _Again(str(exc)) from None

    def _pace(self, store: StateStore, kind: str, n: int, per_s: float) -> None:
        """Wait for ``n`` of the fleet's ``per_s`` a second (a generic cell rate: one row per kind in
        ``fleet_pace`` holds when the next may start, on the server's clock, for every host)."""
        cost = n / per_s
        row = store.db.execute(
            "INSERT INTO fleet_pace (kind, next_at) VALUES (?, clock_timestamp() + make_interval(secs => ?)) "
            "ON CONFLICT (kind) DO UPDATE SET next_at = "
            "greatest(fleet_pace.next_at, clock_timestamp()) + make_interval(secs => ?) "
            "RETURNING extract(epoch FROM next_at - clock_timestamp())::float8",
            (f"{kind}:{self.plan.plan_id}", cost, cost),
        ).fetchone()
        wait = float(row[0]) - cost if row else 0.0
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            if self.stop.is_set():
                raise KeyboardInterrupt
            time.sleep(min(left, 0.2))

    def _progress(self, unit: int, done: int, total: int) -> None:
        """This process's files: its finished units' and those of the units in flight (several with
        ``--workers``), reported from one thread at a time."""
        with self.lock:
            self.in_flight[unit] = (done, total)
            d = self.done_files + sum(x for x, _ in self.in_flight.values())
            t = self.done_files + sum(y for _, y in self.in_flight.values())
            assert self.opts.progress is not None
            self.opts.progress(d, t)

    def _govern(self, sub: Plan) -> None:
        """Wait, before a unit, while XNAT is busy building or the disk it writes to is nearly full
        (``settings.Budget``): the worker's heartbeat goes on meanwhile, and Ctrl-C still stops it."""
        where = [p for p in (sub.xnat.prearchive, sub.xnat.inbox) if p]
        said = ""
        while True:
            why = ""
            for path in where:
                free = _free_gb(path)
                if free is not None and free < self.budget.min_free_gb:
                    why = f"{free:.1f} GB free under {path}, below {self.budget.min_free_gb:g} GB"
            if not why and sub.xnat.database is not None:
                with db.connect(db.resolve_dsn(sub.xnat.database)) as conn, conn.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM xdat_search.prearchive WHERE status = ANY(%s)",
                        (list(BUILDING_STATUSES),),
                    )
                    got = cur.fetchone()
                    building = int(got[0]) if got else 0
                if building >= self.budget.building:
                    why = f"XNAT is building {building} session(s), the governor's limit is {self.budget.building}"
            if not why:
                return
            if why != said:
                log.warning("waiting before the next unit: %s", why)
                if self.opts.status is not None:
                    self.opts.status(f"waiting: {why}")
                said = why
            if self.stop.is_set():
                raise _Again("this worker is stopping")
            time.sleep(max(self.fleet.poll_s, 1.0))

    @contextlib.contextmanager
    def _build_slot(self, slots: _Slots, side: StateStore, kind: str, files: int) -> Iterator[None]:
        """One of the fleet's build slots around a REST build or archive (``kind``) of ``files``, timed
        and recorded in ``fleet_builds`` when it succeeds: the governor's reading of XNAT's pace."""
        limit = self._build_slots(side)
        with slots.held("builds", limit):
            began = time.monotonic()
            yield
            took = time.monotonic() - began
        side.db.execute(
            "INSERT INTO fleet_builds (plan_id, kind, bucket, files, started, seconds, slots, host, pid) "
            "VALUES (?, ?, ?, ?, clock_timestamp() - make_interval(secs => ?), ?, ?, ?, ?)",
            (self.plan.plan_id, kind, size_bucket(files), files, took, took, limit, self.host, self.pid),
        )

    def _build_slots(self, side: StateStore) -> int:
        """The fleet's build budget, or one slot while builds take ``slow_builds`` times as long as
        usual (read at most once a second per process; said once on stderr at each change)."""
        full = self.budget.builds
        if full <= 1:
            return full
        now = time.monotonic()
        with self.lock:
            if self.build_limit is not None and now - self.build_limit[0] < 1.0:
                return self.build_limit[1]
        ratio = self.build_times.slowdown(side)
        limit = 1 if ratio is not None and ratio >= self.budget.slow_builds else full
        with self.lock:
            before = self.build_limit[1] if self.build_limit else full
            self.build_limit = (now, limit)
        if limit != before:
            if limit == 1:
                log.warning(
                    "builds take %.1f× as long as this plan's first ones: one build or archive at a time "
                    "across the fleet until they recover",
                    ratio,
                )
            else:
                log.warning("builds are back to their usual time: up to %d at once again", full)
        return limit

    def _unit(self, store: StateStore, rnd: int, unit: int, job_id: int | None) -> None:
        key = unit_key(self.schema, self.plan.plan_id, rnd, unit)
        # The unit's lock: held by a worker the lease gave up on but still connected (slow, not dead),
        # this one never acts beside it. Nor does it wait for it: the unit goes back to the queue (a
        # retry, ``poll_s`` later) and this worker takes the other units meanwhile.
        if not store.db.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()[0]:
            raise _Again(f"unit {unit} is still held by a slow worker")
        row = store.db.execute(
            "SELECT sessions_json FROM fleet_units WHERE plan_id = ? AND round = ? AND unit = ?",
            (self.plan.plan_id, rnd, unit),
        ).fetchone()
        if row is None:
            raise StateError(f"unit {unit} of round {rnd} is not in fleet_units; rerun `xnatmigrate apply`")
        store.db.execute(
            # The server's clock, one for every host.
            "UPDATE fleet_units SET job_id = ?, host = ?, pid = ?, pid_start = ?, started = now(), finished = NULL "
            "WHERE plan_id = ? AND round = ? AND unit = ?",
            (job_id, self.host, self.pid, self.pid_start, self.plan.plan_id, rnd, unit),
        )
        sub = dataclasses.replace(
            self.plan, sessions=tuple(self.plan.sessions[i] for i in json.loads(row[0]))
        )
        slots = _Slots(store, self.schema, self.plan.plan_id, self.stop, self.fleet.poll_s, self.opts.status)
        self._govern(sub)
        associations: list[int] = []
        jobs = self.opts.jobs
        if any(isinstance(s, CstoreSession) for s in sub.sessions):
            # As many of the fleet's associations as this host's --jobs asks, at least one.
            associations = slots.take("associations", self.budget.associations, want=jobs or 1)
            jobs = len(associations)
        opts = dataclasses.replace(
            self.opts,
            jobs=jobs,
            stop=self.stop,
            progress=(lambda d, t: self._progress(unit, d, t)) if self.opts.progress else None,
            hold_build=lambda kind, files: self._build_slot(slots, side, kind, files),
            pace_inserts=lambda n: self._pace(side, "inserts", n, self.budget.inserts_per_s),
        )
        # The pace and the build times are kept on a connection of its own: apply calls them inside
        # the ledger's group transaction, and a row held there would hold every other worker's pace
        # until that commits.
        side = StateStore(create=False, opener=statepg.opener(self.url))
        try:
            report = apply_plan(sub, store, opts)
        finally:
            side.close()
            slots.give(associations)
        changed = report.changed
        failures = [[r.action_id, r.label, r.message or ""] for r in report.failures]
        store.db.execute(
            "UPDATE fleet_units SET finished = now(), outcome = ?, seconds = ?, xnat_seconds = ?, changed = ?, "
            "failed = ?, failures_json = ? WHERE plan_id = ? AND round = ? AND unit = ?",
            (
                "stopped" if report.stopped else ("failed" if failures else "done"),
                report.seconds,
                report.xnat_seconds,
                changed,
                len(failures),
                json.dumps(failures) if failures else None,
                self.plan.plan_id,
                rnd,
                unit,
            ),
        )
        store.db.execute("SELECT pg_advisory_unlock(?)", (key,))
        with self.lock:
            self.report.sessions.extend(report.sessions)
            self.report.xnat_seconds += report.xnat_seconds
            self.done_files += sum(s.file_count for s in sub.sessions)
            self.in_flight.pop(unit, None)
            self.units_run += 1
            if report.stopped and self.report.stopped is None:
                self.report.stopped = report.stopped
        if report.stopped:
            # A shared resource failed (XNAT, its database, a disk): every unit would fail alike here.
            self.stop.set()
            self._stop_worker()
            raise _Again(report.stopped)


def _client_keepalives(lease_s: float) -> dict[str, Any]:
    """libpq's client-side probes of an idle connection, and its bound on unacknowledged data: a
    network cut surfaces as an error within about a lease, not after the kernel's two hours."""
    idle = max(1, int(lease_s // 3))
    return {
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": max(1, idle // 3),
        "keepalives_count": 3,
        "tcp_user_timeout": int(lease_s * 1000),
    }


def _free_gb(path: str) -> float | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / 1e9


def _queue_error(exc: BaseException, target: statepg.StateUrl) -> StateError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StateError(
        f"the work queue in the state database {target.where} failed ({first}); check that PostgreSQL is "
        "running, then rerun `xnatmigrate apply`: every step recorded is kept"
    )


def work(
    plan: Plan, url: str, opts: Options, fleet: FleetOptions | None = None, workers: int | None = None
) -> ApplyReport:
    """Take units of ``plan`` from the ledger's queue (queueing a round first when none is under way)
    until none is left to do or doing; the caller checked the plan fresh and holds the apply lock
    shared (``join``). KeyboardInterrupt after a Ctrl-C, once the unit in flight went back."""
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    return _Fleet(plan, url, opts, fleet or FleetOptions.from_env(workers)).run()


# --------------------------------------------------------------------------------------------
# status across hosts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStatus:
    """One process that took units of the current round: where, what it did, how fast."""

    host: str
    pid: int
    units_done: int
    running: tuple[int, ...]  # units it holds now
    files_done: int
    seconds: float  # inside its units
    xnat_seconds: float  # of which waiting on XNAT
    last_seen: str | None  # its latest start or finish of a unit

    @property
    def files_per_s(self) -> float:
        return self.files_done / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ErrorCause:
    """Sessions of the plan that failed, and are failed still, for one cause (``cause_of``)."""

    cause: str
    sessions: int
    example: str  # one of their messages, whole
    labels: tuple[str, ...]  # the first few sessions


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"\S*/\S*")
_NUMBERS = re.compile(r"\d+(?:[.:_-]\d+)*")


def cause_of(message: str, label: str = "") -> str:
    """A failure's message without what names its session (the session, paths, quoted values, numbers,
    UIDs), and without the advice after its first '; ': the same failure on two sessions reads alike."""
    head = message.split("; ", 1)[0]
    if label:
        head = head.replace(label, "<session>")
    head = _QUOTED.sub("…", head)
    head = _PATHLIKE.sub("…", head)
    return _NUMBERS.sub("#", head).strip()


def causes(failures: Sequence[tuple[str, str]], shown: int = 3) -> tuple[ErrorCause, ...]:
    """``failures`` as (label, message) grouped by cause, the most sessions first."""
    by: dict[str, list[tuple[str, str]]] = {}
    for label, message in failures:
        by.setdefault(cause_of(message, label), []).append((label, message))
    return tuple(
        ErrorCause(c, len(got), got[0][1], tuple(label for label, _ in got[:shown]))
        for c, got in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    )


@dataclass(frozen=True)
class FleetStatus:
    """The current plan's latest round of units, on every host: units by state, files, rate, ETA."""

    plan_id: str
    round: int
    queue: str
    units: dict[str, int]  # Procrastinate's job states: todo, doing, succeeded, failed, …
    files: int
    files_done: int
    workers: tuple[WorkerStatus, ...]
    files_per_s: float  # the fleet's, over the wall time since the round's first unit started
    eta_s: float | None  # files left at that rate (None: no rate yet)
    xnat_share: float  # of the time inside units, the part spent waiting on XNAT
    budget: str | None  # the round's budget for XNAT (Budget.describe), as its first worker recorded it
    sessions: int | None  # the plan's (None: queued before they were recorded)
    sessions_by_state: dict[str, int]  # in the ledger, of this plan: applied, failed, in_progress, …
    errors: tuple[ErrorCause, ...]  # the sessions failed now, by cause, from every host's units
    builds_slowdown: float | None  # recent builds over the plan's first (the governor's reading)


def fleet_status(store: StateStore) -> FleetStatus | None:
    """The fleet's view of the ledger's current plan, or None when no fleet ever applied it."""
    plan_id = store.current_plan()
    if plan_id is None or not _has_table(store, "fleet_units"):
        return None
    row = store.db.execute("SELECT max(round) FROM fleet_units WHERE plan_id = ?", (plan_id,)).fetchone()
    if not row or row[0] is None:
        return None
    rnd = int(row[0])
    queue = queue_of(plan_id)
    units = {
        str(s): int(n)
        for s, n in store.db.execute(
            "SELECT status::text, count(*) FROM procrastinate_jobs WHERE queue_name = ? GROUP BY status",
            (queue,),
        ).fetchall()
    }
    rows = store.db.execute(
        "SELECT unit, files, host, pid, started::text, finished::text, seconds, xnat_seconds, "
        "extract(epoch FROM now() - min(started) OVER ())::float8 "
        "FROM fleet_units WHERE plan_id = ? AND round = ? ORDER BY unit",
        (plan_id, rnd),
    ).fetchall()
    per: dict[tuple[str, int], dict[str, Any]] = {}
    total = done = 0
    inside = waiting = 0.0
    wall = 0.0
    for unit, files, host, pid, started, finished, seconds, xnat_seconds, since in rows:
        total += files
        wall = float(since or 0.0)
        if host is None:
            continue
        w = per.setdefault(
            (host, pid), {"done": 0, "running": [], "files": 0, "seconds": 0.0, "xnat": 0.0, "last": None}
        )
        w["last"] = max(filter(None, (w["last"], started, finished)), default=None)
        if finished:
            done += files
            w["done"] += 1
            w["files"] += files
            w["seconds"] += seconds or 0.0
            w["xnat"] += xnat_seconds or 0.0
            inside += seconds or 0.0
            waiting += xnat_seconds or 0.0
        else:
            w["running"].append(unit)
    rate = done / wall if wall > 0 and done else 0.0
    got = store.db.execute("SELECT value FROM meta WHERE key = ?", (f"fleet_budget:{plan_id}",)).fetchone()
    planned = store.db.execute(
        "SELECT value FROM meta WHERE key = ?", (f"fleet_sessions:{plan_id}",)
    ).fetchone()
    by_state = {
        str(st): int(n)
        for st, n in store.db.execute(
            "SELECT status, count(*) FROM sessions WHERE plan_id = ? GROUP BY status", (plan_id,)
        ).fetchall()
    }
    # Each session's latest failure, any round, kept only while the ledger still has it failed.
    latest: dict[str, tuple[str, str]] = {}
    recorded = store.db.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'fleet_units' AND column_name = 'failures_json'"
    ).fetchone()
    for (raw,) in (
        ()
        if not recorded
        else store.db.execute(
            "SELECT failures_json FROM fleet_units WHERE plan_id = ? AND failures_json IS NOT NULL "
            "ORDER BY round, unit",
            (plan_id,),
        ).fetchall()
    ):
        for action_id, label, message in json.loads(raw):
            latest[action_id] = (label, message)
    still = store.states_of(list(latest))
    failed = [v for k, v in latest.items() if still.get(k) is SessionState.FAILED]
    return FleetStatus(
        plan_id=plan_id,
        round=rnd,
        queue=queue,
        units=units,
        files=total,
        files_done=done,
        workers=tuple(
            WorkerStatus(h, p, w["done"], tuple(w["running"]), w["files"], w["seconds"], w["xnat"], w["last"])
            for (h, p), w in sorted(per.items())
        ),
        files_per_s=rate,
        eta_s=(total - done) / rate if rate else None,
        xnat_share=waiting / inside if inside else 0.0,
        budget=settings.Budget(**json.loads(got[0])).describe() if got else None,
        sessions=int(planned[0]) if planned else None,
        sessions_by_state=by_state,
        errors=causes(failed),
        builds_slowdown=BuildTimes(plan_id).slowdown(store) if _has_table(store, "fleet_builds") else None,
    )


def _has_table(store: StateStore, name: str) -> bool:
    row = store.db.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])
