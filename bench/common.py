"""Timing primitives shared by every comparison: one command, alternating pairs, medians, versions."""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The interpreter of the venv running the bench: every xnatmigrate and pydicom command uses it.
PYTHON = sys.executable
XNATMIGRATE = [PYTHON, "-m", "xnatmigrate"]
#: GNU time, the launcher ``run`` measures peak RSS through (None: not installed, the harness's own
#: peak then floors every figure, see ``run``).
PEAK_TIME = next((p for p in ("/usr/bin/time",) if os.access(p, os.X_OK)), None)


class BenchError(RuntimeError):
    """A measured command failed: the numbers would be meaningless, so the comparison stops."""


@dataclass(frozen=True)
class Run:
    """One timed command: wall seconds and the peak RSS of its largest process (KiB, from wait4)."""

    seconds: float
    maxrss_kib: int
    stdout: str = ""


def show(cmd: Sequence[str] | str, env: Mapping[str, str] | None = None) -> str:
    """The command as a user would type it (environment additions first)."""
    text = cmd if isinstance(cmd, str) else shlex.join(str(c) for c in cmd)
    text = text.replace(PYTHON + " -m xnatmigrate", "xnatmigrate").replace(PYTHON, "python")
    extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return f"{extra} {text}".strip()


def run(
    cmd: Sequence[str] | str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    ok: Sequence[int] = (0,),
    keep_stdout: bool = False,
) -> Run:
    """Run ``cmd`` (a list, or a string for ``sh -c``) and time it from fork to reap.

    ``wait4`` gives the rusage of the child and its reaped descendants, so ``maxrss_kib`` is the
    peak RSS of the largest single process of the tree (what ``/usr/bin/time -v`` prints), not a sum.
    Output goes to temporary files, never pipes, so a chatty command cannot stall on a full pipe.

    NOTE: a process's ``ru_maxrss`` starts at the peak RSS of the process it was spawned from: Linux
    records the old address space's high-water mark when a process execs, and a child made by
    ``vfork``/``posix_spawn`` (what ``subprocess`` uses) execs from its parent's. This harness grows to
    ≈ 260 MiB generating a 300,000-file corpus, and every command it spawned then measured at least
    that. So the command runs under GNU ``time`` (``PEAK_TIME``, a small C program, when installed),
    whose own child starts from its few MiB; ``maxrss_kib`` is its ``%M``, the same wait4 figure.
    """
    argv: list[str] = ["sh", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
    full_env = {**os.environ, **(env or {})}
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(prefix="bench-peak-") as peak,
    ):
        spawned = [PEAK_TIME, "-q", "-f", "%M", "-o", peak.name, *argv] if PEAK_TIME else argv
        t0 = time.perf_counter()
        proc = subprocess.Popen(spawned, stdout=out, stderr=err, env=full_env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        maxrss_kib = int(usage.ru_maxrss)
        if PEAK_TIME:
            # The last line (GNU time may note a signal before it); none if time itself failed.
            lines = Path(peak.name).read_text(errors="replace").split()
            maxrss_kib = int(lines[-1]) if lines and lines[-1].isdigit() else maxrss_kib
    if proc.returncode not in ok:
        raise BenchError(f"`{show(argv)}` exited {proc.returncode}:\n{stderr[-2000:] or stdout[-2000:]}")
    return Run(seconds, maxrss_kib, stdout if keep_stdout else "")


@dataclass
class Series:
    """Repeated timings of one side of a comparison."""

    label: str
    command: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def maxrss_mib(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024


Step = Callable[[], Run]


def alternate(
    sides: Sequence[tuple[Series, Step, Callable[[], None] | None]], rounds: int, warmup: int
) -> None:
    """Run every side once per round, in the given order (A B A B …), after ``warmup`` unrecorded rounds.

    Each side is ``(series, timed step, untimed setup or None)``; the setup runs right before its
    step, so fresh directories or databases never count. Pairing within a round means drift of a
    shared machine (other jobs, writeback) hits both sides of a ratio alike.
    """
    for r in range(warmup + rounds):
        for series, step, setup in sides:
            if setup is not None:
                setup()
            result = step()
            if r >= warmup:
                series.runs.append(result)


def paired_ratios(ours: Series, ref: Series, scale: float = 1.0) -> list[float]:
    """Per-round ``ours ÷ (ref × scale)`` (the rounds of ``alternate`` line up by index)."""
    return [o / (r * scale) for o, r in zip(ours.seconds, ref.seconds)]


@dataclass
class Row:
    """One line of the results table."""

    key: str  # e.g. "plan-cold"
    size: int  # images in the corpus
    title: str
    ours: Series | None
    ref: Series | None
    ratios: list[float]
    target: str
    met: bool | None  # None: nothing to judge (report-only rows, or skipped)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    shape: str = "standard"  # the corpus shape (bench/corpora.py SHAPES); rows of old runs lack it

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def as_dict(self) -> dict[str, Any]:
        def side(s: Series | None) -> dict[str, Any] | None:
            if s is None or not s.runs:
                return None
            return {
                "label": s.label,
                "command": s.command,
                "seconds": s.seconds,
                "median": s.median,
                "maxrss_mib": s.maxrss_mib,
            }

        return {
            "key": self.key,
            "size": self.size,
            "title": self.title,
            "ours": side(self.ours),
            "ref": side(self.ref),
            "ratios": self.ratios,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "notes": self.notes,
            "extra": self.extra,
            "skipped": self.skipped,
            "shape": self.shape,
        }


def print_row(row: Row) -> None:
    """One line of progress per row, as it is measured."""
    if row.skipped:
        print(f"  {row.key:<18} not run: {row.skipped}", flush=True)
        return
    ours = f"{row.ours.median:8.2f} s" if row.ours and row.ours.runs else "         "
    ref = f"{row.ref.median:8.2f} s" if row.ref and row.ref.runs else "         "
    ratio = f"ratio {row.ratio:.2f}" if row.ratio is not None else ""
    print(
        f"  {row.key:<18} ours {ours}  ref {ref}  {ratio}  met={row.met}  {'; '.join(row.notes)}", flush=True
    )


def skipped_row(key: str, size: int, title: str, target: str, reason: str, shape: str = "standard") -> Row:
    return Row(key, size, title, None, None, [], target, None, skipped=reason, shape=shape)


# ----------------------------------------------------------------------------------------------
# Versions and machine
# ----------------------------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def versions() -> dict[str, str]:
    """Versions of everything whose speed is compared."""
    import pydicom
    import pynetdicom

    import xnatmigrate

    return {
        "xnatmigrate": xnatmigrate.__version__,
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk storescu": _first_line(["storescu", "--version"]).strip("$ ").strip(),
        "dcmtk storescp": _first_line(["storescp", "--version"]).strip("$ ").strip(),
        "dcmtk dcmdump": _first_line(["dcmdump", "--version"]).strip("$ ").strip(),
        "coreutils cp": _first_line(["cp", "--version"]),
        "kernel": platform.release(),
        "xnatmigrate source": _source_state(),
    }


def _source_state() -> str:
    """The commit measured, and how many package files differed from it (others edit concurrently)."""
    root = Path(__file__).resolve().parents[1]
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "xnatmigrate"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return head
    changed = [line[3:] for line in out.splitlines() if line.strip()]
    return f"commit {head}" + (
        f" with {len(changed)} uncommitted file(s): {', '.join(changed)}" if changed else ""
    )


def machine(path: Path) -> dict[str, str]:
    """CPU, memory and the disk holding ``path`` (corpora, prearchive and state share it)."""
    mem = "?"
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    du = shutil.disk_usage(path)
    mount = _first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(path)])
    dev = re.sub(r"^/dev/", "", mount.split()[0]) if mount and mount != "not installed" else ""
    rotational = Path(f"/sys/block/{dev}/queue/rotational")
    kind = {"0": "kernel: non-rotational", "1": "kernel: rotational"}.get(
        rotational.read_text().strip() if rotational.exists() else "", "unknown kind"
    )
    return {
        "cpus": f"{os.cpu_count()} × {model}",
        "memory": mem,
        "disk": f"{mount} ({kind}); {du.free / 1e9:.0f} GB free of {du.total / 1e9:.0f} GB at start",
        "caches": _caches_note(),
    }


def _caches_note() -> str:
    # Never dropped: the machine is shared, and dropping would slow everyone else down. Both sides of
    # a pair read the same files, so the page cache favours neither (see the notes for one exception).
    return (
        "not dropped (deliberately: shared machine); sources come from the page cache where they fit "
        "in memory, for both sides of a pair alike"
    )


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
