"""Issue 16's memory requirement: "Peak memory of a worker independent of plan size (10⁴ vs 10⁶
planned files within 1.2×)".

    python -m bench.fleet_memory [--out docs/fleet-memory.md] [--sizes 10000,1000000]
                                 [--admin-dsn DSN | --embedded] [--tracemalloc auto|always|never]

Prints a table, writes it to ``--out`` and the whole result as JSON beside it (``<out>.json``).

Method. The fleet row's set-up (``bench/rows_fleet.py``): its corpus (``bench/corpora.py`` shape
``fleet``, 2,000 files in 40 studies of 50), its receiver ``DelayedSCP`` (here with no delay: the
workers' memory, not its throughput, is measured), its state URL per schema. Per plan size:

1. A fresh schema, and a real plan of the real corpus for the C-STORE route (``method: cstore``,
   ``build: none``, ``archive`` false, the receiver's port in ``xnat.scp``: the site's ``cstore``
   manifest) with ``xnatmigrate plan MANIFEST --state-url URL``.
2. A bigger plan synthesised from it: each of its sessions cloned ``size ÷ 2,000`` times
   (``dataclasses.replace``): a new ``action_id`` (SHA-256 of the old id and the clone's number), the
   session label suffixed ``_c<k>``, the StudyInstanceUID suffixed ``.<k>`` (units are cut by study:
   every clone is a study of its own), the routing line rebuilt for the new label
   (``labels.routing_line``, as the planner builds it) and ``prearchive_uri`` too when it names the
   session (it does not on this route). The files are unchanged: the same real sources, whose headers
   apply re-reads and compares with the same planned digests (the receiver takes one SOP instance any
   number of times). Manifest path and digest and the ledger serial are those of the real plan, so
   ``check_fresh`` accepts it. ``model.write_plan_json`` computes the id and writes plan.json (loaded
   back with ``api.load_plan``, which checks it), and ``StateStore.save_plan`` makes it the ledger's
   saved plan, the one every ``apply --state-url`` applies. 10⁴ files = 5 clones, 10⁶ = 500.
3. ONE worker, ``xnatmigrate apply --state-url URL --jobs 1`` with ``XNATMIGRATE_UNIT_FILES=1000``
   (the default: 20 studies of 50 files per unit), into the receiver. ``fleet_units`` is polled
   (every 20 ms) until ``--units`` (10) units are finished, and the worker's peak RSS read then
   (``VmHWM`` of ``/proc/<pid>/status``). The 10⁴ plan has exactly 10 units and is left to finish (its
   VmHWM is the last one read before it exits; the wait4 peak at its exit is recorded too); the 10⁶
   plan's worker is then stopped with SIGINT (it exits 130, the unit in flight goes back to the
   queue). Both workers did the same work, 10 units of 1,000 files, and differ only in plan size.
   Also recorded: VmHWM when the first unit started (the plan loaded and the round queued), the
   time from the fork to Procrastinate's ``deferred`` event (the plan read from the ledger and checked;
   the event carries the queueing transaction's start), to the first ``fleet_units.started`` (the
   round queued), the plan.json size and the number of units queued.
4. The ratio of the two VmHWM figures against the 1.2 target. When it misses (or with
   ``--tracemalloc always``), each size is run again with the worker in-process under ``tracemalloc``
   (``python -m bench.fleet_memory --worker …``: ``xnatmigrate.cli.main`` with the fleet's phases
   wrapped), traced from the plan's read (``api.plan_of``) to the round queued (``_Fleet._prepare``
   returned), the phases that see the whole plan; the units run untraced (tracemalloc slows their
   many small allocations some 20-fold, and what a unit allocates is that unit's). Reported: Python's
   traced memory, current and peak, per phase, and the allocations alive after the plan's read,
   inside the queueing transaction (at Procrastinate's ``batch_defer_jobs_async``: the units, the
   ``fleet_units`` rows and the Jobs alive) and after it, compared between the sizes by traceback:
   what grows with the plan. tracemalloc sees Python's allocations only (not libpq's result buffers
   nor malloc's fragmentation): the RSS figures are the requirement's measure, these the explanation.

What this does not cover: a plan whose sessions differ in their sources (here 10⁶ planned files are
2,000 real ones, so the ledger's scan cache and the page cache stay small), and a rerun's round, whose
``applied`` set is read whole (here nothing is applied yet).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from . import corpora
from .common import PYTHON, XNATMIGRATE, BenchError, rmtree, show
from .rows_fleet import DelayedSCP, _drop_schema, state_url
from .site import REPO, Site, free_port

SIZES = (10_000, 1_000_000)
UNIT_FILES = 1000  # XNATMIGRATE_UNIT_FILES: the default
UNITS = 10  # units finished when peak RSS is read: the whole 10⁴ plan
TARGET = 1.2
CORPUS_FILES = 2000
SCHEMA_PREFIX = "fleet_mem"
POLL_S = 0.02
TRACE_DEPTH = 8


# ----------------------------------------------------------------------------------------------
# A bigger plan from a real one
# ----------------------------------------------------------------------------------------------


def clone_session(s: Any, k: int) -> Any:
    """Session ``s`` as the ``k``-th clone: another study under another label, the same files."""
    from xnatmigrate import labels
    from xnatmigrate.model import CstoreSession

    if not isinstance(s, CstoreSession):
        raise BenchError(f"only C-STORE sessions are cloned, not {type(s).__name__}")
    session = f"{s.session}_c{k}"
    line = s.routing_line
    if line is not None:
        line = labels.routing_line(s.project, s.subject, session)
    uri = s.prearchive_uri
    if uri.endswith(f"/{s.session}"):
        uri = uri[: -len(s.session)] + session
    return dataclasses.replace(
        s,
        action_id=hashlib.sha256(f"{s.action_id}|{k}".encode()).hexdigest()[:16],
        session=session,
        study_uid=f"{s.study_uid}.{k}",
        routing_line=line,
        prearchive_uri=uri,
    )


def synthesise(real: Path, out: Path, copies: int) -> dict[str, Any]:
    """plan.json at ``out``: every session of the plan at ``real`` cloned ``copies`` times (clone-major,
    so each unit is consecutive clones), the rest of the plan as it is. Returns its id and sizes."""
    from xnatmigrate import api, model

    t0 = time.perf_counter()
    plan = api.load_plan(real)
    originals = tuple(plan.sessions)
    sessions = tuple(clone_session(s, k) for k in range(copies) for s in originals)
    big = dataclasses.replace(plan, sessions=sessions)
    with out.open("wb") as fh:
        plan_id = model.write_plan_json(big, fh)
        fh.write(b"\n")  # as `xnatmigrate plan` writes it
    del big, sessions
    check = api.load_plan(out)  # the id checked over the bytes, as apply will
    if check.plan_id != plan_id or len(check.sessions) != copies * len(originals):
        raise BenchError(f"the synthesised plan {out} does not load back as written")
    files = sum(s.file_count for s in originals) * copies
    studies = {s.study_uid for s in check.sessions}
    if len(studies) != len(check.sessions):
        raise BenchError("the clones share StudyInstanceUIDs: units would not be whole studies")
    return {
        "plan_id": plan_id,
        "sessions": len(check.sessions),
        "files": files,
        "plan_json_bytes": out.stat().st_size,
        "real_plan_json_bytes": real.stat().st_size,
        "synthesis_s": time.perf_counter() - t0,
    }


def save_plan(url: str, plan_id: str, path: Path) -> float:
    """Make ``path`` the ledger's saved plan (what ``apply --state-url`` applies); seconds taken."""
    from xnatmigrate.execute import statepg
    from xnatmigrate.state import StateStore

    t0 = time.perf_counter()
    with StateStore(create=False, opener=statepg.opener(url)) as store, path.open("rb") as fh:
        store.save_plan(plan_id, fh)
        if store.saved_plan() != plan_id:
            raise BenchError("the ledger did not take the synthesised plan")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# One worker, watched
