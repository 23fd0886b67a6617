"""plan → apply for ``method: inbox`` (issue 14): staged into XNAT's inbox, imported by XNAT's own inbox importer
(the stand-in's emulation, tests/xnat_inbox.py), built and archived; refusals, a Failed request, resume of a
recorded request, kill -9 at every step, and a finished plan re-applied without reading a file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import jsonschema
import pydicom
import pytest

from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.errors import PlanError
from xnatmigrate.execute.xnat import XnatClient, credentials_from_env
from xnatmigrate.model import InboxSession, Result, Step
from xnatmigrate.state import StateStore
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

NOW = datetime(2024, 5, 6, 7, 8, 9)
SPEC = CorpusSpec(patients=2, studies_per_patient=1, series_per_study=2, images_per_series=3, rows=16, seed=7)


class Inbox:
    """One XNAT-like target for the inbox route: inbox, prearchive and archive folders, a corpus, a manifest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.source = root / "legacy"
        self.inbox = root / "inbox"
        self.prearchive = root / "prearchive"
        self.archive = root / "archive"
        self.state = root / "state"
        self.manifest = root / "m.yaml"
        for d in (self.inbox, self.prearchive, self.archive):
            d.mkdir(parents=True)
        self.files = build_corpus(self.source, SPEC)

    def write_manifest(self, url: str, transfer: str = "copy", archive: bool = True, extra: str = "") -> None:
        self.manifest.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                xnat:
                  inbox: {self.inbox}
                  url: {url}
                defaults:
                  method: inbox
                  transfer: {transfer}
                  build: rest
                  archive: {str(archive).lower()}
                  build_timeout: 30
                sources:
                  - source: {self.source}
                    project: prj001
                    subject: "{{{{ PatientID }}}}"
                    session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
                """
            )
            + extra
        )

    def env(self) -> dict[str, str]:
        return {"XNAT_USER": "admin", "XNAT_PASSWORD": "admin"}

    def plan(self):
        return api.plan(self.manifest, state_dir=self.state, now=NOW).plan

    def archive_tree(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.archive)) + ("/" if p.is_dir() else f" {p.stat().st_size}")
            for p in self.archive.rglob("*")
            if not p.name.endswith(".xml")
        )


def imports(xnat: XnatStandIn) -> list:
    return [c for c in xnat.calls if c.method == "POST" and c.path == "/data/services/import"]


@pytest.fixture
def target(tmp_path, monkeypatch):
    t = Inbox(tmp_path / "site")
    for k, v in t.env().items():
        monkeypatch.setenv(k, v)
    return t


def standin(t: Inbox, dsn: str, **kw) -> XnatStandIn:
    xnat = XnatStandIn(
        dsn, t.prearchive, t.archive, projects=kw.pop("projects", {"prj001": 0}), inbox=t.inbox, **kw
    )
    xnat.build_delay = 0.0
    xnat.inbox.delay = 0.01
    return xnat


# --------------------------------------------------------------------------------------------
# the happy path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transfer", ["copy", "hardlink"])
def test_inbox_import_builds_and_archives_and_verifies(target, pg_db_17, transfer, capsys):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url, transfer=transfer)
        plan = target.plan()
        assert plan.sessions and all(isinstance(s, InboxSession) for s in plan.sessions)
        schema = json.loads((Path(__file__).parents[2] / "schemas" / "plan.schema.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(json.loads((target.state / "plan.json").read_text()))
        assert any("inbox importer" in w for w in plan.warnings)  # XNAT's site anonymisation is on
        assert cli.main(["plan", str(target.manifest), "--state-dir", str(target.state)]) == 0
        text = capsys.readouterr().out
        assert "XNAT's anonymisation, naming and merge rules apply" in text
        report = api.apply(state_dir=target.state, poll=0.02)
        assert not report.failures, [r.message for r in report.sessions]
        # The time spent waiting on XNAT's imports and builds is told apart from the run's own.
        assert 0 < report.xnat_seconds < report.seconds
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
        for s in plan.sessions:
            assert sum(xnat.experiments[("prj001", s.session)].scans.values()) == s.file_count
        posts = imports(xnat)
        assert len(posts) == len(plan.sessions)
        for call, s in zip(posts, plan.sessions, strict=True):
            p = {k: v[-1] for k, v in call.params.items()}
            assert p["import-handler"] == "inbox" and p["cleanupAfterImport"] == "true"
            assert (p["PROJECT_ID"], p["SUBJECT_ID"], p["EXPT_LABEL"]) == ("prj001", s.subject, s.session)
            assert p["path"] == f"{target.inbox}/prj001/xnatmigrate-{plan.plan_id[:12]}-{s.session}"
        # XNAT removed what it imported (cleanupAfterImport); the sources are untouched, one link each again.
        assert list((target.inbox / "prj001").iterdir()) == []
        assert all(os.stat(f.path).st_nlink == 1 for f in target.files)
        with StateStore(target.state) as st:
            steps = [h[0] for h in st.history(plan.sessions[0].action_id)]
        assert steps == [Step.STAGE, Step.IMPORT, Step.LOCATE, Step.BUILD, Step.ARCHIVE]
        assert cli.main(["verify", "--state-dir", str(target.state)]) == 0
        assert f"{len(plan.sessions)} of {len(plan.sessions)} session(s) hold" in capsys.readouterr().out
        assert cli.main(["status", "--state-dir", str(target.state)]) == 0
        assert not xnat.errors, xnat.errors


def test_auto_archiving_project_is_recognised_and_not_archived_again(target, pg_db_17):
    with standin(target, pg_db_17.dsn, projects={"prj001": 4}) as xnat:
        target.write_manifest(xnat.url)
        plan = target.plan()
        report = api.apply(state_dir=target.state, poll=0.02)
        assert not report.failures, [r.message for r in report.sessions]
        # The time spent waiting on XNAT's imports and builds is told apart from the run's own.
        assert 0 < report.xnat_seconds < report.seconds
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
        assert not [
            c for c in xnat.calls if c.path == "/data/services/archive"
        ]  # XNAT's commit archived them
        with StateStore(target.state) as st:
            assert st.step_detail(plan.sessions[0].action_id, Step.LOCATE)["archived"] is True


def test_prearchive_only_then_verify_counts_resources(target, pg_db_17):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url, archive=False)
        plan = target.plan()
        assert not api.apply(state_dir=target.state, poll=0.02).failures
        assert not xnat.experiments
        with XnatClient(xnat.url, credentials_from_env(xnat.url)) as c:
            rows = c.prearchive_sessions("prj001")
        assert sorted(r["name"] for r in rows) == sorted(s.session for s in plan.sessions)
        assert {r["status"] for r in rows} == {"READY"}
        assert cli.main(["verify", "--state-dir", str(target.state)]) == 0


def test_refresh_and_revert_know_the_route(target, pg_db_17, capsys):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url, archive=False)
        plan = target.plan()
        assert not api.apply(state_dir=target.state, poll=0.02).failures
        assert cli.main(["refresh", "--state-dir", str(target.state), "--json"]) == 0
        assert '"built"' in capsys.readouterr().out
        assert cli.main(["revert", "--yes", "--state-dir", str(target.state)]) == 0
        with XnatClient(xnat.url, credentials_from_env(xnat.url)) as c:
            assert c.prearchive_sessions("prj001") == []
        with StateStore(target.state) as st:
            assert {s.status.value for s in st.sessions()} == {"reverted"}
        assert len(plan.sessions) == 2


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


def test_validate_refuses_what_the_inbox_route_cannot_do(target, capsys):
    bad = target.root / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat: {{url: http://127.0.0.1:1}}
            sources:
              - source: {target.source}
                method: inbox
                transfer: move
              - source: {target.source}
                method: inbox
                project: prj001
            """
        )
    )
    assert cli.main(["validate", str(bad)]) == 1
    err = capsys.readouterr()
    text = err.out + err.err
    assert "method inbox needs xnat.inbox" in text
    assert "transfer" in text and "move" in text
    assert "method inbox needs a project" in text
    target.write_manifest("http://127.0.0.1:1")
    shutil.rmtree(target.inbox)
    assert cli.main(["validate", str(target.manifest)]) == 0  # validate alone touches no folder
    assert cli.main(["validate", "--check-sources", str(target.manifest)]) == 1
    assert "is not a folder; fix xnat.inbox" in "".join(capsys.readouterr())


