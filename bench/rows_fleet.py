"""Issue 16's row: throughput of 1, 2 and 4 ``apply`` worker processes sharing one plan (``fleet``).

"`make bench`: throughput with 1, 2 and 4 worker processes on one plan (I/O-bound C-STORE into a
receiver with a fixed per-instance delay, so scaling is visible on 2 cores), target ≥ 1.8× at 2 and
≥ 3× at 4 workers; the budget holds (never more concurrent associations than allowed, measured at the
receiver)."

Per N workers, each run: a fresh state schema ``fleet_bench_<N>_<run>`` in the site's database (the
embedded PostgreSQL), ``xnatmigrate plan --state-url`` (untimed), then N ``xnatmigrate apply --state-url
… --jobs 1`` processes started at once, each with a state folder of its own (as hosts of their own
have; the plan comes from the ledger), ``XNATMIGRATE_UNIT_FILES`` small enough that 4 workers take
several units each. Timed from the first fork to the last reap; throughput = instances ÷ wall time;
every worker must exit 0, and the receiver must have stored every instance.

The receiver (``DelayedSCP``): a Storage SCP in this process, a thread per association, answering
each C-STORE success after a fixed ``FLEET_DELAY_S`` (a slow archive: the time a worker waits on, not
CPU), storing nothing (``build: none``, no ``xnat.url``: nothing locates the sessions afterwards, as
in the C-STORE rows, whose storescp only writes the files). It counts the associations open at once
(accepted → release requested, aborted or closed) and keeps the highest count: the budget is N
workers × ``--jobs 1``.

After each run the ledger's ``fleet_units`` (each unit's worker, start, seconds inside ``apply_plan``)
gives the split of the wall time the notes report: each worker's start-up to its first unit, the time
inside units, the gaps between a worker's units (Procrastinate's finish and fetch, the unit's own
ledger connection and locks) and its tail after its last unit (waiting for the others' units).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .common import XNATMIGRATE, BenchError, Row, Run, Series, alternate, paired_ratios, rmtree, show
from .site import REPO, Site

#: The receiver's wait before it answers each C-STORE (seconds): one association stores ≤ 1/delay per s.
FLEET_DELAY_S = 0.020
SMOKE_DELAY_S = 0.002
#: XNATMIGRATE_UNIT_FILES for the runs: 2,000 files in studies of 50 → 20 units, several per worker at 4.
FLEET_UNIT_FILES = 100
WORKERS = (1, 2, 4)
JOBS = 1  # --jobs of each worker: its associations at once
TARGETS = {2: 1.8, 4: 3.0}
SCHEMA_PREFIX = "fleet_bench"


def target_of(n: int) -> str:
    budget = f"≤ {n * JOBS} association{'s' if n * JOBS > 1 else ''} at once"
    if n in TARGETS:
        return f"≥ {TARGETS[n]:.1f}× 1 worker's throughput; {budget}"
    return f"report; {budget}"


# ----------------------------------------------------------------------------------------------
# The receiver
# ----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the receiver saw during one run."""

    stores: int = 0
    instances: set[str] = field(default_factory=set)
    associations: int = 0  # accepted
    open_now: int = 0
    max_open: int = 0  # associations open at once, highest
    connections_now: int = 0
    max_connections: int = 0  # TCP connections at once, highest (an association before it is accepted too)


