"""Issue 14's row: ``apply`` with ``method: inbox, transfer: hardlink``, our side, vs ``cp -al`` + sync.

XNAT cannot run here: its REST side is the tests' stand-in (tests/xnat_standin.py, whose inbox importer
emulates XNAT's, tests/xnat_inbox.py), served from this process. The importer's work (walking the folder,
copying every file into the prearchive, building the session) is XNAT's, not ours: "our side" is the
apply's wall time less the time during which XNAT's import or build jobs were running (the union of those
intervals). That slightly flatters us when we work while XNAT does (we may post the next requests then),
so the wall time is reported beside it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .common import XNATMIGRATE, Row, Run, Series, alternate, paired_ratios, rmtree, run, show
from .site import REPO, Site

T_INBOX = "our side ≤ 3"
LIMIT = 3.0
_USER = {"XNAT_USER": "admin", "XNAT_PASSWORD": "admin"}


class _Busy:
    """Wall-clock intervals during which the stand-in did XNAT's work (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[tuple[float, float]] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.spans.append((start, time.monotonic()))

        return timed

    def within(self, start: float, end: float) -> float:
        """Seconds of [start, end] covered by at least one interval."""
        with self._lock:
            spans = sorted((max(a, start), min(b, end)) for a, b in self.spans if b > start and a < end)
        total, reach = 0.0, start
        for a, b in spans:
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total


def _manifest(site: Site, inbox: Path, url: str) -> Path:
    path = site.root / "manifest-inbox.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              inbox: {inbox}
              url: {url}
            defaults:
              method: inbox
              transfer: hardlink
              build: rest
              archive: false
              build_timeout: 600
            sources:
              - source: {site.corpus.path}
                project: bench
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
    )
    return path


def inbox_row(site: Site, rounds: int, warmup: int) -> Row:
    """The inbox apply (fresh inbox, prearchive, table and state each run) vs ``cp -al`` + sync."""
    from tests.xnat_standin import XnatStandIn  # the stand-in, as the tests run it

    corpus = site.corpus
    inbox, archive = site.root / "inbox", site.root / "archive"
    title = "apply, method: inbox, transfer: hardlink (our side), vs cp -al + sync"
    for d in (inbox, archive):
        rmtree(d)
        d.mkdir()
    busy = _Busy()
    with XnatStandIn(
        site.dsn, site.prearchive, archive, projects={"bench": 0}, inbox=inbox, scheduler=False
    ) as xnat:
        xnat.build_delay = 0.0  # the test knobs that make XNAT's asynchronous steps visible
        xnat.inbox.delay = 0.0
        xnat.inbox._on_request = busy.wrap(xnat.inbox._on_request)  # type: ignore[method-assign]
        xnat._rebuild_job = busy.wrap(xnat._rebuild_job)  # type: ignore[method-assign]
        env = {**site.env, **_USER}
        manifest = _manifest(site, inbox, xnat.url)
        snap = site.root / "state-inbox.plan"
        rmtree(snap)
        site.reset_target()
        if site.cache.exists():  # the scan cache of an earlier row: the plan is the same, made faster
            shutil.copytree(site.cache, snap)
        run([*XNATMIGRATE, "plan", str(manifest), "--state-dir", str(snap)], env=env, cwd=REPO)
        state = site.root / "state-inbox"
        dst = site.root / "cp-dst"
        cmd = [*XNATMIGRATE, "apply", "--state-dir", str(state)]
        ref_cmd = f"cp -al {shlex.quote(str(corpus.path))} {shlex.quote(str(dst))} && sync"
        ours = Series("xnatmigrate apply (inbox, hardlink)", show(cmd, {**site.shown_env, **_USER}))
        ref = Series("cp -al + sync", ref_cmd)
        walls: list[float] = []

        def ref_setup() -> None:
            rmtree(dst)
            os.sync()

        def ours_setup() -> None:
            rmtree(dst)
            site.reset_target()
            for d in (inbox, archive):
                rmtree(d)
                d.mkdir()
            site.restore(snap, state)

        def ours_step() -> Run:
            start = time.monotonic()
            got = run(cmd, env=env, cwd=REPO)
            end = time.monotonic()
            walls.append(got.seconds)
            # Our side: the apply less XNAT's own work meanwhile (at least a millisecond).
            return replace(got, seconds=max(got.seconds - busy.within(start, end), 0.001))

        alternate([(ref, lambda: run(ref_cmd), ref_setup), (ours, ours_step, ours_setup)], rounds, warmup)
        if xnat.errors:
            raise RuntimeError(f"the XNAT stand-in failed: {xnat.errors[0][:300]}")
    rmtree(dst)
    r = paired_ratios(ours, ref)
    row = Row("apply-inbox", corpus.files, title, ours, ref, r, T_INBOX, statistics.median(r) <= LIMIT)
    recorded = walls[-len(ours.runs) :] if ours.runs else []
    if recorded:
        wall = statistics.median(recorded)
        row.extra["wall_seconds"] = recorded
        row.notes.append(
            f"our side {ours.median:.2f} s of an apply of {wall:.2f} s wall (the rest: the stand-in's inbox "
            f"importer and builds, XNAT's work); wall ÷ cp -al + sync {wall / ref.median:.1f}"
        )
    return row