def test_plan_refuses_a_project_the_user_cannot_edit(target, pg_db_17):
    with standin(target, pg_db_17.dsn, editable={"admin": set()}) as xnat:
        target.write_manifest(xnat.url)
        with pytest.raises(PlanError, match="cannot edit project prj001"):
            target.plan()


def test_plan_refuses_an_auto_archiving_project_with_archive_false(target, pg_db_17):
    with standin(target, pg_db_17.dsn, projects={"prj001": 5}) as xnat:
        target.write_manifest(xnat.url, archive=False)
        with pytest.raises(PlanError, match="auto-archives"):
            target.plan()


def test_an_existing_label_is_held_back_as_xnat_would_answer_409(target, pg_db_17):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url)
        first = target.plan()
        assert not api.apply(state_dir=target.state, poll=0.02).failures
        victim = first.sessions[0]
        # Another state: the tool does not know it migrated them, XNAT does.
        again = api.plan(target.manifest, state_dir=target.root / "other-state", now=NOW).plan
        assert not again.sessions
        assert all("would answer 409" in h.reason for h in again.held_back)
        assert victim.session in {h.session for h in again.held_back}


def test_the_standin_refuses_what_xnats_inbox_importer_refuses(target, pg_db_17):
    """DicomInboxImporter.call, answered synchronously (400/409) before anything is queued."""
    with standin(
        target, pg_db_17.dsn, projects={"prj001": 0, "prj002": 0}, editable={"admin": {"prj001"}}
    ) as xnat:
        (target.inbox / "prj001" / "s1").mkdir(parents=True)
        (target.inbox / "prj001" / "s1" / "a.dcm").write_bytes(b"x")
        (target.inbox / "prj002" / "s1").mkdir(parents=True)
        (target.inbox / "prj002" / "s1" / "a.dcm").write_bytes(b"x")
        (target.inbox / "prj001" / "empty").mkdir()
        outside = target.root / "elsewhere"
        outside.mkdir()
        with XnatClient(xnat.url, credentials_from_env(xnat.url)) as c:
            cases = [
                (str(outside), "prj001", 400, "under the main inbox directory"),
                (f"{target.inbox}/prj001/../../elsewhere", "prj001", 400, "under the main inbox directory"),
                (
                    f"{target.inbox}/prj002/s1",
                    "prj001",
                    400,
                    "under the main inbox directory",
                ),  # not editable
                (f"{target.inbox}/prj001/s1", "prj002", 400, "permission to edit the specified destination"),
                (f"{target.inbox}/prj001/empty", "prj001", 400, "does not contain any files"),
                (f"{target.inbox}/prj001/missing", "prj001", 400, "under the main inbox directory"),
            ]
            for path, project, status, text in cases:
                with pytest.raises(Exception) as info:
                    c.inbox_import(project, "S", "E", path)
                assert getattr(info.value, "status", None) == status, (path, info.value)
                assert text in str(info.value)
        assert not xnat.inbox.requests


