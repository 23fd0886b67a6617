"""``make bench``: every comparison of issues 7 and 13, side by side, written to ``docs/benchmarks.md``.

    python -m bench.run [--shapes standard,xray,huge,tiny] [--sizes 2000,10000,100000]
                        [--shape-scale F] [--xray-studies N] [--huge-images N] [--tiny-sizes A,B,C]
                        [--rounds N] [--warmup N] [--only NAME,...]
                        [--out docs/benchmarks.md] [--corpus-dir DIR] [--cstore-jobs 1,2,4] [--merge]
                        [--fleet-files N] [--fleet-workers 1,2,4] [--fleet-unit-files N]
                        [--smoke] [--report-only]

Comparisons (``--only`` names): plan-cold, plan-warm, apply-copy, apply-hardlink, apply-anon, apply-inbox,
reapply, cstore, cstore-recipe, cstore-anon, rss, fleet. Corpora live in ``${XNATMIGRATE_BENCH_DIR:-~/.cache/xnatmigrate-bench}``
(``--corpus-dir``) and are made once. Corpora above ``LARGE`` images run only the rows that matter
at that scale (plan cold once, plan warm, a hard-link apply once, the no-op re-apply, peak RSS): a
durable copy or a C-STORE of 20+ GB per run, several rounds, would take hours and double the disk.

Shapes (``--shapes``, default all; ``bench/corpora.py`` describes each, ``bench/rows_shapes.py`` their
rows): ``standard`` is the corpus of issue 7 at ``--sizes``; ``xray`` is 5,000 studies of 4 small
radiographs (``--xray-studies``), ``huge`` one study of 10,000 images (``--huge-images``), ``tiny``
30,000, 100,000 and 300,000 files of ≈ 3.7 KB (``--tiny-sizes``). ``--shape-scale 0.05`` scales the
three defaults for a quick try (xray 250 studies, huge 500 images, tiny 1,500/5,000/15,000 files);
the explicit options win over it. Above ``LARGE`` images a shape's rows run 1 round, no warm-up.
``fleet`` (issue 16, ``bench/rows_fleet.py``) is the one shape of the ``fleet`` row, and that row runs
on no other: 1, 2 and 4 (``--fleet-workers``) ``apply`` processes sharing one plan of ``--fleet-files``
tiny files (default 2,000) in units of ``--fleet-unit-files`` (default 100), C-STORE into a receiver
that waits 20 ms per instance. ``--only fleet`` runs that shape alone; the other shapes run when some
other row is wanted.

``--smoke`` runs every comparison once on a few hundred small images in a folder next to ``--out``,
and every shape on a few dozen (for the test suite: it proves the harness runs, never how fast).
``--merge`` keeps the results of sizes and shapes not run this time from the previous ``<out>.json``;
``--report-only`` rewrites the report from it.

The plot needs matplotlib in the venv (``.venv/bin/pip install matplotlib``, deliberately not a
dependency of the package); without it the report says so and has no plot. The analysis at the end of
the report is ``bench/notes.md``, written by hand from profiles.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import corpora, report, rows_shapes
from .common import BenchError, Row, machine, print_row, skipped_row, versions
from .rows_apply import T_REAPPLY, TARGETS, apply_row, reapply_row
from .rows_cstore import T_ANON, T_BEST, T_ONE, T_RECIPE, cstore_anon_row, cstore_rows
from .rows_fleet import FLEET_DELAY_S, FLEET_UNIT_FILES, SMOKE_DELAY_S, fleet_rows, target_of
from .rows_inbox import T_INBOX, inbox_row
from .rows_plan import T_COLD, T_WARM, plan_rows
from .site import Site, free_port

NAMES = (
    "plan-cold",
    "plan-warm",
    "apply-copy",
    "apply-hardlink",
    "apply-anon",
    "apply-inbox",
    "reapply",
    "cstore",
    "cstore-recipe",
    "cstore-anon",
    "rss",
    "fleet",
)
SHAPES = ("standard", "xray", "huge", "tiny", "fleet")
FLEET_NAMES = {"fleet"}  # the rows of the fleet shape, and measured on no other
LARGE = 20_000
T_RSS = "100k ≤ 1.5 × 10k, < 500 MB"
RSS_OF = (
    ("plan-cold", "plan (cold)"),
    ("plan-warm", "plan (warm)"),
    ("apply-copy", "apply copy"),
    ("apply-hardlink", "apply hardlink"),
    ("cstore-best", "apply cstore"),
)
NOTES = Path(__file__).with_name("notes.md")
#: --smoke: a few dozen files per shape (tiny: two sizes, for its RSS rows).
SMOKE_SIZES = {"standard": [300], "xray": [40], "huge": [40], "tiny": [20, 60], "fleet": [40]}
#: --smoke: the fleet row's workers and files per unit (4 studies of 10 files: 4 units).
SMOKE_FLEET = ((1, 2), 10)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}"
    )
    ap.add_argument("--sizes", default="2000,10000,100000", help="the standard shape's sizes (images)")
    ap.add_argument(
        "--shape-scale",
        type=float,
        default=1.0,
        help="scale the xray, huge and tiny default sizes (quick runs)",
    )
    ap.add_argument("--xray-studies", type=int, default=None, help="xray studies of 4 images (default 5000)")
    ap.add_argument("--huge-images", type=int, default=None, help="images of the huge study (default 10000)")
    ap.add_argument(
        "--tiny-sizes", default=None, help="tiny shape's sizes in files (default 30000,100000,300000)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(NAMES)}")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--corpus-dir", default=None)
    ap.add_argument("--cstore-jobs", default="1,2,4")
    ap.add_argument("--fleet-files", type=int, default=2000, help="the fleet row's corpus (files; × 50)")
    ap.add_argument(
        "--fleet-workers", default="1,2,4", help="the fleet row's worker counts (first: the base)"
    )
    ap.add_argument(
        "--fleet-unit-files",
        type=int,
        default=FLEET_UNIT_FILES,
        help="XNATMIGRATE_UNIT_FILES of the fleet row's workers",
    )
    ap.add_argument(
        "--merge", action="store_true", help="keep other sizes' and shapes' results from <out>.json"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite <out> from <out>.json, measure nothing"
    )
    ap.add_argument("--smoke", action="store_true", help="every comparison once on a few hundred small files")
    args = ap.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(NAMES)
    if unknown:
        ap.error(f"unknown --only name(s): {', '.join(sorted(unknown))}")
    bad = set(filter(None, args.shapes.split(","))) - set(SHAPES)
    if bad:
        ap.error(f"unknown --shapes name(s): {', '.join(sorted(bad))}")
    try:
        args.shape_sizes = _shape_sizes(args)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _round_to(x: float, unit: int) -> int:
    return max(unit, round(x / unit) * unit)


def _shape_sizes(args: argparse.Namespace) -> dict[str, list[int]]:
    """Sizes (images = files) per selected shape, in the order the shapes run."""
    chosen = [s for s in SHAPES if s in set(filter(None, args.shapes.split(",")))]
    if args.smoke:
        return {s: SMOKE_SIZES[s] for s in chosen}
    f = args.shape_scale
    full = rows_shapes.FULL
    per = rows_shapes.XRAY_IMAGES_PER_STUDY
    if f <= 0:
        raise ValueError("--shape-scale must be > 0")
    xray = args.xray_studies * per if args.xray_studies is not None else _round_to(full["xray"][0] * f, per)
    huge = args.huge_images if args.huge_images is not None else _round_to(full["huge"][0] * f, 4)
    if args.tiny_sizes:
        tiny = [int(t) for t in args.tiny_sizes.split(",") if t.strip()]
    else:
        tiny = sorted({_round_to(n * f, corpora.SHAPES["tiny"].unit) for n in full["tiny"]})
    sizes = {
        "standard": [int(s) for s in args.sizes.split(",") if s.strip()],
        "xray": [xray],
        "huge": [huge],
        "tiny": sorted(set(tiny)),
        "fleet": [args.fleet_files],
    }
    for shape in chosen:
        for n in sizes[shape]:
            corpora.SHAPES[shape].spec(n)  # ValueError: not a multiple of the shape's unit
    return {s: sizes[s] for s in chosen}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    out: Path = args.out.resolve()
    if args.report_only:
        write_report(out, json.loads(out.with_suffix(".json").read_text()))
        print(f"rewrote {out} from {out.with_suffix('.json')}")
        return 0
    started = time.monotonic()
    only = set(filter(None, args.only.split(",")))
    out.parent.mkdir(parents=True, exist_ok=True)
    # The fleet shape serves the fleet row alone, and the fleet row no other shape.
    shape_sizes: dict[str, list[int]] = {
        s: v
        for s, v in args.shape_sizes.items()
        if not only or bool(only & FLEET_NAMES if s == "fleet" else only - FLEET_NAMES)
    }
    sizes = shape_sizes.get("standard", [])
    if args.smoke:
        rounds, warmup = 1, 0
        root = Path(args.corpus_dir).resolve() if args.corpus_dir else out.parent / "bench-smoke"
        jobs = [1, 2]
    else:
        rounds, warmup = args.rounds, args.warmup
        root = corpora.bench_dir(args.corpus_dir)
        jobs = [int(j) for j in args.cstore_jobs.split(",")]
    root.mkdir(parents=True, exist_ok=True)

    def want(name: str) -> bool:
        return not only or name in only

    dcmtk_missing = [t for t in ("storescu", "storescp", "dcmdump") if shutil.which(t) is None]
    meta: dict[str, Any] = {
        "argv": shlex.join(["python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "rounds": f"{rounds} round(s) after {warmup} warm-up"
        + ("" if args.smoke else f"; above {LARGE:,} images 1 round, no warm-up"),
        "warmup": warmup,
        "machine": machine(root),
        "versions": versions(),
    }
    rows: list[Row] = []
    not_run: list[str] = []
    corpus_list: list[dict[str, Any]] = []
    failed = False

    from xnatmigrate.testing.pg import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        port = free_port()
        for shape, shape_list in shape_sizes.items():
            tag = "" if shape == "standard" else f"[{shape}] "
            # Largest first, so that a smaller corpus of the shape is hard links into a larger one.
            have: dict[int, corpora.Corpus] = {}
            for size in sorted(shape_list, reverse=True):
                try:
                    have[size] = corpora.ensure(root, size, smoke=args.smoke, shape=shape)
                except corpora.NoSpace as exc:
                    not_run.append(f"{tag}every row at {size:,} images: {exc}")
            for size in shape_list:
                if size not in have:
                    continue
                corpus = have[size]
                corpus_list.append(
                    {
                        "shape": shape,
                        "size": size,
                        "files": corpus.files,
                        "bytes": corpus.bytes,
                        "sessions": corpus.sessions,
                        "made": corpora.made(root, size, shape),
                    }
                )
                large = size > LARGE and not args.smoke
                r1, w1 = (1, 0) if large else (rounds, warmup)
                name = corpora.SHAPES[shape].name_of(size)
                print(
                    f"== {shape}: {size:,} images in {corpus.sessions:,} stud"
                    f"{'y' if corpus.sessions == 1 else 'ies'} ({corpus.mb:,.0f} MB) "
                    f"at {corpus.path}",
                    flush=True,
                )
                site = Site(root / ("work-" + name.removeprefix("corpus-")), corpus, pg.dsn, port)
                try:
                    if shape == "standard":
                        got = _size_rows(
                            site,
                            size,
                            r1,
                            w1,
                            rounds,
                            warmup,
                            jobs,
                            want,
                            dcmtk_missing,
                            large,
                            not_run,
                            20 if args.smoke else 200,
                        )
                    elif shape == "tiny":
                        got = rows_shapes.tiny_rows(site, shape_list, r1, w1, want=want, not_run=not_run)
                    elif shape == "fleet":
                        got = _fleet_rows(site, r1, w1, args)
                    else:
                        got = rows_shapes.transfer_rows(
                            site, shape, r1, w1, want=want, dcmtk_missing=dcmtk_missing, not_run=not_run
                        )
                finally:
                    site.close(pg.dsn)
                failed |= any(row.skipped and row.skipped.startswith("FAILED") for row in got)
                rows.extend(got)

    data = [r.as_dict() for r in rows]
    raw = out.with_suffix(".json")
    meta["sizes"] = sizes
    meta["shapes"] = {s: n for s, n in shape_sizes.items() if s != "standard"}
    meta["rss"] = want("rss")
    meta["wall_minutes"] = (time.monotonic() - started) / 60
    runs = [meta]
    if args.merge and raw.exists():
        data, corpus_list, not_run, runs = _merge(
            json.loads(raw.read_text()), data, corpus_list, not_run, runs, shape_sizes
        )
    doc = {"runs": runs, "rows": data, "corpora": corpus_list, "not_run": not_run}
    raw.write_text(json.dumps(doc, indent=1))
    write_report(out, doc, smoke=args.smoke)
    print(f"wrote {out} and {raw} in {meta['wall_minutes']:.1f} min")
    return 1 if failed else 0


def _merge(
    old: dict[str, Any],
    data: list[dict[str, Any]],
    corpus_list: list[dict[str, Any]],
    not_run: list[str],
    runs: list[dict[str, Any]],
    shape_sizes: dict[str, list[int]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """This run's results plus the previous ones of sizes (standard) and shapes not run this time."""
    sizes = shape_sizes.get("standard", [])
    others = {s for s in shape_sizes if s != "standard"}

    def kept(item: dict[str, Any]) -> bool:
        shape = item.get("shape", "standard")
        return item["size"] not in sizes if shape == "standard" else shape not in others

    def kept_line(line: str) -> bool:
        if line.startswith("["):
            return line[1:].split("]", 1)[0] not in others
        return not any(f"{s:,}" in line for s in sizes)

    def kept_run(m: dict[str, Any]) -> bool:
        return bool(set(m.get("sizes", [])) - set(sizes) or set(m.get("shapes", {})) - others)

    return (
        [r for r in old["rows"] if kept(r)] + data,
        [c for c in old["corpora"] if kept(c)] + corpus_list,
        [n for n in old.get("not_run", []) if kept_line(n)] + not_run,
        [m for m in old.get("runs", []) if kept_run(m)] + runs,
    )


