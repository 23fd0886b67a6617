"""The public functions behind each command. The CLI only parses, calls these and prints.

Invariants:
- ``plan`` writes only the state directory (scan cache, chosen timestamps, plan.json, plan.sql);
  it never touches the prearchive, XNAT's database or XNAT.
- Every write of plan.json / plan.sql is atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from .errors import PlanError, Problem, StalePlanError, StateError, XnatMigrateError
from .model import (
    BASE_KEYWORDS,
    Manifest,
    Method,
    Outcome,
    Plan,
    PrearchiveSession,
    SessionSpool,
    SessionState,
    Step,
    XnatTarget,
    open_plan,
    shells_of,
    unreachable,
    write_plan_json,
)

# The vocabularies the CLI prints, re-exported: the CLI imports nothing below this module.
from .model import Check as Check
from .model import Result as Result
from .model import RevertOutcome as RevertOutcome
from .model import Seen as Seen
from .pathmap import PathMap
from .state import StateStore

# The planner, the manifest's checks and the DicomEdit machinery (pydicom, lark, Jinja, jsonschema) are
# imported by the commands that use them, as the executors are: `apply` and `status` start without them.
if TYPE_CHECKING:  # the executors import drivers; the commands import them only when they run
    from .execute.apply import ApplyReport as ApplyReport
    from .execute.apply import FleetSummary as FleetSummary
    from .execute.apply import SessionResult as SessionResult
    from .execute.fleet import FleetStatus as FleetStatus
    from .execute.refresh import Observation as Observation
    from .execute.revert import RevertReport as RevertReport
    from .execute.verify import SessionCheck as SessionCheck
    from .execute.verify import VerifyReport as VerifyReport

ProgressFn = Callable[[int, int], None]
STATE_DIR_ENV = "XNATMIGRATE_STATE_DIR"
STATE_URL_ENV = "XNATMIGRATE_STATE_URL"
PLAN_FILE = "plan.json"
SQL_FILE = "plan.sql"


def state_dir_of(arg: str | os.PathLike[str] | None) -> Path:
    """``--state-dir``, else ``$XNATMIGRATE_STATE_DIR``, else ``./.xnatmigrate``."""
    return Path(arg or os.environ.get(STATE_DIR_ENV) or ".xnatmigrate")


def open_state(sdir: Path, state_url: str | None = None, *, create: bool = False) -> StateStore:
    """The ledger: in PostgreSQL when ``--state-url`` (else ``$XNATMIGRATE_STATE_URL``) names one, else
    SQLite in ``sdir``. plan.json and plan.sql stay in ``sdir`` either way."""
    url = _state_url(state_url)
    if not url:
        return StateStore(sdir, create)
    from .execute import statepg  # psycopg: imported only when the state is in PostgreSQL

    return StateStore(create=create, opener=statepg.opener(url))


def _state_url(state_url: str | None) -> str | None:
    return state_url or os.environ.get(STATE_URL_ENV) or None


def atomic_write(path: Path, text: str) -> None:
    atomic_write_with(path, lambda fh: fh.write(text.encode("utf-8")))


_T = TypeVar("_T")


def atomic_write_with(path: Path, write: Callable[[BinaryIO], _T]) -> _T:
    """``write(fh)`` into a temporary file beside ``path`` (binary, seekable), fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            result = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


def validate(paths: Sequence[str | Path], check_sources: bool = False) -> list[Problem]:
    """Every problem (errors and warnings) of every manifest; touches no source unless asked."""
    from .manifest import check_manifest

    problems: list[Problem] = []
    for p in paths:
        problems.extend(check_manifest(p, check_sources)[1])
    return problems


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanOutcome:
    plan: Plan
    plan_path: Path
    sql_path: Path
    files_seen: int
    cache_hits: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)


def scan_keywords(manifest: Manifest) -> frozenset[str]:
    """What the scan reads: identity and naming, the templates' keywords, and the attributes the
    manifest's DicomEdit script files name (so the plan can show what they change)."""
    from . import anonymize, labels
    from .manifest import template_keywords_of

    scripted: frozenset[str] = frozenset()
    for sc in manifest.scripts:
        scripted |= anonymize.read_keywords(anonymize.chain_of([sc.name], {sc.name: sc}))
    return (
        frozenset(BASE_KEYWORDS) | template_keywords_of(manifest) | labels.template_file_keywords() | scripted
    )


