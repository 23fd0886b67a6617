"""A throwaway XNAT-like target per corpus: prearchive folder, XNAT's table, manifests, a dcmtk receiver.

Everything lives in ``<bench dir>/work-<N>/``, on the corpus's filesystem (hard links need that),
and is removed at the end. The database runs in an embedded PostgreSQL (``xnatmigrate.testing.pg``)
on a Unix socket; the receiver listens on 127.0.0.1 only and is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg.conninfo import conninfo_to_dict

from xnatmigrate.testing.pg import create_database, install_prearchive_table, unique_database_name

from .common import PYTHON, XNATMIGRATE, Run, rmtree, run
from .corpora import Corpus

DSN_ENV = "XNATMIGRATE_BENCH_DSN"
CALLED_AET, CALLING_AET = "XNAT", "XNATMIGRATE"
REPO = Path(__file__).resolve().parents[1]
# dcmtk's runtime switch to disable Nagle's algorithm (as XNAT's receiver does on its side); given to
# dcmtk's sender too, so the reference gets the same treatment as ours.
DCMTK_ENV = {"TCP_NODELAY": "1"}


# XNAT's default site anonymisation script (as tests/xnat_standin.py has it), and two deletions.
ANON_SCRIPT = (
    'version "6.1"\n'
    'project != "Unassigned" ? (0008,1030) := project\n'
    "(0010,0010) := subject\n"
    "(0010,0020) := session\n"
    "-(0010,0030)\n"
    "-(0008,0080)\n"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Site:
    """Work folders, a database with XNAT's ``xdat_search.prearchive`` and the manifests for one corpus."""

    def __init__(self, root: Path, corpus: Corpus, admin_dsn: str, port: int) -> None:
        self.root = root
        self.corpus = corpus
        self.port = port
        rmtree(root)
        root.mkdir(parents=True)
        self.prearchive = root / "prearchive"
        self.prearchive.mkdir()
        self.cache = root / "state-cache"
        self.dsn = create_database(admin_dsn, unique_database_name("bench"))
        install_prearchive_table(self.dsn, "1.8.2")
        self.env = {DSN_ENV: self.dsn}
        self.shown_env = {DSN_ENV: "<embedded-pg>"}  # the socket path changes every run
        kinds = ("copy", "hardlink", "cstore", "anon", "cstore-anon")
        self.manifests = {kind: self._manifest(kind) for kind in kinds}

    def _manifest(self, kind: str) -> Path:
        labels = textwrap.dedent(
            f"""\
            sources:
              - source: {self.corpus.path}
                project: bench
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
        script = self.root / "site.das"
        script.write_text(ANON_SCRIPT)
        if kind in ("cstore", "cstore-anon"):
            # cstore-anon: the same send, each file edited in memory by the anon row's script first.
            extra = f"  anonymization: {script}\n" if kind == "cstore-anon" else ""
            head = f"""\
                version: 1
                xnat:
                  scp:
                    host: 127.0.0.1
                    port: {self.port}
                    called_aet: {CALLED_AET}
                    calling_aet: {CALLING_AET}
                defaults:
                  method: cstore
                  routing: patient_comments
                  build: none
                """
            head = textwrap.dedent(head) + extra
        else:
            # anon: a copy through XNAT's default site script plus two deletions (issue 15's row).
            extra = f"  anonymization: {script}\n" if kind == "anon" else ""
            head = f"""\
                version: 1
                xnat:
                  prearchive: {self.prearchive}
                  database: {{dsn_env: {DSN_ENV}}}
                defaults:
                  method: prearchive
                  transfer: {"copy" if kind == "anon" else kind}
                  build: none
                """
            head = textwrap.dedent(head) + extra
        path = self.root / f"manifest-{kind}.yaml"
        path.write_text(textwrap.dedent(head) + labels)
        return path

    # -- commands ---------------------------------------------------------------------------------

    def plan_cmd(self, kind: str, state: Path, offline: bool = False) -> list[str]:
        cmd = [*XNATMIGRATE, "plan", str(self.manifests[kind]), "--state-dir", str(state)]
        return [*cmd, "--offline"] if offline else cmd

    def apply_cmd(self, state: Path, jobs: int | None = None) -> list[str]:
        cmd = [*XNATMIGRATE, "apply", "--state-dir", str(state)]
        return [*cmd, "--jobs", str(jobs)] if jobs else cmd

    def xnatmigrate(self, cmd: list[str]) -> Run:
        return run(cmd, env=self.env, cwd=REPO)

    # -- resetting between runs -------------------------------------------------------------------

    def reset_target(self) -> None:
        """Empty prearchive and table, and nothing left dirty from the deletions to be flushed later."""
        rmtree(self.prearchive)
        self.prearchive.mkdir()
        with psycopg.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE xdat_search.prearchive")
        os.sync()

    def keep_cache(self, state: Path) -> None:
        """Keep a planned state folder: its scan cache makes the untimed plans of later rows warm."""
        rmtree(self.cache)
        if state.exists():
            state.rename(self.cache)

    def make_plan(self, kind: str) -> Path:
        """A plan of ``kind`` against an empty target, kept as a snapshot to copy per run.

        Starts from the scan cache of an earlier plan when there is one: the plan is the same, and at
        100,000 images a cold scan would cost minutes that nothing measures.
        """
        self.reset_target()
        snap = self.root / f"state-{kind}.plan"
        rmtree(snap)
        if self.cache.exists():
            shutil.copytree(self.cache, snap)
        self.xnatmigrate(self.plan_cmd(kind, snap))
        if not self.cache.exists():  # the first plan of this site: later ones start warm from it
            shutil.copytree(snap, self.cache)
        return snap

    def restore(self, snap: Path, state: Path) -> None:
        rmtree(state)
        shutil.copytree(snap, state)

    def close(self, admin_dsn: str) -> None:
        from xnatmigrate.testing.pg import drop_database

        name = conninfo_to_dict(self.dsn)["dbname"]
        with contextlib.suppress(psycopg.Error):
            drop_database(admin_dsn, name)
        rmtree(self.root)


class StoreSCP:
    """dcmtk's ``storescp --fork`` on 127.0.0.1:``port``, restarted with an empty output folder per run.

    ``--fork`` serves each association in a child process, so N parallel associations are served in
    parallel (the same receiver for dcmtk's sender and ours). Stopped by its pid; any association
    child still alive is stopped by its pid too.
    """

    def __init__(self, port: int, out_dir: Path, log: Path) -> None:
        self.port = port
        self.out_dir = out_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def restart(self) -> None:
        self.stop()
        rmtree(self.out_dir)
        self.out_dir.mkdir(parents=True)
        cmd = ["storescp", "--aetitle", CALLED_AET, "-od", str(self.out_dir), "+xa", "--fork", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **DCMTK_ENV}
            )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}; see {self.log}")
            try:
                # A bare TCP probe is not an association: storescp only logs it.
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("storescp did not listen within 10 s") from None
                time.sleep(0.02)

    def received(self) -> int:
        return sum(1 for _ in self.out_dir.iterdir()) if self.out_dir.exists() else 0

    def _children(self, pid: int) -> list[int]:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(c) for c in text.split()]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kids = self._children(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for kid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(kid, signal.SIGTERM)

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        rmtree(self.out_dir)


def receiver_dir(site: Site) -> tuple[Path, str]:
    """Where storescp writes: tmpfs when the corpus fits twice, else the corpus's disk (same for both)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * site.corpus.disk + 1_000_000_000:
        return shm / f"xnatmigrate-bench-rx-{os.getpid()}", "tmpfs (/dev/shm)"
    return site.root / "received", "the corpus's disk"


__all__ = ["PYTHON", "Site", "StoreSCP", "free_port", "receiver_dir"]