def write_report(out: Path, doc: dict[str, Any], *, smoke: bool = False) -> None:
    """``out`` (Markdown) and its throughput PNG from the raw results ``doc``."""
    derived = ("rss-", "tiny-rss-", "tiny-replan-")
    rows = [r for r in doc["rows"] if not r["key"].startswith(derived)]
    not_run = [n for n in doc["not_run"] if not n.startswith(("peak RSS of", "[tiny] peak RSS of"))]
    if doc["runs"][-1].get("rss", True):
        standard = [r for r in rows if r.get("shape", "standard") == "standard"]
        rss, missing = rss_rows(standard) if standard else ([], [])
        rows += rss
        not_run += missing
    # The tiny shape's RSS rows come from its own rows' peaks, whatever the last run asked for (`rss`
    # names the standard shape's row): a merged run of the tiny shape alone keeps them.
    tiny = [r for r in rows if r.get("shape") == "tiny"]
    trss, tmissing = rows_shapes.tiny_rss_rows(tiny) if tiny else ([], [])
    rows += trss
    not_run += tmissing
    replan = rows_shapes.replan_row(rows)
    if replan is not None:
        rows.append(replan)
    standard = [r for r in rows if r.get("shape", "standard") == "standard"]
    plot = report.plot_png(standard, out.with_name(out.stem + "-throughput.png"))
    if plot is None:
        not_run.append(
            "the throughput plot: matplotlib is not installed (`.venv/bin/pip install matplotlib`)"
        )
    notes = NOTES.read_text() if NOTES.exists() and not smoke else None
    out.write_text(
        report.markdown(
            rows,
            runs=doc["runs"],
            corpora=sorted(
                doc["corpora"],
                key=lambda c: (
                    SHAPES.index(c.get("shape", "standard")) if c.get("shape", "standard") in SHAPES else 9,
                    c["size"],
                ),
            ),
            not_run=not_run,
            plot=plot,
            notes=notes,
        )
    )


