"""Issue 13: the archive shapes ``xray``, ``huge`` and ``tiny``, each beside its reference in one run.

- ``xray`` (20,000 images in 5,000 studies of 4) and ``huge`` (one study of 10,000 images): ``apply``
  copy against ``cp -r && sync`` and ``apply`` cstore with the default ``--jobs`` against
  ``storescu +sd +r`` (the standard rows' code, ``apply_row`` and ``cstore_default_row``, keyed
  ``<shape>-apply-copy`` / ``<shape>-cstore``). For ``xray`` each row also carries the cost per
  session, (xnatmigrate − reference) ÷ sessions, per round, median.
- ``tiny`` (30,000 / 100,000 / 300,000 files of ≈ 3.7 KB): plan cold, plan warm at every size, apply
  copy at the smallest and the largest; peak RSS of the three at the largest against the smallest
  (``tiny_rss_rows``, computed when the report is written), and the warm re-plan at 100,000 files.

Sizes of the issue (``FULL``): rows measured at other sizes (``--shape-scale``, ``--xray-studies``, …)
are still judged when the target is a ratio, with a note saying the size is not the issue's; absolute
targets (RSS, seconds per 100,000) are judged only at the issue's size.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from .common import BenchError, Row, print_row, skipped_row
from .rows_apply import apply_row
from .rows_cstore import cstore_default_row
from .rows_plan import T_WARM, plan_rows
from .site import Site

#: The issue's sizes: xray and huge in images; tiny: the small, the re-plan and the large size.
FULL: dict[str, list[int]] = {"xray": [20_000], "huge": [10_000], "tiny": [30_000, 100_000, 300_000]}
XRAY_IMAGES_PER_STUDY = 4
COPY_LIMIT = {"xray": 1.3, "huge": 1.0}
CSTORE_LIMIT = 1.0
T_CSTORE = "≤ 1.0 (default --jobs)"
T_TINY_RSS = "300k ≤ 1.5 × 30k, < 400 MB"
TINY_RSS_LIMIT_MB = 400
TINY_RSS_OF = (
    ("tiny-plan-cold", "plan (cold)"),
    ("tiny-plan-warm", "plan (warm)"),
    ("tiny-apply-copy", "apply copy"),
)
REPLAN_FILES = 100_000
T_REPLAN = f"{REPLAN_FILES:,} files ≤ 10 s"

Want = Callable[[str], bool]


def _guarded(
    rows: list[Row],
    keys: list[tuple[str, str, str]],
    n: int,
    shape: str,
    fn: Any,
    post: Callable[[Row], None] | None = None,
) -> list[Row]:
    """``fn()``'s rows, or a FAILED row per key when a measured command failed; ``post`` applied to
    each, then printed as they come."""
    try:
        got: list[Row] = fn()
    except BenchError as exc:
        got = [skipped_row(k, n, t, tg, f"FAILED: {exc}", shape) for k, t, tg in keys]
    for row in got:
        row.shape = shape
        if post is not None:
            post(row)
        print_row(row)
    rows.extend(got)
    return got


def per_session(row: Row, sessions: int) -> None:
    """Add the cost per session, (ours − reference) ÷ sessions in ms (median over paired rounds)."""
    if row.skipped or row.ours is None or row.ref is None or not row.ours.runs:
        return
    per = [(o - r) / sessions * 1000 for o, r in zip(row.ours.seconds, row.ref.seconds)]
    ms = statistics.median(per)
    row.extra["ms_per_session"] = ms
    row.extra["sessions"] = sessions
    row.notes.append(
        f"{ms:+.1f} ms per session ((xnatmigrate − reference) ÷ {sessions:,} sessions, per-round median)"
    )


def _scale_note(row: Row, shape: str, size: int) -> None:
    full = FULL[shape]
    if size not in full and not row.skipped:
        row.notes.append(f"measured at {size:,} images, not the issue's {', '.join(f'{f:,}' for f in full)}")


def transfer_rows(
    site: Site,
    shape: str,
    rounds: int,
    warmup: int,
    *,
    want: Want,
    dcmtk_missing: list[str],
    not_run: list[str],
) -> list[Row]:
    """``xray`` / ``huge``: apply copy vs ``cp -r && sync``, apply cstore (default jobs) vs storescu."""
    rows: list[Row] = []
    corpus = site.corpus
    n, sessions = corpus.files, corpus.sessions
    copy_t = f"≤ {COPY_LIMIT[shape]:.1f}"

    def post(row: Row) -> None:
        row.extra.pop("state", None)  # no re-apply row here
        row.extra["sessions"] = sessions
        if shape == "xray":
            per_session(row, sessions)
        _scale_note(row, shape, n)

    if want("apply-copy"):
        key = f"{shape}-apply-copy"

        def copy() -> list[Row]:
            return [apply_row(site, "copy", rounds, warmup, key=key, target=copy_t, limit=COPY_LIMIT[shape])]

        for row in _guarded(rows, [(key, "apply, transfer: copy", copy_t)], n, shape, copy, post):
            if row.skipped and not row.skipped.startswith("FAILED"):
                not_run.append(f"[{shape}] apply copy at {n:,} images: {row.skipped}")
    if want("cstore"):
        key = f"{shape}-cstore"
        title = "apply cstore, default --jobs, vs storescu +sd +r"
        if dcmtk_missing:
            reason = f"dcmtk not installed ({', '.join(dcmtk_missing)} missing); .ci/run installs it"
            row = skipped_row(key, n, title, T_CSTORE, reason, shape)
            post(row)
            rows.append(row)
            not_run.append(f"[{shape}] apply cstore at {n:,} images: {reason}")
        else:
            _guarded(
                rows,
                [(key, title, T_CSTORE)],
                n,
                shape,
                lambda: [
                    cstore_default_row(site, rounds, warmup, key=key, target=T_CSTORE, limit=CSTORE_LIMIT)
                ],
                post,
            )
    return rows


def tiny_rows(
    site: Site, sizes: list[int], rounds: int, warmup: int, *, want: Want, not_run: list[str]
) -> list[Row]:
    """One ``tiny`` size: plan cold and warm; apply copy (for its peak RSS) at the end sizes only."""
    rows: list[Row] = []
    n = site.corpus.files
    rss = want("rss")
    if want("plan-cold") or want("plan-warm") or rss:
        got = _guarded(
            rows,
            [
                ("tiny-plan-cold", "plan, cold", "report (peak RSS)"),
                ("tiny-plan-warm", "re-plan of an unchanged tree (warm)", T_WARM),
            ],
            n,
            "tiny",
            lambda: plan_rows(
                site,
                rounds,
                warmup,
                offline_too=False,
                warm_too=True,
                dcmtk=False,
                refs=False,
                prefix="tiny-",
                no_refs_note="no reference: the tiny shape measures peak RSS and the warm re-plan",
            ),
        )
        for row in got:
            if row.key == "tiny-plan-cold" and not row.skipped:
                row.title, row.target = "plan, cold (state deleted)", "report (peak RSS)"
            if row.key == "tiny-plan-warm" and not row.skipped:
                row.title = "warm re-plan of an unchanged tree, vs plan cold"
    if (want("apply-copy") or rss) and n in (min(sizes), max(sizes)):
        got = _guarded(
            rows,
            [("tiny-apply-copy", "apply, transfer: copy", "report (peak RSS)")],
            n,
            "tiny",
            lambda: [
                apply_row(site, "copy", rounds, warmup, key="tiny-apply-copy", target="report (peak RSS)")
            ],
        )
        for row in got:
            row.extra.pop("state", None)
            if row.skipped and not row.skipped.startswith("FAILED"):
                not_run.append(f"[tiny] apply copy at {n:,} files: {row.skipped}")
    return rows


def tiny_rss_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Peak RSS of plan cold, plan warm and apply copy at the largest tiny size vs the smallest.

    From the raw rows, when the report is written (like ``run.rss_rows``). Judged only when the
    largest is the issue's 300,000 files; the target's 1.5 is meant for 10 × the files.
    """
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for key, label in TINY_RSS_OF:
        have = sorted(
            ((r["size"], r) for r in rows if r["key"] == key and r.get("ours")),
            key=lambda t: t[0],
        )
        if len(have) < 2:
            missing.append(f"[tiny] peak RSS of {label}: measured at fewer than two sizes")
            continue
        (small_n, small), (large_n, large) = have[0], have[-1]
        s, big = small["ours"]["maxrss_mib"], large["ours"]["maxrss_mib"]
        mb = big * 1.048576
        row = Row(
            f"tiny-rss-{label}",
            large_n,
            f"peak RSS of {label}, {large_n:,} vs {small_n:,} tiny files",
            None,
            None,
            [],
            T_TINY_RSS,
            big <= 1.5 * s and mb < TINY_RSS_LIMIT_MB,
            shape="tiny",
        )
        row.extra.update(small_mib=s, large_mib=big, growth=big / s, small_size=small_n)
        row.notes.append(f"{mb:.0f} MB at {large_n:,} files, {s * 1.048576:.0f} MB at {small_n:,}")
        if large_n < FULL["tiny"][-1]:
            row.met = None
            row.notes.append(f"judged only at {FULL['tiny'][-1]:,} files; here {large_n:,} vs {small_n:,}")
        out.append(row.as_dict())
    return out, missing


