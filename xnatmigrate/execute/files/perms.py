"""Owner and mode of staged files and folders (``xnat.file_owner`` / ``xnat.file_mode``).

Invariants:
- A path is chmod/chown-ed only when not already right: a hard link shares the source's inode, so
  an unneeded change would touch the source file too.
- Folders get the file mode made searchable where readable, and always owner-writable (XNAT moves
  files out of them); a chown not permitted is an ``ApplyError`` saying who may do it.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ApplyError
from .disk import current_user


def resolve_owner(owner: str | None) -> tuple[int, int] | None:
    """``"user[:group]"`` (names or numbers) → (uid, gid); gid -1 leaves the group alone, like chown."""
    if not owner:
        return None
    user, _, group = owner.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ApplyError(
            f"file_owner {owner!r}: no user {user!r} on this machine; fix xnat.file_owner in the manifest"
        ) from None
    gid = -1
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ApplyError(
                f"file_owner {owner!r}: no group {group!r} on this machine; fix xnat.file_owner in the manifest"
            ) from None
    return uid, gid


def dir_mode(file_mode: int | None) -> int | None:
    # Readable → searchable, and the owner can always write: XNAT moves files out of these folders.
    if file_mode is None:
        return None
    return file_mode | ((file_mode & 0o444) >> 2) | 0o300


@dataclass(frozen=True)
class Perms:
    file_mode: int | None
    dir_mode: int | None
    owner: tuple[int, int] | None
    owner_text: str | None

    def apply_fd(self, fd: int, st: os.stat_result | None = None) -> None:
        if self.file_mode is not None and (st is None or stat.S_IMODE(st.st_mode) != self.file_mode):
            os.fchmod(fd, self.file_mode)
        if self.owner is not None and (st is None or not _owned(st, self.owner)):
            self._chown(lambda uid, gid: os.fchown(fd, uid, gid))

    def apply_path(self, path: str, *, is_dir: bool) -> None:
        """chmod/chown a path (no-op when already right: hard links share the source's inode)."""
        mode = self.dir_mode if is_dir else self.file_mode
        if mode is None and self.owner is None:
            return  # nothing asked (the usual case): not even the lstat, once per staged file
        st = os.lstat(path)
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        if self.owner is not None and not _owned(st, self.owner):
            self._chown(lambda uid, gid: os.chown(path, uid, gid))

    def _chown(self, do: Callable[[int, int], None]) -> None:
        assert self.owner is not None
        try:
            do(*self.owner)
        except PermissionError as exc:
            raise ApplyError(
                f"cannot give files to {self.owner_text}: user {current_user()} may not chown (needs root or "
                "CAP_CHOWN); run apply as root, or drop xnat.file_owner and grant access otherwise"
            ) from exc


def _owned(st: os.stat_result, owner: tuple[int, int]) -> bool:
    uid, gid = owner
    return st.st_uid == uid and (gid == -1 or st.st_gid == gid)