def _size_rows(
    site: Site,
    size: int,
    r1: int,
    w1: int,
    rounds: int,
    warmup: int,
    jobs: list[int],
    want: Any,
    dcmtk_missing: list[str],
    large: bool,
    not_run: list[str],
    recipe_files: int,
) -> list[Row]:
    """Every selected comparison at one corpus size; a failure becomes a FAILED row, not an abort."""
    rows: list[Row] = []
    n = site.corpus.files
    no_dcmtk = f"dcmtk not installed ({', '.join(dcmtk_missing)} missing); .ci/run installs it"

    def guarded(keys: list[tuple[str, str, str]], fn: Any) -> None:
        try:
            got = fn()
        except BenchError as exc:
            got = [skipped_row(k, n, t, tg, f"FAILED: {exc}") for k, t, tg in keys]
        for row in got:
            _print(row)
        rows.extend(got)

    if want("plan-cold") or want("plan-warm"):
        if dcmtk_missing:
            not_run.append(f"dcmdump comparison at {size:,}: {no_dcmtk}")
        guarded(
            [("plan-cold", "plan, cold", T_COLD), ("plan-warm", "plan, warm", T_WARM)],
            lambda: plan_rows(
                site,
                r1,
                w1,
                offline_too=not large,
                warm_too=want("plan-warm"),
                dcmtk=not dcmtk_missing,
                refs=not large,
            ),
        )
    finished: Path | None = None
    for kind in ("copy", "hardlink", "anon"):
        if not want(f"apply-{kind}") and not (want("reapply") and kind == "hardlink" and finished is None):
            continue
        title = f"apply, transfer: {kind}"
        if kind == "anon" and large:
            rows.append(skipped_row("apply-anon", n, title, TARGETS[kind], "measured at 10,000 images"))
            continue
        if kind == "copy" and large:
            reason = (
                f"a durable copy of {site.corpus.mb / 1000:.0f} GB per run, two per round, would take "
                "longer than the whole bench budget; measured at the smaller sizes"
            )
            rows.append(skipped_row("apply-copy", n, title, TARGETS[kind], reason))
            not_run.append(f"apply copy at {size:,}: {reason}")
            continue
        box: list[Row] = []

        def one(kind: str = kind, box: list[Row] = box) -> list[Row]:
            box.append(apply_row(site, kind, r1 if kind == "copy" or not large else 1, w1))
            return box

        guarded([(f"apply-{kind}", title, TARGETS[kind])], one)
        if box and not box[0].skipped and kind != "anon":
            finished = Path(box[0].extra["state"])
    if want("apply-inbox"):
        title = "apply, method: inbox, transfer: hardlink (our side)"
        if large:
            rows.append(skipped_row("apply-inbox", n, title, T_INBOX, "measured at 10,000 images"))
        else:
            guarded([("apply-inbox", title, T_INBOX)], lambda: [inbox_row(site, r1, w1)])
    if want("reapply"):
        if finished is None:
            rows.append(
                skipped_row("reapply", n, "re-apply of a finished plan", T_REAPPLY, "no finished apply")
            )
        else:
            guarded(
                [("reapply", "re-apply of a finished plan", T_REAPPLY)],
                lambda: [reapply_row(site, finished, 3)],
            )
    if want("cstore") or want("cstore-recipe"):
        keys = [
            ("cstore-best", "apply cstore, best N", T_BEST),
            ("cstore-one", "apply cstore, 1 association", T_ONE),
            ("cstore-recipe", "apply cstore vs per-file recipe", T_RECIPE),
            ("cstore-pynetdicom", "pynetdicom's own Association", T_ONE),
        ]
        if dcmtk_missing:
            rows.extend(skipped_row(k, n, t, tg, no_dcmtk) for k, t, tg in keys)
        elif large:
            reason = (
                f"{site.corpus.mb / 1000:.0f} GB over loopback per run, four runs per round; "
                "measured at the smaller sizes"
            )
            rows.extend(skipped_row(k, n, t, tg, reason) for k, t, tg in keys)
            not_run.append(f"cstore rows at {size:,}: {reason}")
        else:
            guarded(
                keys,
                lambda: cstore_rows(
                    site, rounds, warmup, jobs, recipe=want("cstore-recipe"), recipe_files=recipe_files
                ),
            )
    if want("cstore-anon"):
        key = ("cstore-anon", "apply cstore with anonymization vs without", T_ANON)
        if dcmtk_missing:
            rows.append(skipped_row(key[0], n, key[1], key[2], no_dcmtk))
        elif large:
            rows.append(skipped_row(key[0], n, key[1], key[2], "measured at 10,000 images"))
        else:
            guarded([key], lambda: [cstore_anon_row(site, rounds, warmup, jobs)])
    return rows


