"""Carry out a saved plan, session by session, step by step: check → act → record.

Invariants:
- Each step is recorded in the state ledger right after it takes effect; before acting, a step
  checks whether its effect is already there (a crash may have lost the record) and records a
  ``noop`` with the reason if so. A rerun therefore resumes wherever the last run stopped, and
  the end state equals an uninterrupted run's.
- Prearchive order: stage (outside XNAT's view) → publish (one atomic rename) → insert the row →
  build → archive. A row is never inserted before its folder is complete in the prearchive.
- A failure in one session is reported and the others go on, except failures of a shared
  resource (database, XNAT, disk), which stop the run: every later session would fail the same way.
- Group commit (issue 13): consecutive sessions of one route form a group (``grouping``) that shares
  one staging pool and durability barrier, one fsync round for its renames, one database transaction
  for its rows, one send over shared associations, and one ledger commit per phase. Every check is
  still per session, so a kill -9 anywhere in a group equals an uninterrupted run; the ledger is
  committed before the first publish (the files record) and before each archive POST (not idempotent).
- Staging ahead (issue 13): a prearchive group's files are staged on a background thread while the
  main thread publishes, inserts and builds the group before it, one group ahead at most; an inbox
  group's are linked while XNAT imports the group before it (issue 14). That thread
  does file work only; every check before it and every record after it is the main thread's, so the
  ledger's order per session is unchanged. The group's rows are checked in one statement and
  inserted in one round trip (each session's lock and guarded INSERT as plan.sql prints them), then
  read back in one statement to tell each session's outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    ApplyError,
    DatabaseError,
    DicomSendError,
    ReceiverError,
    SessionConflict,
    SettingError,
    StalePlanError,
    XnatMigrateError,
    XnatRestError,
)
from ..model import (
    Build,
    CstoreSession,
    InboxSession,
    Outcome,
    Plan,
    PlannedFile,
    PlannedSession,
    PrearchiveSession,
    Result,
    SessionState,
    Step,
    unreachable,
)
from ..state import StateStore
from . import files, grouping, recheck, settings
from .connections import Connections
from .xnat import ARCHIVE_TIMEOUT, OutcomeUnknown, XnatClient, pauses

if TYPE_CHECKING:  # imported where a route needs them: the inbox route runs without psycopg and pydicom
    from .. import anonymize, dicomedit
    from . import db

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]

# Errors of shared resources: stop the run rather than fail every remaining session alike.
# Row statuses while XNAT archives a session (§3 PrearcStatus): the outcome is awaited, never re-posted.
_ARCHIVING = frozenset({"QUEUED_ARCHIVING", "ARCHIVING", "_ARCHIVING"})

_OWN_STATES = 2000  # up to this many sessions, their states are read by id, not the whole ledger
_FATAL = (DatabaseError, XnatRestError, ReceiverError, files.DiskError, SettingError)

# Fault injection for the crash tests (tests/integration/test_apply_crash.py): SIGKILL this process
# at a chosen point, as a power cut would. "after:STEP[:N]" once STEP is recorded (the N-th time),
# "before-record:STEP[:N]" after STEP acted but before its record, "files:N" after N files staged.
_CRASH_ENV = "XNATMIGRATE_TEST_CRASH"
# The same points, SIGSTOP instead, once per process: a worker slow (not dead) past its lease
# (tests/integration/test_fleet.py continues it with SIGCONT).
_PAUSE_ENV = "XNATMIGRATE_TEST_PAUSE"
_PAUSED = threading.Event()


class _Crash:
    def __init__(self, spec: str | None, sig: signal.Signals = signal.SIGKILL) -> None:
        kind, _, rest = (spec or "").partition(":")
        what, _, n = rest.partition(":")
        self.kind, self.what, self.sig = kind, what, sig
        self.n = int(n or 1) if kind != "files" else int(what or 0)
        self.seen = 0

    def hit(self, kind: str, what: str = "") -> None:
        if self.kind != kind or (kind != "files" and what != self.what):
            return
        self.seen += 1
        if self.seen >= self.n:
            self._fire()

    def files(self, done: int) -> None:
        if self.kind == "files" and done >= self.n:
            self._fire()

    def _fire(self) -> None:
        if self.sig is signal.SIGSTOP:
            if _PAUSED.is_set():
                return
            _PAUSED.set()
        os.kill(os.getpid(), self.sig)


@dataclass
class SessionResult:
    action_id: str
    label: str
    outcome: Result
    steps: list[tuple[Step, Outcome]] = field(default_factory=list)
    message: str | None = None
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class FleetSummary:
    """Where the fleet stood when this worker left (``execute.fleet``): its queue's units by state and
    the plan's sessions applied, on every host."""

    queue: str
    units: int
    units_done: int
    units_failed: int
    units_run_here: int
    sessions: int
    applied: int
    hosts: tuple[str, ...]
    budget: str  # what the fleet may ask of XNAT at once (fleet.Budget.describe)


@dataclass
class ApplyReport:
    plan_id: str
    sessions: list[SessionResult] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str | None = None
    # Of ``seconds``, waiting on XNAT's REST API (its requests and the pauses of polls: XNAT's building,
    # importing, archiving): the rest is this host's own work.
    xnat_seconds: float = 0.0
    # Set when the ledger is shared (PostgreSQL): this process was one worker of a fleet.
    fleet: FleetSummary | None = None

    @property
    def failures(self) -> list[SessionResult]:
        return [s for s in self.sessions if s.outcome is Result.FAILED]

    @property
    def changed(self) -> int:
        return sum(1 for s in self.sessions if s.outcome is Result.DONE)


@dataclass
class Options:
    jobs: int | None = None
    poll: float = 1.0
    send_retries: int = 3
    progress: Progress | None = None
    # What the run waits on now, for the progress line ("" once working again).
    status: Callable[[str], None] | None = None
    on_session: Callable[[SessionResult], None] | None = None
    # Set from another thread (a fleet worker's Ctrl-C): the run stops before its next group, as
    # Ctrl-C stops it on the main thread: KeyboardInterrupt, every step recorded so far kept.
    stop: threading.Event | None = None
    # A fleet's budget for XNAT (execute.fleet): entered around each REST build and archive, so the
    # builds in flight across every host stay within it. None: no limit but this run's own pace.
    # Called with the step ("build" or "archive") and the session's files: its duration is the pace.
    hold_build: Callable[[str, int], contextlib.AbstractContextManager[None]] | None = None
    # Likewise before a group's rows go into XNAT's table: waits until the fleet's rate allows them.
    pace_inserts: Callable[[int], None] | None = None