class DelayedSCP:
    """A Storage SCP on 127.0.0.1:``port`` that waits ``delay`` seconds before answering each C-STORE
    success: a thread per connection, blocking reads, any number of associations at once, every
    presentation context accepted with the first transfer syntax proposed, nothing stored.

    Not pynetdicom's ``AE``: its two reactor threads per association poll every millisecond, which on
    2 cores costs several ms per instance and grows with the associations (measured: 23.6 ms per
    instance at 1 association, 28.4 ms at 4, for a 20 ms delay), so the receiver, not the fleet,
    would bound the scaling. Here the only per-instance cost is the delay (the sleep releases the GIL);
    association negotiation is pynetdicom's PDU code, as the sender's is. An association counts as
    open from the A-ASSOCIATE-AC sent to the A-RELEASE-RQ (or A-ABORT, or close) received, before the
    A-RELEASE-RP is sent: its sender cannot have opened the next one yet.
    """

    def __init__(self, port: int, delay: float) -> None:
        self.port = port
        self.delay = delay
        self.lock = threading.Lock()
        self.tally = Tally()
        self.errors: list[str] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DelayedSCP:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="fleet-scp", daemon=True)
        self._thread.start()
        return self

    def reset(self) -> None:
        with self.lock:
            self.tally = Tally()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> DelayedSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="fleet-scp-assoc", daemon=True).start()

    # -- one connection -----------------------------------------------------------------------------

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            t = self.tally
            t.connections_now += 1
            t.max_connections = max(t.max_connections, t.connections_now)
        tally = t  # the run this connection belongs to, even if a reset comes meanwhile
        is_open = False

        def ended() -> None:
            nonlocal is_open
            if is_open:
                is_open = False
                with self.lock:
                    tally.open_now -= 1

        try:
            command: list[bytes] = []
            pending: dict[int, bytes] | None = None  # the command of the C-STORE whose dataset is coming
            context = 0
            while True:
                head = _recv_exact(conn, 6)
                if not head:
                    return
                pdu_type, length = _PDU_HEADER.unpack(head)
                body = _recv_exact(conn, length)
                if pdu_type == 0x01:  # A-ASSOCIATE-RQ
                    conn.sendall(_accept(head + body))
                    is_open = True
                    with self.lock:
                        tally.associations += 1
                        tally.open_now += 1
                        tally.max_open = max(tally.max_open, tally.open_now)
                elif pdu_type == 0x04:  # P-DATA-TF
                    pos = 0
                    while pos + 6 <= len(body):
                        (item_len,) = _U32.unpack_from(body, pos)
                        context, control = body[pos + 4], body[pos + 5]
                        value = body[pos + 6 : pos + 4 + item_len]
                        pos += 4 + item_len
                        if control & 0x01:  # a command fragment
                            command.append(value)
                            if control & 0x02:
                                elements = _elements(b"".join(command))
                                command = []
                                if _us(elements.get(0x00000800, b"\x01\x01")) == 0x0101:  # no dataset
                                    self._answer(conn, context, elements, tally)
                                else:
                                    pending = elements
                        elif control & 0x02 and pending is not None:  # the dataset's last fragment
                            self._answer(conn, context, pending, tally)
                            pending = None
                elif pdu_type == 0x05:  # A-RELEASE-RQ
                    ended()
                    conn.sendall(_RELEASE_RP)
                    return
                else:  # A-ABORT, or anything this receiver does not expect
                    return
        except (OSError, ValueError) as exc:
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            ended()
            with self.lock:
                tally.connections_now -= 1
            conn.close()

    def _answer(self, conn: socket.socket, context: int, rq: dict[int, bytes], tally: Tally) -> None:
        """The fixed wait, then C-STORE-RSP success (or C-ECHO-RSP) to the request ``rq``."""
        field_ = _us(rq.get(0x00000100, b"\x00\x00"))
        sop_class = rq.get(0x00000002, b"")
        msg_id = rq.get(0x00000110, b"\x00\x00")
        if field_ == 0x0001:  # C-STORE-RQ
            time.sleep(self.delay)
            uid = rq.get(0x00001000, b"")
            with self.lock:
                tally.stores += 1
                tally.instances.add(uid.rstrip(b"\x00 ").decode())
            elements = [(0x00000002, sop_class), (0x00000100, _US.pack(0x8001)), (0x00000120, msg_id)]
            elements += [(0x00000800, _US.pack(0x0101)), (0x00000900, _US.pack(0)), (0x00001000, uid)]
        elif field_ == 0x0030:  # C-ECHO-RQ
            elements = [(0x00000002, sop_class), (0x00000100, _US.pack(0x8030)), (0x00000120, msg_id)]
            elements += [(0x00000800, _US.pack(0x0101)), (0x00000900, _US.pack(0))]
        else:
            raise ValueError(f"command field {field_:#06x} is not C-STORE or C-ECHO")
        cmd = _command(elements)
        conn.sendall(_PDV_HEAD.pack(0x04, 0, len(cmd) + 6, len(cmd) + 2, context, 0x03) + cmd)


_PDU_HEADER = struct.Struct(">BxI")
_PDV_HEAD = struct.Struct(">BBIIBB")
_U32 = struct.Struct(">I")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_ELEMENT = struct.Struct("<HHI")
_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            if not buf:
                return b""
            raise ValueError("connection closed inside a PDU")
        buf += got
    return bytes(buf)


def _us(value: bytes) -> int:
    return int(_US.unpack_from(value)[0])


def _elements(data: bytes) -> dict[int, bytes]:
    """A command set (implicit VR little endian) as {tag: value}."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = _ELEMENT.unpack_from(data, pos)
        out[(group << 16) | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from (tag, value) in tag order, its group length first; odd values padded."""
    body = b""
    for tag, value in elements:
        if len(value) % 2:
            value += b"\x00"
        body += _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value
    return _ELEMENT.pack(0, 0, 4) + _UL.pack(len(body)) + body