def test_the_standin_imports_asynchronously_copies_names_and_anonymises(target, pg_db_17):
    """DicomInboxImportRequestListener: Queued → Accepted → Importing → Processed → Completed on a thread;
    files copied into the prearchive under XNAT's names, the site script applied, the source kept when
    cleanupAfterImport=false."""
    with standin(target, pg_db_17.dsn) as xnat:
        xnat.inbox.delay = 0.1
        folder = target.inbox / "prj001" / "by-hand"
        shutil.copytree(target.source, folder)
        before = sorted(p.name for p in folder.rglob("*") if p.is_file())
        with XnatClient(xnat.url, credentials_from_env(xnat.url)) as c:
            request_id = c.inbox_import("prj001", "SUBJ", "SESS", str(folder), cleanup=False)
            seen = []
            while not seen or seen[-1] not in ("Completed", "Failed"):
                status = c.inbox_request(request_id)["status"]
                if not seen or seen[-1] != status:
                    seen.append(status)
            assert seen[-1] == "Completed" and seen.index("Importing") < seen.index("Processed")
            done = c.inbox_request(request_id)
            assert done["sessionPath"] == str(folder) and done["cleanupAfterImport"] is False
            assert done["resolution"].startswith(
                "Completed importing request with results: /prearchive/projects/prj001/"
            )
            assert [r["id"] for r in c.inbox_requests()] == [int(request_id)]
            # Every study went into the one session EXPT_LABEL names (GDI groups by project, tag, label).
            rows = c.prearchive_sessions("prj001")
        assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == before  # kept
        assert {r["status"] for r in rows} == {"READY"} and {r["name"] for r in rows} == {"SESS"}
        stored = sorted(
            p for r in rows for p in xnat.session_dir("prj001", r["timestamp"], "SESS").rglob("*.dcm")
        )
        assert len(stored) == len(target.files)
        ds = pydicom.dcmread(stored[0])
        assert (str(ds.PatientName), ds.PatientID, ds.StudyDescription) == (
            "SUBJ",
            "SESS",
            "prj001",
        )  # id.das
        assert stored[0].name.startswith(f"{ds.StudyInstanceUID}-")  # dicomFileNameTemplate