class _Runner:
    def __init__(self, plan: Plan, store: StateStore, opts: Options) -> None:
        self.plan = plan
        self.store = store
        self.opts = opts
        self.connections = Connections(plan.xnat)
        # A pass over the plan (each session parsed from plan.json) only for a progress to show.
        self.total_files = sum(s.file_count for s in plan.sessions) if opts.progress else 0
        self.done_files = 0
        self.ahead: list[_Ahead] = []  # stagings in flight (their files count in the progress)
        self.unpruned: list[Path] = []  # published sessions' staging folders whose parents are left
        self.shown = threading.RLock()  # progress and its counts, shared with the staging thread
        self.crash = _Crash(os.environ.get(_CRASH_ENV))
        self.pause = _Crash(os.environ.get(_PAUSE_ENV), signal.SIGSTOP)

    # -- shared resources, opened lazily so a finished plan touches nothing ----------------------

    def conn(self) -> db.Connection:
        return self.connections.db()

    def client(self) -> XnatClient:
        client = self.connections.rest()
        if self.opts.status is not None:
            client.on_pause = self.waiting
        return client

    def waiting(self) -> None:
        """Between two polls of XNAT (building, importing, archiving): the progress line says so until
        the step is recorded or the next files are done."""
        assert self.opts.status is not None
        self.opts.status("waiting on XNAT")

    # -- recording --------------------------------------------------------------------------------

    def record(self, res: SessionResult, step: Step, outcome: Outcome, detail: Any = None) -> None:
        self.crash.hit("before-record", step)
        self.store.record_step(res.action_id, step, outcome, detail)
        res.steps.append((step, outcome))
        if self.opts.status is not None:
            self.opts.status("")  # a step done: whatever it waited on is over
        self.crash.hit("after", step)
        self.pause.hit("after", step)

    def advance(self, n: int) -> None:
        with self.shown:
            self.done_files += n
        if self.opts.status is not None:
            self.opts.status("")
        self.show()

    def show(self) -> None:
        """Progress: files finished, those of a staging running ahead included (any thread may call)."""
        with self.shown:
            done = self.done_files + sum(a.done for a in self.ahead)
            self.crash.files(done)
            if self.opts.progress:
                self.opts.progress(done, self.total_files)

    # -- per session ------------------------------------------------------------------------------

    def run(self) -> ApplyReport:
        """Every group in plan order. A prearchive or inbox group's staging runs ahead on a background
        thread (``_Ahead``) while the main thread finishes the group before it (publish, insert, build;
        or the import requests and the waits for XNAT's importer): one
        group ahead at most, and every check and record stays on the main thread, in the order a run
        without it makes them."""
        report = ApplyReport(self.plan.plan_id)
        started = time.monotonic()
        self.store.begin_plan(self.plan.plan_id)
        limits = grouping.Limits.from_settings()
        begun: list[_Group] = []  # begun, not yet finished: at most two, the older one finishing
        try:
            self.check_site_script()
            for sessions in grouping.groups(self.plan.sessions, limits):
                if self.opts.stop is not None and self.opts.stop.is_set():
                    raise KeyboardInterrupt
                g = self.open_group(sessions, report)
                if begun and begun[-1].ahead is not None:
                    begun[-1].ahead.wait()  # one group ahead at most: its staging is over before ours starts
                if g.items and isinstance(g.items[0].s, PrearchiveSession | InboxSession):
                    with self.store.group():
                        self.begin(g, report)
                    begun.append(g)
                    if len(begun) > 1:
                        self.finish(begun[0], report)  # overlaps g's staging
                        begun.pop(0)
                else:
                    while begun:
                        self.finish(begun[0], report)
                        begun.pop(0)
                    self.finish(g, report)
            while begun:
                self.finish(begun[0], report)
                begun.pop(0)
        finally:
            # Stopped by an exception (Ctrl-C): staging ahead stops, its files stay for a rerun.
            for g in begun:
                if g.ahead is not None:
                    g.ahead.stop()
            for path in self.unpruned:
                files.prune_staging_parents(path)
            report.xnat_seconds = self.connections.xnat_seconds  # before close forgets the client
            self.connections.close()
            report.seconds = time.monotonic() - started
        return report

    def open_group(self, sessions: list[PlannedSession], report: ApplyReport) -> _Group:
        """The group's results, and an item for each session this run still has to carry out.

        The ledger is asked for the group's own sessions (one statement), as the group is reached: no
        pass over a plan read from disk session by session, nor over the whole table for a fleet's unit.
        """
        g = _Group()
        known = self.store.states_of(s.action_id for s in sessions)
        applied = {a for a, st in known.items() if st is SessionState.APPLIED}
        for s in sessions:
            # files/bytes count what this run copied, linked or sent, not what the plan holds.
            res = SessionResult(s.action_id, s.label, Result.NOOP)
            report.sessions.append(res)
            g.results.append(res)
            if report.stopped:
                res.outcome, res.message = Result.SKIPPED, "not attempted: the run stopped earlier"
            elif s.action_id in applied:
                res.message = "already applied"
                self.advance(s.file_count)
            else:
                g.items.append(_Item(s, res, resumed=s.action_id in known))
        return g

    def register(self, items: list[_Item], report: ApplyReport) -> None:
        for it in items:
            with self.attempt(it, report):
                self.store.register_session(self.plan.plan_id, it.s, self.plan.xnat)
                it.done = self.store.steps_done(it.s.action_id)

    def begin(self, g: _Group, report: ApplyReport) -> None:
        """A prearchive or inbox group up to its staging, which starts in the background."""
        self.register(g.items, report)
        if isinstance(g.items[0].s, InboxSession):
            g.stage = self.inbox_prestage(g.items, report)
        else:
            g.stage = self.prearchive_prestage(g.items, report)
        if g.stage:
            g.ahead = self.stage_start(g.stage)
        g.begun = True

    def finish(self, g: _Group, report: ApplyReport) -> None:
        """The rest of a group: each phase for every session, then each session's remaining steps."""
        try:
            if g.items:
                # Group commit: the ledger commits once per phase of the group, not per step.
                with self.store.group():
                    self.run_group(g, report)
        finally:
            if self.opts.on_session:
                for res in g.results:
                    self.opts.on_session(res)

    def run_group(self, g: _Group, report: ApplyReport) -> None:
        """Each phase for every session of the group, then each session's remaining steps in turn."""
        items = g.items
        if not g.begun:
            self.register(items, report)
        match items[0].s:
            case PrearchiveSession():
                assert g.begun, "run() begins every prearchive group before it finishes it"
                self.prearchive_group(g, report)
            case CstoreSession():
                self.cstore_group(items, report)
            case InboxSession():
                assert g.begun, "run() begins every inbox group before it finishes it"
                self.inbox_group(g, report)
            case _:
                unreachable(items[0].s)
        for it in items:
            if not it.alive:
                continue
            if report.stopped:
                it.alive = False
                it.res.outcome = Result.SKIPPED
                it.res.message = "not finished: the run stopped earlier; rerun apply to resume it"
                continue
            with self.attempt(it, report):
                match it.s:
                    case PrearchiveSession():
                        s = it.s
                        self.build_and_archive(s, it.res, it.done, s.project, s.timestamp, s.session)
                    case CstoreSession():
                        self.cstore_finish(it.s, it.res, it.done)
                    case InboxSession():
                        self.inbox_finish(it.s, it.res, it.done)
                    case _:
                        unreachable(it.s)
                self.store.set_session_status(it.s.action_id, SessionState.APPLIED)
                if any(o is Outcome.DONE for _, o in it.res.steps):
                    it.res.outcome = Result.DONE
                elif it.resumed:
                    # An earlier run was interrupted after its last step took effect: this run
                    # found everything done and finished the session; that is not "nothing to do".
                    it.res.outcome = Result.DONE
                    it.res.message = "finished: an interrupted earlier run had carried out its steps"
                else:
                    it.res.outcome = Result.NOOP

    @contextlib.contextmanager
    def attempt(self, it: _Item, report: ApplyReport) -> Iterator[None]:
        """A failure inside fails this session only (or, for a shared resource, stops the run)."""
        try:
            yield
        except XnatMigrateError as exc:
            self.fail(it, exc, report)

    def fail(self, it: _Item, exc: XnatMigrateError, report: ApplyReport) -> None:
        it.alive = False
        it.res.outcome, it.res.message = Result.FAILED, str(exc)
        self.store.set_session_status(it.s.action_id, SessionState.FAILED)
        if isinstance(exc, _FATAL) and not report.stopped:
            report.stopped = str(exc)

    # -- the prearchive route, a group at a time --------------------------------------------------

    def prearchive_prestage(self, items: list[_Item], report: ApplyReport) -> list[_Item]:
        """The group's sessions that need staging (checked per session: published or staged already)."""
        root = self.plan.xnat.prearchive
        assert root, "planner guarantees a prearchive root for prearchive sessions"
        to_stage: list[_Item] = []
        for it in items:
            if not it.alive:
                continue
            s = _prearchive(it)
            with self.attempt(it, report):
                it.staging, it.final = files.staging_dir(root, s), files.final_dir(root, s)
                # 1. stage — check: already published (by this or a crashed run) or staged and recorded.
                if Step.PUBLISH in it.done or (it.final.exists() and not it.staging.exists()):
                    if Step.STAGE not in it.done:
                        reason = {"reason": "session folder already published"}
                        self.record(it.res, Step.STAGE, Outcome.NOOP, reason)
                    self.advance(s.file_count)
                elif Step.STAGE in it.done and it.staging.exists():
                    self.advance(s.file_count)
                else:
                    to_stage.append(it)  # its sources are checked where it is staged (files.stage_batch)
        return to_stage

    def prearchive_group(self, g: _Group, report: ApplyReport) -> None:
        """Stage → (one barrier) → publish → (one fsync round) → insert (one transaction), per group.

        Each phase checks before it acts, per session, exactly as for a group of one; only the
        durability is shared. Records made before the first publish are committed before it: the
        files record must exist for every published folder.
        """
        items = g.items
        if g.ahead is not None:
            self.stage_record(g.stage, g.ahead, report)
        self.store.commit()
        # A fleet's budget of rows a second: waited for before the group's folders enter XNAT's view,
        # so a folder never waits for its row.
        to_insert = sum(1 for it in items if it.alive and Step.INSERT not in it.done)
        if to_insert and self.opts.pace_inserts is not None:
            self.opts.pace_inserts(to_insert)

        # 2. publish — one atomic rename each into XNAT's view, only once the row is known to be
        # writable (reachable database, INSERT privilege, no other session of the study in the way);
        # then one fsync round makes the group's renames durable.
        pending: list[Path] = []
        published: list[tuple[_Item, Outcome]] = []
        # The rows of the whole group are checked in one read-only transaction.
        unchecked = [
            it for it in items if it.alive and Step.PUBLISH not in it.done and Step.INSERT not in it.done
        ]
        checked: dict[int, bool | XnatMigrateError] = {}
        if unchecked and not report.stopped:
            answers: list[bool | XnatMigrateError]
            from . import db  # psycopg: only for a route that writes XNAT's table

            try:
                answers = db.check_insertable_many(self.conn(), [_prearchive(it) for it in unchecked])
            except XnatMigrateError as exc:  # no connection: every session fails with it, as one by one
                answers = [exc] * len(unchecked)
            checked = {id(it): a for it, a in zip(unchecked, answers, strict=True)}
        for it in items:
            if not it.alive or report.stopped:
                continue
            if Step.PUBLISH in it.done:
                it.visible = True
                continue
            with self.attempt(it, report):
                answer = checked.get(id(it))
                if isinstance(answer, XnatMigrateError):
                    raise answer
                published.append((it, files.publish(it.staging, it.final, pending, prune=False)))
                it.visible = True
        try:
            files.fsync_dirs(pending)
        except OSError as exc:
            err = files.DiskError(
                f"{exc.strerror or exc} making published folders durable ({exc.filename}): check that "
                "disk, then rerun"
            )
            for it, _ in published:
                with self.attempt(it, report):
                    self.withdraw(_prearchive(it), it.res, it.staging, it.final, err)
            return
        for it, outcome in published:
            self.record(it.res, Step.PUBLISH, outcome, {"path": str(it.final)})
        # Their emptied staging parents are removed later, off the main thread (stage_start): they are
        # each session's own, and nothing of this run creates anything in them again (a withdrawn
        # session's folder makes them non-empty, and rmdir leaves a non-empty folder alone).
        self.unpruned.extend(it.staging for it, _ in published)

        # 3. insert — guarded INSERTs in one transaction; "noop" for a row already ours. A session
        # whose row is not written goes back out of XNAT's view: no folder stands there without its row.
        rows = [it for it in items if it.alive and it.visible and Step.INSERT not in it.done]
        if not rows:
            return
        from . import db

        try:
            outcomes = db.insert_rows(self.conn(), [_prearchive(it) for it in rows])
        except DatabaseError as exc:
            for it in rows:
                with self.attempt(it, report):
                    self.withdraw(_prearchive(it), it.res, it.staging, it.final, exc)
            return
        for it, got in zip(rows, outcomes, strict=True):
            s = _prearchive(it)
            with self.attempt(it, report):
                if isinstance(got, SessionConflict):
                    self.withdraw(s, it.res, it.staging, it.final, got)
                else:
                    self.record(it.res, Step.INSERT, got, {"timestamp": s.timestamp, "project": s.project})

    def check_site_script(self) -> None:
        """The plan pinned XNAT's site script: refuse to apply it once XNAT's differs (the files would
        not be what XNAT's receiver makes of them now). Asked only while a session still needs it."""
        if not self.plan.scripts:
            return
        from .. import anonymize

        pinned = next((sc for sc in self.plan.scripts if sc.name == anonymize.SITE_SCRIPT_NAME), None)
        if pinned is None:
            return
        # A fleet's unit asks for its own sessions; a whole plan reads the table.
        sessions = self.plan.sessions
        states = (
            self.store.states_of(s.action_id for s in sessions)
            if len(sessions) <= _OWN_STATES
            else self.store.all_states()
        )
        applied = {a for a, st in states.items() if st is SessionState.APPLIED}
        if not any(
            isinstance(s, PrearchiveSession | CstoreSession) and anonymize.SITE_SCRIPT_NAME in s.anonymize
            for s in self.plan.sessions
            if s.action_id not in applied
        ):
            return
        text = self.client().site_anonymization_script()
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != pinned.sha256:
            raise StalePlanError(
                "XNAT's site anonymisation script (GET /xapi/anonymize/site) changed since the plan; "
                "re-run `xnatmigrate plan` and review what the new script does"
            )

    def editors(self, sessions: list[PrearchiveSession]) -> dict[str, files.Editor]:
        """The de-identification of each session with ``anonymize`` scripts (anonymize.edit_bytes with
        its labels and the secret from the environment), by action_id."""
        out: dict[str, files.Editor] = {}
        sessions = [s for s in sessions if s.anonymize]
        if not sessions:
            return out
        from .. import anonymize, dicomedit

        scripts = {sc.name: sc for sc in self.plan.scripts}
        secret = os.environ.get(dicomedit.SECRET_ENV)
        for s in sessions:
            chain = anonymize.chain_of(s.anonymize, scripts)
            labels = anonymize.variables(s.project, s.subject, s.session)

            def edit(
                f: PlannedFile,
                data: bytes,
                chain: dicomedit.ScriptChain = chain,
                labels: dict[str, str] = labels,
            ) -> bytes:
                return anonymize.edit_bytes(chain, data, labels, secret, f.source)

            out[s.action_id] = edit
        return out

    def cstore_edit(self, s: CstoreSession) -> anonymize.SessionEdit | None:
        """The de-identification of a C-STORE session's files as the sender applies it, in memory, to
        each file before it writes the routing element (None: no scripts, files sent as stored)."""
        if not s.anonymize:
            return None
        from .. import anonymize, dicomedit

        return anonymize.session_edit(
            s.anonymize,
            {sc.name: sc for sc in self.plan.scripts},
            anonymize.variables(s.project, s.subject, s.session),
            os.environ.get(dicomedit.SECRET_ENV),
            anonymize.cstore_kept(s.routing),
        )

    def stage_start(self, group: list[_Item]) -> _Ahead:
        """The group's files staged on a background thread (``files.stage_batch``: one pool, one barrier)."""
        batch = [(_staged(it), it.staging, _staged(it).transfer) for it in group]
        editors = self.editors([it.s for it in group if isinstance(it.s, PrearchiveSession)])
        jobs = self.opts.jobs or files.DEFAULT_JOBS
        prune, self.unpruned = self.unpruned, []  # staging parents of sessions published before

        keywords = self.plan.scan_keywords

        def stage(cancel: threading.Event, progress: Progress) -> list[_StagedSession]:
            out = files.stage_batch(
                batch,
                jobs=jobs,
                file_mode=self.plan.xnat.file_mode,
                file_owner=self.plan.xnat.file_owner,
                progress=progress,
                editors=editors,
                cancel=cancel,
                prune=prune,
            )
            # The headers about to reach XNAT re-read here too, off the main thread. An edited file no
            # longer holds the header planned: its source's bytes are checked (bound to the plan by
            # stat before and after they were read), as for C-STORE.
            done: list[_StagedSession] = []
            for it, staged in zip(group, out, strict=True):
                if isinstance(staged, XnatMigrateError):
                    done.append((staged, []))
                    continue
                s = _staged(it)
                edited = isinstance(s, PrearchiveSession) and bool(s.anonymize)
                # A link to the inode the plan's scan read, its ctime unmoved until the link was made,
                # holds the planned header (``files.StagedFile.unchanged``): not read again.
                pairs = [
                    (f, f.source if edited else str(it.staging / f.dest))
                    for f, st in zip(s.files, staged, strict=True)
                    if not st.unchanged
                ]
                try:
                    done.append((staged, recheck.changed(pairs, keywords)))
                except XnatMigrateError as exc:
                    done.append((exc, []))
            return done

        ahead = _Ahead(stage, sum(it.s.file_count for it in group), self.show)
        with self.shown:
            self.ahead.append(ahead)
        ahead.start()
        return ahead

    def stage_record(self, group: list[_Item], ahead: _Ahead, report: ApplyReport) -> None:
        """The staging's outcome per session, checked and recorded (main thread: the ledger's one writer)."""
        try:
            results = ahead.result()
        except XnatMigrateError as exc:
            for it in group:
                self.fail(it, exc, report)
            return
        finally:
            with self.shown:
                self.ahead.remove(ahead)
                self.done_files += ahead.files
        for it, (staged, changed) in zip(group, results, strict=True):
            s = _staged(it)
            with self.attempt(it, report):
                if isinstance(staged, XnatMigrateError):
                    raise staged
                self.refuse_changed(changed, s, it.staging)
                self.store.record_files(s.action_id, [(f.dest, f.source, f.size, f.sha256) for f in staged])
                size = sum(f.size for f in staged)
                it.res.files, it.res.bytes = len(staged), size
                detail: dict[str, Any] = {"files": len(staged), "bytes": size}
                if isinstance(s, InboxSession):
                    detail["path"] = str(it.staging)
                outcome = Outcome.DONE
                if Step.STAGE in it.done:
                    # An inbox folder staged by an earlier run, re-checked file by file (nothing re-copied
                    # that verified): the ledger says so instead of claiming new work.
                    outcome, detail["reason"] = Outcome.NOOP, "staged by an earlier run, re-checked"
                self.record(it.res, Step.STAGE, outcome, detail)

    def recheck_headers(
        self, pairs: list[tuple[PlannedFile, str]], s: PlannedSession, staging: Path | None = None
    ) -> None:
        """The headers about to reach XNAT are the ones planned; else that session fails, nothing sent or
        published (and what was staged is removed: it must never be reused)."""
        self.refuse_changed(recheck.changed(pairs, self.plan.scan_keywords), s, staging)

    def refuse_changed(self, bad: list[str], s: PlannedSession, staging: Path | None) -> None:
        """``recheck_headers`` once the headers were re-read: ``bad`` says what changed."""
        if not bad:
            return
        if staging is not None:
            files.discard_staged(staging)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StalePlanError(f"{bad[0]}{more}: {s.label} changed since the plan; re-run `xnatmigrate plan`")

    def withdraw(
        self,
        s: PrearchiveSession,
        res: SessionResult,
        staging: Path,
        final: Path,
        exc: XnatMigrateError,
    ) -> None:
        """The row could not be written after publishing: move the folder back to staging and say where."""
        try:
            files.unpublish(final, staging)
        except OSError as move_exc:
            raise ApplyError(
                f"{exc}; and the published folder {final} could not be moved back out of XNAT's view "
                f"({move_exc.strerror}): move it to {staging} by hand before XNAT restarts"
            ) from None
        self.record(res, Step.PUBLISH, Outcome.REVERTED, {"path": str(staging), "reason": str(exc)})
        raise type(exc)(f"{exc} (its folder was moved back out of XNAT's view to {staging})") from None

    def build_and_archive(
        self,
        s: PlannedSession,
        res: SessionResult,
        done: set[Step],
        project: str | None,
        ts: str,
        folder: str,
    ) -> None:
        # 4. build
        if Step.BUILD not in done:
            self.build(s, res, project, ts, folder)
        # 5. archive
        if s.archive and Step.ARCHIVE not in done:
            self.archive(s, res, project, ts, folder)

    def budget(self, step: str, s: PlannedSession) -> contextlib.AbstractContextManager[None]:
        return self.opts.hold_build(step, s.file_count) if self.opts.hold_build else contextlib.nullcontext()

    def build(self, s: PlannedSession, res: SessionResult, project: str | None, ts: str, folder: str) -> None:
        if s.build is Build.REST:
            with self.budget("build", s):
                self._build(s, res, project, ts, folder)
        else:
            self._build(s, res, project, ts, folder)

    def _build(
        self, s: PlannedSession, res: SessionResult, project: str | None, ts: str, folder: str
    ) -> None:
        match s.build:
            case Build.REST:
                client = self.client()
                row = client.prearchive_session(project, ts, folder)
                if row is not None and row.get("status") == "READY":
                    # Built already (a crash after the build): release it all the same, idempotently.
                    released = self.release(s)
                    self.record(res, Step.BUILD, Outcome.NOOP, {"status": "READY", "released": released})
                    return
                client.rebuild(project, ts, folder)
                row = client.wait_for_status(
                    project, ts, folder, timeout=s.build_timeout, poll=self.opts.poll
                )
                status = row.get("status")
                if status != "READY":
                    log = client.last_log(project, ts, folder)
                    self.record(res, Step.BUILD, Outcome.FAILED, {"status": status, "log": log})
                    raise ApplyError(
                        f"XNAT's build of {s.prearchive_uri} ended {status}: {log.strip()[:300] or 'no log'}; "
                        "fix the cause in XNAT (prearchive page → Rebuild), then rerun apply"
                    )
                released = self.release(s)
                self.record(res, Step.BUILD, Outcome.DONE, {"status": status, "released": released})
            case Build.SCHEDULER:
                self.record(
                    res, Step.BUILD, Outcome.NOOP, {"reason": "left to XNAT's SessionXMLRebuilder job"}
                )
            case Build.NONE:
                self.record(res, Step.BUILD, Outcome.NOOP, {"reason": "build: none"})
            case _:
                unreachable(s.build)

    def release(self, s: PlannedSession) -> bool:
        """The REST build is READY: prevent_auto_commit back to false on our row (prearchive route)."""
        if isinstance(s, PrearchiveSession) and self.plan.xnat.database is not None:
            from . import db

            return db.release_row(self.conn(), s) > 0
        return False

    def archive(
        self, s: PlannedSession, res: SessionResult, project: str | None, ts: str, folder: str
    ) -> None:
        if s.build is Build.SCHEDULER:
            self._archive(s, res, project, ts, folder)
        else:
            with self.budget("archive", s):
                self._archive(s, res, project, ts, folder)

    def _archive(
        self, s: PlannedSession, res: SessionResult, project: str | None, ts: str, folder: str
    ) -> None:
        if s.build is Build.SCHEDULER:
            # The scheduled build archives by itself (row autoarchive = AutoArchive, §3).
            self.record(
                res, Step.ARCHIVE, Outcome.NOOP, {"reason": "XNAT auto-archives after its scheduled build"}
            )
            return
        client = self.client()
        row = client.prearchive_session(project, ts, folder)
        if row is None or row.get("status", "") in _ARCHIVING:
            # Check: a crash after our POST leaves no row (archived) or one XNAT is still archiving;
            # the archive call is not idempotent, so learn the outcome instead of posting again.
            uri = self.archive_outcome(client, s, project, ts, folder)
            self.record(res, Step.ARCHIVE, Outcome.NOOP, {"reason": f"archived by an earlier run: {uri}"})
            return
        # The archive call is the one act that is not idempotent: every record made before it (the
        # build, the row) must be durable first, or a crash here would leave a rerun redoing them.
        self.store.commit()
        try:
            uri, finished = client.archive(project, ts, folder)
        except OutcomeUnknown as exc:
            # Never POST again: XNAT may be archiving it right now. Learn the outcome instead.
            log.warning("%s; polling XNAT for the outcome", exc)
            uri, finished = "", False
        except XnatRestError as exc:
            if exc.status in (400, 403, 404, 409):
                # XNAT refused this session (a label conflict, busy, no row): it fails, the run goes on.
                raise ApplyError(f"{exc}; fix it in XNAT, then rerun apply") from None
            raise
        if not finished:
            # A 303 (auto-archive, Archiver:131) or a lost answer: wait until the row is gone and the
            # experiment is there, or the row says ERROR/CONFLICT.
            uri = self.archive_outcome(client, s, project, ts, folder)
        self.record(res, Step.ARCHIVE, Outcome.DONE, {"uri": uri})

    def archive_outcome(
        self, client: XnatClient, s: PlannedSession, project: str | None, ts: str, folder: str
    ) -> str:
        """The archive's outcome, read from XNAT (its row and the project's experiments)."""
        deadline = time.monotonic() + ARCHIVE_TIMEOUT
        waits = pauses(self.opts.poll)
        while True:
            row = client.prearchive_session(project, ts, folder)
            if row is None:
                if project and s.session in client.experiment_labels(project):
                    return f"/data/archive/projects/{project}/experiments/{s.session}"
                raise ApplyError(
                    f"{s.prearchive_uri} left XNAT's prearchive but is not archived in {project}; "
                    "see `xnatmigrate refresh` and XNAT's logs"
                )
            status = row.get("status", "")
            if status in ("ERROR", "CONFLICT"):
                log_text = client.last_log(project, ts, folder)
                raise ApplyError(
                    f"XNAT's archive of {s.prearchive_uri} ended {status}: {log_text.strip()[:300] or 'no log'}; "
                    "fix it in XNAT, then rerun apply"
                )
            if status == "READY":
                raise ApplyError(
                    f"XNAT did not start archiving {s.prearchive_uri} (row READY): rerun apply to ask again"
                )
            if time.monotonic() > deadline:
                raise ApplyError(
                    f"XNAT is still archiving {s.prearchive_uri} (status {status}) after {ARCHIVE_TIMEOUT:g} s; "
                    "rerun apply later: the step is checked, not repeated"
                )
            client.pause(next(waits))

    def direct_archived(self, s: CstoreSession, res: SessionResult, done: set[Step]) -> None:
        """The receiver archives by itself: no row to locate or build; wait for the experiment."""
        if Step.ARCHIVE in done:
            return
        if not _wait_archived(self.client(), s, self.opts.poll):
            raise ApplyError(
                f"XNAT's direct-archive receiver has not archived {s.label} within {s.build_timeout:g} s; "
                "check /xapi/direct-archive and XNAT's logs, then rerun apply (nothing is sent again)"
            )
        reason = {"reason": "archived directly by XNAT's receiver (directArchive)"}
        for step in (Step.LOCATE, Step.BUILD, Step.ARCHIVE):
            if step not in done:
                self.record(res, step, Outcome.NOOP, reason)

    # -- the inbox route, a group at a time ------------------------------------------------------

    def inbox_prestage(self, items: list[_Item], report: ApplyReport) -> list[_Item]:
        """The group's sessions to stage into ``<inbox>/<project>/xnatmigrate-<plan>-<session>/`` (one
        pool, one barrier: ``begin`` starts it in the background).

        Check before acting: a session whose request is recorded is never staged or posted again; one
        staged by a crashed run whose request XNAT knows (the POST's answer, or the commit of its
        record, was lost with the crash) adopts that request (``/xapi/dicom/list/all``, by path)
        instead of posting a second one.
        """
        inbox = self.plan.xnat.inbox
        assert inbox, "manifest validation requires xnat.inbox for method inbox"
        if not Path(inbox).is_dir():
            err = files.DiskError(
                f"XNAT's inbox {inbox} is not a folder (xnat.inbox): mount it or fix the manifest, then rerun"
            )
            for it in items:
                if it.alive:
                    self.fail(it, err, report)
            return []
        resumed = [it for it in items if it.alive and it.resumed and Step.IMPORT not in it.done]
        known: dict[str, dict[str, Any]] = {}
        if resumed:
            with contextlib.suppress(XnatMigrateError):  # a failed look-up only means: post again
                for r in self.client().inbox_requests():
                    path = os.path.normpath(str(r.get("sessionPath") or "/"))
                    if str(r.get("status")) != "Failed" and int(r.get("id") or 0) > int(
                        known.get(path, {}).get("id") or 0
                    ):
                        known[path] = r
        to_stage: list[_Item] = []
        for it in items:
            if not it.alive:
                continue
            s = _inbox(it)
            with self.attempt(it, report):
                recorded_dir, recorded_url = self.store.session_paths(s.action_id)
                it.staging = Path(recorded_dir or s.inbox_dir(self.plan.plan_id))
                it.xnat_path = recorded_url or s.inbox_path(self.plan.plan_id)
                if Step.IMPORT in it.done:
                    self.advance(s.file_count)  # XNAT has the files (and may have removed the folder)
                    continue
                found = known.get(os.path.normpath(it.xnat_path))
                if found is not None:
                    if Step.STAGE not in it.done:
                        self.record(it.res, Step.STAGE, Outcome.NOOP, {"reason": "imported already"})
                    detail = {
                        "id": str(found["id"]),
                        "path": it.xnat_path,
                        "reason": "requested by an earlier run",
                    }
                    self.record(it.res, Step.IMPORT, Outcome.NOOP, detail)
                    it.done |= {Step.STAGE, Step.IMPORT}
                    self.advance(s.file_count)
                    continue
                to_stage.append(it)  # its sources are checked where it is staged (files.stage_batch)
        return to_stage

    def inbox_group(self, g: _Group, report: ApplyReport) -> None:
        """The group's staging recorded, then XNAT's inbox importer asked for each session (§4.6),
        the request id recorded at once."""
        items = g.items
        if g.ahead is not None:
            self.stage_record(g.stage, g.ahead, report)
        # Every stage record is durable before the first request: a rerun must never stage again what
        # XNAT may already be importing (and removing: cleanupAfterImport).
        self.store.commit()
        behind = _CommitBehind(self.store.commit)
        try:
            for it in items:
                if not it.alive or report.stopped or Step.IMPORT in it.done:
                    continue
                self.inbox_request(it, report, behind)
        finally:
            behind.close()

    def inbox_request(self, it: _Item, report: ApplyReport, behind: _CommitBehind) -> None:
        """POST one session's import and record its request id; the commit of that record runs while
        the next session's POST is in flight (``_CommitBehind``)."""
        s = _inbox(it)
        with self.attempt(it, report):
            assert s.project is not None, "planner refuses Unassigned inbox sessions"
            try:
                try:
                    request_id = self.client().inbox_import(s.project, s.subject, s.session, it.xnat_path)
                finally:
                    behind.wait()  # the ledger is the main thread's again before anything records
            except OutcomeUnknown as exc:
                raise ApplyError(
                    f"{exc}; rerun apply: it finds the request XNAT queued (/xapi/dicom/list/all) "
                    "instead of asking again"
                ) from None
            except XnatRestError as exc:
                if exc.status in (400, 403, 404, 409):
                    # XNAT refused this session (path, rights, an existing label): it fails, the run goes on.
                    raise ApplyError(f"{exc}; fix it in XNAT or the manifest, then rerun apply") from None
                raise
            self.record(it.res, Step.IMPORT, Outcome.DONE, {"id": request_id, "path": it.xnat_path})
            # The request id is what spares a second request: made durable at once, behind the next POST.
            behind.start()
            it.done.add(Step.IMPORT)

    def inbox_finish(self, s: InboxSession, res: SessionResult, done: set[Step]) -> None:
        """Wait for XNAT's import request to end, find the session it made, then build/archive it."""
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        if located is None:
            request = self.store.step_detail(s.action_id, Step.IMPORT) or {}
            request_id = str(request.get("id", ""))
            final = self.wait_for_import(s, res, request_id)
            located = self.locate_imported(s, request_id, final)
            self.record(res, Step.LOCATE, Outcome.DONE, located)
        if located.get("archived"):
            # The project auto-archives: XNAT's commit archived it (DicomInboxImportRequestListener).
            reason = {"reason": "built and archived by XNAT's inbox importer (the project auto-archives)"}
            for step in (Step.BUILD, *((Step.ARCHIVE,) if s.archive else ())):
                if step not in done:
                    self.record(res, step, Outcome.NOOP, reason)
            return
        self.build_and_archive(s, res, done, s.project, located["timestamp"], located["folder"])

    def wait_for_import(self, s: InboxSession, res: SessionResult, request_id: str) -> dict[str, Any]:
        """Poll ``GET /xapi/dicom/{id}`` until Completed or Failed (bounded by ``build_timeout``)."""
        client = self.client()
        deadline = time.monotonic() + s.build_timeout
        last = "unknown"
        waits = pauses(self.opts.poll)
        while True:
            request = client.inbox_request(request_id)
            if request is None:
                raise ApplyError(
                    f"XNAT does not know the inbox import request {request_id} of {s.label} (GET /xapi/dicom/"
                    f"{request_id} answered 404); see XNAT's logs, then `xnatmigrate revert` it and re-plan"
                )
            last = str(request.get("status", ""))
            if last == "Completed":
                return request
            if last == "Failed":
                why = " ".join(str(request.get("resolution") or "no reason given").split())[:300]
                self.record(res, Step.IMPORT, Outcome.FAILED, {"id": request_id, "resolution": why})
                raise ApplyError(
                    f"XNAT's inbox import of {s.label} (request {request_id}) failed: {why}; fix the cause, "
                    "then rerun apply (it stages and asks again)"
                )
            if time.monotonic() > deadline:
                raise ApplyError(
                    f"XNAT's inbox import of {s.label} (request {request_id}) is still {last} after "
                    f"{s.build_timeout:g} s; rerun apply later: the request is polled, never posted again"
                )
            client.pause(next(waits))

    def locate_imported(self, s: InboxSession, request_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """The prearchive session the import made (project, tag, label: how GradualDicomImporter groups
        files, §3), or the archived experiment when the project auto-archived it."""
        client = self.client()
        shown = s.project or "Unassigned"
        rows = [
            r
            for r in client.prearchive_sessions(s.project, tag=s.study_uid)
            if r.get("name") == s.session and r.get("project") == shown
        ]
        if rows:
            return {"timestamp": rows[0]["timestamp"], "folder": rows[0]["folderName"], "request": request_id}
        if s.project and s.session in client.experiment_labels(s.project):
            return {"archived": True, "request": request_id}
        resolution = " ".join(str(request.get("resolution") or "").split())[:300]
        raise ApplyError(
            f"XNAT's inbox import of {s.label} (request {request_id}) completed ({resolution or 'no detail'}) "
            f"but XNAT holds no session {s.session} of study {s.study_uid} in {shown}: the importer may have "
            "routed the files elsewhere; see XNAT's prearchive and logs"
        )

    # -- the C-STORE route, a group at a time ----------------------------------------------------

    def cstore_group(self, items: list[_Item], report: ApplyReport) -> None:
        """The files of the group's sessions over shared associations (each file keeps its own
        session's routing line and scripts: edited in memory, then routed), proposing the presentation
        contexts of the whole group at once."""
        from . import dicom

        scp = self.plan.xnat.scp
        assert scp is not None, "manifest validation requires xnat.scp for cstore"
        sending: list[tuple[_Item, list[PlannedFile]]] = []
        for it in items:
            if not it.alive or Step.SEND in it.done:
                continue
            s = _cstore(it)
            with self.attempt(it, report):
                confirmed = self.store.sent_for(s.action_id)
                todo = [f for f in s.files if f.sop_instance_uid not in confirmed]
                self.advance(s.file_count - len(todo))
                if todo:
                    files.check_sources_of(todo)
                    self.recheck_headers([(f, f.source) for f in todo], s)
                sending.append((it, todo))
        todo_all = [(it, f) for it, todo in sending if it.alive for f in todo]
        failed: dict[str, list[tuple[str, str]]] = {}
        if todo_all:
            # SOPInstanceUIDs and source paths are unique in a plan (scan.dedupe): each names one session.
            owner = {f.sop_instance_uid: it for it, f in todo_all}
            by_source = {f.source: it for it, f in todo_all}
            size_of = {f.sop_instance_uid: f.size for _, f in todo_all}

            def on_confirmed(batch: list[tuple[str, int]]) -> None:
                per: dict[str, list[tuple[str, int]]] = {}
                for uid, status in batch:
                    per.setdefault(owner[uid].s.action_id, []).append((uid, status))
                    owner[uid].res.files += 1
                    owner[uid].res.bytes += size_of[uid]
                for action_id, rows in per.items():
                    self.store.record_sent(action_id, rows)
                self.store.commit()  # a confirmation is what spares a resend: never held back

            before = self.done_files

            def prog(d: int, _t: int) -> None:
                self.done_files = before + d
                if self.opts.progress:
                    self.opts.progress(self.done_files, self.total_files)

            first = _cstore(todo_all[0][0])
            edit_of = {it.s.action_id: self.cstore_edit(_cstore(it)) for it, _ in sending if it.alive}
            try:
                outcome = dicom.send_files(
                    [f for _, f in todo_all],
                    scp,
                    routing=first.routing,
                    line=first.routing_line,
                    lines=[_cstore(it).routing_line or "" for it, _ in todo_all],
                    # The headers were re-read above from the source bytes; the bytes sent are edited.
                    edits=[edit_of[it.s.action_id] for it, _ in todo_all],
                    contexts=[c for it, _ in sending if it.alive for c in _cstore(it).contexts],
                    jobs=self.opts.jobs or 1,
                    retries=self.opts.send_retries,
                    acse_timeout=settings.positive(settings.DICOM_ACSE_TIMEOUT),
                    dimse_timeout=settings.positive(settings.DICOM_DIMSE_TIMEOUT),
                    max_stalls=int(settings.positive(settings.DICOM_MAX_STALLS)),
                    on_confirmed=on_confirmed,
                    progress=prog,
                )
            except XnatMigrateError as exc:
                for it, _ in sending:
                    if it.alive:
                        self.fail(it, exc, report)
                return
            for path, reason in outcome.failures:
                failed.setdefault(by_source[path].s.action_id, []).append((path, reason))
        for it, todo in sending:
            if not it.alive:
                continue
            s = _cstore(it)
            with self.attempt(it, report):
                bad = failed.get(s.action_id)
                if bad:
                    path, reason = bad[0]
                    self.record(it.res, Step.SEND, Outcome.FAILED, {"failures": len(bad)})
                    raise DicomSendError(
                        f"{len(bad)} file(s) of {s.label} were not stored (e.g. {path}: {reason}); "
                        "rerun apply to send them again"
                    )
                sent = self.store.sent_for(s.action_id)
                warnings = sum(1 for v in sent.values() if v != 0)
                self.record(
                    it.res,
                    Step.SEND,
                    Outcome.DONE if todo else Outcome.NOOP,
                    {"confirmed": len(sent), "warnings": warnings},
                )

    def cstore_finish(self, s: CstoreSession, res: SessionResult, done: set[Step]) -> None:
        """After the send: find the session XNAT's receiver made (project, tag, label), build, archive."""
        if not self.plan.xnat.url:
            return
        if s.direct_archive:
            self.direct_archived(s, res, done)
            return
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        if located is None:
            row = self.client().wait_for_session(
                s.project, s.study_uid, s.session, timeout=s.build_timeout, poll=self.opts.poll
            )
            located = {"timestamp": row["timestamp"], "folder": row["folderName"]}
            self.record(res, Step.LOCATE, Outcome.DONE, located)
        self.build_and_archive(s, res, done, s.project, located["timestamp"], located["folder"])


class _CommitBehind:
    """The ledger's commit on a thread of its own while the main thread waits on XNAT's answer to the
    next request; ``wait()`` before the ledger is touched again, ``close()`` at the end.

    Invariant: at most one commit in flight, and the ledger is used by one thread at a time (the
    connection's own rule): the main thread calls ``wait()`` before any record, so a crash loses at
    most the request ids of the request in flight and the one before it, each found again by path in
    XNAT's list of requests (``inbox_prestage``), never posted twice. One thread for all the commits:
    starting a thread per commit cost more than the commit on a busy machine.
    """

    def __init__(self, commit: Callable[[], None]) -> None:
        self._commit = commit
        self._thread: threading.Thread | None = None
        self._todo = threading.Semaphore(0)
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._exc: BaseException | None = None

    def start(self) -> None:
        self.wait()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="commit-behind", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._todo.release()

    def _loop(self) -> None:
        while True:
            self._todo.acquire()
            if self._closed:
                return
            try:
                self._commit()
            except BaseException as exc:  # raised again in the main thread by wait()
                self._exc = exc
            finally:
                self._idle.set()

    def wait(self) -> None:
        self._idle.wait()
        exc, self._exc = self._exc, None
        if exc is not None:
            raise exc

    def close(self) -> None:
        """Wait for the commit in flight (raising its error), then end the thread."""
        try:
            self.wait()
        finally:
            if self._thread is not None:
                self._closed = True
                self._todo.release()
                self._thread.join()
                self._thread = None


#: Per staged session: its files (or the error it met), and what the re-read of its headers found changed.
_StagedSession = tuple[list[files.StagedFile] | XnatMigrateError, list[str]]


class _Ahead:
    """One group's staging on a background thread, so that disk and CPUs stay busy while the main
    thread does the per-session work of the group before it (publish, insert, build).

    Invariant: only file work runs there (``files.stage_batch``); what it returns, or raises, reaches
    the main thread through ``result()``, which records it. A crash meanwhile leaves unrecorded staging
    folders, which a rerun re-checks file by file as after a crash inside any staging.
    """

    def __init__(
        self,
        fn: Callable[[threading.Event, Progress], list[_StagedSession]],
        count: int,
        show: Callable[[], None],
    ) -> None:
        self.files, self.done = count, 0  # files to stage, files staged so far
        self._fn, self._show = fn, show
        self._cancel = threading.Event()
        self._out: list[_StagedSession] = []
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stage-ahead", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._out = self._fn(self._cancel, self._progress)
        except BaseException as exc:  # raised again in the main thread by result()
            self._exc = exc

    def _progress(self, done: int, _total: int) -> None:
        self.done = done
        self._show()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> list[_StagedSession]:
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        return self._out

    def stop(self) -> None:
        """Hand out no more files, let those in flight finish, and wait (the result is discarded)."""
        self._cancel.set()
        self._thread.join()


@dataclass
class _Group:
    """A group's sessions on their way: results for the report, items still to carry out."""

    results: list[SessionResult] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)
    begun: bool = False  # registered and checked, its staging (if any) started: begin()
    stage: list[_Item] = field(default_factory=list)  # the items being staged
    ahead: _Ahead | None = None