# ----------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` (KiB) of a live process; {} once it has exited."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def _ledger(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The worker's progress as the ledger has it (the tables appear once the worker made them)."""
    got: dict[str, Any] = {"units": 0, "finished": 0, "first_started": None, "deferred": None}
    row = conn.execute(
        "SELECT to_regclass('fleet_units') IS NOT NULL, to_regclass('procrastinate_events') IS NOT NULL"
    ).fetchone()
    if row and row[0]:
        r = conn.execute(
            "SELECT count(*), count(finished), extract(epoch FROM min(started))::float8 FROM fleet_units"
        ).fetchone()
        if r:
            got.update(units=int(r[0]), finished=int(r[1]), first_started=r[2])
    if row and row[1]:
        r = conn.execute(
            "SELECT extract(epoch FROM min(at))::float8 FROM procrastinate_events WHERE type = 'deferred'"
        ).fetchone()
        if r:
            got["deferred"] = r[0]
    return got


def watch_worker(
    cmd: list[str], env: dict[str, str], dsn: str, schema: str, units: int, log: Path
) -> dict[str, Any]:
    """Start ``cmd``; poll the ledger and /proc until ``units`` units are finished; then SIGINT it
    unless it is exiting anyway (no unit left). What was seen, times in seconds after the fork."""
    full_env = {**os.environ, **env}
    with (
        log.with_suffix(".out").open("wb") as out,
        log.with_suffix(".err").open("wb") as err,
        psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema}") as conn,
    ):
        epoch0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=REPO)
        seen: dict[str, Any] = {
            "hwm_kib_at_queued": None,
            "hwm_kib_at_units": None,
            "rss_kib_at_units": None,
            "last_hwm_kib": None,
        }
        code: int | None = None
        rusage_kib = 0
        interrupted_at: float | None = None
        state: dict[str, Any] = {}
        deadline = time.monotonic() + 3600
        while True:
            st = proc_status(proc.pid)
            if st.get("VmHWM"):
                seen["last_hwm_kib"] = st["VmHWM"]
            state = _ledger(conn)
            if state["first_started"] is not None and seen["hwm_kib_at_queued"] is None and st:
                seen["hwm_kib_at_queued"] = st.get("VmHWM")
            if state["finished"] >= units and seen["hwm_kib_at_units"] is None and st:
                seen["hwm_kib_at_units"] = st.get("VmHWM")
                seen["rss_kib_at_units"] = st.get("VmRSS")
                seen["units_at_read"] = state["finished"]
                seen["read_s"] = time.time() - epoch0
                if state["units"] > state["finished"]:  # units left: stop it, the one in flight goes back
                    proc.send_signal(signal.SIGINT)
                    interrupted_at = time.monotonic()
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                proc.returncode = code
                rusage_kib = int(usage.ru_maxrss)
                break
            if interrupted_at is not None and time.monotonic() - interrupted_at > 120:
                proc.send_signal(signal.SIGINT)  # a second Ctrl-C: os._exit(130)
                interrupted_at = time.monotonic()
            if time.monotonic() > deadline:
                proc.kill()
                raise BenchError(f"`{show(cmd)}` did not finish {units} units within an hour")
            time.sleep(POLL_S)
        ended = time.time() - epoch0
        state = _ledger(conn)
    stderr = log.with_suffix(".err").read_text(errors="replace")
    stdout = log.with_suffix(".out").read_text(errors="replace")
    expected = 130 if interrupted_at is not None else 0
    if code != expected:
        raise BenchError(f"`{show(cmd)}` exited {code}, not {expected}:\n{stderr[-2000:] or stdout[-2000:]}")
    if seen["hwm_kib_at_units"] is None:
        # The worker finished its last unit and exited between two polls: its last VmHWM read stands.
        seen["hwm_kib_at_units"] = seen["last_hwm_kib"]
        seen["hwm_read_before_exit"] = True
    if state["finished"] < units:
        raise BenchError(f"the worker exited after {state['finished']} of {units} units:\n{stderr[-2000:]}")
    return {
        **seen,
        "exit_code": code,
        "interrupted": interrupted_at is not None,
        "maxrss_kib_at_exit": rusage_kib,
        "units_queued": state["units"],
        "units_finished": state["finished"],
        "to_deferred_s": state["deferred"] - epoch0 if state["deferred"] is not None else None,
        "to_first_unit_s": state["first_started"] - epoch0 if state["first_started"] is not None else None,
        "exit_s": ended,
        "stdout_tail": stdout[-600:],
    }