# --------------------------------------------------------------------------------------------
# XNAT's answer: Failed, slow, lost
# --------------------------------------------------------------------------------------------


def test_a_failed_request_is_one_line_with_xnats_reason_and_a_rerun_asks_again(target, pg_db_17, capsys):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url)
        plan = target.plan()
        victim = plan.sessions[0]
        xnat.inbox.failing[victim.folder_name(plan.plan_id)] = "Input/output error on the inbox volume"
        assert cli.main(["apply", "--state-dir", str(target.state)]) == 1
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if victim.session in x)
        assert "failed: An error occurred reading data" in line and "Input/output error" in line
        assert ("prj001", victim.session) not in xnat.experiments
        del xnat.inbox.failing[victim.folder_name(plan.plan_id)]
        report = api.apply(state_dir=target.state, poll=0.02)
        assert not report.failures, [r.message for r in report.sessions]
        # The time spent waiting on XNAT's imports and builds is told apart from the run's own.
        assert 0 < report.xnat_seconds < report.seconds
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)
        assert len(imports(xnat)) == len(plan.sessions) + 1  # the failed one was asked twice


def test_a_recorded_request_is_polled_never_posted_again(target, pg_db_17):
    with standin(target, pg_db_17.dsn) as xnat:
        xnat.inbox.delay = 0.4  # Accepted, Importing, Processed, … take a while
        target.write_manifest(xnat.url, extra="")
        text = target.manifest.read_text().replace("build_timeout: 30", "build_timeout: 0.3")
        target.manifest.write_text(text)
        plan = target.plan()
        first = api.apply(state_dir=target.state, poll=0.05)
        assert {r.outcome for r in first.sessions} == {Result.FAILED}
        assert all("rerun apply later" in (r.message or "") for r in first.sessions)
        assert len(imports(xnat)) == len(plan.sessions)
        xnat.wait_idle(30)
        # A new plan meanwhile (another plan id): XNAT's rows are this tool's own import, not a conflict,
        # and the recorded request and folder are the ones resumed.
        again = target.plan()
        assert again.plan_id != plan.plan_id and len(again.sessions) == len(plan.sessions)
        second = api.apply(state_dir=target.state, poll=0.05)
        assert not second.failures, [r.message for r in second.sessions]
        assert len(imports(xnat)) == len(plan.sessions)  # no second POST
        assert sorted(xnat.experiments) == sorted(("prj001", s.session) for s in plan.sessions)