@dataclass
class _Item:
    """One session of a group on its way through the phases."""

    s: PlannedSession
    res: SessionResult
    resumed: bool = False  # an earlier run had started it
    done: set[Step] = field(default_factory=set)
    alive: bool = True  # False once it failed or was left for a rerun
    visible: bool = False  # its folder is in XNAT's view (prearchive route)
    staging: Path = Path()
    final: Path = Path()
    xnat_path: str = ""  # the inbox folder as XNAT sees it (inbox route)


def _prearchive(it: _Item) -> PrearchiveSession:
    assert isinstance(it.s, PrearchiveSession), "a group holds sessions of one route"
    return it.s


def _inbox(it: _Item) -> InboxSession:
    assert isinstance(it.s, InboxSession), "a group holds sessions of one route"
    return it.s


def _staged(it: _Item) -> PrearchiveSession | InboxSession:
    assert isinstance(it.s, (PrearchiveSession, InboxSession)), "only these routes stage files"
    return it.s


def _cstore(it: _Item) -> CstoreSession:
    assert isinstance(it.s, CstoreSession), "a group holds sessions of one route"
    return it.s


def _wait_archived(client: XnatClient, s: CstoreSession, poll: float) -> bool:
    """A direct-archive receiver writes no prearchive row (GradualDicomImporter:101-107, §9): the
    session is done when the project's archive lists it."""
    if not s.project:
        return False
    deadline = time.monotonic() + s.build_timeout
    waits = pauses(poll)
    while time.monotonic() < deadline:
        if s.session in client.experiment_labels(s.project):
            return True
        client.pause(next(waits))
    return False


def apply_plan(plan: Plan, store: StateStore, opts: Options | None = None) -> ApplyReport:
    """Apply every session of ``plan``; the caller holds the state lock and checked freshness."""
    return _Runner(plan, store, opts or Options()).run()
