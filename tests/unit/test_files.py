"""Staging and publishing session folders (real files in tmp_path; no services)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from xnatmigrate.errors import ApplyError, StalePlanError, XnatMigrateError
from xnatmigrate.execute import files
from xnatmigrate.execute.files import disk, publishing, stage, transfer
from xnatmigrate.execute.files.perms import Perms
from xnatmigrate.model import PlannedFile, PlannedScan, PrearchiveSession
from xnatmigrate.testing.sessions import prearchive_session

TS = "20240131_101112123"


def make_sources(root: Path, n: int = 6, size: int = 50_000, series: int = 2) -> list[Path]:
    out = []
    for i in range(n):
        p = root / f"series{i % series}" / f"IMG{i:04d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size + i))
        out.append(p)
    return out


def make_session(
    sources: list[Path], project: str | None = "P1", ts: str = TS, label: str = "S1"
) -> PrearchiveSession:
    by_scan: dict[str, list[PlannedFile]] = {}
    for p in sources:
        st = p.stat()
        scan = p.parent.name.removeprefix("series")
        by_scan.setdefault(scan, []).append(
            PlannedFile(
                str(p),
                st.st_size,
                st.st_mtime_ns,
                "1.2.3",
                "1.2.840",
                "1.2",
                f"SCANS/{scan}/DICOM/{p.name}.dcm",
            )
        )
    scans = tuple(PlannedScan(k, f"1.2.{k}", k, "MR", tuple(v)) for k, v in by_scan.items())
    return prearchive_session(scans, project=project, timestamp=ts, label=label)


def sha(p: Path | str) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "prearchive"
    r.mkdir()
    return r


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    return make_sources(tmp_path / "src")


def all_files(top: Path) -> list[str]:
    return sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file())


# --- paths ---------------------------------------------------------------------------------------


def test_staging_dir_is_hidden_from_xnat_and_unique(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    top = staging.relative_to(root).parts[0]
    assert top == files.STAGING_DIRNAME and "." in top  # XNAT's trawler skips names with '.' (§2)
    assert staging == root / files.STAGING_DIRNAME / TS / "P1" / "S1"
    unassigned = make_session(sources, project=None)
    assert (
        files.staging_dir(str(root), unassigned) == root / files.STAGING_DIRNAME / TS / "_unassigned" / "S1"
    )
    other = make_session(sources, ts="20240131_101112124")
    assert files.staging_dir(str(root), other) != staging


def test_final_dir_project_and_unassigned(root: Path, sources: list[Path]) -> None:
    assert files.final_dir(str(root), make_session(sources)) == root / "P1" / TS / "S1"
    assert files.final_dir(str(root), make_session(sources, project=None)) == root / TS / "S1"


# --- stage + publish -----------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", [1, 4])
@pytest.mark.parametrize("fsync_each", [False, True])
def test_stage_and_publish_layout_and_checksums(
    root: Path, sources: list[Path], jobs: int, fsync_each: bool
) -> None:
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    seen: list[tuple[int, int]] = []
    staged = files.stage_session(
        s, staging, jobs=jobs, progress=lambda d, t: seen.append((d, t)), fsync_each=fsync_each
    )

    assert [f.dest for f in staged] == [f.dest for f in s.files]  # plan order
    for rec, pf in zip(staged, s.files):
        assert rec.source == pf.source and rec.size == pf.size
        assert rec.sha256 == sha(pf.source) == sha(staging / pf.dest)
    assert all_files(staging) == sorted(f.dest for f in s.files)  # no .part, nothing else
    assert seen[-1] == (len(s.files), len(s.files)) and len(seen) == len(s.files)
    assert not final.exists()

    assert files.publish(staging, final) == "done"
    assert not staging.exists()
    assert all_files(final) == sorted(f.dest for f in s.files)
    assert all(sha(final / r.dest) == r.sha256 for r in staged)
    # Empty <ts>/<project> folders of the staging area are pruned; the staging root stays.
    assert list((root / files.STAGING_DIRNAME).iterdir()) == []
    record = {r.dest: (r.source, r.size, r.sha256) for r in staged}
    assert list(files.recorded_differences(final, record)) == []
    assert list(files.recorded_differences(final, record, quick=True)) == []


def test_publish_unassigned_goes_under_timestamp(root: Path, sources: list[Path]) -> None:
    s = make_session(sources, project=None)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    assert files.publish(staging, final) == "done"
    assert (root / TS / "S1" / s.files[0].dest).is_file()


def test_publish_noop_when_already_published(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    assert files.publish(staging, final) == "done"
    assert files.publish(staging, final) == "noop"  # the record of the first publish was lost


def test_publish_refuses_when_both_exist(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    final.mkdir(parents=True)
    (final / "xnat-was-here").write_text("x")
    with pytest.raises(ApplyError, match="both staging .* exist; inspect and remove one") as ei:
        files.publish(staging, final)
    assert "\n" not in str(ei.value)
    assert all_files(final) == ["xnat-was-here"]  # never merged
    assert all_files(staging) == sorted(f.dest for f in s.files)


def test_publish_never_replaces_an_empty_final_folder(root: Path, sources: list[Path]) -> None:
    # rename(2) would silently replace an empty directory; renameat2(RENAME_NOREPLACE) refuses.
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    final.mkdir(parents=True)
    with pytest.raises(ApplyError):
        files.publish(staging, final)
    with pytest.raises(OSError) as ei:
        publishing._rename_noreplace(staging, final)
    assert ei.value.errno == errno.EEXIST


def test_publish_without_staging_says_rerun(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    with pytest.raises(ApplyError, match="nothing staged"):
        files.publish(files.staging_dir(str(root), s), files.final_dir(str(root), s))


# --- resume --------------------------------------------------------------------------------------


def test_resume_deletes_parts_and_strays_and_rehashes_reused_files(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    inodes = {f.dest: (staging / f.dest).stat().st_ino for f in s.files}

    # A crash mid-copy of the first file: its final name is not there yet, a half .part is.
    first = staging / s.files[0].dest
    first.unlink()
    Path(f"{first}.part").write_bytes(b"half")
    (staging / "SCANS" / "0" / "DICOM" / "stray.dcm").write_bytes(b"not planned")
    (staging / "SCANS" / "99" / "DICOM").mkdir(parents=True)
    (staging / "SCANS" / "99" / "DICOM" / "x.dcm").write_bytes(b"old plan")

    hashed: list[str] = []
    real = transfer._hash_path

    def spy(path: str, buf: bytearray) -> str:
        hashed.append(path)
        return real(path, buf)

    monkeypatch.setattr(transfer, "_hash_path", spy)
    staged = files.stage_session(s, staging, jobs=2)

    assert all_files(staging) == sorted(f.dest for f in s.files)  # .part and strays gone
    assert all(r.sha256 == sha(staging / r.dest) == sha(r.source) for r in staged)
    reused = [f.dest for f in s.files[1:]]
    # Every reused file was re-hashed (its checksum record may have died with the crash) ...
    assert sorted(os.path.relpath(p, staging) for p in hashed) == sorted(reused)
    # ... and kept, not copied again.
    assert all((staging / d).stat().st_ino == inodes[d] for d in reused)


def test_resume_recopies_a_corrupted_reused_file(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    bad = staging / s.files[2].dest
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only a re-hash can tell
    bad.write_bytes(bytes(data))

    staged = files.stage_session(s, staging, jobs=2)
    assert sha(bad) == sha(s.files[2].source) == staged[2].sha256


def test_resume_recopies_a_truncated_reused_file(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    files.stage_session(s, staging, jobs=1)
    (staging / s.files[0].dest).write_bytes(b"")  # what a power cut can leave without per-file fsync
    files.stage_session(s, staging, jobs=1)
    assert sha(staging / s.files[0].dest) == sha(s.files[0].source)


# --- hardlink, modes, owners ---------------------------------------------------------------------


def test_hardlink_is_the_source_inode(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    staged = files.stage_session(s, staging, transfer="hardlink", jobs=2)
    for rec, pf in zip(staged, s.files):
        assert os.path.samefile(staging / pf.dest, pf.source)
        assert rec.sha256 == sha(pf.source)
    assert all_files(staging) == sorted(f.dest for f in s.files)
    # A rerun reuses the links (same inode) and relinks a copy that is not one.
    victim = staging / s.files[1].dest
    victim.unlink()
    victim.write_bytes(Path(s.files[1].source).read_bytes())
    files.stage_session(s, staging, transfer="hardlink", jobs=2)
    assert os.path.samefile(victim, s.files[1].source)


def _bound(path: Path, dest: str = "SCANS/0/DICOM/a.dcm") -> PlannedFile:
    """``path`` planned as the scan plans it: bound to its inode and ctime. After a pause: a change in
    the same coarse clock tick as the file's last one would not move its ctime (the scan cache's and
    ``unchanged_since_plan``'s NOTE), and the plan never comes milliseconds after the file's write."""
    time.sleep(0.03)
    st = path.stat()
    return PlannedFile(
        str(path), st.st_size, st.st_mtime_ns, "1.2.3", "1.2.840", "1.2", dest,
        ctime_ns=st.st_ctime_ns, ino=st.st_ino,
    )  # fmt: skip


NO_PERMS = Perms(None, None, None, None)


def test_a_link_is_made_under_its_final_name_and_knows_the_plans_inode_unchanged(
    tmp_path: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    links: list[tuple[str, str]] = []
    real = os.link

    def spy(src: str, dst: str) -> None:
        links.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(os, "link", spy)
    f = _bound(sources[0])
    dst = str(tmp_path / "a.dcm")
    staged = transfer.link_one(f, dst, NO_PERMS, bytearray(1024), digest=False)
    assert links == [(f.source, dst)]  # straight to the final name: no .part, no rename
    assert os.path.samefile(dst, f.source) and staged.sha256 == transfer.NOT_HASHED
    assert staged.unchanged  # the inode the plan read, not written to since: recheck may skip it
    # Our link moved the source's ctime: a second link of the same plan (a rerun, another apply of it)
    # cannot tell a write from the link, so its header is re-read.
    again = transfer.link_one(f, str(tmp_path / "b.dcm"), NO_PERMS, bytearray(1024), digest=False)
    assert not again.unchanged
    # A file planned without its inode and ctime (--path-map, hand-made sessions) is never "unchanged".
    unbound = dataclasses.replace(_bound(sources[1]), ino=-1, ctime_ns=-1)
    assert not transfer.link_one(unbound, str(tmp_path / "c.dcm"), NO_PERMS, bytearray(1024)).unchanged


def test_a_rewrite_with_size_and_mtime_restored_is_caught_through_the_ctime(
    tmp_path: Path, sources: list[Path]
) -> None:
    f = _bound(sources[0])
    st = sources[0].stat()
    data = bytearray(sources[0].read_bytes())
    data[100:104] = b"EDIT"
    time.sleep(0.03)
    sources[0].write_bytes(bytes(data))  # same size
    os.utime(sources[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` would leave it
    assert not transfer.unchanged_since_plan(f, sources[0].stat())
    staged = transfer.link_one(f, str(tmp_path / "a.dcm"), NO_PERMS, bytearray(1024), digest=False)
    assert not staged.unchanged  # so recheck reads its header again


def test_a_link_that_is_not_the_sources_inode_is_refused_and_removed(
    tmp_path: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_a_link(src: str, dst: str) -> None:  # what a link that went wrong would leave: another inode
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(os, "link", not_a_link)
    f = _bound(sources[0])
    dst = tmp_path / "a.dcm"
    with pytest.raises(ApplyError, match="is not the source's inode"):
        transfer.link_one(f, str(dst), NO_PERMS, bytearray(1024), digest=False)
    assert not dst.exists()


def test_a_source_replaced_after_plan_is_not_linked(tmp_path: Path, sources: list[Path]) -> None:
    f = _bound(sources[0])
    other = tmp_path / "other"
    other.write_bytes(sources[0].read_bytes())
    st = sources[0].stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, sources[0])  # same bytes, size and mtime; another inode
    dst = tmp_path / "a.dcm"
    with pytest.raises(StalePlanError, match="replaced by another file"):
        transfer.link_one(f, str(dst), NO_PERMS, bytearray(1024), digest=False)
    assert not dst.exists()


def test_file_mode_and_owner_applied_to_files_and_folders(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    owner = f"{os.getuid()}:{os.getgid()}"
    files.stage_session(s, staging, jobs=2, file_mode=0o640, file_owner=owner)
    for f in s.files:
        st = (staging / f.dest).stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    for d in (staging, staging / "SCANS", staging / "SCANS" / "0", staging / "SCANS" / "0" / "DICOM"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750  # readable → searchable, owner may write
    files.publish(staging, final)
    # Folders publish creates for XNAT (it writes the session XML there) mirror the session folder.
    assert stat.S_IMODE(final.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "P1").stat().st_mode) == 0o750


def test_unknown_owner_is_a_clear_error(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    with pytest.raises(ApplyError, match="no user 'no-such-user-xm'.*fix xnat.file_owner"):
        files.stage_session(s, files.staging_dir(str(root), s), jobs=1, file_owner="no-such-user-xm")


def test_chown_not_permitted_is_a_clear_error(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(*_a: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", denied)
    monkeypatch.setattr(os, "fchown", denied)
    s = make_session(sources)
    with pytest.raises(ApplyError, match="may not chown .*run apply as root"):
        files.stage_session(
            s, files.staging_dir(str(root), s), jobs=1, file_owner="0:0" if os.getuid() else "1:1"
        )


# --- sources -------------------------------------------------------------------------------------


def test_check_sources_detects_size_mtime_and_vanished(sources: list[Path]) -> None:
    s = make_session(sources)
    files.check_sources(s)

    os.utime(sources[0], ns=(1, 1))
    with pytest.raises(StalePlanError, match=r"IMG0000 was modified.*re-run xnatmigrate plan"):
        files.check_sources(s)

    s = make_session(sources)
    with sources[1].open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(StalePlanError, match=r"IMG0001 changed size"):
        files.check_sources(s)

    s = make_session(sources)
    sources[2].unlink()
    sources[3].unlink()
    with pytest.raises(StalePlanError, match=r"IMG0002 has vanished since planning \(and 1 more\)") as ei:
        files.check_sources(s)
    assert "\n" not in str(ei.value)
    gone = [f for f in s.files if f.source == str(sources[2])]
    with pytest.raises(StalePlanError, match="IMG0002 has vanished"):
        files.check_sources_of(gone)  # the subset form C-STORE resumes use
    files.check_sources_of([f for f in s.files if f.source == str(sources[4])])


@pytest.mark.parametrize("jobs", [1, 4])
def test_stage_refuses_a_changed_or_vanished_source_and_leaves_no_part(
    root: Path, sources: list[Path], jobs: int
) -> None:
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    sources[3].write_bytes(b"changed")
    with pytest.raises(StalePlanError, match="re-run xnatmigrate plan"):
        files.stage_session(s, staging, jobs=jobs)
    assert not [p for p in staging.rglob("*.part")]
    sources[3].unlink()
    with pytest.raises(StalePlanError, match="vanished"):
        files.stage_session(s, staging, jobs=jobs)


def test_unreadable_source_is_a_clear_error(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads through chmod 000, so the denial is simulated at open().
    real_open = os.open
    victim = str(sources[1])

    def fake_open(path: object, flags: int, *a: object) -> int:
        if str(path) == victim:
            raise PermissionError(errno.EACCES, "Permission denied", victim)
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    with pytest.raises(ApplyError, match=r"cannot read source .*IMG0001: permission denied for user") as ei:
        files.stage_session(s, staging, jobs=1)
    assert "\n" not in str(ei.value)
    assert not [p for p in staging.rglob("*.part")]


def test_write_error_mid_copy_removes_the_part(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "write", failing_write)
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    with pytest.raises(ApplyError, match="Input/output error on .*staged files are kept for resume"):
        files.stage_session(s, staging, jobs=1)
    assert not [p for p in staging.rglob("*.part")]
    assert len(all_files(staging)) == 2  # the two finished files stay for the rerun
    monkeypatch.undo()
    files.stage_session(s, staging, jobs=1)
    assert all_files(staging) == sorted(f.dest for f in s.files)


# --- guards and helpers --------------------------------------------------------------------------


def test_unsafe_destinations_are_refused(root: Path, sources: list[Path]) -> None:
    s = make_session(sources[:1])
    pf = s.scans[0].files[0]
    for dest in ("../escape.dcm", "/abs.dcm", "SCANS/1/DICOM/x.dcm.part", "SCANS//x.dcm"):
        bad = make_session(sources[:1])
        object.__setattr__(bad.scans[0], "files", (dataclasses.replace(pf, dest=dest),))
        with pytest.raises(ApplyError, match="unsafe destination"):
            files.stage_session(bad, files.staging_dir(str(root), bad), jobs=1)


def test_staging_must_be_below_the_staging_root(root: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    with pytest.raises(ApplyError, match="not below a .xnatmigrate-staging"):
        files.stage_session(s, files.final_dir(str(root), s), jobs=1)


def test_missing_prearchive_root_is_not_created(tmp_path: Path, sources: list[Path]) -> None:
    s = make_session(sources)
    with pytest.raises(ApplyError, match="prearchive root .* does not exist"):
        files.stage_session(s, files.staging_dir(str(tmp_path / "nope"), s), jobs=1)
    assert not (tmp_path / "nope").exists()


def test_recorded_differences_detects_missing_wrong_size_and_changed_content(
    root: Path, sources: list[Path]
) -> None:
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    staged = files.stage_session(s, staging, jobs=2)
    files.publish(staging, final)
    record = {r.dest: (r.source, r.size, r.sha256) for r in staged}
    first, second = final / s.files[0].dest, final / s.files[1].dest

    def kinds(quick: bool = False) -> list[tuple[Path, str]]:
        return [(p, kind) for p, kind, _ in files.recorded_differences(final, record, quick=quick)]

    first.write_bytes(b"short")
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    second.write_bytes(bytes(data))
    assert sorted(kinds()) == sorted([(first, "size"), (second, "sha256")])
    assert kinds(quick=True) == [(first, "size")]  # sizes only
    first.unlink()
    assert sorted(kinds()) == sorted([(first, "missing"), (second, "sha256")])


def test_small_helpers(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert files.sha256_file(p) == hashlib.sha256(b"abc").hexdigest()
    assert files.free_bytes(tmp_path / "does" / "not" / "exist") > 0
    assert files.same_filesystem(tmp_path, tmp_path / "x" / "y")
    from xnatmigrate.execute.apply import _FATAL

    assert issubclass(files.DiskError, ApplyError) and issubclass(files.DiskError, _FATAL)  # stops the run
    assert issubclass(files.DiskError, XnatMigrateError)


def test_empty_session_stages_an_empty_folder(root: Path) -> None:
    s = make_session([])
    staging = files.staging_dir(str(root), s)
    assert files.stage_session(s, staging, jobs=4) == []
    assert staging.is_dir()


def test_writeback_error_at_the_final_syncfs_forgets_this_runs_files(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    kept = staging / s.files[0].dest
    inode = kept.stat().st_ino
    for f in s.files[1:]:
        (staging / f.dest).unlink()

    class FailingLibc:
        @staticmethod
        def syncfs(_fd: int) -> int:
            ctypes.set_errno(errno.EIO)
            return -1

    monkeypatch.setattr(disk, "libc", lambda: FailingLibc)  # where disk.syncfs looks it up
    with pytest.raises(ApplyError, match="Input/output error"):
        files.stage_session(s, staging, jobs=2)
    # The page cache may hold bytes the disk never got: what this run wrote is not trusted later.
    assert all_files(staging) == [s.files[0].dest] and kept.stat().st_ino == inode
    monkeypatch.undo()
    files.stage_session(s, staging, jobs=2)
    assert all_files(staging) == sorted(f.dest for f in s.files)


def test_staging_that_wrote_makes_folders_durable_with_its_one_syncfs(
    root: Path, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The syncfs commits the journal holding the new folders and renames: no fsync per folder then;
    a run that wrote nothing (every file reused) has no syncfs, and fsyncs its folders instead."""
    calls: list[tuple[str, str]] = []
    real_syncfs, real_fsync_dir = stage.syncfs, stage.fsync_dir
    monkeypatch.setattr(stage, "syncfs", lambda p: (calls.append(("syncfs", str(p))), real_syncfs(p))[1])
    monkeypatch.setattr(stage, "fsync_dir", lambda p: (calls.append(("fsync", str(p))), real_fsync_dir(p))[1])
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    files.stage_session(s, staging, jobs=2)
    assert [c for c, _ in calls] == ["syncfs"]
    calls.clear()
    files.stage_session(s, staging, jobs=2)  # a rerun: every file reused, nothing written
    assert calls and {c for c, _ in calls} == {"fsync"} and str(staging) in {p for _, p in calls}


