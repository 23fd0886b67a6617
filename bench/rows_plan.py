"""Rows 1-2: ``plan`` cold and warm against a pydicom header loop and dcmtk's batched ``dcmdump``."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from .common import PYTHON, Row, Series, Step, alternate, paired_ratios, rmtree, run, show
from .site import REPO, Site

T_COLD = "≤ 1.0 (default --jobs)"
T_DCMTK = "stretch ≤ 2"
T_WARM = "100,000 files ≤ 10 s"


def plan_rows(
    site: Site,
    rounds: int,
    warmup: int,
    *,
    offline_too: bool,
    warm_too: bool,
    dcmtk: bool,
    refs: bool = True,
    prefix: str = "",
    no_refs_note: str = "references not run at this size (measured at the smaller ones)",
) -> list[Row]:
    """Cold plan (state deleted) against the DB vs the references, and a warm re-plan, in one loop.

    Per round: pydicom loop, cold plan, ``dcmdump`` batch, [cold plan --offline], warm plan. The warm
    plan starts from a copy of the cold plan's state, so its scan cache is exactly what a re-plan of an
    unchanged tree finds. ``refs=False`` (the largest corpus) times the plans only: their cold plan
    is needed for the warm one and for peak RSS, and the references were measured at smaller sizes.
    ``prefix`` goes before every row key (``tiny-plan-warm``: the archive shapes of issue 13).
    """
    corpus = site.corpus
    n = corpus.files
    cold_state, off_state = site.root / "state-cold", site.root / "state-cold-offline"
    warm_state = site.root / "state-warm"
    pyd_cmd = [PYTHON, "-m", "bench.pydicom_loop", str(corpus.path)]
    dcm_cmd = f"find {shlex.quote(str(corpus.path))} -type f -exec dcmdump +P 0020,000d {{}} + >/dev/null"
    cold = Series("xnatmigrate plan (cold, with DB)", show(site.plan_cmd("copy", cold_state), site.shown_env))
    offline = Series("xnatmigrate plan --offline (cold)", show(site.plan_cmd("copy", off_state, True)))
    warm = Series("xnatmigrate plan (warm)", show(site.plan_cmd("copy", warm_state), site.shown_env))
    pyd = Series("pydicom dcmread(stop_before_pixels) loop", show(pyd_cmd))
    dcm = Series("dcmdump +P 0020,000d, batched", dcm_cmd)

    def step(cmd: list[str] | str) -> Step:
        return lambda: run(cmd, cwd=REPO, env=site.env)

    def fresh(state: Path) -> None:
        rmtree(state)

    def warm_setup() -> None:
        if not cold_state.exists():  # smoke with no warm-up: fill a cache first, untimed
            site.xnatmigrate(site.plan_cmd("copy", cold_state))
        site.restore(cold_state, warm_state)

    site.reset_target()
    sides: list[tuple[Series, Step, Callable[[], None] | None]] = [
        (cold, step(site.plan_cmd("copy", cold_state)), lambda: fresh(cold_state))
    ]
    if refs:
        sides.insert(0, (pyd, step(pyd_cmd), None))
    if dcmtk and refs:
        sides.append((dcm, step(dcm_cmd), None))
    if offline_too:
        sides.append((offline, step(site.plan_cmd("copy", off_state, True)), lambda: fresh(off_state)))
    if warm_too:
        sides.append((warm, step(site.plan_cmd("copy", warm_state)), warm_setup))
    alternate(sides, rounds, warmup)
    for d in (off_state, warm_state):
        rmtree(d)
    site.keep_cache(cold_state)

    rows = []
    if not refs:
        row = Row(f"{prefix}plan-cold", n, "plan, cold, vs pydicom loop", cold, None, [], T_COLD, None)
        row.notes.append(no_refs_note)
        rows.append(row)
    else:
        r = paired_ratios(cold, pyd)
        rows.append(
            Row(f"{prefix}plan-cold", n, "plan, cold, vs pydicom loop", cold, pyd, r, T_COLD, _le(r, 1.0))
        )
    if dcmtk and refs:
        r = paired_ratios(cold, dcm)
        rows.append(
            Row(
                f"{prefix}plan-cold-dcmtk",
                n,
                "plan, cold, vs dcmtk dcmdump",
                cold,
                dcm,
                r,
                T_DCMTK,
                _le(r, 2.0),
            )
        )
    if offline_too:
        r = paired_ratios(offline, pyd)
        rows.append(
            Row(
                f"{prefix}plan-cold-offline",
                n,
                "plan --offline, cold, vs pydicom loop",
                offline,
                pyd,
                r,
                "report",
                None,
            )
        )
    if warm_too:
        r = paired_ratios(warm, cold)
        at100k = warm.median * 100_000 / n
        met = at100k <= 10.0 if n >= 100_000 else None
        row = Row(f"{prefix}plan-warm", n, "plan, warm, vs plan cold", warm, cold, r, T_WARM, met)
        row.extra["seconds_per_100k"] = at100k
        if n < 100_000:
            row.notes.append(f"≈ {at100k:.1f} s per 100,000 files at this rate (extrapolated, not judged)")
        rows.append(row)
    return rows


def _le(ratios: list[float], limit: float) -> bool | None:
    import statistics

    return statistics.median(ratios) <= limit if ratios else None