# ----------------------------------------------------------------------------------------------
# The worker under tracemalloc (``python -m bench.fleet_memory --worker OUT apply …``)
# ----------------------------------------------------------------------------------------------


def _traced_worker(out_dir: Path, argv: list[str]) -> int:
    """``xnatmigrate.cli.main(argv)`` traced from the plan's read to the round queued, the phases that
    see the whole plan (tracemalloc slows a unit's many small allocations some 20-fold, and what a
    unit allocates does not depend on the plan: the RSS figures cover the units)."""
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()

    def mark(what: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        phases.append({"phase": what, "t": time.monotonic() - t0, "current": current, "peak": peak})
        tracemalloc.reset_peak()
        (out_dir / "phases.json").write_text(json.dumps(phases, indent=1))

    def dump(name: str) -> None:
        tracemalloc.take_snapshot().dump(str(out_dir / f"{name}.snap"))

    from procrastinate import manager as pmanager

    from xnatmigrate import api, cli
    from xnatmigrate.execute import fleet

    plan_of = api.plan_of

    def traced_plan_of(*args: Any, **kw: Any) -> Any:
        tracemalloc.start(TRACE_DEPTH)
        mark("start (after imports, the ledger opened)")
        got = plan_of(*args, **kw)
        mark("plan read from the ledger and checked (plan_of)")
        dump("loaded")
        return got

    setattr(api, "plan_of", traced_plan_of)  # noqa: B010  # called by name in api.apply
    prepare = fleet._Fleet._prepare

    async def traced_prepare(self: Any) -> bool:
        mark("fleet.join, check_fresh, begin_plan, Procrastinate opened")
        got = await prepare(self)
        mark("round queued (_prepare)")
        dump("queued")
        tracemalloc.stop()
        return got

    setattr(fleet._Fleet, "_prepare", traced_prepare)  # noqa: B010
    defer = pmanager.JobManager.batch_defer_jobs_async

    async def traced_defer(self: Any, jobs: Any, **kw: Any) -> Any:
        dump("queueing")  # inside _prepare: its units, rows and Jobs alive
        return await defer(self, jobs, **kw)

    setattr(pmanager.JobManager, "batch_defer_jobs_async", traced_defer)  # noqa: B010
    return cli.main(argv)


def _top_growth(small: Path, big: Path, n: int = 12) -> list[dict[str, Any]]:
    """Allocations alive in the ``big`` plan's snapshot beyond the ``small`` one's, by line, largest
    first, each with the frames of this project and Procrastinate that led to it."""
    noise = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>"))
    a = tracemalloc.Snapshot.load(str(small)).filter_traces(noise)
    b = tracemalloc.Snapshot.load(str(big)).filter_traces(noise)
    out = []
    for d in b.compare_to(a, "traceback")[:n]:
        frames = [f"{Path(f.filename).name}:{f.lineno}" for f in d.traceback]
        ours = [
            f"{f.filename.split('site-packages/')[-1].split(str(REPO) + '/')[-1]}:{f.lineno}"
            for f in d.traceback
            if "xnatmigrate" in f.filename or "procrastinate" in f.filename or "psycopg" in f.filename
        ]
        out.append(
            {
                "size_diff": d.size_diff,
                "count_diff": d.count_diff,
                "size": d.size,
                "where": frames[-1] if frames else "?",
                "via": ours[-4:],
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# Per plan size
# ----------------------------------------------------------------------------------------------


def prepare_schema(site: Site, size: int, tag: str, out: Path) -> tuple[str, str, dict[str, Any]]:
    """A fresh schema holding a real plan, then the synthesised plan of ``size`` files as its saved
    plan: (schema, state URL, the plan's figures)."""
    schema = f"{SCHEMA_PREFIX}_{tag}_{size}"
    _drop_schema(site.dsn, schema)
    url = state_url(site.dsn, schema)
    plan_dir = site.root / f"plan-{tag}-{size}"
    rmtree(plan_dir)
    t0 = time.perf_counter()
    site.xnatmigrate([*site.plan_cmd("cstore", plan_dir), "--state-url", url])
    planned_s = time.perf_counter() - t0
    copies = size // site.corpus.files
    if copies * site.corpus.files != size:
        raise BenchError(f"{size:,} files is not a multiple of the corpus's {site.corpus.files:,}")
    got = synthesise(plan_dir / "plan.json", out, copies)
    got.update(copies=copies, real_plan_s=planned_s, save_plan_s=save_plan(url, got["plan_id"], out))
    return schema, url, got


def measure(
    site: Site, scp: DelayedSCP, size: int, units: int, unit_files: int, *, traced: Path | None = None
) -> dict[str, Any]:
    tag = "trace" if traced else "rss"
    plan_json = site.root / f"synth-{size}.json"
    schema, url, plan = prepare_schema(site, size, tag, plan_json)
    host = site.root / f"host-{tag}-{size}"
    rmtree(host)
    args = ["apply", "--state-dir", str(host), "--state-url", url, "--jobs", "1"]
    if traced is None:
        cmd = [*XNATMIGRATE, *args]
    else:
        rmtree(traced)
        traced.mkdir(parents=True)
        cmd = [PYTHON, "-m", "bench.fleet_memory", "--worker", str(traced), *args]
    env = {**site.env, "XNATMIGRATE_UNIT_FILES": str(unit_files)}
    scp.reset()
    print(
        f"  {size:,} files: {plan['sessions']:,} sessions, plan.json {plan['plan_json_bytes'] / 1e6:,.0f} MB; "
        f"{'tracemalloc ' if traced else ''}worker started",
        flush=True,
    )
    got = watch_worker(cmd, env, site.dsn, schema, units, site.root / f"worker-{tag}-{size}")
    with scp.lock:
        got["receiver_stores"] = scp.tally.stores
        got["receiver_max_associations"] = scp.tally.max_open
    if scp.errors:
        raise BenchError(f"the receiver failed: {scp.errors[:3]}")
    if got["receiver_stores"] < units * unit_files:
        raise BenchError(f"the receiver took {got['receiver_stores']} instances, {units} units send more")
    _drop_schema(site.dsn, schema)
    plan_json.unlink()
    got.update(plan=plan, size=size, command=show(cmd, {"XNATMIGRATE_UNIT_FILES": str(unit_files)}))
    if traced is not None:
        got["phases"] = json.loads((traced / "phases.json").read_text())
    return got


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "–" if kib is None else f"{kib / 1024:,.1f}"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        "| planned files | sessions | plan.json MB | units queued | fork → deferred s | fork → 1st unit s "
        f"| VmHWM at 1st unit MiB | VmHWM at {result['units']} units MiB | wait4 peak at exit MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        p = r["plan"]
        lines.append(
            f"| {r['size']:,} | {p['sessions']:,} | {p['plan_json_bytes'] / 1e6:,.1f} | {r['units_queued']:,} "
            f"| {_s(r['to_deferred_s'])} | {_s(r['to_first_unit_s'])} | {_mib(r['hwm_kib_at_queued'])} "
            f"| {_mib(r['hwm_kib_at_units'])} | {_mib(r['maxrss_kib_at_exit'])} "
            f"{'(SIGINT, 130)' if r['interrupted'] else '(finished, 0)'} |"
        )
    ratio = result["ratio"]
    lines.append("")
    lines.append(
        f"Ratio of VmHWM at {result['units']} units, {runs[-1]['size']:,} ÷ {runs[0]['size']:,} files: "
        f"**{ratio:.3f}** (target ≤ {TARGET}): {'met' if result['met'] else 'MISSED'}."
    )
    traced = result.get("tracemalloc")
    if traced:
        lines += ["", "tracemalloc (Python allocations of the worker; MiB), per phase: current / peak"]
        lines.append("")
        head = "| phase | " + " | ".join(f"{t['size']:,} files" for t in traced["runs"]) + " |"
        lines += [head, "|---|" + "---:|" * len(traced["runs"])]
        names = [p["phase"] for p in traced["runs"][0]["phases"]]
        for i, name in enumerate(names):
            cells = []
            for t in traced["runs"]:
                ph = t["phases"][i] if i < len(t["phases"]) else None
                cells.append(f"{ph['current'] / 2**20:,.1f} / {ph['peak'] / 2**20:,.1f}" if ph else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for moment, rows in traced["growth"].items():
            lines += [
                "",
                f"Alive at {moment}, {traced['runs'][-1]['size']:,} beyond {traced['runs'][0]['size']:,}:",
            ]
            lines.append("")
            lines += ["| KiB more | blocks more | allocated at | via |", "|---:|---:|---|---|"]
            for g in rows:
                lines.append(
                    f"| {g['size_diff'] / 1024:,.0f} | {g['count_diff']:,} | {g['where']} | {' ← '.join(reversed(g['via']))} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        return _traced_worker(Path(args[1]), args[2:])
    ap = argparse.ArgumentParser(prog="python -m bench.fleet_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/fleet-memory.md"))
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="planned files, smallest first")
    ap.add_argument("--units", type=int, default=UNITS, help="units finished when the peak is read")
    ap.add_argument("--unit-files", type=int, default=UNIT_FILES, help="XNATMIGRATE_UNIT_FILES")
    ap.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--embedded", action="store_true", help="an embedded PostgreSQL instead of --admin-dsn")
    ap.add_argument("--tracemalloc", choices=("auto", "always", "never"), default="auto")
    ap.add_argument("--corpus-dir", default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xnatmigrate-fleet-memory"))
    ns = ap.parse_args(args)
    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()]
    out: Path = ns.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = corpora.ensure(corpora.bench_dir(ns.corpus_dir), CORPUS_FILES, shape="fleet")
    result: dict[str, Any] = {
        "argv": " ".join(["python", "-m", "bench.fleet_memory", *args]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "corpus": {"path": str(corpus.path), "files": corpus.files, "sessions": corpus.sessions},
        "units": ns.units,
        "unit_files": ns.unit_files,
        "target": TARGET,
    }
    with contextlib.ExitStack() as stack:
        admin = ns.admin_dsn
        if ns.embedded:
            from xnatmigrate.testing.pg import EmbeddedPostgres

            admin = stack.enter_context(EmbeddedPostgres()).dsn
        site = Site(ns.work / "site", corpus, admin, free_port())
        stack.callback(site.close, admin)
        scp = stack.enter_context(DelayedSCP(site.port, 0.0))
        print(
            f"== fleet memory: one worker, {ns.units} units of {ns.unit_files} files, sizes {sizes}",
            flush=True,
        )
        runs = [measure(site, scp, n, ns.units, ns.unit_files) for n in sizes]
        result["runs"] = runs
        first, last = runs[0]["hwm_kib_at_units"], runs[-1]["hwm_kib_at_units"]
        result["ratio"] = last / first
        result["ratio_wait4"] = runs[-1]["maxrss_kib_at_exit"] / runs[0]["maxrss_kib_at_exit"]
        result["met"] = result["ratio"] <= TARGET
        if ns.tracemalloc == "always" or (ns.tracemalloc == "auto" and not result["met"]):
            print("== the same under tracemalloc, to see what grows", flush=True)
            traced_runs = []
            for n in sizes:
                traced_runs.append(
                    measure(site, scp, n, ns.units, ns.unit_files, traced=ns.work / f"trace-{n}")
                )
            small, big = ns.work / f"trace-{sizes[0]}", ns.work / f"trace-{sizes[-1]}"
            moments: dict[str, Callable[[], list[dict[str, Any]]]] = {
                "the plan loaded": lambda: _top_growth(small / "loaded.snap", big / "loaded.snap"),
                "queueing (batch_defer_jobs_async)": lambda: _top_growth(
                    small / "queueing.snap", big / "queueing.snap"
                ),
                "the round queued (after _prepare)": lambda: _top_growth(
                    small / "queued.snap", big / "queued.snap"
                ),
            }
            result["tracemalloc"] = {
                "runs": [{"size": r["size"], "phases": r["phases"]} for r in traced_runs],
                "growth": {k: f() for k, f in moments.items()},
                "rss": [{"size": r["size"], "hwm_kib_at_units": r["hwm_kib_at_units"]} for r in traced_runs],
            }
    text = table(result)
    print(text)
    out.write_text(f"# Fleet worker memory vs plan size\n\n`{result['argv']}` ({result['date']})\n\n{text}")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
