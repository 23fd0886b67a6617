"""``refresh``: compare the ledger with XNAT now and report what happened since, without acting.

What it learns is recorded per session (``observed`` in the state), which ``status`` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..errors import XnatMigrateError
from ..model import Method, Seen, SessionState, Step, XnatTarget
from ..state import AppliedSession, StateStore
from . import db
from .connections import Targets
from .xnat import XnatClient

# SessionXMLRebuilder defaults: runs every 60 s, builds rows idle ≥ 5 minutes (xnat-reference §3).
REBUILD_INTERVAL = timedelta(minutes=5)


# XNAT's prearchive statuses (§3) as refresh groups them.
_SEEN_OF_STATUS = {
    "READY": Seen.BUILT,
    "ERROR": Seen.ERROR,
    "CONFLICT": Seen.CONFLICT,
    "RECEIVING": Seen.WAITING,
}


@dataclass
class Observation:
    action_id: str
    label: str
    state: Seen
    status: str | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "status": self.status, "detail": self.detail}


def _parse_ts(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.split(".")[0])
        except ValueError:
            return None
    return None


def _stuck_cause(row: dict[str, Any]) -> str:
    """Why XNAT's rebuilder has not built a RECEIVING row (its skip rules, §3)."""
    pac = row.get("prevent_auto_commit")
    if pac in (True, "true", "t"):
        return "prevent_auto_commit is true, so XNAT's scheduler skips it: run `xnatmigrate apply` (build: rest) or Rebuild in XNAT"
    if row.get("source") in ("uploader", "applet"):
        return f"source is {row.get('source')!r}, which XNAT's rebuilder skips"
    return "lock files under <cachePath>/prearc_locks/<project>/<timestamp>/<folder> may hold it; check XNAT's logs"


def observe(
    store: StateStore,
    fallback: XnatTarget | None,
    *,
    now: datetime | None = None,
    on_session: Callable[[Observation], None] | None = None,
) -> list[Observation]:
    """Observe every applied session in XNAT (database first, REST when configured) and record it."""
    now = now or datetime.now()
    out = []
    with Targets(fallback) as targets:
        for s in store.sessions():
            if s.status is SessionState.REVERTED:
                continue
            try:
                target = targets.of(s)
                obs = _observe_one(store, s, target.db_if_any(), target.rest_if_any(), now)
            except XnatMigrateError as exc:
                obs = Observation(s.action_id, s.label, Seen.UNKNOWN, None, str(exc))
            store.record_observation(s.action_id, obs.as_dict())
            out.append(obs)
            if on_session:
                on_session(obs)
    return out


def _observe_one(
    store: StateStore, s: AppliedSession, conn: db.Connection | None, client: XnatClient | None, now: datetime
) -> Observation:
    ts, folder = s.timestamp, s.session
    if s.method in (Method.CSTORE, Method.INBOX):
        located = store.step_detail(s.action_id, Step.LOCATE)
        if not located:
            what = "sent" if s.method is Method.CSTORE else "inbox import requested"
            return Observation(
                s.action_id, s.label, Seen.UNKNOWN, None, f"{what}; not yet located in XNAT's prearchive"
            )
        if located.get("archived"):
            return _vanished(store, s, conn, client)
        ts, folder = located["timestamp"], located["folder"]
    row: dict[str, Any] | None = None
    if conn is not None:
        with db.transaction(conn) as cur:
            row = db.fetch_row(cur, s.project, ts, folder)
    elif client is not None:
        row = client.prearchive_session(s.project, ts, folder)
    else:
        return Observation(
            s.action_id, s.label, Seen.UNKNOWN, None, "neither xnat.database nor xnat.url is set"
        )
    if row is None:
        return _vanished(store, s, conn, client)
    status = str(row.get("status"))
    lastmod = _parse_ts(row.get("lastmod"))
    idle = now - lastmod if lastmod else None
    if (
        status in ("RECEIVING", "BUILDING", "QUEUED_BUILDING", "_BUILDING")
        and idle
        and idle > REBUILD_INTERVAL
    ):
        cause = (
            _stuck_cause(row) if status == "RECEIVING" else "XNAT's build has not finished; check its logs"
        )
        return Observation(
            s.action_id,
            s.label,
            Seen.STUCK,
            status,
            f"{status} for {int(idle.total_seconds() // 60)} min: {cause}",
        )
    state = _SEEN_OF_STATUS.get(status, Seen.BUILDING if "BUILD" in status else Seen.OTHER)
    return Observation(s.action_id, s.label, state, status, f"row {status}")


def _vanished(
    store: StateStore, s: AppliedSession, conn: db.Connection | None, client: XnatClient | None
) -> Observation:
    """The row is gone: archived, moved to another project, or deleted (§3 transitions)."""
    if Step.ARCHIVE in store.steps_done(s.action_id):
        detail = store.step_detail(s.action_id, Step.ARCHIVE) or {}
        return Observation(
            s.action_id,
            s.label,
            Seen.ARCHIVED,
            None,
            f"archived by this tool {detail.get('uri', '')}".strip(),
        )
    if client is not None and s.project and s.session in client.experiment_labels(s.project):
        return Observation(
            s.action_id, s.label, Seen.ARCHIVED, None, f"archived in {s.project} (not by this tool)"
        )
    if conn is not None:
        with db.transaction(conn) as cur:
            rows = db.existing_rows(cur, [s.study_uid])
        for r in rows:
            if r.name == s.session and r.project != s.project:
                return Observation(
                    s.action_id,
                    s.label,
                    Seen.MOVED,
                    r.status,
                    f"moved to project {r.project or 'Unassigned'} ({r.timestamp})",
                )
    return Observation(
        s.action_id,
        s.label,
        Seen.DELETED,
        None,
        "its prearchive row is gone and no archived session was found",
    )