def _accept(rq_pdu: bytes) -> bytes:
    """The A-ASSOCIATE-AC to a whole A-ASSOCIATE-RQ: every context accepted with its first syntax."""
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import PresentationContext

    rq = A_ASSOCIATE_RQ()
    rq.decode(rq_pdu)
    primitive = rq.to_primitive()
    results = []
    for cx in primitive.presentation_context_definition_list:
        ok = PresentationContext()
        ok.context_id = cx.context_id
        ok.abstract_syntax = cx.abstract_syntax
        ok.transfer_syntax = [cx.transfer_syntax[0]]
        ok.result = 0x00
        results.append(ok)
    primitive.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 0  # unlimited: the sender sends each file in as few PDUs as it likes
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.7156.1.16"
    primitive.user_information = [max_length, impl]
    primitive.result = 0x00
    primitive.result_source = 0x01
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(primitive)
    return bytes(ac.encode())


# ----------------------------------------------------------------------------------------------
# N workers at once
# ----------------------------------------------------------------------------------------------


def state_url(dsn: str, schema: str) -> str:
    """``dsn`` (key=value or URL, no password: the embedded server trusts) as a ``--state-url``."""
    params = {k: v for k, v in conninfo_to_dict(dsn).items() if v and k != "password"}
    user, dbname = params.pop("user", ""), params.pop("dbname", "")
    return f"postgresql://{user + '@' if user else ''}/{dbname}?{urlencode({**params, 'schema': schema})}"


@dataclass(frozen=True)
class Fleet:
    """One timed run of N workers: wall seconds, each worker's pid and exit (s after the first fork)."""

    seconds: float
    pids: list[int]
    exits: list[float]
    maxrss_kib: int
    started_epoch: float  # time.time() at the first fork, against the ledger's timestamps


