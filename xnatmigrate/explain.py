"""Plan → what a person reads (a Terraform-like summary) and what a machine reads (JSON)."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from .dicombytes import MAX_CONTEXTS  # shared with the sender, which splits contexts by it
from .model import (
    CstoreSession,
    InboxSession,
    LookupMatch,
    Plan,
    PlannedSession,
    PrearchiveSession,
    unreachable,
)

MAX_REASONS = 5
MAX_EDITS = 12  # per session, what its anonymisation does to its first file


def _script_name(name: str) -> str:
    return "XNAT's site script" if name == "site" else name.rsplit("/", 1)[-1]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def associations(s: CstoreSession) -> int:
    """Associations one sender worker opens for this session: contexts are split by 128."""
    return max(1, -(-len(s.contexts) // MAX_CONTEXTS))


def summary_counts(plan: Plan) -> dict[str, int]:
    """One pass over the sessions (they may be read from plan.json one at a time)."""
    scans = files = size = 0
    for s in plan.sessions:
        scans += len(s.scans)
        files += s.file_count
        size += s.bytes
    return {
        "sessions": len(plan.sessions),
        "scans": scans,
        "files": files,
        "bytes": size,
        "rejected": len(plan.rejected),
        "held_back": len(plan.held_back),
        "unchanged": len(plan.unchanged),
    }


def plan_json(plan: Plan, plan_path: str | None = None, sql_path: str | None = None) -> dict[str, Any]:
    """The ``plan --json`` document (issue #3 shape, plus more keys)."""
    return {
        "plan_id": plan.plan_id,
        "plan_file": plan_path,
        "sql_file": sql_path,
        "table_profile": plan.table_profile,
        "summary": summary_counts(plan),
        "sessions": [_session_json(s, plan.plan_id) for s in plan.sessions],
        "unchanged": [
            {"project": u.project, "session": u.session, "study_uid": u.study_uid, "reason": u.reason}
            for u in plan.unchanged
        ],
        "held_back": [
            {
                "project": h.project,
                "session": h.session,
                "study_uid": h.study_uid,
                "reason": h.reason,
                "files": len(h.files),
            }
            for h in plan.held_back
        ],
        "rejected": [{"path": r.path, "reason": r.reason} for r in plan.rejected],
        "warnings": list(plan.warnings),
        "skipped_checks": list(plan.skipped_checks),
        "lookups": [
            {"name": t.name, "file": t.file, "key": t.key, "sha256": t.sha256, "rows": t.rows}
            for t in plan.lookups
        ],
        "scripts": [{"name": sc.name, "sha256": sc.sha256} for sc in plan.scripts],
    }


def _session_json(s: PlannedSession, plan_id: str = "") -> dict[str, Any]:
    """One session of ``plan --json``: the same keys for every route (None where a route has none)."""
    out: dict[str, Any] = {
        "action_id": s.action_id,
        "project": s.project,
        "subject": s.subject,
        "session": s.session,
        "study_uid": s.study_uid,
        "timestamp": None,
        "method": s.method.value,
        "build": s.build.value,
        "archive": s.archive,
        "scans": len(s.scans),
        "files": s.file_count,
        "bytes": s.bytes,
        "prearchive_uri": s.prearchive_uri,
        "session_dir": None,
        "raw_labels": dict(s.raw_labels),
        "mapped_by": [
            {"table": m.table, "keyword": m.keyword, "key": m.key, "line": m.line} for m in s.mapped_by
        ],
        "routing_line": None,
        "contexts": 0,
        "associations_per_worker": 0,
    }
    match s:
        case PrearchiveSession():
            out.update(
                timestamp=s.timestamp,
                session_dir=s.session_dir,
                anonymize=list(s.anonymize),
                anonymized=[{"name": e.name, "action": e.action, "value": e.value} for e in s.anonymized],
            )
        case CstoreSession():
            out.update(
                routing_line=s.routing_line,
                contexts=len(s.contexts),
                associations_per_worker=associations(s),
                anonymize=list(s.anonymize),
                anonymized=[{"name": e.name, "action": e.action, "value": e.value} for e in s.anonymized],
            )
        case InboxSession():
            out.update(session_dir=s.inbox_dir(plan_id), inbox_path=s.inbox_path(plan_id))
        case _:
            unreachable(s)
    return out


def _anonymised_lines(s: PrearchiveSession | CstoreSession, how: str = "") -> list[str]:
    """The session's scripts and what they do to its first file (at most ``MAX_EDITS`` of them)."""
    if not s.anonymize:
        return []
    lines = [f"        anonymised by: {' + '.join(_script_name(n) for n in s.anonymize)}{how}"]
    for e in s.anonymized[:MAX_EDITS]:
        lines.append(
            f"          - {e.name}" if e.action == "delete" else f"          {e.name} := {e.value!r}"
        )
    if len(s.anonymized) > MAX_EDITS:
        lines.append(f"          … and {len(s.anonymized) - MAX_EDITS} more change(s)")
    return lines


def _route_lines(s: PlannedSession) -> list[str]:
    archive = "yes" if s.archive else "no"
    match s:
        case PrearchiveSession():
            return [f"        build: {s.build}, archive: {archive}", *_anonymised_lines(s)]
        case CstoreSession():
            routing = s.routing_line or f"none (XNAT's own rules → {s.project_label}/{s.session})"
            return [
                f"        routing: {routing}",
                f"        {len(s.contexts)} presentation context(s) in {associations(s)} association(s) "
                f"per --jobs worker; build: {s.build}, archive: {archive}",
                *_anonymised_lines(s, " (in memory, before the routing is written)"),
            ]
        case InboxSession():
            return [
                f"        {s.transfer} into XNAT's inbox, then XNAT's inbox importer (import-handler=inbox): "
                "XNAT's anonymisation, naming and merge rules apply",
                f"        archive: {archive} (the importer builds it; it archives by itself when the project "
                "auto-archives)",
            ]
        case _:
            unreachable(s)


def _where(s: PlannedSession, plan_id: str = "") -> str:
    match s:
        case PrearchiveSession():
            return s.session_dir
        case CstoreSession():
            return f"C-STORE → {s.prearchive_uri}"
        case InboxSession():
            return f"inbox {s.inbox_dir(plan_id) if plan_id else s.inbox_parent + '/'} → {s.prearchive_uri}"
        case _:
            unreachable(s)


def _label_line(s: PlannedSession) -> str:
    parts = []
    for name, value in (("project", s.project_label), ("subject", s.subject), ("session", s.session)):
        raw = s.raw_labels.get(name)
        parts.append(f"{name} {raw!r} → {value}" if raw else f"{name} {value}")
    return ", ".join(parts)


def mapped_by_text(plan: Plan, matches: tuple[LookupMatch, ...]) -> str:
    """``subjects[PatientID=12345] (subjects.csv line 7), …``: the rows that gave a session its labels."""
    files = {t.name: t.file.rsplit("/", 1)[-1] for t in plan.lookups}
    return ", ".join(
        f"{m.table}[{m.keyword}={m.key}] ({files.get(m.table, m.table)} line {m.line})" for m in matches
    )


def plan_text(plan: Plan, plan_path: str | None = None, sql_path: str | None = None) -> str:
    """The human summary: per project what is added, then unchanged, held back, rejected."""
    out: list[str] = []
    # Per project: its sessions' lines and totals (sessions, scans, files, bytes), made in one pass
    # that holds no session (a plan's sessions may be read from plan.json one at a time).
    by_project: dict[str, tuple[list[str], list[int]]] = defaultdict(lambda: ([], [0, 0, 0, 0]))
    for s in plan.sessions:
        lines, totals = by_project[s.project_label]
        n_files, size = s.file_count, s.bytes
        for i, n in enumerate((1, len(s.scans), n_files, size)):
            totals[i] += n
        lines.append(
            f"    + {s.session:<24} {n_files:>6} files  {human_bytes(size):>9}  {_where(s, plan.plan_id)}"
        )
        if s.raw_labels:
            lines.append(f"        labels: {_label_line(s)}")
        if s.mapped_by:
            lines.append(f"        mapped by: {mapped_by_text(plan, s.mapped_by)}")
        lines.extend(_route_lines(s))
    if plan.sessions:
        out.append("xnatmigrate will perform the following actions:")
        out.append("")
    for project in sorted(by_project):
        lines, (n_sessions, scans, files, size) = by_project[project]
        out.append(
            f"  project {project}: + {n_sessions} session(s), {scans} scan(s), {files} file(s), "
            f"{human_bytes(size)}"
        )
        out.extend(lines)
        out.append("")
    if plan.unchanged:
        out.append(f"  unchanged: {len(plan.unchanged)} session(s) already migrated")
    if plan.held_back:
        out.append(f"  held back: {len(plan.held_back)} study(ies)")
        for h in plan.held_back[:MAX_REASONS]:
            out.append(f"    ! {h.study_uid}: {h.reason}")
        if len(plan.held_back) > MAX_REASONS:
            out.append(f"    … {len(plan.held_back) - MAX_REASONS} more (see --json)")
    if plan.rejected:
        reasons = Counter(r.reason.split(":")[0] for r in plan.rejected)
        out.append(f"  rejected: {len(plan.rejected)} file(s)")
        for reason, n in reasons.most_common(MAX_REASONS):
            example = next(r for r in plan.rejected if r.reason.split(":")[0] == reason)
            out.append(f"    - {n} × {reason} (e.g. {example.path}: {example.reason})")
    for t in plan.lookups:
        out.append(f"  lookup table {t.name}: {t.file}, {t.rows} row(s), sha256 {t.sha256[:12]}…")
    for sc in plan.scripts:
        out.append(
            f"  anonymisation script {_script_name(sc.name)}: sha256 {sc.sha256[:12]}… (pinned in the plan)"
        )
    for w in plan.warnings:
        out.append(f"  warning: {w}")
    for skipped in plan.skipped_checks:
        out.append(f"  not checked: {skipped}")
    # The totals of the projects' (summary_counts would read every session again).
    c = {
        "sessions": len(plan.sessions),
        "files": sum(totals[2] for _, totals in by_project.values()),
        "bytes": sum(totals[3] for _, totals in by_project.values()),
        "rejected": len(plan.rejected),
        "unchanged": len(plan.unchanged),
    }
    out.append("")
    if plan.sessions:
        out.append(
            f"Plan: {c['sessions']} session(s), {c['files']} file(s), {human_bytes(c['bytes'])} to add; "
            f"{c['unchanged']} unchanged; {c['rejected']} file(s) rejected."
        )
    else:
        out.append(f"No changes. {c['unchanged']} session(s) unchanged; {c['rejected']} file(s) rejected.")
    if plan_path:
        out.append(f"Saved the plan to {plan_path}" + (f" and its SQL to {sql_path}" if sql_path else ""))
        if plan.sessions:
            out.append("Review it, then run `xnatmigrate apply` to carry it out.")
    return "\n".join(out)
