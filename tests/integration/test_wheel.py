"""The built wheel carries schemas/ and sql/ and works outside the checkout."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_installs_and_validates_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("xnatmigrate-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    # Dependencies come from the test venv's site-packages via a .pth path entry (no network);
    # .pth files there (the editable install) are not processed, so only the wheel provides xnatmigrate.
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)]
        if _pip_has_python_flag()
        else [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
        check=True,
        capture_output=True,
    )
    where = tmp_path / "elsewhere"
    where.mkdir()
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import xnatmigrate, xnatmigrate.resources as r; "
            "print(xnatmigrate.__file__); print(r.schema_path('manifest.schema.json')); print(r.sql_dir())",
        ],
        cwd=where,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert probe[0].startswith(site), probe
    assert "_data/schemas" in probe[1] and Path(probe[1]).is_file()
    assert (
        Path(probe[2], "xnat", "1.8.2.sql").is_file() and Path(probe[2], "prearchive_insert.sql.j2").is_file()
    )
    manifest = where / "m.yaml"
    manifest.write_text((REPO / "manifests" / "cstore.yaml").read_text())
    run = subprocess.run(
        [str(py), "-m", "xnatmigrate", "validate", str(manifest)], cwd=where, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "1 manifest(s) valid" in run.stdout
    bad = where / "bad.yaml"
    bad.write_text("version: 1\nxnat: {}\nsources: []\n")
    run = subprocess.run(
        [str(py), "-m", "xnatmigrate", "validate", str(bad)], cwd=where, capture_output=True, text=True
    )
    assert run.returncode == 1 and "$.sources" in run.stderr


def _pip_has_python_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout
    major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    return (major, minor) >= (22, 3)
