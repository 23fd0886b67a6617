"""``refresh``: compare the ledger with XNAT now and report what happened since, without acting.

What it learns is recorded per session (``observed`` in the state), which ``status`` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..errors import XnatMigrateError
from ..model import XnatTarget
from ..state import AppliedSession, StateStore
from . import db
from .connections import Connections

# SessionXMLRebuilder defaults: runs every 60 s, builds rows idle ≥ 5 minutes (xnat-reference §3).
REBUILD_INTERVAL = timedelta(minutes=5)


@dataclass
class Observation:
    action_id: str
    label: str
    state: str  # waiting | building | built | error | conflict | archived | moved | deleted | stuck | unknown
    status: str | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "status": self.status, "detail": self.detail}


def _label(s: AppliedSession) -> str:
    return f"{s.project or 'Unassigned'}/{s.session}"


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
    xnat: XnatTarget,
    *,
    now: datetime | None = None,
    on_session: Callable[[Observation], None] | None = None,
) -> list[Observation]:
    """Observe every applied session in XNAT (database first, REST when configured) and record it."""
    now = now or datetime.now()
    out = []
    with Connections(xnat) as target:
        client = target.rest() if target.has_rest else None
        conn = target.db() if target.has_db else None
        for s in store.sessions():
            if s.status not in ("applied", "failed", "applying"):
                continue
            try:
                obs = _observe_one(store, s, conn, client, now)
            except XnatMigrateError as exc:
                obs = Observation(s.action_id, _label(s), "unknown", None, str(exc))
            store.record_observation(s.action_id, obs.as_dict())
            out.append(obs)
            if on_session:
                on_session(obs)
    return out


def _observe_one(store: StateStore, s: AppliedSession, conn: Any, client: Any, now: datetime) -> Observation:
    ts, folder = s.timestamp, s.session
    if s.method == "cstore":
        located = store.step_detail(s.action_id, "locate")
        if not located:
            return Observation(
                s.action_id, _label(s), "unknown", None, "sent; not yet located in XNAT's prearchive"
            )
        ts, folder = located["timestamp"], located["folder"]
    row: dict[str, Any] | None = None
    if conn is not None:
        with conn, conn.cursor() as cur:
            row = db.fetch_row(cur, s.project, ts, folder)
    elif client is not None:
        row = client.prearchive_session(s.project, ts, folder)
    else:
        return Observation(
            s.action_id, _label(s), "unknown", None, "neither xnat.database nor xnat.url is set"
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
            _label(s),
            "stuck",
            status,
            f"{status} for {int(idle.total_seconds() // 60)} min: {cause}",
        )
    state = {
        "READY": "built",
        "ERROR": "error",
        "CONFLICT": "conflict",
        "RECEIVING": "waiting",
    }.get(status, "building" if "BUILD" in status else status.lower())
    return Observation(s.action_id, _label(s), state, status, f"row {status}")


def _vanished(store: StateStore, s: AppliedSession, conn: Any, client: Any) -> Observation:
    """The row is gone: archived, moved to another project, or deleted (§3 transitions)."""
    if "archive" in store.steps_done(s.action_id):
        detail = store.step_detail(s.action_id, "archive") or {}
        return Observation(
            s.action_id, _label(s), "archived", None, f"archived by this tool {detail.get('uri', '')}".strip()
        )
    if client is not None and s.project and s.session in client.experiment_labels(s.project):
        return Observation(
            s.action_id, _label(s), "archived", None, f"archived in {s.project} (not by this tool)"
        )
    if conn is not None:
        with conn, conn.cursor() as cur:
            rows = db.existing_rows(cur, [s.study_uid])
        for r in rows:
            if r.name == s.session and r.project != s.project:
                return Observation(
                    s.action_id,
                    _label(s),
                    "moved",
                    r.status,
                    f"moved to project {r.project or 'Unassigned'} ({r.timestamp})",
                )
    return Observation(
        s.action_id,
        _label(s),
        "deleted",
        None,
        "its prearchive row is gone and no archived session was found",
    )