def plan(
    manifest_path: str | Path,
    *,
    state_dir: str | Path | None = None,
    offline: bool = False,
    jobs: int | None = None,
    out: str | Path | None = None,
    sql_out: str | Path | None = None,
    progress: ProgressFn | None = None,
    now: datetime | None = None,
    state_url: str | None = None,
) -> PlanOutcome:
    """Scan, check and plan; write plan.json and plan.sql. Raises PlanError when refused."""
    from .scan.sources import scratch_error

    with _collector_paused():
        try:
            return _plan(manifest_path, state_dir, offline, jobs, out, sql_out, progress, now, state_url)
        except OSError as exc:
            # The spooled sessions, plan.json or plan.sql on a full or read-only filesystem.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
                raise
            where = exc.filename or (str(Path(out).parent) if out else str(state_dir_of(state_dir)))
            raise scratch_error(exc, os.path.dirname(where) if exc.filename else where) from None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the while: a plan makes several objects per file
    and frees them by reference counting alone (it makes no reference cycles), and at 100,000
    files the collector's passes over them were a tenth of a warm plan's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plan(
    manifest_path: str | Path,
    state_dir: str | Path | None,
    offline: bool,
    jobs: int | None,
    out: str | Path | None,
    sql_out: str | Path | None,
    progress: ProgressFn | None,
    now: datetime | None,
    state_url: str | None = None,
) -> PlanOutcome:
    from . import dicomedit, statements
    from .execute.facts import archived_facts, gather_facts, site_facts
    from .manifest import load_manifest
    from .planner import draft_plan, group_studies, planned_projects
    from .scan import scan_sources

    started = time.monotonic()
    manifest = load_manifest(manifest_path)
    sdir = state_dir_of(state_dir)
    with open_state(sdir, state_url, create=True) as store, contextlib.ExitStack() as closing:
        # Scratch files (the scan's working set, the spooled sessions) go beside the state when it
        # is a folder: a large archive's are as big as plan.json, too big for a /tmp held in memory.
        scratch = str(sdir) if sdir.is_dir() else None
        shared = store.shared
        keywords = scan_keywords(manifest)
        # The scan looks the cache up and writes it back batch by batch; its files are on disk, read
        # back a study at a time by the planner (``planner.StudySource``).
        scanned = scan_sources(manifest, keywords, cache=store, jobs=jobs, progress=progress, workdir=scratch)
        closing.callback(scanned.close)
        study_uids = scanned.study_uids()
        facts = gather_facts(manifest, study_uids, offline=offline)
        if offline:
            facts = replace(
                facts, skipped=(*facts.skipped, "archived sessions with the same label (--offline)")
            )
        when = now or datetime.now()
        secret = os.environ.get(dicomedit.SECRET_ENV)
        # What depends on the projects the plan writes into (archived labels, site settings, XNAT's
        # site script) is learnt first, from the studies' labels alone; then the plan is made once.
        grouping = group_studies(manifest, scanned)
        projects = planned_projects(manifest, scanned, grouping)
        archived = archived_facts(manifest, projects, offline)
        site, site_skipped = site_facts(manifest, projects, offline)
        facts = replace(
            facts,
            archived=archived[0] if archived is not None else None,
            site=site,
            skipped=facts.skipped + (archived[1] if archived is not None else ()) + site_skipped,
        )
        result = draft_plan(
            manifest,
            scanned,
            scanned.rejects,
            store.view(),
            facts,
            when,
            keywords,
            scanned.warnings,
            secret,
            sink=SessionSpool(scratch),
            grouping=grouping,
        )
        del grouping
        store.record_timestamps(_timestamps(result))
    plan_path = Path(out) if out else sdir / PLAN_FILE
    sql_path = Path(sql_out) if sql_out else sdir / SQL_FILE
    files_seen, cache_hits = scanned.files_seen, scanned.cache_hits
    del scanned  # closed with the state: the plan holds what it needs of its files

    # Compact and canonical (sorted keys): plan.json is for machines (the summary and plan.sql are
    # for people). Written session by session while its id is computed over the same bytes, so
    # neither the plan as plain data nor its JSON text is ever held whole.
    def write_plan(fh: BinaryIO) -> str:
        plan_id = write_plan_json(result, fh)
        fh.write(b"\n")
        return plan_id

    result = replace(result, plan_id=atomic_write_with(plan_path, write_plan))
    atomic_write_with(
        sql_path, lambda fh: fh.writelines(p.encode("utf-8") for p in statements.plan_script_pieces(result))
    )
    if shared:
        # Every host with the state URL applies this plan, not a copy of plan.json of its own.
        with open_state(sdir, state_url) as store, plan_path.open("rb") as fh:
            store.save_plan(result.plan_id, fh)
    return PlanOutcome(
        plan=result,
        plan_path=plan_path,
        sql_path=sql_path,
        files_seen=files_seen,
        cache_hits=cache_hits,
        seconds=time.monotonic() - started,
    )