def replan_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's "warm re-plan of 100,000 files ≤ 10 s" from the tiny shape's warm re-plans.

    The tiny plan-warm row at exactly 100,000 files when there is one (judged); else the one closest
    to it, its time scaled to 100,000 files (not judged). None when no tiny re-plan was measured.
    """
    warm = [r for r in rows if r["key"] == "tiny-plan-warm" and r.get("ours")]
    if not warm:
        return None
    best = min(warm, key=lambda r: abs(r["size"] - REPLAN_FILES))
    n = best["size"]
    secs = best["ours"]["median"]
    at = secs * REPLAN_FILES / n
    row = Row(
        "tiny-replan-100k",
        n,
        f"warm re-plan {REPLAN_FILES:,} files (tiny shape, unchanged tree)",
        None,
        None,
        [],
        T_REPLAN,
        at <= 10.0 if n == REPLAN_FILES else None,
        shape="tiny",
    )
    row.extra["seconds"] = secs
    row.extra["seconds_per_100k"] = at
    if n == REPLAN_FILES:
        row.notes.append(f"{secs:.2f} s for {n:,} files")
    else:
        row.notes.append(
            f"{secs:.2f} s for {n:,} files ≈ {at:.1f} s per {REPLAN_FILES:,} at this rate "
            f"(extrapolated, not judged: measured at {REPLAN_FILES:,} only in a full run)"
        )
    return row.as_dict()
