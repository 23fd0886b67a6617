"""De-identification in flight on the prearchive route (issue 15.2): XNAT's site script (read over REST at
plan, pinned in the plan) or a script file, applied to every file as it is staged. Real PostgreSQL, real
folders, the REST stand-in (whose site script is XNAT's default, tests/xnat_standin.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from tests.sites import NOW, Site
from tests.xnat_receiver import apply_site_script
from tests.xnat_standin import DEFAULT_ANON_SCRIPT
from xnatmigrate import api
from xnatmigrate.errors import ManifestError, PlanError, StalePlanError
from xnatmigrate.explain import plan_text
from xnatmigrate.model import Result

SCRIPT = """version "6.1"
// A site's own script: the kind XNAT sites use
(0010,0010) := subject
(0010,0020) := session
-(0010,0030)
(0008,0080) := "ANONYMISED"
(0008,1030) := format["{0}_{1}", (0008,0080), (0010,0020)]
"""


def use(site: Site, anonymization: str) -> None:
    site.manifest.write_text(
        site.manifest.read_text().replace(
            "anonymization: none   # synthetic data; the stand-in has XNAT's default: site script on",
            f"anonymization: {anonymization}",
        )
    )


def staged_files(site: Site) -> dict[str, Path]:
    return {p.name: p for p in site.prearchive.rglob("*.dcm") if ".xnatmigrate-staging" not in p.parts}


def test_site_script_is_pinned_in_the_plan_and_applied_to_every_file(site):
    use(site, "site")
    p = api.plan(site.manifest, state_dir=site.state, now=NOW).plan
    assert [sc.name for sc in p.scripts] == ["site"] and p.scripts[0].text == DEFAULT_ANON_SCRIPT
    s = p.sessions[0]
    assert s.anonymize == ("site",)
    assert {(e.name, e.value) for e in s.anonymized} >= {("PatientName", s.subject), ("PatientID", s.session)}
    assert "anonymised by: XNAT's site script" in plan_text(p)

    report = api.apply(state_dir=site.state, poll=0.05)
    assert not report.failures
    sources = {f.dest.rsplit("/", 1)[-1]: f.source for s in p.sessions for f in s.files}
    staged = staged_files(site)
    assert set(staged) == set(sources)
    by_name = {f.dest.rsplit("/", 1)[-1]: s for s in p.sessions for f in s.files}
    for name, path in staged.items():
        out, src = pydicom.dcmread(path), pydicom.dcmread(sources[name])
        sess = by_name[name]
        assert str(out.PatientName) == sess.subject and out.PatientID == sess.session
        assert out.StudyDescription == "prj001"  # project != "Unassigned" ? (0008,1030) := project
        assert out.SOPInstanceUID == src.SOPInstanceUID and out.StudyInstanceUID == src.StudyInstanceUID
        assert out.PixelData == src.PixelData
        assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    # The source files are untouched.
    assert all(pydicom.dcmread(f).PatientName != by_name[n].subject for n, f in sources.items())
    # A finished plan re-applies as a no-op.
    again = api.apply(state_dir=site.state, poll=0.05)
    assert {r.outcome for r in again.sessions} == {Result.NOOP}


def test_prearchive_copy_equals_what_xnat_receiver_makes_of_the_same_file(site, tmp_path):
    """The round trip: the file staged by apply equals the source run through the receiver stand-in's own
    application of the same site script (tests/xnat_receiver.py, an independent implementation)."""
    use(site, "site")
    p = api.plan(site.manifest, state_dir=site.state, now=NOW).plan
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    staged = staged_files(site)
    for s in p.sessions:
        for f in s.files:
            theirs = tmp_path / "received.dcm"
            shutil.copyfile(f.source, theirs)
            apply_site_script(theirs, DEFAULT_ANON_SCRIPT, s.project, s.subject, s.session)
            ours = pydicom.dcmread(staged[f.dest.rsplit("/", 1)[-1]])
            expected = pydicom.dcmread(theirs)
            assert {e.tag: e.value for e in ours} == {e.tag: e.value for e in expected}


def test_a_script_file_is_applied_and_an_edit_makes_the_plan_stale(site):
    script = site.manifest.parent / "anon" / "site.das"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    use(site, "anon/site.das")
    p = api.plan(site.manifest, state_dir=site.state, now=NOW).plan
    assert [sc.name for sc in p.scripts] == [str(script.resolve())]
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    for path in staged_files(site).values():
        ds = pydicom.dcmread(path)
        assert "PatientBirthDate" not in ds and ds.InstitutionName == "ANONYMISED"
        assert ds.StudyDescription == f"ANONYMISED_{ds.PatientID}"
    script.write_text(SCRIPT + "-(0010,0040)\n")
    with pytest.raises(StalePlanError, match="anonymisation script .* changed since the plan"):
        api.check_fresh(api.load_plan(site.state / "plan.json"), _Store(p))


class _Store:
    def __init__(self, plan):
        self.plan = plan

    def serial(self):
        return self.plan.state_serial

    def current_plan(self):
        return self.plan.plan_id


def test_a_construct_not_implemented_is_refused_at_validate_with_its_line(site):
    script = site.manifest.parent / "bad.das"
    script.write_text('version "6.1"\n(0010,0010) := "X"\n(0008,0080) := getURL["http://x"]\n')
    use(site, "bad.das")
    with pytest.raises(ManifestError) as err:
        api.plan(site.manifest, state_dir=site.state, now=NOW)
    assert "bad.das:3" in str(err.value) and "getURL" in str(err.value)


def test_a_script_renaming_by_anonymised_uids_is_refused_at_plan(site):
    script = site.manifest.parent / "uids.das"
    script.write_text('version "6.1"\n(0020,000D) := hashUID[(0020,000D)]\n')
    use(site, "uids.das")
    with pytest.raises(PlanError, match="changes StudyInstanceUID"):
        api.plan(site.manifest, state_dir=site.state, now=NOW)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("site\n  transfer: hardlink", "would edit the source files"),
        ("project", "applies the project's script itself"),
        ("[none, site]", "cannot be combined"),
    ],
)
def test_refused_combinations(site, setting, message):
    use(site, setting)
    with pytest.raises(ManifestError, match=message):
        api.plan(site.manifest, state_dir=site.state, now=NOW)


def test_site_anonymisation_on_and_raw_copy_is_refused_naming_the_fix(site):
    use(site, "site")
    site.manifest.write_text(site.manifest.read_text().replace("  anonymization: site\n", ""))
    with pytest.raises(PlanError, match="anonymization: site to apply XNAT's site script"):
        api.plan(site.manifest, state_dir=site.state, now=NOW)


def test_verify_fails_when_a_migrated_file_holds_the_raw_header_again(site):
    """The ledger records the SHA-256 of the anonymised bytes: a raw file put back is found."""
    use(site, "site")
    p = api.plan(site.manifest, state_dir=site.state, now=NOW).plan
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    assert api.verify(state_dir=site.state).ok
    f = p.sessions[0].files[0]
    shutil.copyfile(f.source, staged_files(site)[f.dest.rsplit("/", 1)[-1]])
    report = api.verify(state_dir=site.state)
    assert not report.ok
    assert any(f.dest.rsplit("/", 1)[-1] in (pr.path or "") for pr in report.problems)


def test_kill_9_after_staging_then_rerun_re_derives_staged_files(site):
    """A crash leaves edited files staged but unrecorded; the rerun edits each source again and compares,
    so a staged file that differs (here: the raw source put in its place) is replaced, not trusted."""
    import os
    import subprocess
    import sys

    use(site, "site")
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    env = {**os.environ, **site.env(), "XNATMIGRATE_TEST_CRASH": "before-record:stage"}
    run = subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(site.state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    staging = site.prearchive / ".xnatmigrate-staging"
    staged = sorted(p for p in staging.rglob("*.dcm"))
    assert staged, "the crash point is after the files were staged"
    victim = staged[0]
    source = next(
        f.source
        for s in api.load_plan(site.state / "plan.json").sessions
        for f in s.files
        if f.dest.endswith(victim.name)
    )
    shutil.copyfile(source, victim)  # raw bytes under the final name
    assert not api.apply(state_dir=site.state, poll=0.05).failures
    final = staged_files(site)[victim.name]
    assert pydicom.dcmread(final).PatientName != pydicom.dcmread(source).PatientName
    assert api.verify(state_dir=site.state).ok


def test_apply_refuses_once_xnats_site_script_changed_since_the_plan(site):
    use(site, "site")
    api.plan(site.manifest, state_dir=site.state, now=NOW)
    site.xnat.anonymize_site_script = DEFAULT_ANON_SCRIPT + "-(0010,0040)\n"
    with pytest.raises(StalePlanError, match="site anonymisation script .* changed since the plan"):
        api.apply(state_dir=site.state, poll=0.05)
    assert staged_files(site) == {} and not (site.prearchive / ".xnatmigrate-staging").exists()
