"""Sessions taken in groups for group commit: consecutive, one route, bounded in files, sessions, bytes.

Invariants:
- Every session is in exactly one group, and the groups keep the plan's order.
- A group holds sessions of one route (and, for C-STORE, one routing element): one barrier, one
  transaction or one set of associations serves the whole group.
- A group closes before a session that would take it past a limit; a session alone past the limits is
  a group of its own (a huge study is never split here: its files have their own pipeline).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from ..model import CstoreSession, InboxSession, PlannedSession, PrearchiveSession, unreachable
from . import settings


@dataclass(frozen=True)
class Limits:
    files: int
    sessions: int
    bytes: int

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            files=int(settings.positive(settings.GROUP_FILES)),
            sessions=max(1, int(settings.positive(settings.GROUP_SESSIONS))),
            bytes=int(settings.positive(settings.GROUP_MB) * 1_000_000),
        )


def _kind(s: PlannedSession) -> Hashable:
    match s:
        case PrearchiveSession():
            return "prearchive"
        case CstoreSession():
            return ("cstore", s.routing)
        case InboxSession():
            return "inbox"
        case _:
            unreachable(s)


def groups(sessions: Sequence[PlannedSession], limits: Limits) -> Iterator[list[PlannedSession]]:
    """The plan's sessions in consecutive groups within ``limits``."""
    group: list[PlannedSession] = []
    files = size = 0
    for s in sessions:
        if group and (
            _kind(s) != _kind(group[0])
            or len(group) >= limits.sessions
            or files + s.file_count > limits.files
            or size + s.bytes > limits.bytes
        ):
            yield group
            group, files, size = [], 0, 0
        group.append(s)
        files += s.file_count
        size += s.bytes
    if group:
        yield group