def test_publishing_many_folders_is_one_syncfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(publishing, "syncfs", lambda p: calls.append(f"syncfs {p}"))

    def fsync_dir(p: Path) -> None:
        if not p.exists():
            raise FileNotFoundError(p)
        calls.append(f"fsync {p}")

    monkeypatch.setattr(publishing, "fsync_dir", fsync_dir)
    dirs = [tmp_path / f"d{i}" for i in range(publishing.SYNCFS_OVER + 1)]
    for d in dirs:
        d.mkdir()
    publishing.fsync_dirs([*dirs, dirs[0]])
    assert calls == [f"syncfs {dirs[0]}"]
    calls.clear()
    few = dirs[: publishing.SYNCFS_OVER - 1]  # with "gone": SYNCFS_OVER folders
    publishing.fsync_dirs([*few, few[0], tmp_path / "gone"])  # a pruned folder is skipped
    assert calls == [f"fsync {d}" for d in few]


@pytest.mark.parametrize("size", [50_000, 3 * files.digest.BUFFER_SIZE // 2], ids=["one-chunk", "chunked"])
def test_copy_refuses_bytes_that_read_back_differently(tmp_path: Path, size: int) -> None:
    """The read-back check catches a write that did not land as read (here: every written chunk with its
    first byte flipped), for a file read in one chunk and one read in several. Nothing is left under the
    final name or as scratch, and the next attempt copies it right."""
    (src,) = make_sources(tmp_path / "src", n=1, size=size, series=1)
    f = make_session([src]).files[0]
    dst = tmp_path / "out" / "IMG.dcm"
    dst.parent.mkdir()
    real_write = os.write

    def flipped(fd: int, data: bytes | memoryview) -> int:
        b = bytes(data)
        return real_write(fd, bytes([b[0] ^ 1]) + b[1:])

    perms = transfer.Perms(None, None, None, None)
    try:
        os.write = flipped  # type: ignore[assignment]
        with pytest.raises(ApplyError, match="verification failed"):
            transfer.copy_one(f, str(dst), perms, bytearray(files.digest.BUFFER_SIZE), False)
    finally:
        os.write = real_write  # type: ignore[assignment]
    assert list(dst.parent.iterdir()) == []
    staged = transfer.copy_one(f, str(dst), perms, bytearray(files.digest.BUFFER_SIZE), False)
    assert dst.read_bytes() == src.read_bytes() and staged.sha256 == sha(src)


@pytest.mark.parametrize("jobs", [1, 4])
def test_a_cancelled_batch_stops_handing_out_files_and_the_next_one_reuses_what_was_finished(
    root: Path, tmp_path: Path, jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cancel`` (the run stopping while a group is staged ahead): no more files are handed out, the
    batch raises one line, no scratch file is left, and a later batch keeps every file finished."""
    import threading

    sources = make_sources(tmp_path / "many", n=40, size=20_000)
    s = make_session(sources)
    staging = files.staging_dir(str(root), s)
    cancel = threading.Event()
    # After the fifth file, a copy waits for the cancel (set by the progress the main thread reports):
    # otherwise fast copies could all be handed out before the main thread has counted five.
    real_copy, copied, count_lock = stage.copy_one, [0], threading.Lock()

    def copy_then_wait(*args: Any, **kwargs: Any) -> Any:
        staged = real_copy(*args, **kwargs)
        with count_lock:
            copied[0] += 1
            n = copied[0]
        if n > 5:  # the first five return: the main thread sees them and cancels
            cancel.wait(10)
        return staged

    monkeypatch.setattr(stage, "copy_one", copy_then_wait)

    def progress(done: int, _total: int) -> None:
        if done >= 5:  # not == 5: several threads' files may be counted in one call
            cancel.set()

    batch = [(s, staging, s.transfer)]
    with pytest.raises(ApplyError, match="cancelled"):
        files.stage_batch(batch, jobs=jobs, progress=progress, cancel=cancel)
    kept = all_files(staging)
    assert 5 <= len(kept) < len(s.files) and not [k for k in kept if k.endswith(files.PART_SUFFIX)]
    before = {k: (staging / k).stat().st_ino for k in kept}
    (result,) = files.stage_batch(batch, jobs=jobs)
    assert not isinstance(result, XnatMigrateError) and [f.dest for f in result] == [f.dest for f in s.files]
    assert all((staging / k).stat().st_ino == ino for k, ino in before.items())  # reused, not copied again
    assert all(sha(staging / f.dest) == f.sha256 for f in result)
