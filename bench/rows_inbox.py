"""Issue 14's row: ``apply`` with ``method: inbox, transfer: hardlink``, our side, vs ``cp -al`` + sync.

XNAT cannot run here: its REST side is the tests' stand-in (tests/xnat_standin.py, whose inbox importer
emulates XNAT's, tests/xnat_inbox.py), served from this process. The importer's work (walking the folder,
copying every file into the prearchive, building the session) is XNAT's, not ours: "our side" is the
apply's wall time less the time it reports waiting on XNAT (``apply --json``: ``summary.xnat_seconds``,
its REST requests and the pauses of its polls). The wall time is reported beside it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import textwrap
from dataclasses import replace
from pathlib import Path

from .common import XNATMIGRATE, Row, Run, Series, alternate, paired_ratios, rmtree, run, show
from .site import REPO, Site

T_INBOX = "our side ≤ 3"
LIMIT = 3.0
_USER = {"XNAT_USER": "admin", "XNAT_PASSWORD": "admin"}


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
    with XnatStandIn(
        site.dsn, site.prearchive, archive, projects={"bench": 0}, inbox=inbox, scheduler=False
    ) as xnat:
        xnat.build_delay = 0.0  # the test knobs that make XNAT's asynchronous steps visible
        xnat.inbox.delay = 0.0
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
        cmd = [*XNATMIGRATE, "apply", "--state-dir", str(state), "--json"]
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
            got = run(cmd, env=env, cwd=REPO, keep_stdout=True)
            walls.append(got.seconds)
            waited = float(json.loads(got.stdout)["summary"]["xnat_seconds"])
            # Our side: the apply less what it spent waiting on XNAT (at least a millisecond).
            return replace(got, seconds=max(got.seconds - waited, 0.001), stdout="")

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
            f"our side {ours.median:.2f} s of an apply of {wall:.2f} s wall (the rest waiting on the stand-in's "
            f"REST API, inbox importer and builds: XNAT's side); wall ÷ cp -al + sync {wall / ref.median:.1f}"
        )
    return row
