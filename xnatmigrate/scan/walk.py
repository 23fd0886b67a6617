"""Walking a source: include/exclude globs, the folder walk, the entries not walked (``skipped:``).

Invariants:
- Nothing is opened but folders: file contents are never read here, and entries that are not regular
  files or folders (FIFOs, sockets, devices) are never opened at all.
- A file's path is the source folder joined with its relative path (symlinks in it are kept, never
  resolved), so it is stable between runs and is the key of the scan cache; results are sorted.
- A folder that cannot be listed is a reject of its own; the source folder itself unlistable is a
  PlanError (a user error to fix, not a file to reject).
- Folders are walked with ``os.scandir``, paths kept as str (speed).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from functools import lru_cache

from ..errors import PlanError
from ..model import Reject, SourceSpec


@lru_cache(maxsize=512)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob over POSIX relative paths; the pattern is anchored at both ends.

    ``**`` as a whole segment matches any number of directories (zero included), ``*`` any run of
    characters within one segment, ``?`` one character but ``/``, ``[abc]``/``[!abc]`` a class.
    NOTE: unlike a shell, ``*`` also matches names starting with a dot; matching is case-sensitive.
    """
    pat = re.sub(r"/{2,}", "/", pattern)
    while pat.startswith("./"):
        pat = pat[2:]
    pat = pat.lstrip("/")
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            if pat.startswith("**", i) and (i == 0 or pat[i - 1] == "/"):
                after = i + 2
                if after == n:
                    out.append(".*")
                    i = after
                    continue
                if pat[after] == "/":
                    out.append("(?:[^/]+/)*")
                    i = after + 1
                    continue
            out.append("[^/]*")
            while i < n and pat[i] == "*":  # a run of stars inside a segment is one star
                i += 1
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pat[j] in "!^":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            end = pat.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pat[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("(?s:" + "".join(out) + r")\Z")


# Globs that match every relative path (``**`` any run of segments, ``**/*`` any file in any folder).
_EVERYTHING = frozenset({"**", "**/*"})


def _prune_regex(pattern: str) -> re.Pattern[str] | None:
    """For an exclude ``X/**``: the folders (relative paths) matching X, whose whole subtree is excluded."""
    if pattern.endswith("/**") and len(pattern) > 3:
        return glob_to_regex(pattern[:-3])
    return None


def walk_with_rejects(src: SourceSpec) -> tuple[list[str], list[Reject]]:
    """Files of one source after include/exclude, sorted, plus what was not walked (sorted by path)
    and why: ``iter_walk`` gathered into lists."""
    errors: list[Reject] = []
    files = sorted(iter_walk(src, errors))
    errors.sort(key=lambda r: r.path)
    return files, errors


def iter_walk(src: SourceSpec, errors: list[Reject]) -> Iterator[str]:
    """Files of one source after include/exclude, as the walk finds them (not sorted), each once;
    what is not walked, and why, is appended to ``errors`` (in walk order) on the way.

    A stream, so that a scan of a huge source holds a folder's names at a time, not all of them.

    Entries that are not regular files or folders are never read, and each one the globs would
    have taken is a ``skipped: …`` reject: FIFOs, sockets and devices (reading could block or never
    end); symbolic links to folders inside the source (walked where they are); symbolic links
    leading outside the source, unless the source sets ``follow_links: true``; with it, a link to a
    folder already walked (a loop, or a second way in). A dangling link is kept, so the scan reports
    it as unreadable.
    """
    root = os.path.abspath(src.source)
    real_root = os.path.realpath(root)
    includes = [glob_to_regex(p) for p in src.include]
    excludes = [glob_to_regex(p) for p in src.exclude]
    prunes = [r for r in (_prune_regex(p) for p in src.exclude) if r is not None]
    # Folders entered, by (device, inode): only needed when links are followed (loops).
    entered: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(root, "")]

    # The default include and no exclude (the usual source) takes every file: no regex per file.
    everything = not excludes and any(p in _EVERYTHING for p in src.include)

    def wanted(rel: str) -> bool:
        return any(r.match(rel) for r in includes) and not any(r.match(rel) for r in excludes)

    def pruned(rel: str) -> bool:
        return any(r.match(rel) for r in prunes) or any(r.match(rel) for r in excludes)

    def outside(target: str) -> bool:
        return target != real_root and not target.startswith(real_root.rstrip(os.sep) + os.sep)

    while stack:
        folder, prefix = stack.pop()
        subdirs: list[tuple[str, str]] = []
        try:
            it = os.scandir(folder)
            if src.follow_links:
                st = os.stat(folder)
                entered.add((st.st_dev, st.st_ino))
        except OSError as exc:
            if folder == root:
                raise PlanError(
                    f"sources[{src.index}]: cannot list {root} ({exc.strerror or exc}); "
                    "fix the path, or mount it"
                ) from None
            errors.append(Reject(folder, f"unreadable: {exc.strerror or exc} (folder not listed)"))
            continue
        with it:
            for entry in it:
                rel = prefix + entry.name
                try:
                    if entry.is_symlink():
                        if not os.path.exists(entry.path):
                            pass  # dangling: kept, the scan reports it as unreadable
                        elif entry.is_dir():
                            if not pruned(rel):
                                why = _folder_link(entry.path, real_root, src.follow_links, outside, entered)
                                if why is None:
                                    subdirs.append((entry.path, rel + "/"))
                                else:
                                    errors.append(Reject(entry.path, why))
                            continue
                        elif wanted(rel):
                            target = os.path.realpath(entry.path)
                            if outside(target) and not src.follow_links:
                                errors.append(Reject(entry.path, _outside(target)))
                            elif not entry.is_file():
                                errors.append(
                                    Reject(entry.path, _special(os.stat(entry.path).st_mode, target))
                                )
                            else:
                                yield entry.path
                            continue
                        else:
                            continue
                    elif entry.is_dir(follow_symlinks=False):
                        if not any(r.match(rel) for r in prunes):
                            subdirs.append((entry.path, rel + "/"))
                        continue
                    elif not entry.is_file(follow_symlinks=False):
                        if wanted(rel):
                            errors.append(
                                Reject(entry.path, _special(entry.stat(follow_symlinks=False).st_mode))
                            )
                        continue
                except OSError:
                    pass  # cannot even stat it: keep it, reading it will say why
                if everything or wanted(rel):
                    yield entry.path
        stack.extend(reversed(subdirs))


