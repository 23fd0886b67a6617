"""Sessions taken in groups for group commit: consecutive, one route, bounded in files, sessions, bytes.

Invariants:
- Every session is in exactly one group, and the groups keep the plan's order.
- A group holds sessions of one route (and, for C-STORE, one routing element): one barrier, one
  transaction or one set of associations serves the whole group.
- A group closes before a session that would take it past a limit; a session alone past the limits is
  a group of its own (a huge study is never split here: its files have their own pipeline).
- A plan's first group, when it is an inbox group, is held to ``1/FIRST_INBOX_SHARE`` of the files and
  bytes limits: its staging is the one nothing overlaps (apply links each later group while XNAT imports
  the one before), so a small first group sets XNAT's importer to work sooner.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

from ..model import CstoreSession, InboxSession, PlannedSession, PrearchiveSession, unreachable
from . import settings

#: An inbox plan's first group holds at most this share of the files and bytes limits (module invariants).
FIRST_INBOX_SHARE = 8


@dataclass(frozen=True)
class Limits:
    files: int
    sessions: int
    bytes: int

    def share(self, n: int) -> Limits:
        """These limits' files and bytes divided by ``n`` (at least one file and byte)."""
        return Limits(files=max(1, self.files // n), sessions=self.sessions, bytes=max(1, self.bytes // n))

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
    first = True
    cap = limits
    for s in sessions:
        if first and not group and isinstance(s, InboxSession):
            cap = limits.share(FIRST_INBOX_SHARE)
        if group and (
            _kind(s) != _kind(group[0])
            or len(group) >= cap.sessions
            or files + s.file_count > cap.files
            or size + s.bytes > cap.bytes
        ):
            yield group
            group, files, size, first, cap = [], 0, 0, False, limits
        group.append(s)
        files += s.file_count
        size += s.bytes
    if group:
        yield group
