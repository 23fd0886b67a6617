"""Real faults while staging: a full disk, a read-only mount, and kill -9 in the middle of a copy.

The full and read-only filesystems are small tmpfs mounts (needs root, or CAP_SYS_ADMIN); without that
permission those tests skip and say why.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xnatmigrate.execute import files
from xnatmigrate.execute.files import stage
from xnatmigrate.model import PlannedFile, PlannedScan, PrearchiveSession
from xnatmigrate.testing.sessions import prearchive_session

TS = "20240131_101112123"
REPO = Path(__file__).resolve().parents[2]


def make_session(sources: list[Path], label: str = "S1", ts: str = TS) -> PrearchiveSession:
    planned = []
    for p in sources:
        st = p.stat()
        planned.append(
            PlannedFile(str(p), st.st_size, st.st_mtime_ns, "", "", "", f"SCANS/1/DICOM/{p.name}.dcm")
        )
    return prearchive_session(
        (PlannedScan("1", "1.2.3.1", "1", "MR", tuple(planned)),),
        timestamp=ts,
        label=label,
        action_id=label,
        study_uid="1.2.3",
    )


def write_sources(folder: Path, sizes: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        p = folder / f"IMG{i:04d}"
        with p.open("wb") as fh:
            for _ in range(size // (1 << 20)):
                fh.write(os.urandom(1 << 20))
            fh.write(os.urandom(size % (1 << 20)))
        out.append(p)
    return out


def sha(p: Path | str) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def visible_tree(root: Path) -> list[str]:
    """Every path XNAT's trawler would look at (top-level names with '.' are skipped, §2)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if "." not in p.relative_to(root).parts[0] and p.name != "lost+found"
    )


def parts_under(top: Path) -> list[Path]:
    return list(top.rglob(f"*{files.PART_SUFFIX}"))


@pytest.fixture
def tmpfs(mount_tmpfs: Callable[[str], Path]) -> Path:
    """A 2 MB tmpfs at tmp_path/mnt, unmounted afterwards."""
    return mount_tmpfs("2m")


def remount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True)


def assert_one_line_with_fix(message: str) -> None:
    assert "\n" not in message and ": " in message


# --- disk full -----------------------------------------------------------------------------------


