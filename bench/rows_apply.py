"""Rows 3, 4 and 8: ``apply`` (copy, hardlink) against ``cp -r``/``cp -al`` + ``sync``; a no-op re-apply."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import statistics
from pathlib import Path

from .common import Row, Series, alternate, free_bytes, paired_ratios, rmtree, run, show, skipped_row
from .site import REPO, Site

TARGETS = {"copy": "≤ 1.1", "hardlink": "≤ 3 (report)", "anon": "≤ 1.5"}
LIMITS = {"copy": 1.1, "hardlink": 3.0, "anon": 1.5}
# What each kind's reference is: the copy the user would otherwise make.
_REF_FLAG = {"copy": "-r", "hardlink": "-al", "anon": "-r"}
T_REAPPLY = "100,000 files ≤ 5 s, no file contents read"


def apply_row(
    site: Site,
    kind: str,
    rounds: int,
    warmup: int,
    *,
    key: str | None = None,
    target: str | None = None,
    limit: float | None = None,
) -> Row:
    """``xnatmigrate apply`` of a saved plan (fresh prearchive, table and state each run) vs cp + sync.

    Only the apply command is timed; the plan is made once, before, and its state copied per run.
    ``key``, ``target`` and ``limit`` (the ratio to meet; None: report only) default to the standard
    rows' (``apply-<kind>``, ``TARGETS``, ``LIMITS``); the archive shapes of issue 13 set their own.
    """
    corpus = site.corpus
    key = key or f"apply-{kind}"
    if target is None:
        target, limit = TARGETS[kind], LIMITS[kind]
    what = "copy with anonymization (DicomEdit script)" if kind == "anon" else kind
    title = f"apply, transfer: {what}, vs cp {_REF_FLAG[kind]} + sync"
    if kind in ("copy", "anon") and free_bytes(site.root) < corpus.disk + 2_000_000_000:
        return skipped_row(
            key,
            corpus.files,
            title,
            target,
            f"not enough free disk for a copy of {corpus.disk / 1e6:.0f} MB plus 2 GB of headroom",
        )
    snap = site.make_plan(kind)
    state = site.root / f"state-{kind}"
    dst = site.root / "cp-dst"
    flag = _REF_FLAG[kind]
    # `sync`: plain cp only fills the page cache; the product's copy is durable when apply returns.
    ref_cmd = f"cp {flag} {shlex.quote(str(corpus.path))} {shlex.quote(str(dst))} && sync"
    ours = Series(f"xnatmigrate apply ({kind})", show(site.apply_cmd(state), site.shown_env))
    ref = Series(f"cp {flag} + sync", ref_cmd)

    def ref_setup() -> None:
        rmtree(dst)
        os.sync()

    def ours_setup() -> None:
        rmtree(dst)
        site.reset_target()
        site.restore(snap, state)

    alternate(
        [
            (ref, lambda: run(ref_cmd), ref_setup),
            (ours, lambda: site.xnatmigrate(site.apply_cmd(state)), ours_setup),
        ],
        rounds,
        warmup,
    )
    rmtree(dst)
    r = paired_ratios(ours, ref)
    met = statistics.median(r) <= limit if limit is not None else None
    row = Row(key, corpus.files, title, ours, ref, r, target, met)
    row.extra["mb_per_s"] = corpus.mb / ours.median
    row.extra["ref_mb_per_s"] = corpus.mb / ref.median
    row.notes.append(
        f"{corpus.mb / ours.median:.0f} MB/s vs {corpus.mb / ref.median:.0f} MB/s ({corpus.mb:.0f} MB)"
    )
    row.extra["state"] = str(state)  # finished: the re-apply row uses it
    return row


def reapply_row(site: Site, state: Path, runs: int) -> Row:
    """Re-apply of a finished plan: timed ``runs`` times, then once more to prove no file is read.

    Proof, two ways: ``rchar`` of ``/proc/<shell>/io`` after the apply was reaped (every byte that
    apply read through read()/pread(), page-cache hits included, and Python's own imports), and, when
    strace is installed, every ``open*`` of a path below the corpus or the prearchive.
    """
    corpus = site.corpus
    cmd = site.apply_cmd(state)
    ours = Series("xnatmigrate apply (finished plan)", show(cmd, site.shown_env))
    for _ in range(runs):
        ours.runs.append(site.xnatmigrate(cmd))
    row = Row("reapply", corpus.files, "re-apply of a finished plan", ours, None, [], T_REAPPLY, None)
    per100k = ours.median * 100_000 / corpus.files
    # /proc/<pid>/io of the shell includes the I/O of the children it reaped (the kernel adds a
    # reaped child's counters to its parent's), so this measures the whole apply process tree.
    proof = run(f"{shlex.join(cmd)} >/dev/null && cat /proc/$$/io", env=site.env, cwd=REPO, keep_stdout=True)
    io = dict(re.findall(r"^(\w+): (\d+)$", proof.stdout, re.M))
    rchar = int(io.get("rchar", -1))
    row.extra["rchar"] = rchar
    row.notes.append(
        f"the whole apply read {rchar / 1e6:.1f} MB through read() (Python imports and the state "
        f"file included) against a corpus of {corpus.mb:.0f} MB"
    )
    opened = _opened_below(site, cmd)
    if opened is not None:
        row.extra["opened_corpus_files"] = opened
        row.notes.append(f"strace: {opened} file open*() below the corpus or the prearchive")
    # strace is the proof when present; rchar alone includes Python's own imports (≈ 4 MB).
    no_read = opened == 0 if opened is not None else rchar < corpus.bytes / 10
    if corpus.files >= 100_000:
        row.met = per100k <= 5.0 and no_read
    else:
        row.notes.append("judged only at 100,000 files (start-up dominates here)")
        row.met = None if no_read else False
    row.extra["seconds_per_100k"] = per100k
    row.extra["no_contents_read"] = no_read
    return row


def _opened_below(site: Site, cmd: list[str]) -> int | None:
    strace = shutil.which("strace")
    if strace is None:
        return None
    log = site.root / "reapply.strace"
    run(
        [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log), *cmd], env=site.env, cwd=REPO
    )
    roots = (str(site.corpus.path), str(site.prearchive))
    count = 0
    with open(log, errors="replace") as fh:
        for line in fh:
            m = re.search(r'open(?:at2?)?\((?:[^,]*, )?"([^"]*)"', line)
            # Folder listings (O_DIRECTORY) are metadata; a file opened at all counts as read.
            if m and m.group(1).startswith(roots) and "O_DIRECTORY" not in line:
                count += 1
    return count
