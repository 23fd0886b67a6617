"""``docs/benchmarks.md`` (tables, commands, versions, machine) and the throughput plot."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .corpora import SHAPES

ORDER = [
    ("plan-cold", 1),
    ("plan-cold-dcmtk", 1),
    ("plan-cold-offline", 1),
    ("plan-warm", 2),
    ("apply-copy", 3),
    ("apply-hardlink", 4),
    ("apply-anon", 4),
    ("cstore-best", 5),
    ("cstore-anon", 5),
    ("cstore-one", 6),
    ("cstore-recipe", 7),
    ("reapply", 8),
    ("rss-plan (cold)", 9),
    ("rss-plan (warm)", 9),
    ("rss-apply copy", 9),
    ("rss-apply hardlink", 9),
    ("rss-apply cstore", 9),
]
NUMBER = dict(ORDER)
RANK = {k: i for i, (k, _) in enumerate(ORDER)}

# (row key, which side) → plot line; throughput in files/s against corpus size.
PLOT_LINES = [
    ("plan-cold", "ours", "xnatmigrate plan (cold)", "C0", "-"),
    ("plan-cold", "ref", "pydicom loop", "C0", ":"),
    ("plan-cold-dcmtk", "ref", "dcmdump batched", "C0", "--"),
    ("plan-warm", "ours", "xnatmigrate plan (warm)", "C4", "-"),
    ("apply-copy", "ours", "xnatmigrate apply copy", "C1", "-"),
    ("apply-copy", "ref", "cp -r + sync", "C1", ":"),
    ("apply-hardlink", "ours", "xnatmigrate apply hardlink", "C2", "-"),
    ("apply-hardlink", "ref", "cp -al + sync", "C2", ":"),
    ("cstore-best", "ours", "xnatmigrate cstore (best N)", "C3", "-"),
    ("cstore-best", "ref", "storescu +sd +r", "C3", ":"),
]


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _met(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return "not run"
    return {True: "**yes**", False: "**no**", None: "–"}[row["met"]]


def _ratio(row: dict[str, Any]) -> str:
    if row["key"].startswith("fleet-") and row["extra"].get("speedup") is not None:
        return f"×{row['extra']['speedup']:.2f} throughput"
    if row["key"] == "cstore-recipe" and row["extra"].get("speedup"):
        return f"{row['extra']['speedup']:.0f}× faster"
    if "rss-" in row["key"] and "growth" in row["extra"]:
        e = row["extra"]
        return f"×{e['growth']:.2f} ({e['small_mib']:.0f} → {e['large_mib']:.0f} MiB)"
    if row["key"] == "reapply":
        return "no contents read" if row["extra"].get("no_contents_read") else "**contents read**"
    return "–" if row["ratio"] is None else f"{row['ratio']:.2f}"


def sort_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (RANK.get(r["key"], 99), r["size"]))


def shape_of(row: dict[str, Any]) -> str:
    return str(row.get("shape", "standard"))


# Issue 13: per shape, its rows in table order, and what the section says the shape is for.
SHAPE_ORDER = {
    "xray": ["xray-apply-copy", "xray-cstore"],
    "huge": ["huge-apply-copy", "huge-cstore"],
    "tiny": [
        "tiny-plan-cold",
        "tiny-plan-warm",
        "tiny-apply-copy",
        "tiny-rss-plan (cold)",
        "tiny-rss-plan (warm)",
        "tiny-rss-apply copy",
        "tiny-replan-100k",
    ],
    "fleet": ["fleet-1", "fleet-2", "fleet-4"],
}
SHAPE_TITLE = {
    "xray": "xray: many studies of a few small images (20,000 images in 5,000 studies)",
    "huge": "huge: one study of 10,000 images",
    "tiny": "tiny: a big archive of tiny files (300,000 files, against 30,000)",
    "fleet": "fleet: 1, 2 and 4 worker processes on one plan (issue 16)",
}
SHAPE_PURPOSE = {
    "xray": (
        "Per-session costs dominate: each study is one XNAT session of 4 files. Beside each ratio, the "
        "cost per session, (xnatmigrate − reference) ÷ sessions, median of the per-round differences."
    ),
    "huge": "One session, so per-session costs vanish: what is left is the per-file and per-byte path.",
    "tiny": (
        "Bytes are negligible: per-file costs and memory that grows with the number of files. Peak RSS "
        "of `plan` cold, `plan` warm and `apply` copy at the largest size against the smallest; the "
        "warm re-plan of an unchanged tree at 100,000 files (this shape's row is the one judged for "
        "issue 13; the standard shape's `plan-warm` at 100,000 images is the same target on larger files)."
    ),
    "fleet": (
        "`xnatmigrate apply --state-url … --jobs 1` started N times at once on one plan in PostgreSQL "
        "(`bench/rows_fleet.py`): C-STORE into a receiver that waits a fixed time per instance before "
        "answering, so the work is waiting, not CPU, and scaling is visible on 2 cores. Throughput is "
        "instances ÷ wall time from the first fork to the last worker's exit; ×1 worker is the median of "
        "the per-round ratios. The budget is measured at the receiver: the most associations open at once "
        "must not exceed N × `--jobs`. A fresh state schema and an untimed plan before every run."
    ),
}


def _mib(row: dict[str, Any]) -> str:
    return f"{row['ours']['maxrss_mib']:.0f}" if row.get("ours") else "–"


def _per_session(row: dict[str, Any]) -> str:
    ms = row["extra"].get("ms_per_session")
    return "–" if ms is None else f"{ms:+.1f}"


def _ours_s(row: dict[str, Any]) -> str:
    if row["ours"]:
        return _s(row["ours"]["median"])
    return _s(row["extra"].get("seconds"))


def _studies(n: int) -> str:
    return f"{n:,} stud{'y' if n == 1 else 'ies'}"


def _verdict(rows: Sequence[dict[str, Any]]) -> str:
    judged = [r for r in rows if r["met"] is not None and not r.get("skipped")]
    if not judged:
        return "No target judged at these sizes (absolute targets are judged at the issue's sizes only)"
    missed = [f"{r['key']} @ {r['size']:,}" for r in judged if not r["met"]]
    text = f"{len(judged) - len(missed)} of {len(judged)} judged target(s) met"
    return text + (f"; missed: {', '.join(missed)}" if missed else "")


def _row_notes(w: Callable[[str], None], rows: Sequence[dict[str, Any]]) -> None:
    for r in rows:
        bits = list(r["notes"])
        if r.get("skipped"):
            bits.append(f"not run: {r['skipped']}")
        if r["ours"] and len(r["ours"]["seconds"]) > 1:
            bits.append("xnatmigrate runs: " + ", ".join(f"{x:.2f}" for x in r["ours"]["seconds"]))
        if r["ref"] and len(r["ref"]["seconds"]) > 1:
            bits.append("reference runs: " + ", ".join(f"{x:.2f}" for x in r["ref"]["seconds"]))
        if bits:
            w(f"- **{r['key']} @ {r['size']:,}**: " + "; ".join(bits) + ".")


def _fleet_table(w: Callable[[str], None], rows: Sequence[dict[str, Any]]) -> None:
    w(
        "| workers | instances | units | wall median s | instances/s | × 1 worker | to last unit s (× 1 worker) | "
        "max associations (budget) | target | met |"
    )
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        e = r["extra"]
        if r.get("skipped") or "workers" not in e:
            w(
                f"| {r['key'].removeprefix('fleet-')} | {r['size']:,} | – | – | – | – | – | – | {r['target']} | {_met(r)} |"
            )
            continue
        split = e.get("split", {})
        last = _s(split.get("to_last_unit_s"))
        if e.get("work_speedup") is not None and e["workers"] != 1:
            last += f" (×{e['work_speedup']:.2f})"
        w(
            f"| {e['workers']} | {r['size']:,} | {split.get('units', '–')} | {_ours_s(r)} | "
            f"{e['files_per_s']:.0f} | ×{e['speedup']:.2f} | {last} | "
            f"{e['max_associations']} ({e['workers'] * e['jobs']}) | {r['target']} | {_met(r)} |"
        )


def shape_sections(rows: Sequence[dict[str, Any]], corpora: Sequence[dict[str, Any]]) -> list[str]:
    """The archive shapes of issue 13 (and the fleet's of issue 16): a section per shape measured,
    table, targets, met/missed."""
    out: list[str] = []
    w = out.append
    shapes = [s for s in SHAPE_ORDER if any(shape_of(r) == s for r in rows)]
    if not shapes:
        return out
    w("## Archive shapes (issue 13)\n" if shapes != ["fleet"] else "## Shapes\n")
    w(
        "Each shape is its own deterministic corpus (`bench/corpora.py`), measured in the same run as "
        "its reference, alternating as above.\n"
    )
    for shape in shapes:
        order = {k: i for i, k in enumerate(SHAPE_ORDER[shape])}
        mine = sorted(
            (r for r in rows if shape_of(r) == shape), key=lambda r: (order.get(r["key"], 99), r["size"])
        )
        w(f"### {SHAPE_TITLE[shape]}\n")
        sizes = ", ".join(
            f"{c['size']:,} images in {_studies(c['sessions'])}" if c.get("sessions") else f"{c['size']:,}"
            for c in corpora
            if c.get("shape") == shape
        )
        w(f"Corpus: {SHAPES[shape].text}; measured: {sizes or '–'}. {SHAPE_PURPOSE[shape]}\n")
        w(f"**{_verdict(mine)}.**\n")
        if shape == "fleet":
            _fleet_table(w, mine)
        elif shape == "tiny":
            w(
                "| comparison | files | xnatmigrate median s | reference median s | ratio | peak RSS MiB | target | met |"
            )
            w("|---|---:|---:|---:|---:|---:|---|---|")
            for r in mine:
                ref = r["ref"]["median"] if r["ref"] else None
                w(
                    f"| {r['title']} | {r['size']:,} | {_ours_s(r)} | {_s(ref)} | {_ratio(r)} | {_mib(r)} | "
                    f"{r['target']} | {_met(r)} |"
                )
        else:
            w(
                "| comparison | images | sessions | xnatmigrate median s | reference median s | ratio | "
                "ms per session | target | met |"
            )
            w("|---|---:|---:|---:|---:|---:|---:|---|---|")
            for r in mine:
                ref = r["ref"]["median"] if r["ref"] else None
                sessions = r["extra"].get("sessions")
                w(
                    f"| {r['title']} | {r['size']:,} | {'–' if sessions is None else f'{sessions:,}'} | "
                    f"{_ours_s(r)} | {_s(ref)} | {_ratio(r)} | {_per_session(r)} | {r['target']} | {_met(r)} |"
                )
        w("")
        _row_notes(w, mine)
        w("")
    return out


def markdown(
    rows: Sequence[dict[str, Any]],
    *,
    runs: Sequence[dict[str, Any]],
    corpora: Sequence[dict[str, Any]],
    not_run: Sequence[str],
    plot: str | None,
    notes: str | None,
) -> str:
    out: list[str] = []
    w = out.append
    w("# Benchmarks\n")
    w(
        "Each comparison measured side by side in one run on one machine by `make bench` (`bench/run.py`; "
        "the runs below may differ in machine, each says which); absolute "
        "times on a shared machine are noise, so every comparison runs as alternating pairs "
        "(reference, xnatmigrate, reference, xnatmigrate, … after a warm-up) and the **ratio is the "
        "median of the per-round ratios** xnatmigrate ÷ reference (below 1: xnatmigrate is faster).\n"
    )
    for meta in runs:
        sizes = ", ".join(f"{n:,}" for n in meta.get("sizes", []))
        what = [f"standard {sizes} images"] if sizes else []
        what += [f"{s} {', '.join(f'{n:,}' for n in ns)}" for s, ns in meta.get("shapes", {}).items()]
        w(
            f"- Run: `{meta['argv']}` ({'; '.join(what)}) on {meta['date']}"
            f"{_machine_of(meta)}, {meta['wall_minutes']:.0f} min "
            f"wall time; {meta['rounds']}; xnatmigrate "
            f"{meta['versions'].get('xnatmigrate source', '(source state not recorded)')}."
        )
    w("- Times are wall seconds from fork to reap of the command, Python start-up included for both sides.")
    w(
        "- Peak RSS: `wait4` rusage of the command (the largest single process of its tree, as "
        "`/usr/bin/time -v` reports).\n"
    )
    shaped = [r for r in rows if shape_of(r) != "standard"]
    rows = [r for r in rows if shape_of(r) == "standard"]
    w("## Results\n")
    if not rows:
        w("The standard shape (issue 7) was not measured in this run (`--shapes`).\n")
    else:
        w("The standard shape (issue 7); the archive shapes of issue 13 follow in their own section.\n")
        w("| # | comparison | images | xnatmigrate median s | reference median s | ratio | target | met |")
        w("|---|---|---:|---:|---:|---:|---|---|")
        for r in sort_rows(rows):
            ours = r["ours"]["median"] if r["ours"] else None
            ref = r["ref"]["median"] if r["ref"] else None
            w(
                f"| {NUMBER.get(r['key'], '')} | {r['title']} | {r['size']:,} | {_s(ours)} | {_s(ref)} | "
                f"{_ratio(r)} | {r['target']} | {_met(r)} |"
            )
        w("")
        w("Notes per row:\n")
        _row_notes(w, sort_rows(rows))
        w("")
    if plot:
        w(f"![throughput against corpus size]({plot})\n")
        w("Throughput (files/s, log scales) against corpus size, from the medians above.\n")
    out.extend(shape_sections(shaped, corpora))
    if not_run:
        w("## Not run, and why\n")
        for line in not_run:
            w(f"- {line}")
        w("")
    w("## Commands\n")
    w(
        "Paths are those of this run (corpora under the bench directory, outside the repository). "
        "`XNATMIGRATE_BENCH_DSN` points at a database of an embedded PostgreSQL "
        "(`xnatmigrate.testing.pg`) holding XNAT's `xdat_search.prearchive` (profile 1.8.2).\n"
    )
    seen: set[tuple[str, str]] = set()
    for r in sort_rows(rows) + sorted(shaped, key=lambda r: (shape_of(r), r["key"], r["size"])):
        for side in ("ref", "ours"):
            s = r[side]
            if s and (s["label"], s["command"]) not in seen:
                seen.add((s["label"], s["command"]))
                cmd = s["command"].replace(runs[-1].get("bench_dir", "\0"), "$BENCH")
                where = f"{r['size']:,}" if shape_of(r) == "standard" else f"{shape_of(r)} {r['size']:,}"
                w(f"- {s['label']} ({where}):\n  `{cmd}`")
    w("")
    w(
        "Untimed between runs: `rm -rf` of the destination, `TRUNCATE xdat_search.prearchive`, a copy of "
        "the saved plan's state folder, a restart of `storescp` with an empty output folder, then `sync`; for "
        "the fleet rows, a fresh state schema and its plan.\n"
    )
    w("## Corpora\n")
    w(
        "Deterministic (`xnatmigrate.testing.corpus`; seeds: standard 0, xray 13, huge 14, tiny 15, fleet 16), explicit VR little endian, "
        "uncompressed; the session of a study is `PatientID_StudyDate`. Shapes:\n"
    )
    for name in dict.fromkeys(shape_of(c) for c in corpora):
        if name in SHAPES:
            w(f"- {name}: {SHAPES[name].text}.")
    w("")
    w("| shape | images | files | studies | MB | made |")
    w("|---|---:|---:|---:|---:|---|")
    for c in corpora:
        studies = f"{c['sessions']:,}" if c.get("sessions") else "–"
        w(
            f"| {shape_of(c)} | {c['size']:,} | {c['files']:,} | {studies} | {c['bytes'] / 1e6:,.0f} | "
            f"{c['made']} |"
        )
    w("")
    w("## Machine and versions\n")
    last = runs[-1]
    for k, v in last["machine"].items():
        w(f"- {k}: {v}")
    for k, v in last["versions"].items():
        if k != "xnatmigrate source":
            w(f"- {k}: {v}")
    w("")
    if notes:
        w(notes.strip() + "\n")
    return "\n".join(out)


def plot_png(rows: Sequence[dict[str, Any]], path: Path) -> str | None:
    """Write the throughput plot; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by = {(r["key"], r["size"]): r for r in rows if not r.get("skipped")}
    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=100)
    drawn = 0
    for key, side, label, colour, style in PLOT_LINES:
        pts = sorted(
            (size, size / r[side]["median"]) for (k, size), r in by.items() if k == key and r.get(side)
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, marker="o", label=label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus size (images)")
    ax.set_ylabel("throughput (files/s)")
    ax.set_title("xnatmigrate (solid) vs reference tools (dotted/dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _machine_of(meta: dict[str, Any]) -> str:
    """`` on 2 × <cpu>`` for a run that recorded its machine, else nothing."""
    machine = meta.get("machine")
    cpus = machine.get("cpus") if isinstance(machine, dict) else None
    return f" on {cpus}" if cpus else ""