def _timestamps(plan: Plan) -> list[tuple[str | None, str, str, str]]:
    """(project, session, study, timestamp) of the plan's prearchive sessions (read without their
    files: they are in the plan's spool)."""
    return [
        (s.project, s.session, s.study_uid, s.timestamp)
        for s in shells_of(plan.sessions)
        if isinstance(s, PrearchiveSession)
    ]


def plan_of(store: StateStore, sdir: Path, plan_path: str | Path | None = None) -> Plan:
    """The plan to act on: ``plan_path`` when given; else, with a shared ledger (``--state-url``), the
    plan ``plan`` saved in it, whichever host made it; else ``<state-dir>/plan.json``."""
    if plan_path is not None:
        return load_plan(plan_path)
    saved = store.saved_plan() if store.shared else None
    if saved is None:
        return load_plan(sdir / PLAN_FILE)
    # An unnamed file, gone when the plan is: its sessions are read from it as apply gets to them.
    with tempfile.TemporaryFile() as fh:
        for line in store.plan_lines(saved):
            fh.write(line)
        fh.seek(0)
        try:
            plan_obj = open_plan(fh)
        except ValueError as exc:
            raise PlanError(
                f"the plan saved in {store.db.name} is damaged ({exc}); re-run `xnatmigrate plan`"
            ) from None
    if plan_obj.plan_id != saved:
        raise PlanError(
            f"the plan saved in {store.db.name} is not plan {saved[:12]}; re-run `xnatmigrate plan`"
        )
    return plan_obj


