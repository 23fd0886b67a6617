"""A host that mounts the sources elsewhere than the planning host applies the same plan with
``--path-map`` (issue 16): refused without it (naming the fix), applied with it as an uninterrupted
run on the planning host would, and a source changed since the plan still refused."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.test_apply_prearchive import _archive_tree, _normalised
from tests.integration.test_apply_prearchive import reference as reference  # a fixture, reused
from tests.sites import NOW, Site
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli


@pytest.fixture
def moved(tmp_path, pg_admin_dsn, monkeypatch):
    """A site planned, then its manifest and sources moved under another root (another mount)."""
    from xnatmigrate.testing.pg import temporary_database

    with temporary_database(pg_admin_dsn, "1.7") as pdb:
        s = Site(tmp_path / "site", pdb.dsn, archive=True)
        with XnatStandIn(pdb.dsn, s.prearchive, s.archive_dir, projects={"prj001": 0}) as xnat:
            xnat.build_delay = 0.0
            s.write_manifest(xnat.url)
            for k, v in s.env().items():
                monkeypatch.setenv(k, v)
            api.plan(s.manifest, state_dir=s.state, now=NOW)
            mount = tmp_path / "mnt" / "storage"
            mount.mkdir(parents=True)
            shutil.move(s.source, mount / "legacy")
            shutil.move(s.manifest, mount / "manifest.yaml")
            yield s, xnat, f"{s.root}={mount}"


def test_another_mount_is_refused_without_a_map_and_applied_with_one(moved, reference, capsys):
    s, xnat, entry = moved
    assert cli.main(["apply", "--state-dir", str(s.state)]) == 1
    err = capsys.readouterr().err
    assert "manifest" in err and "is gone" in err  # the manifest first: nothing applied
    assert s.rows() == []
    # The manifest mapped, not the sources: the sources are the next thing refused, with the fix named.
    report = api.apply(
        state_dir=s.state, poll=0.05, path_map=[f"{s.manifest}={entry.split('=')[1]}/manifest.yaml"]
    )
    assert report.failures and all("apply --path-map FROM=TO" in (r.message or "") for r in report.failures)
    assert "has vanished" in (report.failures[0].message or "")
    assert cli.main(["apply", "--state-dir", str(s.state), "--path-map", entry]) == 0
    assert _normalised(s) == reference[0]
    assert sorted(xnat.experiments) == reference[1]
    assert _archive_tree(s) == reference[2]


def test_the_map_comes_from_the_environment_and_a_changed_source_is_still_refused(moved, monkeypatch):
    s, _xnat, entry = moved
    monkeypatch.setenv("XNATMIGRATE_PATH_MAP", entry)
    mount = entry.split("=")[1]
    victim = sorted((f for f in s.files if f.kind == "image"), key=lambda f: str(f.path))[0]
    moved_file = f"{mount}/legacy/{victim.path.relative_to(s.source)}"
    st = os.stat(moved_file)
    with open(moved_file, "r+b") as fh:  # the PatientID changed, size and mtime kept
        data = fh.read()
        at = data.index(victim.patient_id.encode())
        fh.seek(at)
        fh.write(b"X" * len(victim.patient_id))
    os.utime(moved_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = api.apply(state_dir=s.state, poll=0.05)
    assert len(report.failures) == 1, [(r.label, r.message) for r in report.sessions]
    assert "changed since the plan" in (report.failures[0].message or "")
