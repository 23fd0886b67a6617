"""One plan applied by several worker processes through one PostgreSQL ledger (issue 16), each worker
a host of its own where the machine allows it (its own UTS namespace: its own host name, so this
host's quick take-over of its own dead processes does not apply and only the lease can give a unit
away), against the prearchive stand-in: three workers at once, one killed mid-unit, one stopped past
its lease. Every end state equals one uninterrupted apply's, and no session step took effect twice."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.integration.test_apply_prearchive import _archive_tree, _normalised
from tests.sites import NOW, Site
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.execute import statepg
from xnatmigrate.testing.corpus import CorpusSpec

# Eight studies of two files; four units of two studies each (XNATMIGRATE_UNIT_FILES=4).
SPEC = CorpusSpec(patients=8, studies_per_patient=1, series_per_study=1, images_per_series=2, rows=8, seed=5)
LEASE = "3"
UNITS = 4


def _own_host_possible() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-u", "true"], capture_output=True)
    return probe.returncode == 0


OWN_HOST = _own_host_possible()
needs_own_host = pytest.mark.skipif(
    not OWN_HOST, reason="needs `unshare -u` (a host name per worker) to test the lease alone"
)


def _worker(s: Site, url: str, host: str, **env: str) -> subprocess.Popen[str]:
    """``xnatmigrate apply --state-url`` as a host named ``host`` (when the machine allows it)."""
    full = {**os.environ, **s.env(), "XNATMIGRATE_UNIT_FILES": "4", "XNATMIGRATE_LEASE_S": LEASE, **env}
    # Its own state directory, as on a host of its own: the plan comes from the ledger.
    state = s.root / f"state-{host}"
    cmd = [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(state), "--state-url", url]
    if OWN_HOST:
        # Its own host name, then exec: the pid the test holds is the worker's own.
        cmd = ["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', host, *cmd]
    return subprocess.Popen(
        cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _ledger(state_db_dsn: str, url: str, query: str) -> list[tuple]:
    schema = statepg.parse_state_url(url).schema
    with psycopg.connect(state_db_dsn, options=f"-c search_path={schema}") as conn:
        return conn.execute(query).fetchall()


def _no_step_twice(state_db_dsn: str, url: str) -> None:
    """Every step of every session took effect (``done``) at most once, whichever worker ran it."""
    done = _ledger(state_db_dsn, url, "SELECT action_id, step FROM steps WHERE outcome = 'done'")
    twice = [k for k, n in Counter(done).items() if n > 1]
    assert not twice, twice


@pytest.fixture
def fleet_site(tmp_path, pg_admin_dsn, monkeypatch):
    from xnatmigrate.testing.pg import temporary_database

    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(tmp_path / "site", pdb.dsn, archive=True, spec=SPEC)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.3  # units that last long enough for workers to overlap
            s.write_manifest(xnat.url)
            for k, v in s.env().items():
                monkeypatch.setenv(k, v)
            yield s, xnat


@pytest.fixture
def fleet_reference(tmp_path_factory, pg_admin_dsn):
    """The same corpus applied by one uninterrupted apply on the embedded (SQLite) ledger."""
    from xnatmigrate.testing.pg import temporary_database

    root = tmp_path_factory.mktemp("fleetref")
    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(root / "site", pdb.dsn, archive=True, spec=SPEC)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.0
            s.write_manifest(xnat.url)
            with pytest.MonkeyPatch.context() as mp:
                for k, v in s.env().items():
                    mp.setenv(k, v)
                api.plan(s.manifest, state_dir=s.state, now=NOW)
                report = api.apply(state_dir=s.state, poll=0.05)
            assert not report.failures and len(report.sessions) == SPEC.patients
            yield _normalised(s), sorted(xnat.experiments), _archive_tree(s)


def _same_as_reference(s: Site, xnat: XnatStandIn, reference: tuple) -> None:
    assert _normalised(s) == reference[0]
    assert sorted(xnat.experiments) == reference[1]
    assert _archive_tree(s) == reference[2]


def _finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_three_workers_share_the_plan_and_end_as_one_uninterrupted_apply(
    fleet_site, fleet_reference, state_url, state_db_dsn, capsys
):
    s, xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    workers = [_worker(s, state_url, f"host{i}") for i in range(3)]
    results = [_finish(p) for p in workers]
    for code, out, err in results:
        assert code == 0, (out, err)
        assert "of the plan applied" in out and f"{SPEC.patients} of {SPEC.patients} session(s)" in out
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)
    units = _ledger(state_db_dsn, state_url, "SELECT unit, host, finished, outcome FROM fleet_units")
    assert len(units) == UNITS and all(u[2] and u[3] == "done" for u in units)
    jobs = _ledger(state_db_dsn, state_url, "SELECT status::text FROM procrastinate_jobs")
    assert sorted(j[0] for j in jobs) == ["succeeded"] * UNITS
    if OWN_HOST:
        assert len({u[1] for u in units}) >= 2, units  # the work was shared, not done by one of them
    fs = api.fleet_status(s.state, state_url=state_url)
    assert fs is not None and fs.units == {"succeeded": UNITS} and fs.files_done == fs.files == len(s.files)
    assert sum(w.units_done for w in fs.workers) == UNITS and {w.host for w in fs.workers} == {
        u[1] for u in units
    }
    assert fs.eta_s == 0 and fs.files_per_s > 0
    assert fs.sessions == SPEC.patients and fs.sessions_by_state == {"applied": SPEC.patients}
    assert fs.errors == ()
    assert fs.builds_slowdown == pytest.approx(1.0, abs=0.5)  # quick stand-in builds, compared at the floor
    # A finished plan: another worker queues nothing and applies nothing.
    code, out, err = _finish(_worker(s, state_url, "late"))
    assert code == 0 and "Nothing to do" in out, (out, err)
    assert len(_ledger(state_db_dsn, state_url, "SELECT 1 FROM procrastinate_jobs")) == UNITS
    # The plan says what the fleet may ask of XNAT (the defaults here).
    assert cli.main(["plan", str(s.manifest), "--state-dir", str(s.state), "--state-url", state_url]) == 0
    assert (
        "with a budget for XNAT: at most 4 C-STORE association(s) and 2 build(s)" in capsys.readouterr().out
    )


@needs_own_host
def test_a_worker_killed_mid_unit_has_its_unit_taken_over_after_the_lease(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    doomed = _worker(s, state_url, "doomed", XNATMIGRATE_TEST_CRASH="after:insert:1")
    assert _finish(doomed)[0] == -9  # killed inside its first unit, after a row went into XNAT's table
    doing = _ledger(state_db_dsn, state_url, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'")
    assert doing == [(1,)]  # its unit still looks taken: only its lease can give it away
    started = time.monotonic()
    rest = [_worker(s, state_url, f"host{i}") for i in range(2)]
    for code, out, err in (_finish(p) for p in rest):
        assert code == 0, (out, err)
    assert time.monotonic() - started >= float(LEASE)  # the dead unit waited for its lease
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)
    hosts = {h for (h,) in _ledger(state_db_dsn, state_url, "SELECT host FROM fleet_units")}
    assert "doomed" not in hosts  # every unit, the dead one's included, was finished by the others


def test_a_worker_killed_mid_unit_is_resumed_at_once_by_a_rerun_on_its_host(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    assert _finish(_worker(s, state_url, "one", XNATMIGRATE_TEST_CRASH="after:build:1"))[0] == -9
    started = time.monotonic()
    code, out, err = _finish(_worker(s, state_url, "one", XNATMIGRATE_LEASE_S="600"))
    assert code == 0, (out, err)
    assert time.monotonic() - started < 300  # its own host saw the process gone: no 600 s lease
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)


@needs_own_host
def test_a_worker_stopped_past_its_lease_keeps_its_unit_and_no_study_is_applied_twice(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    slow = _worker(s, state_url, "slow", XNATMIGRATE_TEST_PAUSE="after:insert:1")
    deadline = time.monotonic() + 60
    while _state(slow.pid) != "T":  # stopped (SIGSTOP) inside its first unit
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.05)
    doing = "SELECT id, worker_id FROM procrastinate_jobs WHERE status = 'doing'"
    [(job, _)] = _ledger(state_db_dsn, state_url, doing)
    other = _worker(s, state_url, "other")
    # Past the lease: the other worker does the other units and takes the slow one's back, but never
    # acts on it while the stopped worker's connection still holds its lock: the unit goes back to the
    # queue each time, and the other units are not held up behind it. (Waited for, not slept: a
    # loaded machine starts the other worker late.)
    finished_q = "SELECT count(*) FROM fleet_units WHERE finished IS NOT NULL"
    attempts_q = f"SELECT attempts FROM procrastinate_jobs WHERE id = {job}"
    deadline = time.monotonic() + 120
    while _ledger(state_db_dsn, state_url, finished_q) != [(UNITS - 1,)] or _ledger(
        state_db_dsn, state_url, attempts_q
    ) == [(0,)]:
        assert other.poll() is None, other.communicate()
        assert time.monotonic() < deadline, _ledger(
            state_db_dsn, state_url, "SELECT * FROM procrastinate_jobs"
        )
        time.sleep(0.2)
    tried = _ledger(state_db_dsn, state_url, attempts_q)[0][0]
    time.sleep(3 * float(LEASE))  # and well past the lease, the other still tries, and still waits
    assert other.poll() is None
    assert _ledger(state_db_dsn, state_url, attempts_q)[0][0] > tried
    assert _ledger(state_db_dsn, state_url, "SELECT host FROM fleet_units WHERE unit = 0") == [("slow",)]
    assert _ledger(state_db_dsn, state_url, finished_q) == [(UNITS - 1,)]  # every other unit, by the other
    os.kill(slow.pid, signal.SIGCONT)
    # Continued long after its lease, the slow worker either finishes the step it was in and its unit
    # (the other still retries it), or its watchdog ends it first; either way it says why.
    code, out, err = _finish(slow)
    assert code == 0 or (code == 75 and "another worker will take this unit over" in err), (code, out, err)
    assert "Traceback" not in err, err
    code, out, err = _finish(other)
    assert code == 0 and "Traceback" not in err, (out, err)
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "gone"
    return stat.rsplit(b")", 1)[1].split()[0].decode()


def test_ctrl_c_sends_the_unit_in_flight_back_and_a_rerun_finishes_the_plan(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    xnat.build_delay = 1.0  # a unit lasts a few seconds: the interrupt lands inside one
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    w = _worker(s, state_url, "one")
    deadline = time.monotonic() + 60
    while not _ledger(state_db_dsn, state_url, "SELECT 1 FROM steps WHERE step = 'build'"):
        assert w.poll() is None and time.monotonic() < deadline, w.communicate()
        time.sleep(0.05)
    w.send_signal(signal.SIGINT)
    code, out, err = _finish(w)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted: rerun the same command to resume", (
        err
    )
    jobs = _ledger(state_db_dsn, state_url, "SELECT status::text FROM procrastinate_jobs")
    assert "doing" not in {j[0] for j in jobs} and "todo" in {j[0] for j in jobs}  # nothing left taken
    xnat.build_delay = 0.0
    code, out, err = _finish(_worker(s, state_url, "one"))
    assert code == 0, (out, err)
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)


def test_revert_is_refused_while_a_worker_holds_the_ledger_and_a_worker_while_a_revert_does(
    fleet_site, state_url
):
    from xnatmigrate.errors import LockedError
    from xnatmigrate.execute import fleet
    from xnatmigrate.state import StateStore

    s, _xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    worker = StateStore(create=False, opener=statepg.opener(state_url))
    try:
        fleet.join(worker)
        with pytest.raises(LockedError, match=r"in use by apply workers \(the latest on host .* pid \d+\)"):
            api.revert(s.state, yes=True, state_url=state_url)
    finally:
        worker.close()
    holder = StateStore(create=False, opener=statepg.opener(state_url))
    try:
        holder.lock("revert")
        with pytest.raises(LockedError, match=r"is in use by revert on host"):
            api.apply(state_dir=s.state, state_url=state_url)
        assert s.rows() == []  # refused before anything was done
    finally:
        holder.close()


def _building(s: Site) -> int:
    with psycopg.connect(s.dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM xdat_search.prearchive WHERE status IN ('BUILDING', '_BUILDING')"
        ).fetchone()
    return int(row[0]) if row else 0


def test_the_build_budget_holds_across_workers(fleet_site, fleet_reference, state_url, state_db_dsn):
    s, xnat = fleet_site
    xnat.build_delay = 0.3
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    workers = [_worker(s, state_url, f"host{i}", XNATMIGRATE_BUDGET_BUILDS="1") for i in range(3)]
    most = 0
    while any(p.poll() is None for p in workers):
        most = max(most, _building(s))  # what XNAT builds at once, sampled at its table
        time.sleep(0.02)
    for code, out, err in (_finish(p) for p in workers):
        assert code == 0, (out, err)
        assert "at most 4 C-STORE association(s) and 1 build(s) or archive(s) at once" in out
    assert most == 1  # one at a time across the three workers (and the sampling saw it)
    _same_as_reference(s, xnat, fleet_reference)


def test_the_governor_waits_while_xnat_is_busy_building(fleet_site, fleet_reference, state_url, state_db_dsn):
    s, xnat = fleet_site
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    with psycopg.connect(s.dsn) as conn:  # someone else's upload XNAT is building
        conn.execute(
            "INSERT INTO xdat_search.prearchive (project, timestamp, foldername, name, tag, status, url, "
            "prevent_anon, prevent_auto_commit) VALUES ('prj001', '20200101_000000000', 'other', 'other', "
            "'1.2.3', 'BUILDING', '/elsewhere', false, false)"
        )
    w = _worker(s, state_url, "one", XNATMIGRATE_GOVERNOR_BUILDING="1")
    time.sleep(4)
    assert w.poll() is None
    assert not _ledger(state_db_dsn, state_url, "SELECT 1 FROM steps")  # nothing done while XNAT is busy
    with psycopg.connect(s.dsn) as conn:
        conn.execute("DELETE FROM xdat_search.prearchive WHERE foldername = 'other'")
    code, out, err = _finish(w)
    assert code == 0, (out, err)
    assert "waiting before the next unit: XNAT is building 1 session(s), the governor's limit is 1" in err
    _same_as_reference(s, xnat, fleet_reference)


def test_the_association_budget_holds_across_workers_and_every_instance_is_sent_once(
    tmp_path, state_url, state_db_dsn
):
    from tests.dicom_peers import PynetdicomStoreSCP
    from tests.integration.test_apply_cstore import write_manifest
    from xnatmigrate.testing.corpus import build_corpus

    source = tmp_path / "legacy"
    files = build_corpus(source, SPEC)
    with PynetdicomStoreSCP(delay=0.05) as scp:
        manifest = tmp_path / "m.yaml"
        write_manifest(manifest, source, scp.port)
        state = tmp_path / "state"
        api.plan(manifest, state_dir=state, state_url=state_url, now=NOW)
        env = {**os.environ, "XNATMIGRATE_UNIT_FILES": "4", "XNATMIGRATE_BUDGET_ASSOCIATIONS": "2"}
        cmd = [
            sys.executable,
            "-m",
            "xnatmigrate",
            "apply",
            "--state-dir",
            str(state),
            "--state-url",
            state_url,
        ]
        workers = [
            subprocess.Popen(
                [*cmd, "--jobs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        for code, out, err in (_finish(p) for p in workers):
            assert code == 0, (out, err)
        # Three workers asking for two associations each: never more than the fleet's two at once.
        assert 1 <= scp.most_open <= 2, scp.most_open
        assert sorted(scp.received) == sorted(f.sop_uid for f in files)
        assert set(scp.attempts.values()) == {1}  # no instance sent twice


@needs_own_host
def test_a_worker_cut_from_the_database_stops_within_its_lease_and_its_unit_is_finished_by_another(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    from tests.netcut import CuttableProxy

    s, xnat = fleet_site
    xnat.build_delay = 0.5  # units long enough to be cut inside one
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    parts = urlsplit(state_url)
    query = dict(parse_qsl(parts.query))
    proxy = CuttableProxy(query.get("host") or "127.0.0.1", int(query.get("port") or 5432))
    try:
        via = urlunsplit(parts._replace(query=urlencode({**query, "host": "127.0.0.1", "port": proxy.port})))
        cut = _worker(s, via, "cut")
        deadline = time.monotonic() + 60
        while not _ledger(state_db_dsn, state_url, "SELECT 1 FROM steps LIMIT 1"):  # inside its first unit
            assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
            time.sleep(0.05)
        proxy.cut(server_sees_after=1.0)
        started = time.monotonic()
        other = _worker(s, state_url, "other")
        code, out, err = _finish(cut, timeout=60)  # no hang: its watchdog ends it
        assert code == 75 and time.monotonic() - started < 30, (code, out, err)
        assert err.strip().splitlines()[-1].startswith("error: no heartbeat reached the state database")
        code, out, err = _finish(other)
        assert code == 0, (out, err)
    finally:
        proxy.close()
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)
    hosts = _ledger(
        state_db_dsn, state_url, "SELECT DISTINCT host FROM fleet_units WHERE finished IS NOT NULL"
    )
    assert ("other",) in hosts


# kill -9 of one of two workers at points across a unit's steps, then the other finishes the plan.
FLEET_CRASH_POINTS = [
    "files:3",
    "before-record:stage",
    "after:publish:1",
    "before-record:insert:2",
    "after:build:1",
    "before-record:archive",
]


@needs_own_host
@pytest.mark.parametrize("crash", FLEET_CRASH_POINTS)
def test_kill_9_of_one_worker_at_any_step_ends_as_one_uninterrupted_apply(
    fleet_site, fleet_reference, state_url, state_db_dsn, crash
):
    s, xnat = fleet_site
    xnat.build_delay = 0.05
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    doomed = _worker(s, state_url, "doomed", XNATMIGRATE_TEST_CRASH=crash)
    assert _finish(doomed)[0] == -9  # inside its first unit, on another host than the survivor's
    code, out, err = _finish(_worker(s, state_url, "other"))
    assert code == 0, (out, err)
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)
    # No orphan: nothing half-copied, no staging folder left with anything in it.
    leftovers = [t for t in s.tree() if ".part" in t or (".xnatmigrate-staging" in t and not t.endswith("/"))]
    assert not leftovers, leftovers


def test_one_process_with_several_workers_applies_units_at_once_and_ends_as_one_apply(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    xnat.build_delay = 0.3
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    cmd = [
        sys.executable,
        "-m",
        "xnatmigrate",
        "apply",
        "--state-dir",
        str(s.root / "st"),
        "--state-url",
        state_url,
    ]
    env = {**os.environ, **s.env(), "XNATMIGRATE_UNIT_FILES": "4", "XNATMIGRATE_LEASE_S": LEASE}
    p = subprocess.Popen(
        [*cmd, "--workers", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    code, out, err = _finish(p)
    assert code == 0 and "Traceback" not in err, (out, err)
    _same_as_reference(s, xnat, fleet_reference)
    _no_step_twice(state_db_dsn, state_url)
    spans = _ledger(state_db_dsn, state_url, "SELECT started, finished FROM fleet_units ORDER BY started")
    overlapping = any(b[0] < a[1] for a, b in itertools.pairwise(spans))
    assert len(spans) == UNITS and overlapping  # units ran at the same time in the one process
    # With a ledger in a state directory there is one apply: --workers is refused, with the reason.
    assert cli.main(["apply", "--state-dir", str(s.state), "--workers", "2"]) == 1


def test_the_insert_budget_paces_the_rows_of_every_worker(
    fleet_site, fleet_reference, state_url, state_db_dsn
):
    s, xnat = fleet_site
    xnat.build_delay = 0.0
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    workers = [_worker(s, state_url, f"host{i}", XNATMIGRATE_BUDGET_INSERTS_PER_S="2") for i in range(2)]
    for code, out, err in (_finish(p) for p in workers):
        assert code == 0, (out, err)
        assert "2 prearchive row(s) a second across all hosts" in out
    _same_as_reference(s, xnat, fleet_reference)
    # Eight rows at two a second, in groups of two (a unit's sessions), from two workers: the last group
    # may start no sooner than 3 s after the first, however fast the machine.
    (span,) = _ledger(
        state_db_dsn,
        state_url,
        "SELECT extract(epoch FROM max(at::timestamp) - min(at::timestamp))::float8 FROM steps WHERE step = 'insert'",
    )[0]
    assert span >= 2.5, span


def test_failures_on_several_hosts_are_grouped_by_cause_in_the_fleet_status(
    fleet_site, state_url, state_db_dsn, capsys
):
    s, xnat = fleet_site
    xnat.build_delay = 0.0
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    # Two studies lose a file after plan (storage unmounted, a file moved): their sessions fail alike.
    images = [f.path for f in s.files if f.kind == "image"]
    victims = {images[0]: s.root / "aside-0", images[-1]: s.root / "aside-1"}
    for path, aside in victims.items():
        path.rename(aside)
    workers = [_worker(s, state_url, f"host{i}") for i in range(2)]
    results = [_finish(p) for p in workers]
    assert all(code != 0 for code, _, _ in results), results
    fs = api.fleet_status(s.state, state_url=state_url)
    assert fs is not None
    assert fs.sessions_by_state == {"applied": SPEC.patients - 2, "failed": 2}
    assert len(fs.errors) == 1, fs.errors
    (cause,) = fs.errors
    assert cause.sessions == 2 and len(cause.labels) == 2
    assert not any(str(p) in cause.cause for p in victims)  # the cause names no file…
    assert any(str(p) in cause.example for p in victims)  # …its example does
    assert cli.main(["status", "--fleet", "--state-dir", str(s.state), "--state-url", state_url]) == 0
    out = capsys.readouterr().out
    assert f"Sessions: {SPEC.patients} planned; {SPEC.patients - 2} applied, 2 failed." in out
    assert f"Errors by cause:\n  2 session(s): {cause.cause} (" in out
    # The files back (moved: their ctime changed, so plan again), a rerun applies the two sessions:
    # they are no error any more (the new plan holds those two; the rest it lists as unchanged).
    for path, aside in victims.items():
        aside.rename(path)
    api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
    code, out, err = _finish(_worker(s, state_url, "again"))
    assert code == 0, (out, err)
    fs = api.fleet_status(s.state, state_url=state_url)
    assert fs is not None and fs.errors == () and fs.sessions == 2 and fs.sessions_by_state == {"applied": 2}
    _no_step_twice(state_db_dsn, state_url)


def _builds_recorded(state_db_dsn: str, url: str) -> int:
    if not _ledger(state_db_dsn, url, "SELECT 1 WHERE to_regclass('fleet_builds') IS NOT NULL"):
        return 0
    return int(_ledger(state_db_dsn, url, "SELECT count(*) FROM fleet_builds")[0][0])


def test_builds_slower_than_the_plans_first_ones_go_one_at_a_time_across_the_fleet(
    tmp_path, pg_admin_dsn, monkeypatch, state_url, state_db_dsn
):
    from xnatmigrate.testing.pg import temporary_database

    spec = CorpusSpec(
        patients=16, studies_per_patient=1, series_per_study=1, images_per_series=1, rows=8, seed=7
    )
    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(tmp_path / "site", pdb.dsn, spec=spec)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.2  # XNAT's usual pace
            s.write_manifest(xnat.url)
            for k, v in s.env().items():
                monkeypatch.setenv(k, v)
            api.plan(s.manifest, state_dir=s.state, state_url=state_url, now=NOW)
            # Twice as long as usual is slow here: a loaded machine adds its own time to every build,
            # which narrows the ratio the stand-in's delays make.
            env = {
                "XNATMIGRATE_UNIT_FILES": "1",
                "XNATMIGRATE_BUDGET_BUILDS": "2",
                "XNATMIGRATE_GOVERNOR_SLOW_BUILDS": "2",
            }
            workers = [_worker(s, state_url, f"host{i}", **env) for i in range(3)]
            samples: list[tuple[float, int]] = []  # (when, sessions XNAT builds at once)
            while any(p.poll() is None for p in workers):
                samples.append((time.time(), _building(s)))
                if xnat.build_delay < 1 and _builds_recorded(state_db_dsn, state_url) >= 3:
                    xnat.build_delay = 1.6  # XNAT slows down to eight times its usual time
                time.sleep(0.02)
            results = [_finish(p) for p in workers]
    for code, out, err in results:
        assert code == 0, (out, err)
    said = "".join(err for _, _, err in results)
    assert "as long as this plan's first ones: one build or archive at a time across the fleet" in said, said
    builds = _ledger(
        state_db_dsn,
        state_url,
        "SELECT extract(epoch FROM started)::float8, seconds, slots FROM fleet_builds ORDER BY started",
    )
    assert len(builds) == spec.patients
    assert [b[2] for b in builds[:3]] == [2, 2, 2]  # the usual pace: the fleet's whole budget
    one = [b for b in builds if b[2] == 1]
    assert one, builds  # then one slot, once builds ran slow
    assert all(b[1] >= 1.5 for b in one)  # only while they did
    # What XNAT saw: never more than the budget, and one at a time once the last build begun on two
    # slots had ended (a build ends, in the ledger, once XNAT said it was built).
    assert max(n for _, n in samples) <= 2
    two_ended = max(start + took for start, took, slots in builds if slots == 2)
    assert any(slots == 1 and start > two_ended for start, _, slots in builds), builds
    late = [n for t, n in samples if t > two_ended + 0.1]
    assert late and max(late) <= 1, (late, builds)
    _no_step_twice(state_db_dsn, state_url)