def load_plan(path: str | Path) -> Plan:
    """The plan at ``path``, checked against its id; its sessions are read from the file as they
    are used (``model.open_plan``), so a plan of millions of files loads in little memory."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return open_plan(fh)
    except FileNotFoundError:
        raise PlanError(f"no plan at {p}: run `xnatmigrate plan MANIFEST` first") from None
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read the plan {p} ({exc}); re-run `xnatmigrate plan`") from None


def check_fresh(plan_obj: Plan, store: StateStore) -> None:
    """Refuse a stale plan: manifest or a lookup table changed, or the state moved on (the sources
    are checked per session by apply)."""
    rerun = "re-run `xnatmigrate plan` and review the new plan"
    try:
        digest = _sha256(Path(plan_obj.manifest_path))
    except OSError:
        raise StalePlanError(f"the manifest {plan_obj.manifest_path} is gone; {rerun}") from None
    if digest != plan_obj.manifest_digest:
        raise StalePlanError(f"the manifest {plan_obj.manifest_path} changed since the plan; {rerun}")
    for table in plan_obj.lookups:
        try:
            table_digest = _sha256(Path(table.file))
        except OSError:
            raise StalePlanError(f"the lookup table {table.name} ({table.file}) is gone; {rerun}") from None
        if table_digest != table.sha256:
            raise StalePlanError(
                f"the lookup table {table.name} ({table.file}) changed since the plan; {rerun}"
            )
    for script in plan_obj.scripts:
        from .anonymize import SITE_SCRIPT_NAME  # pydicom: only for a plan with scripts

        if script.name == SITE_SCRIPT_NAME:
            continue  # pinned in the plan: apply uses the text reviewed
        try:
            script_digest = _sha256(Path(script.name))
        except OSError:
            raise StalePlanError(f"the anonymisation script {script.name} is gone; {rerun}") from None
        if script_digest != script.sha256:
            raise StalePlanError(f"the anonymisation script {script.name} changed since the plan; {rerun}")
    if store.serial() != plan_obj.state_serial and store.current_plan() != plan_obj.plan_id:
        raise StalePlanError(
            f"the state moved on since this plan (serial {plan_obj.state_serial} → {store.serial()}); {rerun}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# apply / status
# --------------------------------------------------------------------------------------------


def apply(
    plan_path: str | Path | None = None,
    *,
    state_dir: str | Path | None = None,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
    on_session: Callable[[SessionResult], None] | None = None,
    poll: float = 1.0,
    state_url: str | None = None,
    path_map: Sequence[str] | None = None,
    workers: int | None = None,
    status: Callable[[str], None] | None = None,
) -> ApplyReport:
    """Apply a saved plan (default ``<state-dir>/plan.json``; with a PostgreSQL ledger, the plan saved
    in it).

    Refuses a stale plan. With the ledger in a state directory, a second concurrent apply is refused;
    with a PostgreSQL ledger this process is one worker of a fleet (``execute.fleet``): any number of
    them, on any hosts, share the plan's units until none is left. ``status`` hears what the run
    waits on now ("waiting on XNAT", the fleet's budget or governor; "" once working again).
    """
    from .execute.apply import Options, apply_plan

    sdir = state_dir_of(state_dir)
    url = _state_url(state_url)
    # A plan of this host's is read first: "no plan" is the clearer line when neither is there.
    local = None if url else load_plan(plan_path or sdir / PLAN_FILE)
    opts = Options(jobs=jobs, progress=progress, on_session=on_session, poll=poll, status=status)
    with open_state(sdir, state_url) as store:
        # Sources as this host mounts them (``--path-map``): the plan and its id stay as reviewed.
        plan_obj = PathMap.of(path_map).plan(local or plan_of(store, sdir, plan_path))
        if url:
            from .execute import fleet

            fleet.join(store)
            check_fresh(plan_obj, store)
            store.begin_plan(plan_obj.plan_id)
            return fleet.work(plan_obj, url, opts, workers=workers)
        if workers is not None and workers != 1:
            raise StateError(
                "--workers needs a ledger in PostgreSQL (--state-url): with a state directory, one apply "
                "works at a time (--jobs sets how many files it copies or sends at once)"
            )
        store.lock("apply")
        check_fresh(plan_obj, store)
        return apply_plan(plan_obj, store, opts)


@dataclass(frozen=True)
class SessionStatus:
    action_id: str
    method: Method
    project: str | None
    subject: str | None
    session: str
    study_uid: str
    prearchive_uri: str
    status: SessionState
    last_step: Step | None
    last_outcome: Outcome | None
    remaining: tuple[Step, ...]
    observed: dict[str, Any] | None


def steps_for(method: Method, archive: bool = False) -> tuple[Step, ...]:
    """The apply steps of a route, in order."""
    match method:
        case Method.PREARCHIVE:
            base: tuple[Step, ...] = (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD)
        case Method.CSTORE:
            base = (Step.SEND, Step.LOCATE, Step.BUILD)
        case Method.INBOX:
            base = (Step.STAGE, Step.IMPORT, Step.LOCATE, Step.BUILD)
        case _:
            unreachable(method)
    return base + ((Step.ARCHIVE,) if archive else ())


def status(state_dir: str | Path | None = None, *, state_url: str | None = None) -> list[SessionStatus]:
    """Per session in the ledger: the last step done and what remains."""
    sdir = state_dir_of(state_dir)
    out = []
    with open_state(sdir, state_url) as store:
        sessions = store.sessions()
        # Ledgers written before targets were recorded keep the archive option only in plan.json.
        saved = _saved_plan(sdir, store) if any(s.archive is None for s in sessions) else None
        legacy = {p.action_id: p.archive for p in saved.sessions} if saved else {}
        for s in sessions:
            hist = store.history(s.action_id)
            done = store.steps_done(s.action_id)
            archive = s.archive if s.archive is not None else legacy.get(s.action_id, Step.ARCHIVE in done)
            wanted = steps_for(s.method, archive=archive)
            finished = s.status in (SessionState.APPLIED, SessionState.REVERTED)
            remaining = () if finished else tuple(w for w in wanted if w not in done)
            last = hist[-1] if hist else None
            out.append(
                SessionStatus(
                    action_id=s.action_id,
                    method=s.method,
                    project=s.project,
                    subject=s.subject,
                    session=s.session,
                    study_uid=s.study_uid,
                    prearchive_uri=s.prearchive_uri,
                    status=s.status,
                    last_step=last[0] if last else None,
                    last_outcome=last[1] if last else None,
                    remaining=remaining,
                    observed=store.observation(s.action_id),
                )
            )
    return out


def fleet_budget(state_url: str | None = None) -> str | None:
    """With a PostgreSQL ledger, what the fleet applying a plan may ask of XNAT at once, from this
    host's environment (``XNATMIGRATE_BUDGET_*``, ``XNATMIGRATE_GOVERNOR_*``): the worker that queues a
    round records it for every host. None with a ledger in a state directory (one process, no fleet)."""
    if not _state_url(state_url):
        return None
    from .execute import settings

    return settings.Budget.from_env().describe()


def fleet_status(state_dir: str | Path | None = None, *, state_url: str | None = None) -> FleetStatus | None:
    """The current plan's units on every host (``execute.fleet.fleet_status``); None with a ledger in a
    state directory, or when no fleet applied the plan."""
    url = _state_url(state_url)
    if not url:
        return None
    from .execute import fleet

    with open_state(state_dir_of(state_dir), url) as store:
        return fleet.fleet_status(store)


def _saved_plan(sdir: Path, store: StateStore) -> Plan | None:
    """The plan saved in the state directory, or None when there is none that loads.

    NOTE: loading reads and hashes the whole plan: callers load it once and only when they need it.
    """
    try:
        return plan_of(store, sdir)
    except XnatMigrateError:
        return None


# --------------------------------------------------------------------------------------------
# verify / revert / refresh
# --------------------------------------------------------------------------------------------


def _fallback_if_needed(store: StateStore, sdir: Path, saved: Plan | None = None) -> XnatTarget | None:
    """The saved plan's target, for sessions of a ledger that does not record its own (else None)."""
    if not any(s.target is None for s in store.sessions()):
        return None
    plan_obj = saved or _saved_plan(sdir, store)
    return plan_obj.xnat if plan_obj else None


def verify(
    state_dir: str | Path | None = None,
    *,
    quick: bool = False,
    on_session: Callable[[SessionCheck], None] | None = None,
    state_url: str | None = None,
) -> VerifyReport:
    """Check every applied session (files, checksums, rows, instances in XNAT) where it went."""
    from .execute.verify import verify as run

    sdir = state_dir_of(state_dir)
    with open_state(sdir, state_url) as store:
        # The saved plan, when there is one, says what should be there: sessions never attempted count.
        saved = _saved_plan(sdir, store)
        return run(
            store,
            _fallback_if_needed(store, sdir, saved),
            planned=saved.sessions if saved else (),
            quick=quick,
            on_session=on_session,
        )


def revert(
    state_dir: str | Path | None = None,
    *,
    yes: bool = False,
    sessions: Sequence[str] = (),
    projects: Sequence[str] = (),
    force: bool = False,
    archived: bool = False,
    confirm: Callable[[str], bool] | None = None,
    state_url: str | None = None,
) -> RevertReport:
    """Remove (with ``yes``) or list what this tool created and XNAT has not taken over."""
    from .execute.revert import revert as run

    sdir = state_dir_of(state_dir)
    with open_state(sdir, state_url) as store:
        if yes:
            store.lock("revert")
        return run(
            store,
            _fallback_if_needed(store, sdir),
            yes=yes,
            sessions=sessions,
            projects=projects,
            force=force,
            archived=archived,
            confirm=confirm,
        )


def refresh(
    state_dir: str | Path | None = None,
    *,
    on_session: Callable[[Observation], None] | None = None,
    state_url: str | None = None,
) -> list[Observation]:
    """Observe every applied session in XNAT now and record what was seen."""
    from .execute.refresh import observe

    sdir = state_dir_of(state_dir)
    with open_state(sdir, state_url) as store:
        return observe(store, _fallback_if_needed(store, sdir), on_session=on_session)


def junit_xml(report: VerifyReport) -> str:
    """A verify report as JUnit XML (one test case per session, one failure per problem)."""
    from .execute.verify import junit_xml as render

    return render(report)
