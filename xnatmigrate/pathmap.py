"""Per-host path maps (issue 16): the plan names sources as the planning host saw them; another host
of a fleet may mount the same storage elsewhere (``/mnt/pacs`` there, ``/data/legacy`` here).

``--path-map FROM=TO`` (repeatable) or ``$XNATMIGRATE_PATH_MAP`` (entries separated by ``;``) maps
every planned source path under FROM to the same path under TO, on this host only: the plan, its id
and its SQL stay what was reviewed. The manifest, the lookup tables and script files the plan pins are
mapped the same way (they are checked unchanged before an apply).

Invariants:
- A prefix matches whole path components (``/a/b`` maps ``/a/b/c``, never ``/a/bc``); the longest
  matching prefix wins; both sides are absolute, normalised paths.
- A mapped file is still bound to its size, mtime and header (the bytes read are hashed against the
  plan), but not to its inode and ctime: another mount of the same files may number them otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import overload

from .errors import SettingError
from .model import Plan, PlannedSession

ENV = "XNATMIGRATE_PATH_MAP"


@dataclasses.dataclass(frozen=True)
class PathMap:
    """Prefix pairs, longest ``src`` first."""

    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> PathMap:
        pairs: dict[str, str] = {}
        for entry in entries:
            if not entry.strip():
                continue
            src, sep, dst = entry.partition("=")
            if not sep or not os.path.isabs(src) or not os.path.isabs(dst):
                raise SettingError(
                    f"path map entry {entry!r} is not FROM=TO with two absolute paths (e.g. "
                    "/mnt/pacs=/data/legacy); fix --path-map or $XNATMIGRATE_PATH_MAP"
                )
            pairs[os.path.normpath(src)] = os.path.normpath(dst)
        return cls(tuple(sorted(pairs.items(), key=lambda p: -len(p[0]))))

    @classmethod
    def of(cls, entries: Sequence[str] | None) -> PathMap:
        """``--path-map`` entries when given, else ``$XNATMIGRATE_PATH_MAP``."""
        if entries:
            return cls.parse(entries)
        return cls.parse(os.environ.get(ENV, "").split(";"))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def path(self, p: str) -> str:
        for src, dst in self.pairs:
            if p == src:
                return dst
            if p.startswith(src.rstrip("/") + "/"):
                return dst.rstrip("/") + "/" + p[len(src.rstrip("/")) + 1 :]
        return p

    def session(self, s: PlannedSession) -> PlannedSession:
        scans = tuple(
            dataclasses.replace(
                sc,
                files=tuple(
                    dataclasses.replace(f, source=mapped, ino=-1, ctime_ns=-1)
                    if (mapped := self.path(f.source)) != f.source
                    else f
                    for f in sc.files
                ),
            )
            for sc in s.scans
        )
        return dataclasses.replace(s, scans=scans)

    def plan(self, p: Plan) -> Plan:
        """``p`` with its sources, manifest, lookup tables and script files as this host sees them."""
        if not self:
            return p
        return dataclasses.replace(
            p,
            manifest_path=self.path(p.manifest_path),
            sessions=MappedSessions(p.sessions, self),
            lookups=tuple(dataclasses.replace(t, file=self.path(t.file)) for t in p.lookups),
            scripts=tuple(
                dataclasses.replace(sc, name=self.path(sc.name)) if os.path.isabs(sc.name) else sc
                for sc in p.scripts
            ),
        )


class MappedSessions(Sequence[PlannedSession]):
    """A plan's sessions, each mapped as it is read (the plan's lazy reading stays lazy)."""

    def __init__(self, sessions: Sequence[PlannedSession], pm: PathMap) -> None:
        self._sessions, self._pm = sessions, pm

    def __len__(self) -> int:
        return len(self._sessions)

    @overload
    def __getitem__(self, i: int) -> PlannedSession: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[PlannedSession, ...]: ...
    def __getitem__(self, i: int | slice) -> PlannedSession | tuple[PlannedSession, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        return self._pm.session(self._sessions[i])
