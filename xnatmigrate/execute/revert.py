"""``revert``: remove what the ledger proves this tool created and XNAT has not taken over.

Invariants:
- Only paths recorded in the ledger and rows matching this tool's key *and* ``source =
  'xnatmigrate'`` are ever touched; other uploads' folders and rows survive untouched.
- Each removal is check → act → record like apply, so a revert killed midway resumes.
- Without ``yes`` nothing is removed: the report says what would be.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import xnat_table
from ..errors import XnatMigrateError
from ..model import APPLY_STEPS, Method, Outcome, RevertOutcome, SessionState, Step, XnatTarget, unreachable
from ..state import AppliedSession, StateStore
from . import db, files
from .connections import Connections, Targets
from .xnat import XnatClient


@dataclass
class RevertItem:
    action_id: str
    label: str
    outcome: RevertOutcome
    reason: str = ""
    steps: list[tuple[Step, Outcome]] = field(default_factory=list)


@dataclass
class RevertReport:
    items: list[RevertItem] = field(default_factory=list)
    dry_run: bool = True

    @property
    def refused(self) -> list[RevertItem]:
        return [i for i in self.items if i.outcome is RevertOutcome.REFUSED]


class _Reverter:
    def __init__(
        self,
        store: StateStore,
        targets: Targets,
        yes: bool,
        force: bool,
        archived: bool,
        confirm: Callable[[str], bool] | None,
    ) -> None:
        self.store, self.targets, self.yes, self.force, self.archived = store, targets, yes, force, archived
        self.confirm = confirm
        self.target: Connections | None = None  # of the session being reverted

    @property
    def xnat(self) -> XnatTarget:
        assert self.target is not None
        return self.target.xnat

    def client(self) -> XnatClient | None:
        assert self.target is not None
        return self.target.rest_if_any()

    def conn(self) -> db.Connection | None:
        assert self.target is not None
        return self.target.db_if_any()

    def record(self, item: RevertItem, step: Step, outcome: Outcome, detail: Any = None) -> None:
        self.store.record_step(item.action_id, step, outcome, detail)
        item.steps.append((step, outcome))

    def row(self, s: AppliedSession, ts: str, folder: str) -> dict[str, Any] | None:
        conn = self.conn()
        if conn is not None:
            with db.transaction(conn) as cur:
                return db.fetch_row(cur, s.project, ts, folder)
        client = self.client()
        return client.prearchive_session(s.project, ts, folder) if client else None

    # -- one session ----------------------------------------------------------------------------

    def session(self, s: AppliedSession) -> RevertItem:
        item = RevertItem(s.action_id, s.label, RevertOutcome.NOTHING)
        self.target = self.targets.of(s)
        done = self.store.steps_done(s.action_id)
        if not done & APPLY_STEPS:
            item.reason = "nothing of it was applied"
            return item
        if Step.ARCHIVE in done:
            return self.archived_session(s, item)
        match s.method:
            case Method.CSTORE:
                return self.cstore_session(s, item)
            case Method.PREARCHIVE:
                return self.prearchive_session(s, item)
            case Method.INBOX:
                return self.inbox_session(s, item)
            case _:
                unreachable(s.method)

    def refuse(self, item: RevertItem, reason: str) -> RevertItem:
        item.outcome, item.reason = RevertOutcome.REFUSED, reason
        return item

    def prearchive_session(self, s: AppliedSession, item: RevertItem) -> RevertItem:
        row = self.row(s, s.timestamp, s.session)
        if row is not None and xnat_table.is_locked(str(row.get("status"))):
            return self.refuse(
                item,
                f"XNAT holds it locked (status {row['status']}): wait for XNAT to finish; a stuck lock "
                "is cleared as xnat-reference.md §7 describes",
            )
        if row is not None and row.get("source") not in (None, "", xnat_table.ROW_SOURCE):
            return self.refuse(item, f"the row's source is {row.get('source')!r}, not this tool's")
        if not self.force:
            changed = self.changes(s, row)
            if changed:
                return self.refuse(item, f"changed since apply ({changed}); --force removes it anyway")
        final = Path(s.session_dir or "")
        if not self.yes:
            item.outcome = RevertOutcome.WOULD_REMOVE
            item.reason = f"folder {final} and its row" if final.exists() or row else "its ledger records"
            return item
        # Files first, then the row: a row without its folder is what XNAT's own clean-up expects
        # to find and delete (§7); a folder without a row would be invisible to the UI.
        client = self.client()
        if client is not None and row is not None:
            if not client.delete_prearchive_session(s.project, s.timestamp, s.session):
                return self.kept_by_xnat(item, client.prearchive_session(s.project, s.timestamp, s.session))
            self.record(item, Step.REVERT_FILES, Outcome.DONE, {"via": "REST DELETE"})
            self.record(item, Step.REVERT_ROW, Outcome.DONE, {"via": "REST DELETE"})
        else:
            self.remove_folder(s, item)
            self.remove_row(s, item)
        self.forget(s, item)
        return item

    def remove_folder(self, s: AppliedSession, item: RevertItem) -> None:
        final = Path(s.session_dir or "")
        root = Path(self.xnat.prearchive or "")
        if not final.exists():
            self.record(item, Step.REVERT_FILES, Outcome.NOOP, {"reason": "folder already gone"})
        else:
            # Rename into the staging area first (atomic), so XNAT never sees a half-deleted session.
            trash = root / files.STAGING_DIRNAME / "trash" / s.action_id
            trash.parent.mkdir(parents=True, exist_ok=True)
            if trash.exists():
                shutil.rmtree(trash)
            final.rename(trash)
            shutil.rmtree(trash)
            self.record(item, Step.REVERT_FILES, Outcome.DONE, {"path": str(final)})
        xml = final.parent / f"{final.name}.xml"
        with contextlib.suppress(FileNotFoundError):
            xml.unlink()
        with contextlib.suppress(OSError):
            final.parent.rmdir()  # the timestamp folder, if this session was its only content

    def remove_row(self, s: AppliedSession, item: RevertItem) -> None:
        conn = self.conn()
        if conn is None:
            self.record(item, Step.REVERT_ROW, Outcome.NOOP, {"reason": "no database configured"})
            return
        n = db.delete_row(conn, s.project, s.timestamp, s.session)
        self.record(item, Step.REVERT_ROW, Outcome.DONE if n else Outcome.NOOP, {"rows": n})

    def changes(self, s: AppliedSession, row: dict[str, Any] | None) -> str:
        recorded = self.store.files_for(s.action_id)
        for path, kind, _message in files.recorded_differences(Path(s.session_dir or ""), recorded):
            if kind != "missing":  # missing: partly removed already (a revert killed midway): finish it
                return f"{path} differs from what was copied"
        if row is not None and s.row:
            for col in ("project", "foldername", "name", "tag", "url"):
                if row.get(col) != s.row.get(col):
                    return f"row column {col} is {row.get(col)!r}"
        return ""

    def archived_session(self, s: AppliedSession, item: RevertItem) -> RevertItem:
        if not self.archived:
            return self.refuse(item, "it is archived in XNAT; --archived deletes the experiment through REST")
        client = self.client()
        if client is None:
            return self.refuse(item, "deleting an archived session needs xnat.url")
        if not self.yes:
            item.outcome, item.reason = RevertOutcome.WOULD_REMOVE, "the archived experiment (REST DELETE)"
            return item
        if self.confirm is not None and not self.confirm(f"{s.project}/{s.session}"):
            return self.refuse(item, "not confirmed")
        gone = client.delete_experiment(s.project or "", s.subject or "", s.session)
        self.record(item, Step.REVERT_ARCHIVE, Outcome.DONE if gone else Outcome.NOOP, {"project": s.project})
        self.forget(s, item)
        return item

    def cstore_session(self, s: AppliedSession, item: RevertItem) -> RevertItem:
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        client = self.client()
        if not located or client is None:
            return self.refuse(
                item,
                "sent over C-STORE and not located in XNAT's prearchive"
                + ("" if client else " (xnat.url not set)")
                + ": delete it in XNAT's prearchive page",
            )
        row = client.prearchive_session(s.project, located["timestamp"], located["folder"])
        if row is not None and xnat_table.is_locked(row.get("status", "")):
            return self.refuse(item, f"XNAT holds it locked (status {row['status']})")
        if not self.yes:
            item.outcome, item.reason = (
                RevertOutcome.WOULD_REMOVE,
                "the prearchive session XNAT's receiver made (REST DELETE)",
            )
            return item
        if not client.delete_prearchive_session(s.project, located["timestamp"], located["folder"]):
            return self.kept_by_xnat(
                item, client.prearchive_session(s.project, located["timestamp"], located["folder"])
            )
        self.record(item, Step.REVERT_FILES, Outcome.DONE, {"via": "REST DELETE"})
        self.forget(s, item)
        return item

    def inbox_session(self, s: AppliedSession, item: RevertItem) -> RevertItem:
        """The staged inbox folder (if XNAT has not removed it), and the prearchive session XNAT's
        importer made (REST DELETE, as for C-STORE). A request still running is left alone."""
        staged = Path(s.session_dir or "")
        done = self.store.steps_done(s.action_id)
        located = self.store.step_detail(s.action_id, Step.LOCATE)
        if Step.IMPORT in done and not located:
            return self.refuse(
                item,
                "XNAT's inbox importer was asked to import it and the outcome is not known yet: rerun "
                "apply (it polls the request), then revert",
            )
        if located:
            if not staged.name.startswith("xnatmigrate-") or not staged.exists():
                return self.cstore_session(s, item)
            result = self.cstore_session(s, item)
            if result.outcome is RevertOutcome.REMOVED or (
                self.yes and result.outcome is RevertOutcome.NOTHING
            ):
                files.discard_staged(staged)
            return result
        if not self.yes:
            item.outcome, item.reason = RevertOutcome.WOULD_REMOVE, f"its staged inbox folder {staged}"
            return item
        if staged.name.startswith("xnatmigrate-") and staged.exists():
            files.discard_staged(staged)
        self.record(item, Step.REVERT_FILES, Outcome.DONE, {"path": str(staged)})
        self.forget(s, item)
        return item

    def kept_by_xnat(self, item: RevertItem, row: dict[str, str] | None) -> RevertItem:
        """XNAT answered the DELETE with 200 but kept the session (a locked row, §9): it stays in the
        ledger, so a later revert can remove it."""
        status = row.get("status", "?") if row else "?"
        return self.refuse(
            item,
            f"XNAT kept it after the DELETE (status {status}): wait for XNAT to release it, then rerun revert",
        )

    def forget(self, s: AppliedSession, item: RevertItem) -> None:
        for step in self.store.steps_done(s.action_id) & APPLY_STEPS:
            self.store.record_step(s.action_id, step, Outcome.REVERTED)
        self.store.clear_session_records(s.action_id)
        self.store.set_session_status(s.action_id, SessionState.REVERTED)
        item.outcome = RevertOutcome.REMOVED


def revert(
    store: StateStore,
    fallback: XnatTarget | None,
    *,
    yes: bool = False,
    sessions: Sequence[str] = (),
    projects: Sequence[str] = (),
    force: bool = False,
    archived: bool = False,
    confirm: Callable[[str], bool] | None = None,
) -> RevertReport:
    """Revert the matching sessions of the ledger (all by default); see the module docstring."""
    report = RevertReport(dry_run=not yes)
    targets = Targets(fallback)
    worker = _Reverter(store, targets, yes, force, archived, confirm)
    try:
        for s in store.sessions():
            if s.status is SessionState.REVERTED:
                continue
            if sessions and s.session not in sessions:
                continue
            if projects and (s.project or "Unassigned") not in projects:
                continue
            try:
                report.items.append(worker.session(s))
            except XnatMigrateError as exc:
                report.items.append(RevertItem(s.action_id, s.label, RevertOutcome.REFUSED, str(exc)))
                break
    finally:
        targets.close()
    if yes and any(i.outcome is RevertOutcome.REMOVED for i in report.items):
        store.bump_serial()
    return report
