"""``verify``: prove that what the ledger says was applied is in XNAT, intact, where planned.

Read-only: nothing here writes to XNAT, its database or the prearchive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import xnat_table
from ..errors import XnatMigrateError
from ..model import Check, Method, PlannedSession, SessionState, Step, XnatTarget, unreachable
from ..state import AppliedSession, StateStore
from . import db, files
from .connections import Targets
from .xnat import XnatClient

# Statuses a healthy session may show after apply: waiting, being built, built (§3). ERROR and
# CONFLICT are problems; locked/queued ones mean XNAT is busy with it (not a failure of ours).
HEALTHY = frozenset({"RECEIVING", "READY", "BUILDING", "QUEUED_BUILDING", "_BUILDING", "RECEIVING_INTERRUPT"})
# Columns not compared with the plan: a build rewrites lastmod, scan_date, scan_time, subject,
# uploaded and timezone from the session XML (PrearcTableBuilder:66-73, §9), status moves, and after
# its REST build the tool itself sets prevent_auto_commit back to false (sql/prearchive_release.sql.j2).
XNAT_OWNED = frozenset(
    {"lastmod", "status", "scan_date", "scan_time", "subject", "uploaded", "timezone", "prevent_auto_commit"}
)


@dataclass
class Finding:
    session: str
    check: Check
    message: str
    path: str | None = None


@dataclass
class SessionCheck:
    action_id: str
    label: str
    method: Method
    checks: int = 0
    problems: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    sessions: list[SessionCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [p for s in self.sessions for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


class _Verifier:
    def __init__(
        self, store: StateStore, quick: bool, client: XnatClient | None, conn: db.Connection | None
    ) -> None:
        self.store, self.quick, self.client, self.conn = store, quick, client, conn

    def session(self, s: AppliedSession) -> SessionCheck:
        res = SessionCheck(s.action_id, s.label, s.method)
        done = self.store.steps_done(s.action_id)
        match s.method:
            case Method.PREARCHIVE:
                if Step.ARCHIVE in done:
                    self.archived(s, res)
                else:
                    self.files(s, res)
                    self.row(s, res)
            case Method.CSTORE:
                self.cstore(s, res, done)
            case Method.INBOX:
                self.inbox(s, res, done)
            case _:
                unreachable(s.method)
        return res

    def problem(self, res: SessionCheck, check: Check, message: str, path: str | None = None) -> None:
        res.problems.append(Finding(res.label, check, message, path))

    def files(self, s: AppliedSession, res: SessionCheck) -> None:
        recorded = self.store.files_for(s.action_id)
        if not recorded:
            self.problem(
                res, Check.FILES, "the ledger has no file records for this session (it was not staged)"
            )
            return
        res.checks += len(recorded)
        for path, _kind, message in files.recorded_differences(
            Path(s.session_dir or ""), recorded, quick=self.quick
        ):
            self.problem(res, Check.FILES, message, str(path))

    def row(self, s: AppliedSession, res: SessionCheck) -> None:
        if self.conn is None:
            res.skipped.append("prearchive row (no database configured)")
            return
        res.checks += 1
        with db.transaction(self.conn) as cur:
            row = db.fetch_row(cur, s.project, s.timestamp, s.session)
        if row is None:
            self.problem(
                res, Check.ROW, "its row is missing from xdat_search.prearchive (see `xnatmigrate refresh`)"
            )
            return
        for col, want in (s.row or {}).items():
            if col in XNAT_OWNED:
                continue
            got = row.get(col)
            if isinstance(got, datetime):
                # Timestamps compare to the second: the planned value is millisecond text.
                got_s: Any = xnat_table.sql_timestamp(got)[:19]
                want_s: Any = str(want)[:19]
            else:
                got_s, want_s = got, want
            if got_s != want_s:
                self.problem(res, Check.ROW, f"column {col} is {got_s!r}, planned {want_s!r}")
        if row["status"] not in HEALTHY:
            self.problem(
                res, Check.ROW, f"status {row['status']} (XNAT's build or archive failed; see its logs/last)"
            )

    def archived(self, s: AppliedSession, res: SessionCheck) -> None:
        if self.client is None:
            res.skipped.append("archived session (xnat.url not set)")
            return
        subject = s.subject or ""
        counts = self.client.experiment_scan_files(s.project or "", subject, s.session)
        res.checks += 1
        if counts is None:
            self.problem(
                res, Check.ARCHIVE, f"archived experiment {s.project}/{subject}/{s.session} not found in XNAT"
            )
            return
        total = sum(counts.values())
        if total != s.files:
            self.problem(
                res,
                Check.ARCHIVE,
                f"XNAT holds {total} file(s) in the archived session, {s.files} were migrated",
            )
        res.skipped.append("checksums of archived files (XNAT owns them after archiving)")

    def inbox(self, s: AppliedSession, res: SessionCheck, done: set[Step]) -> None:
        """Imported by XNAT's inbox importer: XNAT holds as many files as were staged for it (counted
        from the prearchive session's ``/resources``, or the archived experiment's scans)."""
        if self.client is None:
            res.skipped.append("files held by XNAT (xnat.url not set)")
            return
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        if not located:
            self.problem(
                res, Check.XNAT, "XNAT's inbox import was not located in XNAT (see `xnatmigrate status`)"
            )
            return
        counts = _inbox_counts(self.client, s, done, located)
        res.checks += 1
        if counts is None:
            self.problem(res, Check.ARCHIVE, f"archived experiment {s.project}/{s.session} not found in XNAT")
            return
        total = sum(counts.values())
        if total != s.files:
            self.problem(
                res,
                Check.XNAT,
                f"XNAT holds {total} file(s) of this session; {s.files} were staged into its inbox",
            )
        res.skipped.append("checksums (XNAT copied, renamed and may have anonymised the files)")

    def cstore(self, s: AppliedSession, res: SessionCheck, done: set[Step]) -> None:
        sent = self.store.sent_for(s.action_id)
        res.checks += 1
        if len(sent) != s.files:
            self.problem(res, Check.SEND, f"{len(sent)} of {s.files} instance(s) confirmed by the receiver")
        if self.client is None:
            res.skipped.append("instances held by XNAT (xnat.url not set)")
            return
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        if Step.ARCHIVE in done:
            counts = self.client.experiment_scan_files(s.project or "", s.subject or "", s.session)
        elif located:
            counts = self.client.prearchive_scan_files(s.project, located["timestamp"], located["folder"])
        else:
            res.skipped.append("instances held by XNAT (session not located yet)")
            return
        res.checks += 1
        total = sum((counts or {}).values())
        if total != len(sent):
            self.problem(
                res,
                Check.XNAT,
                f"XNAT holds {total} instance(s) of this session; {len(sent)} were confirmed sent",
            )


def _inbox_counts(
    client: XnatClient, s: AppliedSession, done: set[Step], located: dict[str, Any]
) -> dict[str, int] | None:
    if Step.ARCHIVE in done or located.get("archived"):
        return client.experiment_scan_files(s.project or "", s.subject or "", s.session)
    return client.prearchive_scan_files(s.project, located["timestamp"], located["folder"])


def verify(
    store: StateStore,
    fallback: XnatTarget | None,
    *,
    planned: Sequence[PlannedSession] = (),
    quick: bool = False,
    on_session: Callable[[SessionCheck], None] | None = None,
) -> VerifyReport:
    """Check every applied session where it went (its recorded target; ``fallback`` for old ledgers),
    and judge the whole plan: each ``planned`` session (and each one the ledger holds) that is not
    applied is a problem, failed or never attempted.

    Opens each target's database/REST only if the target has them and a session needs them.
    """
    report = VerifyReport()
    ledger = store.sessions()
    by_id = {s.action_id: s for s in ledger}
    with Targets(fallback) as targets:
        for s in ledger:
            if s.status is not SessionState.APPLIED:
                continue
            try:
                target = targets.of(s)
                conn = target.db_if_any() if s.method is Method.PREARCHIVE else None
                res = _Verifier(store, quick, target.rest_if_any(), conn).session(s)
            except XnatMigrateError as exc:
                res = SessionCheck(s.action_id, s.label, s.method)
                res.problems.append(Finding(res.label, Check.ERROR, str(exc)))
            report.sessions.append(res)
            if on_session:
                on_session(res)
    seen = set()
    for action_id, label, method, why in _not_applied(ledger, planned, by_id):
        if action_id in seen:
            continue
        seen.add(action_id)
        res = SessionCheck(action_id, label, method)
        res.problems.append(Finding(label, Check.NOT_APPLIED, why))
        report.sessions.append(res)
        if on_session:
            on_session(res)
    return report


def _not_applied(
    ledger: Sequence[AppliedSession], planned: Sequence[PlannedSession], by_id: dict[str, AppliedSession]
) -> list[tuple[str, str, Method, str]]:
    out = []
    for p in planned:
        got = by_id.get(p.action_id)
        if got is None:
            out.append(
                (p.action_id, p.label, p.method, "planned but never attempted: run `xnatmigrate apply`")
            )
        elif got.status in (SessionState.FAILED, SessionState.APPLYING):
            out.append((p.action_id, p.label, p.method, _unfinished(got)))
    for s in ledger:
        if s.status in (SessionState.FAILED, SessionState.APPLYING):
            out.append((s.action_id, s.label, s.method, _unfinished(s)))
    return out


def _unfinished(s: AppliedSession) -> str:
    if s.status is SessionState.FAILED:
        return "its apply failed: see `xnatmigrate status`, fix the cause and rerun apply"
    return "its apply was interrupted: rerun `xnatmigrate apply` to finish it"


def junit_xml(report: VerifyReport) -> str:
    """A JUnit report: one test case per session, one failure per problem."""
    from xml.sax.saxutils import escape, quoteattr

    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuite name="xnatmigrate verify" tests="{len(report.sessions)}" '
        f'failures="{sum(1 for s in report.sessions if s.problems)}">',
    ]
    for s in report.sessions:
        lines.append(f"  <testcase classname={quoteattr(s.method)} name={quoteattr(s.label)}>")
        if s.problems:
            text = "\n".join(f"{p.check}: {p.message}" for p in s.problems)
            lines.append(f"    <failure message={quoteattr(s.problems[0].message)}>{escape(text)}</failure>")
        if s.skipped:
            lines.append(f"    <system-out>{escape('not checked: ' + '; '.join(s.skipped))}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"