def test_disk_full_before_starting(tmpfs: Path, tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src", [600_000] * 5)  # 3 MB into 2 MB
    s = make_session(sources)
    staging = files.staging_dir(str(tmpfs), s)
    with pytest.raises(files.DiskError) as ei:
        files.stage_session(s, staging, jobs=2)
    msg = str(ei.value)
    assert_one_line_with_fix(msg)
    assert msg.startswith(f"disk full on {tmpfs} while staging P1/{TS}/S1: free at least ")
    assert "MB and rerun; staged files are kept for resume" in msg
    assert [p for p in staging.rglob("*") if p.is_file()] == []  # refused before writing anything
    assert visible_tree(tmpfs) == []


@pytest.mark.parametrize("jobs", [1, 3])
def test_disk_full_midway_then_resume_after_growing_the_disk(
    tmpfs: Path, tmp_path: Path, jobs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = write_sources(tmp_path / "src", [300_000] * 5)  # 1.5 MB: fits in 2 MB when it starts
    s = make_session(sources)
    staging, final = files.staging_dir(str(tmpfs), s), files.final_dir(str(tmpfs), s)
    filler = tmpfs / ".filler"
    lock = threading.Lock()
    copy_one = stage.copy_one  # looked up there by stage_session's workers
    started = []

    first_done = threading.Event()

    def copy_after_another_writer_filled_the_disk(*args: Any) -> files.StagedFile:
        # Another writer takes the rest of the disk once the first file is in: the kernel's own ENOSPC.
        # The second copy waits for the first to finish, so with several workers the first is kept.
        with lock:
            started.append(1)
            n = len(started)
        if n == 1:
            try:
                return copy_one(*args)
            finally:
                first_done.set()
        if n == 2:
            assert first_done.wait(30)
            with lock, filler.open("wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
        return copy_one(*args)

    monkeypatch.setattr(stage, "copy_one", copy_after_another_writer_filled_the_disk)
    with pytest.raises(files.DiskError) as ei:
        files.stage_session(s, staging, jobs=jobs)
    msg = str(ei.value)
    assert_one_line_with_fix(msg)
    assert msg.startswith(f"disk full on {tmpfs} while staging P1/{TS}/S1: free at least ")
    assert parts_under(tmpfs) == []  # the half-written file is gone ...
    kept = [p for p in staging.rglob("*") if p.is_file()]
    assert kept and all(
        sha(p) == sha(tmp_path / "src" / p.name.removesuffix(".dcm")) for p in kept
    )  # ... not these
    assert not final.exists() and visible_tree(tmpfs) == []

    monkeypatch.undo()
    remount(tmpfs, "size=8m")  # "free space and rerun"
    inodes = {p.name: p.stat().st_ino for p in kept}
    staged = files.stage_session(s, staging, jobs=jobs)
    assert files.publish(staging, final) == "done"
    assert all(sha(final / r.dest) == sha(r.source) == r.sha256 for r in staged)
    assert all((final / "SCANS/1/DICOM" / n).stat().st_ino == ino for n, ino in inodes.items())  # resumed
    assert parts_under(tmpfs) == []


# --- read-only / not writable ----------------------------------------------------------------------


def test_read_only_prearchive(tmpfs: Path, tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src", [10_000] * 3)
    s1, s2 = make_session(sources, "S1"), make_session(sources, "S2", ts="20240131_101112124")
    st1 = files.staging_dir(str(tmpfs), s1)
    files.stage_session(s1, st1, jobs=1)
    remount(tmpfs, "ro")

    with pytest.raises(files.DiskError) as ei:
        files.stage_session(s2, files.staging_dir(str(tmpfs), s2), jobs=1)
    assert_one_line_with_fix(str(ei.value))
    assert (
        str(ei.value)
        == f"{tmpfs} is read-only while staging P1/20240131_101112124/S2: remount it read-write and rerun"
    )

    with pytest.raises(files.DiskError, match=f"^{tmpfs} is read-only: remount it read-write and rerun$"):
        files.publish(st1, files.final_dir(str(tmpfs), s1))
    assert visible_tree(tmpfs) == []

    remount(tmpfs, "rw")
    assert files.publish(st1, files.final_dir(str(tmpfs), s1)) == "done"


def test_prearchive_not_writable_by_the_user() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the child as another user")
    # Outside pytest's 0700 temp root, so that 'nobody' can reach the sources.
    base = Path(tempfile.mkdtemp(prefix="xm-files-"))
    try:
        os.chmod(base, 0o755)
        sources = write_sources(base / "src", [10_000] * 2)
        root = base / "prearchive"
        root.mkdir(mode=0o755)  # root's, not writable for 'nobody'
        s = make_session(sources)
        blob = base / "session.pickle"
        blob.write_bytes(pickle.dumps(s))
        for p in (base / "src", *sources, blob):
            os.chmod(p, os.stat(p).st_mode | 0o005)
        code = textwrap.dedent(
            f"""
            import pickle, sys
            from xnatmigrate.execute import files
            s = pickle.loads(open({str(blob)!r}, "rb").read())
            try:
                files.stage_session(s, files.staging_dir({str(root)!r}, s), jobs=1)
            except files.DiskError as exc:
                print(exc); sys.exit(3)
            """
        )
        r = None
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
            try:
                r = subprocess.run(
                    [python, "-c", code],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    user=65534,
                    group=65534,
                    env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)},
                )
            except OSError:
                continue  # this interpreter is not reachable for 'nobody'
            if r.returncode in (0, 3):
                break
        if r is None or r.returncode not in (0, 3):
            pytest.skip(
                f"cannot run a Python child as nobody here: {r.stderr.strip()[-200:] if r else 'no access'}"
            )
        assert r.returncode == 3, r.stdout
        line = r.stdout.strip()
        assert_one_line_with_fix(line)
        assert "is not writable by user nobody" in line and "give that user write access" in line
        assert not (root / files.STAGING_DIRNAME).exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- kill -9 -------------------------------------------------------------------------------------

# The child stages the session with os.write wrapped: once BLOCK_AT bytes of the big file's .part are
# written it says so on stdout and waits, so the parent's SIGKILL always lands in the middle of that copy
# (with jobs=2 the other worker copies on meanwhile). A child that finishes prints "finished" instead.
# (apply's XNATMIGRATE_TEST_CRASH=files:N fires between files, so it cannot stop a copy halfway.)
CHILD = """
import os, pickle, sys, threading
from xnatmigrate.execute import files
s = pickle.loads(open(sys.argv[1], "rb").read())
big_part, block_at = sys.argv[4], int(sys.argv[5])
real_write, written, lock = os.write, 0, threading.Lock()

def write(fd, data):
    global written
    n = real_write(fd, data)
    if os.readlink(f"/proc/self/fd/{fd}") == big_part:
        with lock:
            written += n
            reached = written >= block_at
        if reached:
            print("blocked", written, flush=True)
            threading.Event().wait()
    return n

os.write = write
files.stage_session(s, files.staging_dir(sys.argv[2], s), jobs=int(sys.argv[3]))
print("finished", flush=True)
"""
BLOCK_AT = 8 << 20


@pytest.mark.parametrize("jobs", [1, 2])
def test_kill_9_during_a_big_copy_then_rerun(tmp_path: Path, jobs: int) -> None:
    # Small files around one big one; the kill lands while the big one's .part is being written.
    sizes = [200_000] * 8 + [24 << 20] + [200_000] * 8
    sources = write_sources(tmp_path / "src", sizes)
    big = sources[8]
    root = tmp_path / "prearchive"
    root.mkdir()
    s = make_session(sources)
    staging, final = files.staging_dir(str(root), s), files.final_dir(str(root), s)
    blob = tmp_path / "session.pickle"
    blob.write_bytes(pickle.dumps(s))
    scans = staging / "SCANS/1/DICOM"
    big_part = scans / f"{big.name}.dcm{files.PART_SUFFIX}"

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(blob), str(root), str(jobs), str(big_part), str(BLOCK_AT)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        said = child.stdout.readline()  # type: ignore[union-attr]
        assert said.startswith("blocked "), f"the child did not stop mid-copy: {said!r}"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    assert big_part in parts_under(staging)  # half-written: the kill came mid-copy
    assert BLOCK_AT <= big_part.stat().st_size < big.stat().st_size
    assert not final.exists() and visible_tree(root) == []
    finished = {p.name: p.stat().st_ino for p in scans.glob("*.dcm")}
    if jobs == 1:  # one worker goes in plan order: the eight before the big one are done, no later one
        assert sorted(finished) == [f"{p.name}.dcm" for p in sources[:8]]
    else:  # the other worker may still have held one file taken before the big one
        assert len({f"{p.name}.dcm" for p in sources[:8]} & set(finished)) >= 7

    staged = files.stage_session(s, staging, jobs=jobs)
    assert parts_under(staging) == []
    assert [r.sha256 for r in staged] == [sha(p) for p in sources]
    assert {n: (scans / n).stat().st_ino for n in finished} == finished  # reused, not copied again
    assert files.publish(staging, final) == "done"
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()) == sorted(
        r.dest for r in staged
    )
    assert all(sha(final / r.dest) == r.sha256 for r in staged)
