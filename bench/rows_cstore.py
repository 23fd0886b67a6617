"""Rows 5-7: ``apply`` of a cstore plan against dcmtk's ``storescu`` into the same dcmtk ``storescp``.

Plus ``cstore-pynetdicom``: pynetdicom's own ``Association`` (``bench/pynetdicom_send.py``) over the
same corpus into the same receiver, so the reason for the hand-written sender stays reproducible.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from .common import PYTHON, BenchError, Row, Run, Series, Step, alternate, paired_ratios, run, show
from .corpora import subset
from .site import CALLED_AET, CALLING_AET, DCMTK_ENV, REPO, Site, StoreSCP, receiver_dir

T_BEST = "≤ 1.0 (best N)"
T_ONE = "report"
T_RECIPE = "≥ 25× faster"
RECIPE_FILES = 200


def cstore_rows(
    site: Site,
    rounds: int,
    warmup: int,
    jobs: Sequence[int],
    recipe: bool,
    recipe_files: int = RECIPE_FILES,
    pynetdicom: bool = True,
) -> list[Row]:
    """Per round: ``storescu +sd +r``, ours with each N in ``jobs``, pynetdicom's loop, the per-file recipe.

    storescp is restarted with an empty output folder before every run (untimed) and each run is
    checked to have delivered every file. N > 1 associations need ``storescp --fork``; it is used
    for every run, dcmtk's included, so all senders face the same receiver.
    """
    corpus = site.corpus
    n = corpus.files
    out, where = receiver_dir(site)
    # The per-file recipe's subset is made of hard links to the sources, which moves their ctime: make
    # it before the plan, which binds every file to its ctime (a later link would make the plan stale).
    sub = subset(corpus, site.root / "recipe-subset", min(recipe_files, n))
    snap = site.make_plan("cstore")
    state = site.root / "state-cstore"
    ref_cmd = (
        f"storescu +sd +r -aet {CALLING_AET} -aec {CALLED_AET} 127.0.0.1 {site.port} "
        f"{shlex.quote(str(corpus.path))}"
    )
    nsub = sum(1 for _ in sub.iterdir())
    recipe_cmd = (
        f"find {shlex.quote(str(sub))} -name '*.dcm' -exec storescu --aetitle LOCAL --call {CALLED_AET} "
        f"127.0.0.1 {site.port} {{}} \\;"
    )
    pynd_cmd = [
        PYTHON,
        "-m",
        "bench.pynetdicom_send",
        "127.0.0.1",
        str(site.port),
        CALLED_AET,
        CALLING_AET,
        str(corpus.path),
    ]
    ref = Series("storescu +sd +r (one association)", show(ref_cmd, DCMTK_ENV))
    pynd = Series("pynetdicom AE().associate + send_c_store loop", show(pynd_cmd))
    lost: list[int] = []  # per pynetdicom run: associations its threads lost (bench/pynetdicom_send.py)
    ours = {j: Series(f"xnatmigrate apply --jobs {j} (cstore)", show(site.apply_cmd(state, j))) for j in jobs}
    per_file = Series(f"find … -exec storescu … {{}} \\; ({nsub} files)", show(recipe_cmd, DCMTK_ENV))

    with StoreSCP(site.port, out, site.root / "storescp.log") as scp:

        def checked(step: Callable[[], Run], expect: int) -> Step:
            def go() -> Run:
                result = step()
                got = scp.received()
                if got != expect:
                    raise BenchError(f"storescp received {got} of {expect} files; see {scp.log}")
                return result

            return go

        def ours_setup() -> None:
            scp.restart()
            site.restore(snap, state)

        sides: list[tuple[Series, Step, Callable[[], None] | None]] = [
            (ref, checked(lambda: run(ref_cmd, env=DCMTK_ENV), n), scp.restart)
        ]

        def send(cmd: list[str]) -> Callable[[], Run]:
            return lambda: site.xnatmigrate(cmd)

        for j in jobs:
            sides.append((ours[j], checked(send(site.apply_cmd(state, j)), n), ours_setup))
        if pynetdicom:

            def pynd_run() -> Run:
                result = run(pynd_cmd, cwd=REPO, keep_stdout=True)
                lost.append(int(result.stdout.split()[1]))
                return result

            sides.append((pynd, checked(pynd_run, n), scp.restart))
        if recipe:
            sides.append((per_file, checked(lambda: run(recipe_cmd, env=DCMTK_ENV), nsub), scp.restart))
        alternate(sides, rounds, warmup)

    best_j = min(jobs, key=lambda j: ours[j].median)
    best = ours[best_j]
    rows = []
    r = paired_ratios(best, ref)
    row = Row(
        "cstore-best",
        n,
        f"apply cstore, best N (N={best_j}), vs storescu +sd +r",
        best,
        ref,
        r,
        T_BEST,
        statistics.median(r) <= 1.0,
    )
    row.extra["best_jobs"] = best_j
    row.extra["by_jobs"] = {j: ours[j].median for j in jobs}
    row.notes.append(
        "medians by N: " + ", ".join(f"N={j} {ours[j].median:.2f} s" for j in jobs) + f"; receiver on {where}"
    )
    row.extra["mb_per_s"] = corpus.mb / best.median
    row.extra["ref_mb_per_s"] = corpus.mb / ref.median
    rows.append(row)
    one = ours[jobs[0]] if 1 not in ours else ours[1]
    r = paired_ratios(one, ref)
    rows.append(
        Row("cstore-one", n, "apply cstore, 1 association, vs storescu +sd +r", one, ref, r, T_ONE, None)
    )
    if pynetdicom:
        r = paired_ratios(pynd, ref)
        row = Row(
            "cstore-pynetdicom",
            n,
            "pynetdicom's own Association (send_c_store by path, 1 association), vs storescu +sd +r",
            pynd,
            ref,
            r,
            T_ONE,
            None,
        )
        slower = statistics.median(p / o for p, o in zip(pynd.seconds, one.seconds))
        row.extra["vs_ours_one"] = slower
        row.notes.append(f"{slower:.1f}× the time of apply cstore over 1 association (same rounds)")
        row.extra["lost_associations"] = lost
        if any(lost):
            row.notes.append(
                f"pynetdicom lost {sum(lost)} C-STORE response(s) in {sum(1 for x in lost if x)} of "
                f"{len(lost)} runs (warm-up included) to its own reactor thread: each cost its 2 s DIMSE "
                "timeout and a new association"
            )
        rows.append(row)
    if recipe:
        # Scaled: the recipe's per-file time × the corpus size, against ours on the whole corpus.
        scale = n / nsub
        speedups = [(p * scale) / o for p, o in zip(per_file.seconds, best.seconds)]
        row = Row(
            "cstore-recipe",
            n,
            f"apply cstore (N={best_j}) vs per-file storescu recipe ({nsub} files, scaled ×{scale:.0f})",
            best,
            per_file,
            [1 / s for s in speedups],
            T_RECIPE,
            statistics.median(speedups) >= 25,
        )
        row.extra["speedup"] = statistics.median(speedups)
        row.extra["recipe_files_per_s"] = nsub / per_file.median
        rate = nsub / per_file.median
        row.notes.append(f"{statistics.median(speedups):.0f}× faster; the recipe sends {rate:.0f} files/s")
        rows.append(row)
    return rows


def cstore_default_row(site: Site, rounds: int, warmup: int, *, key: str, target: str, limit: float) -> Row:
    """``apply`` of a cstore plan with the default ``--jobs`` (none given) vs ``storescu +sd +r``.

    The archive shapes' row (issue 13): what a user gets without tuning, against dcmtk's one
    association, both into the same ``storescp --fork`` (restarted empty before every run, untimed),
    each run checked to have delivered every file. ``TCP_NODELAY=1`` for dcmtk's side as in
    ``cstore_rows``.
    """
    corpus = site.corpus
    n = corpus.files
    out, where = receiver_dir(site)
    snap = site.make_plan("cstore")
    state = site.root / "state-cstore"
    ref_cmd = (
        f"storescu +sd +r -aet {CALLING_AET} -aec {CALLED_AET} 127.0.0.1 {site.port} "
        f"{shlex.quote(str(corpus.path))}"
    )
    ref = Series("storescu +sd +r (one association)", show(ref_cmd, DCMTK_ENV))
    ours = Series("xnatmigrate apply, default --jobs (cstore)", show(site.apply_cmd(state), site.shown_env))
    with StoreSCP(site.port, out, site.root / "storescp.log") as scp:

        def checked(step: Callable[[], Run]) -> Step:
            def go() -> Run:
                result = step()
                got = scp.received()
                if got != n:
                    raise BenchError(f"storescp received {got} of {n} files; see {scp.log}")
                return result

            return go

        def ours_setup() -> None:
            scp.restart()
            site.restore(snap, state)

        alternate(
            [
                (ref, checked(lambda: run(ref_cmd, env=DCMTK_ENV)), scp.restart),
                (ours, checked(lambda: site.xnatmigrate(site.apply_cmd(state))), ours_setup),
            ],
            rounds,
            warmup,
        )
    r = paired_ratios(ours, ref)
    row = Row(
        key,
        n,
        "apply cstore, default --jobs, vs storescu +sd +r",
        ours,
        ref,
        r,
        target,
        statistics.median(r) <= limit,
    )
    row.extra["mb_per_s"] = corpus.mb / ours.median
    row.extra["ref_mb_per_s"] = corpus.mb / ref.median
    row.notes.append(
        f"{corpus.mb / ours.median:.0f} MB/s vs {corpus.mb / ref.median:.0f} MB/s ({corpus.mb:.0f} MB); "
        f"receiver on {where}"
    )
    return row


T_ANON = "≤ 1.3"
ANON_LIMIT = 1.3


def cstore_anon_row(site: Site, rounds: int, warmup: int, jobs: Sequence[int]) -> Row:
    """``apply`` of a cstore plan whose files the anon row's script edits in memory before they are sent,
    against the same plan without the script (issue 15: "C-STORE with anonymisation ≤ 1.3× the same run
    without"), each N in ``jobs``, both into the same ``storescp --fork`` (restarted empty before every
    run, untimed), each run checked to have delivered every file. Judged at the N the plain send is
    fastest with (the one a user would pick); the others are in the notes.
    """
    corpus = site.corpus
    n = corpus.files
    out, where = receiver_dir(site)
    plain_snap, anon_snap = site.make_plan("cstore"), site.make_plan("cstore-anon")
    state = site.root / "state-cstore"
    plain = {
        j: Series(f"xnatmigrate apply --jobs {j} (cstore)", show(site.apply_cmd(state, j))) for j in jobs
    }
    anon = {
        j: Series(f"xnatmigrate apply --jobs {j} (cstore, anonymization)", show(site.apply_cmd(state, j)))
        for j in jobs
    }
    with StoreSCP(site.port, out, site.root / "storescp.log") as scp:

        def checked(j: int) -> Step:
            def go() -> Run:
                result = site.xnatmigrate(site.apply_cmd(state, j))
                got = scp.received()
                if got != n:
                    raise BenchError(f"storescp received {got} of {n} files; see {scp.log}")
                return result

            return go

        def setup(snap: Path) -> Callable[[], None]:
            def go() -> None:
                scp.restart()
                site.restore(snap, state)

            return go

        sides: list[tuple[Series, Step, Callable[[], None] | None]] = []
        for j in jobs:
            sides.append((plain[j], checked(j), setup(plain_snap)))
            sides.append((anon[j], checked(j), setup(anon_snap)))
        alternate(sides, rounds, warmup)
    best_j = min(jobs, key=lambda j: plain[j].median)
    r = paired_ratios(anon[best_j], plain[best_j])
    row = Row(
        "cstore-anon",
        n,
        f"apply cstore with anonymization (DicomEdit script, in memory), N={best_j}, vs the same without",
        anon[best_j],
        plain[best_j],
        r,
        T_ANON,
        statistics.median(r) <= ANON_LIMIT,
    )
    by_jobs = {j: statistics.median(paired_ratios(anon[j], plain[j])) for j in jobs}
    row.extra["best_jobs"] = best_j
    row.extra["ratio_by_jobs"] = by_jobs
    row.notes.append(
        "by N: "
        + ", ".join(
            f"N={j} {anon[j].median:.2f} s vs {plain[j].median:.2f} s (×{by_jobs[j]:.2f})" for j in jobs
        )
        + f"; receiver on {where}"
    )
    return row