def _fleet_rows(site: Site, rounds: int, warmup: int, args: argparse.Namespace) -> list[Row]:
    """The fleet row at each worker count (a FAILED row per count when a run failed)."""
    if args.smoke:
        workers, unit, delay = [*SMOKE_FLEET[0]], SMOKE_FLEET[1], SMOKE_DELAY_S
    else:
        workers = [int(w) for w in args.fleet_workers.split(",") if w.strip()]
        unit, delay = args.fleet_unit_files, FLEET_DELAY_S
    n = site.corpus.files
    try:
        got = fleet_rows(site, rounds, warmup, workers=workers, unit_files=unit, delay=delay)
    except BenchError as exc:
        got = [
            skipped_row(
                f"fleet-{w}",
                n,
                f"apply, {w} worker process(es) on one plan",
                target_of(w),
                f"FAILED: {exc}",
                "fleet",
            )
            for w in workers
        ]
    for row in got:
        _print(row)
    return got


def rss_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Row 9 from the raw rows: peak RSS at the largest size against the next size down.

    Computed when the report is written, so results merged from several runs are compared too.
    Returns the rows and a line per command that was measured at fewer than two sizes.
    """
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for key, label in RSS_OF:
        have = sorted(((r["size"], r) for r in rows if r["key"] == key and r.get("ours")), key=lambda t: t[0])
        if len(have) < 2:
            missing.append(f"peak RSS of {label}: measured at fewer than two sizes")
            continue
        (small_n, small), (large_n, large) = have[-2], have[-1]
        s, big = small["ours"]["maxrss_mib"], large["ours"]["maxrss_mib"]
        row = Row(
            f"rss-{label}",
            large_n,
            f"peak RSS of {label}, {large_n:,} vs {small_n:,} images",
            None,
            None,
            [],
            T_RSS,
            big <= 1.5 * s and big * 1.048576 < 500,
        )
        row.extra.update(small_mib=s, large_mib=big, growth=big / s, small_size=small_n)
        row.notes.append(f"{big * 1.048576:.0f} MB at {large_n:,} images")
        if large_n < 100_000:
            row.met = None
            row.notes.append(f"judged only at 100,000 images; here {large_n:,} vs {small_n:,}")
        out.append(row.as_dict())
    return out, missing


_print = print_row


if __name__ == "__main__":
    raise SystemExit(main())