def test_a_finished_plan_reapplies_without_reading_a_file(target, pg_db_17, capsys):
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url)
        target.plan()
        assert cli.main(["apply", "--state-dir", str(target.state)]) == 0
        capsys.readouterr()
        shutil.rmtree(target.source)  # nothing left to read
        before = len(xnat.calls)
        assert cli.main(["apply", "--state-dir", str(target.state)]) == 0
        assert "Nothing to do" in capsys.readouterr().out
        assert len(xnat.calls) == before  # not even a login
        assert list((target.inbox / "prj001").iterdir()) == []  # nothing staged


def test_hard_links_into_the_inbox_are_not_read_but_a_changed_header_is_still_caught(
    target, pg_db_17, monkeypatch
):
    """XNAT's importer reads and copies the linked files and removes the links: our side links and
    hashes nothing (issue 14: zero copy), and re-reads the header only of a file whose inode changed
    since plan (its ctime moved). A header rewritten after plan (same size, mtime put back) is still
    refused before XNAT is asked for that session: its ctime gives it away."""
    from xnatmigrate.execute import recheck
    from xnatmigrate.execute.files import transfer

    def no_hashing(*args, **kwargs):
        raise AssertionError("a hard link into XNAT's inbox was read whole and hashed")

    reread: list[str] = []
    same_head, read_header = recheck.same_head, recheck.read_header

    def counted_head(path, planned):
        reread.append(path)
        return same_head(path, planned)

    def counted_parse(path, keywords):
        reread.append(path)
        return read_header(path, keywords)

    monkeypatch.setattr(transfer, "hash_fd", no_hashing)
    monkeypatch.setattr(recheck, "same_head", counted_head)
    monkeypatch.setattr(recheck, "read_header", counted_parse)
    with standin(target, pg_db_17.dsn) as xnat:
        target.write_manifest(xnat.url, transfer="hardlink")
        plan = target.plan()
        first, second = plan.sessions[0], plan.sessions[1]
        victim = first.files[0].source
        st = os.stat(victim)
        ds = pydicom.dcmread(victim)
        ds.PatientName = "Changed^After^Plan"  # same length as the planned value: same size
        raw = bytearray(Path(victim).read_bytes())
        old = pydicom.dcmread(victim).PatientName.original_string
        new = str(ds.PatientName).encode().ljust(len(old), b" ")[: len(old)]
        raw[raw.index(old) : raw.index(old) + len(old)] = new
        Path(victim).write_bytes(bytes(raw))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` would leave it
        report = api.apply(state_dir=target.state, poll=0.02)
        failed = {r.action_id: r.message or "" for r in report.sessions if r.outcome is Result.FAILED}
        assert list(failed) == [first.action_id] and "re-run" in failed[first.action_id], failed
        # Only the rewritten file was read again (its bytes, then its parse): the others were linked
        # while still the very inodes the plan read.
        assert {os.path.basename(p) for p in reread} == {os.path.basename(first.files[0].dest)}, reread
        assert [(p, s) for p, s in xnat.experiments] == [("prj001", second.session)]
        with StateStore(target.state) as store:
            recorded = store.files_for(second.action_id)
        assert len(recorded) == second.file_count
        assert {sha for _, _, sha in recorded.values()} == {transfer.NOT_HASHED}
        assert not xnat.errors, xnat.errors


# --------------------------------------------------------------------------------------------
# kill -9 anywhere: the end state equals an uninterrupted run's
# --------------------------------------------------------------------------------------------

# Both sessions form one group: a stage record is committed before the first request, each request's
# record right after it and committed behind the next POST, so a crash between a POST and the commit of
# its record finds the request in XNAT's list.
CRASH_POINTS = [
    "files:1",
    "files:7",
    "before-record:stage",
    "after:stage:2",
    "before-record:import",
    "after:import",
    "before-record:import:2",
    "after:import:2",
    "before-record:locate",
    "after:locate",
    "before-record:build",
    "after:build:2",
    "before-record:archive",
    "after:archive",
    "after:archive:2",
]


def _apply_subprocess(t: Inbox, crash: str | None, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **t.env(), **extra}
    if crash:
        env["XNATMIGRATE_TEST_CRASH"] = crash
    return subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(t.state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def reference(tmp_path_factory, pg_admin_dsn, monkeypatch):
    from xnatmigrate.testing.pg import temporary_database

    t = Inbox(tmp_path_factory.mktemp("ref") / "site")
    for k, v in t.env().items():
        monkeypatch.setenv(k, v)
    with temporary_database(pg_admin_dsn, "1.8.2") as pdb, standin(t, pdb.dsn) as xnat:
        t.write_manifest(xnat.url)
        t.plan()
        run = _apply_subprocess(t, None)
        assert run.returncode == 0, run.stderr
        yield sorted(xnat.experiments), t.archive_tree(), len(imports(xnat))


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_kill_9_anywhere_then_rerun_equals_uninterrupted(target, pg_admin_dsn, reference, crash):
    from xnatmigrate.testing.pg import temporary_database

    with temporary_database(pg_admin_dsn, "1.8.2") as pdb, standin(target, pdb.dsn) as xnat:
        target.write_manifest(xnat.url)
        target.plan()
        first = _apply_subprocess(target, crash)
        assert first.returncode == -9, (crash, first.returncode, first.stderr)
        second = _apply_subprocess(target, None)
        assert second.returncode == 0, (crash, second.stdout, second.stderr)
        xnat.wait_idle(30)
        assert sorted(xnat.experiments) == reference[0]
        assert target.archive_tree() == reference[1]
        assert len(imports(xnat)) == reference[2]  # never a second request for a session
        assert list((target.inbox / "prj001").iterdir()) == []
        third = _apply_subprocess(target, None)
        assert third.returncode == 0 and "Nothing to do" in third.stdout
        assert not xnat.errors, xnat.errors


# Hard links go straight to their final names (no .part): a crash between a link and its check, or
# after a session's links and before its record, leaves final-named links that the rerun checks again
# (inode, size, mtime) and, their ctime moved by the first run's link, whose headers it re-reads.
# Groups of one session: the second is linked ahead, while XNAT imports the first (files:7 lands there).
LINK_CRASH_POINTS = [
    "files:1",
    "files:7",
    "before-record:stage",
    "after:stage:2",
    "before-record:import",
    "after:import",
    "before-record:import:2",
]
ONE_PER_GROUP = {"XNATMIGRATE_GROUP_SESSIONS": "1"}


@pytest.mark.parametrize("crash", LINK_CRASH_POINTS)
def test_kill_9_while_hard_linking_then_rerun_equals_uninterrupted(target, pg_admin_dsn, reference, crash):
    from xnatmigrate.testing.pg import temporary_database

    with temporary_database(pg_admin_dsn, "1.8.2") as pdb, standin(target, pdb.dsn) as xnat:
        target.write_manifest(xnat.url, transfer="hardlink")
        target.plan()
        first = _apply_subprocess(target, crash, **ONE_PER_GROUP)
        assert first.returncode == -9, (crash, first.returncode, first.stderr)
        second = _apply_subprocess(target, None, **ONE_PER_GROUP)
        assert second.returncode == 0, (crash, second.stdout, second.stderr)
        xnat.wait_idle(30)
        assert sorted(xnat.experiments) == reference[0]  # the reference applied copies: the same end
        assert target.archive_tree() == reference[1]
        assert len(imports(xnat)) == reference[2]
        assert list((target.inbox / "prj001").iterdir()) == []
        assert all(p.stat().st_nlink == 1 for p in target.source.rglob("*") if p.is_file())  # no link left
        assert not xnat.errors, xnat.errors