def run_all(cmds: Sequence[list[str]], env: dict[str, str]) -> Fleet:
    """Start every command at once (a fork each, output to temporary files) and reap each on a thread
    of its own, so each exit time is its own; BenchError unless every one exits 0."""
    full_env = {**os.environ, **env}
    with contextlib.ExitStack() as stack:
        outs = [
            (stack.enter_context(tempfile.TemporaryFile()), stack.enter_context(tempfile.TemporaryFile()))
            for _ in cmds
        ]
        ends = [0.0] * len(cmds)
        codes = [0] * len(cmds)
        rss = [0] * len(cmds)
        epoch0 = time.time()
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(cmd, stdout=o, stderr=e, env=full_env, cwd=REPO)
            for cmd, (o, e) in zip(cmds, outs)
        ]

        def reap(i: int) -> None:
            _, status, usage = os.wait4(procs[i].pid, 0)
            ends[i] = time.perf_counter() - t0
            codes[i] = os.waitstatus_to_exitcode(status)
            procs[i].returncode = codes[i]  # reaped by wait4: tell Popen
            rss[i] = int(usage.ru_maxrss)

        threads = [threading.Thread(target=reap, args=(i,)) for i in range(len(procs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, code in enumerate(codes):
            out, err = outs[i]
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
            if code != 0 or "of the plan applied" not in stdout:
                raise BenchError(
                    f"worker {i + 1} of {len(cmds)} (`{show(cmds[i])}`) exited {code}:\n"
                    f"{stderr[-2000:] or stdout[-2000:]}"
                )
    return Fleet(max(ends), [p.pid for p in procs], ends, max(rss), epoch0)


def _units(dsn: str, schema: str) -> list[tuple[str, int, float, float, float, int]]:
    """Per unit of the run: (host, pid, started epoch, finished epoch, seconds in apply_plan, files)."""
    with psycopg.connect(dsn, options=f"-c search_path={schema}") as conn:
        rows = conn.execute(
            "SELECT host, pid, extract(epoch FROM started)::float8, extract(epoch FROM finished)::float8, "
            "seconds, files FROM fleet_units WHERE finished IS NOT NULL ORDER BY started"
        ).fetchall()
    return [(h, int(p), float(s), float(f), float(sec), int(n)) for h, p, s, f, sec, n in rows]


def _drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # type: ignore[arg-type]


def split(fleet: Fleet, units: list[tuple[str, int, float, float, float, int]]) -> dict[str, Any]:
    """Where one run's wall time went, per worker (medians over workers; seconds)."""
    by: dict[int, list[tuple[str, int, float, float, float, int]]] = {}
    for u in units:
        by.setdefault(u[1], []).append(u)
    startup, inside, gaps, tails, per_worker = [], [], [], [], []
    idle = 0
    for pid, exit_s in zip(fleet.pids, fleet.exits):
        us = by.get(pid, [])
        if not us:  # a worker that took no unit: its whole life is start-up and waiting
            idle += 1
            tails.append(exit_s)
            continue
        startup.append(us[0][2] - fleet.started_epoch)
        inside.append(sum(u[4] for u in us))
        gaps += [b[2] - a[3] for a, b in itertools.pairwise(us)]
        tails.append(exit_s - (us[-1][3] - fleet.started_epoch))
        per_worker.append(len(us))
    unit_s = [u[4] for u in units]
    last = (max(u[3] for u in units) - fleet.started_epoch) if units else None
    return {
        "units": len(units),
        "units_per_worker": sorted(per_worker, reverse=True),
        "idle_workers": idle,
        "startup_s": statistics.median(startup) if startup else None,
        "startup_s_min": min(startup) if startup else None,
        "startup_s_max": max(startup) if startup else None,
        "in_units_s": statistics.median(inside) if inside else None,
        "unit_s": statistics.median(unit_s) if unit_s else None,
        "gap_s": statistics.median(gaps) if gaps else None,
        "gaps_s_total": sum(gaps) / max(1, len(by)),
        "tail_s": statistics.median(tails) if tails else None,
        "tail_s_max": max(tails) if tails else None,
        "first_to_last_unit_s": (max(u[3] for u in units) - min(u[2] for u in units)) if units else None,
        "to_last_unit_s": last,
        # The fleet's exit: the last reap after the last unit finished (idle workers' poll, summary, exit).
        "exit_s": fleet.seconds - last if last is not None else None,
    }


def fleet_rows(
    site: Site,
    rounds: int,
    warmup: int,
    *,
    workers: Sequence[int] = WORKERS,
    unit_files: int = FLEET_UNIT_FILES,
    delay: float = FLEET_DELAY_S,
) -> list[Row]:
    """A row per N in ``workers``: N workers at once on one plan, alternating N = 1, 2, 4 per round."""
    corpus = site.corpus
    n = corpus.files
    env = {**site.env, "XNATMIGRATE_UNIT_FILES": str(unit_files)}
    shown = {"XNATMIGRATE_UNIT_FILES": str(unit_files)}
    url_shown = f"postgresql://…/<site database>?schema={SCHEMA_PREFIX}_<N>_<run>"
    counter = {"runs": 0}
    current: dict[str, Any] = {}
    series = {
        w: Series(
            f"{w} × xnatmigrate apply --jobs {JOBS} (cstore, one plan in PostgreSQL)",
            show(
                [
                    *XNATMIGRATE,
                    "apply",
                    "--state-dir",
                    "<own folder>",
                    "--state-url",
                    url_shown,
                    "--jobs",
                    str(JOBS),
                ],
                shown,
            )
            + f" ({w} at once)",
        )
        for w in workers
    }
    walls: dict[int, list[float]] = {w: [] for w in workers}  # warm-up included, as the tallies
    tallies: dict[int, list[Tally]] = {w: [] for w in workers}
    splits: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}

    with DelayedSCP(site.port, delay) as scp:

        def setup(w: int) -> Callable[[], None]:
            def go() -> None:
                counter["runs"] += 1
                schema = f"{SCHEMA_PREFIX}_{w}_{counter['runs']}"
                url = state_url(site.dsn, schema)
                plan_dir = site.root / "fleet-plan"
                rmtree(plan_dir)
                for i in range(max(workers)):
                    rmtree(site.root / f"fleet-host{i}")
                site.xnatmigrate([*site.plan_cmd("cstore", plan_dir), "--state-url", url])
                current.update(schema=schema, url=url)
                scp.reset()

            return go

        def step(w: int) -> Callable[[], Run]:
            def go() -> Run:
                url = current["url"]
                cmds = [
                    [
                        *XNATMIGRATE,
                        "apply",
                        "--state-dir",
                        str(site.root / f"fleet-host{i}"),
                        "--state-url",
                        url,
                        "--jobs",
                        str(JOBS),
                    ]
                    for i in range(w)
                ]
                got = run_all(cmds, env)
                with scp.lock:
                    tally = scp.tally
                    scp.tally = Tally()
                if len(tally.instances) != n:
                    raise BenchError(f"the receiver stored {len(tally.instances)} of {n} instances")
                walls[w].append(got.seconds)
                tallies[w].append(tally)
                splits[w].append(split(got, _units(site.dsn, current["schema"])))
                _drop_schema(site.dsn, current["schema"])
                return Run(got.seconds, got.maxrss_kib)

            return go

        alternate([(series[w], step(w), setup(w)) for w in workers], rounds, warmup)

    base_w = 1 if 1 in series else workers[0]
    base = series[base_w]

    def recorded(w: int) -> list[dict[str, Any]]:
        return splits[w][len(splits[w]) - len(series[w].runs) :]

    rows: list[Row] = []
    for w in workers:
        s = series[w]
        budget = w * JOBS
        max_open = max(t.max_open for t in tallies[w])
        held = max_open <= budget
        if w == 1 or s is base:
            row = Row(f"fleet-{w}", n, _title(w), s, None, [], target_of(w), held, shape="fleet")
            speedup = 1.0
        else:
            r = paired_ratios(s, base)  # wall(N) ÷ wall(1), per round: below 1 is faster
            speedup = statistics.median(1 / x for x in r)
            goal = TARGETS.get(w)
            met = held and (goal is None or speedup >= goal)
            row = Row(f"fleet-{w}", n, _title(w), s, base, r, target_of(w), met, shape="fleet")
        thr = n / s.median
        last = recorded(w)
        # The same ratio up to the last unit finished (the work done), without the workers' exits.
        done = [a["to_last_unit_s"] / b["to_last_unit_s"] for a, b in zip(recorded(base_w), last)]
        work_speedup = statistics.median(done) if done else None
        # And of the time inside units alone (per worker, median): what the units themselves scale by.
        inside = [a["in_units_s"] / b["in_units_s"] for a, b in zip(recorded(base_w), last)]
        units_speedup = statistics.median(inside) if inside else None
        row.extra.update(
            workers=w,
            jobs=JOBS,
            unit_files=unit_files,
            delay_s=delay,
            files_per_s=thr,
            speedup=speedup,
            work_speedup=work_speedup,
            units_speedup=units_speedup,
            ideal_s=n * delay / w,
            max_associations=max_open,
            max_associations_by_run=[t.max_open for t in tallies[w]],
            max_connections=max(t.max_connections for t in tallies[w]),
            associations_by_run=[t.associations for t in tallies[w]],
            stores_by_run=[t.stores for t in tallies[w]],
            walls_with_warmup=walls[w],
            split=_median_split(last),
            splits=splits[w],
        )
        sp = row.extra["split"]
        row.notes.append(
            f"{thr:.0f} instances/s, ×{speedup:.2f} 1 worker's; at most {max_open} association(s) open "
            f"at once at the receiver (budget {budget}; {max(t.max_connections for t in tallies[w])} TCP "
            f"connections); floor {n * delay / w:.1f} s ({n:,} × {delay * 1000:.0f} ms ÷ {w})"
        )
        row.notes.append(
            f"per worker (medians): start-up to its first unit {_f(sp.get('startup_s'))} s, inside units "
            f"{_f(sp.get('in_units_s'))} s ({sp.get('units')} units of ≤ {unit_files} files, "
            f"{_f(sp.get('unit_s'))} s each), between units {_f(sp.get('gap_s'), 3)} s, after its own last "
            f"unit {_f(sp.get('tail_s'))} s (max {_f(sp.get('tail_s_max'))}); last unit finished → last "
            f"worker reaped {_f(sp.get('exit_s'))} s"
        )
        if w != base_w:
            row.notes.append(
                f"first fork → last unit finished {_f(sp.get('to_last_unit_s'))} s: ×{_f(work_speedup)} "
                f"1 worker's on that measure; time inside units ×{_f(units_speedup)}"
            )
        dups = [st - n for st in row.extra["stores_by_run"] if st != n]
        if dups:
            row.notes.append(f"instances stored more than once: {dups} (per run, warm-up included)")
        rows.append(row)
    return rows


def _title(w: int) -> str:
    if w == 1:
        return f"apply, 1 worker process on one plan (cstore, --jobs {JOBS}, receiver waits per instance)"
    return f"apply, {w} worker processes on one plan (cstore, --jobs {JOBS} each), vs 1 worker"


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _median_split(splits: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-run splits' medians, key by key (the recorded runs, not the warm-up)."""
    if not splits:
        return {}
    out: dict[str, Any] = {}
    for k, v in splits[0].items():
        vals = [s[k] for s in splits if isinstance(s.get(k), int | float)]
        out[k] = statistics.median(vals) if isinstance(v, int | float) and vals else v
    return out


__all__ = [
    "FLEET_DELAY_S",
    "FLEET_UNIT_FILES",
    "SMOKE_DELAY_S",
    "WORKERS",
    "DelayedSCP",
    "fleet_rows",
    "target_of",
]