def _outside(target: str) -> str:
    return (
        f"skipped: symbolic link leading outside the source, to {target}; set follow_links: true "
        "on this source to follow it"
    )


def _special(mode: int, target: str | None = None) -> str:
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "not a regular file"
    )
    via = f"symbolic link to {target}, " if target else ""
    return f"skipped: {via}{kind}, not a regular file: it is not read (reading could block or never end)"


def _folder_link(
    path: str,
    real_root: str,
    follow: bool,
    outside: Callable[[str], bool],
    entered: set[tuple[int, int]],
) -> str | None:
    """Why the symbolic link ``path`` to a folder is not walked, or None to walk it."""
    target = os.path.realpath(path)
    if not outside(target):
        return f"skipped: symbolic link to the folder {target}, inside the source: walked there, not twice"
    if not follow:
        return _outside(target)
    st = os.stat(path)
    if (st.st_dev, st.st_ino) in entered:
        return f"skipped: symbolic link to the folder {target}, already walked (a loop, or a second way in)"
    entered.add((st.st_dev, st.st_ino))
    return None


def walk_source(src: SourceSpec) -> list[str]:
    """Absolute paths of the source's files that match an include and no exclude, sorted.

    Globs see the path relative to the source folder with ``/`` separators. Raises PlanError when the
    source folder itself cannot be listed (a user error to fix, not a file to reject).
    """
    return walk_with_rejects(src)[0]
