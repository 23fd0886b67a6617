"""The pure planner: labels, grouping, hold-backs, refusals, timestamps, rows (no services)."""

from dataclasses import replace
from datetime import datetime

import pytest

from xnatmigrate.errors import PlanError
from xnatmigrate.model import (
    CstoreSession,
    DatabaseTarget,
    ExistingRow,
    FileHeader,
    Manifest,
    Reject,
    ScpTarget,
    SourceSpec,
    XnatFacts,
    compute_plan_id,
    plan_from_dict,
    plan_to_dict,
)
from xnatmigrate.planner import build_plan
from xnatmigrate.state import AppliedSession

NOW = datetime(2024, 1, 31, 10, 11, 12, 123000)
MR = "1.2.840.10008.5.1.4.1.1.4"
ELE = "1.2.840.10008.1.2.1"


class FakeState:
    """A read-only state view, as the planner's contract allows."""

    def __init__(self, serial=0, timestamps=None, sessions=()):
        self.serial = serial
        self._ts = dict(timestamps or {})
        self._sessions = list(sessions)

    def timestamp_for(self, project, session, study_uid):
        return self._ts.get((project, session, study_uid))

    def all_timestamps(self):
        return set(self._ts.values())

    def sources_of(self, action_id):
        return next((s.sources for s in self.sessions() if s.action_id == action_id), ())

    def sessions(self):
        return self._sessions


def header(path, study="1.2.3", series="1.2.3.1", sop=None, number="1", inst="1", **values):
    base = {
        "SOPInstanceUID": sop or f"{series}.{inst}",
        "SOPClassUID": MR,
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series,
        "SeriesNumber": number,
        "InstanceNumber": inst,
        "Modality": "MR",
        "PatientID": "PAT001",
        "PatientName": "DOE^JOHN",
        "StudyDate": "20131211",
        "StudyTime": "151818.000",
    }
    base.update(values)
    return FileHeader(path=path, size=1000, mtime_ns=1, transfer_syntax=ELE, values=base)


def manifest(*sources, url_root=None):
    specs = []
    for i, s in enumerate(sources):
        specs.append(SourceSpec(index=i, line=None, **s))
    from xnatmigrate.model import XnatTarget

    return Manifest(
        path="/m.yaml",
        digest="d" * 64,
        version=1,
        xnat=XnatTarget(
            prearchive="/data/xnat/prearchive",
            prearchive_url_root=url_root,
            database=DatabaseTarget(dsn="postgresql://x@db/x"),
            url="http://xnat",
            scp=ScpTarget(host="xnat"),
        ),
        sources=tuple(specs),
    )


def src(**kw):
    base = {
        "source": "/src",
        "project": "prj001",
        "subject": "{{ PatientID }}",
        "session": "{{ PatientID }}_MR",
    }
    base.update(kw)
    return base


def plan_of(m, headers, state=None, facts=None, rejects=()):
    return build_plan(
        m,
        [(0, h) if not isinstance(h, tuple) else h for h in headers],
        list(rejects),
        state or FakeState(),
        facts or XnatFacts(),
        NOW,
    )


def test_one_study_becomes_one_session_with_xnat_paths_and_row():
    m = manifest(src(), url_root="/xnat/prearchive")
    p = plan_of(
        m,
        [
            header("/src/a", inst="1"),
            header("/src/b", inst="2"),
            header("/src/c", series="1.2.3.2", number="2"),
        ],
    )
    (s,) = p.sessions
    assert (s.project, s.subject, s.session, s.timestamp) == (
        "prj001",
        "PAT001",
        "PAT001_MR",
        "20240131_101112123",
    )
    assert s.session_dir == "/data/xnat/prearchive/prj001/20240131_101112123/PAT001_MR"
    assert s.prearchive_uri == "/prearchive/projects/prj001/20240131_101112123/PAT001_MR"
    assert [sc.scan_id for sc in s.scans] == ["1", "2"]
    assert s.scans[0].files[0].dest.startswith("SCANS/1/DICOM/1.2.3-1-1-") and s.scans[0].files[
        0
    ].dest.endswith(".dcm")
    row = s.row
    assert row["url"] == "/xnat/prearchive/prj001/20240131_101112123/PAT001_MR"
    assert row["uploaded"] == "2024-01-31 10:11:12.123"
    assert (row["scan_date"], row["scan_time"]) == ("2013-12-11 15:18:18", "15:18:18")
    assert (row["tag"], row["name"], row["foldername"], row["status"]) == (
        "1.2.3",
        "PAT001_MR",
        "PAT001_MR",
        "RECEIVING",
    )
    assert row["prevent_anon"] is False and row["prevent_auto_commit"] is True
    assert (row["autoarchive"], row["source"]) == ("Manual", "xnatmigrate")


def test_scheduler_build_lets_xnat_build_and_archive():
    p = plan_of(manifest(src(build="scheduler", archive=True)), [header("/src/a")])
    row = p.sessions[0].row
    assert row["prevent_auto_commit"] is False and row["autoarchive"] == "AutoArchive"


def test_unassigned_session_layout():
    p = plan_of(manifest(src(project=None)), [header("/src/a")])
    s = p.sessions[0]
    assert s.project is None and s.row["project"] is None
    assert s.session_dir == "/data/xnat/prearchive/20240131_101112123/PAT001_MR"
    assert s.prearchive_uri == "/prearchive/projects/Unassigned/20240131_101112123/PAT001_MR"


def test_labels_are_sanitised_and_raw_kept():
    p = plan_of(manifest(src(subject="{{ PatientName }}")), [header("/src/a")])
    s = p.sessions[0]
    assert s.subject == "DOE_JOHN" and s.raw_labels == {"subject": "DOE^JOHN"}


def test_where_filter_and_missing_template_value_reject_files():
    m = manifest(src(where=(("Modality", ("MR",)),), session="{{ PatientID }}_{{ AccessionNumber }}"))
    p = plan_of(m, [header("/src/ct", Modality="CT", AccessionNumber="A1"), header("/src/noacc", inst="2")])
    reasons = {r.path: r.reason for r in p.rejected}
    assert reasons["/src/ct"] == "filtered out by where: Modality=CT not in MR"
    assert reasons["/src/noacc"] == "template variable AccessionNumber is missing from the header"
    assert p.sessions == ()


def test_a_label_too_long_for_a_folder_rejects_its_study_with_the_reason():
    m = manifest(src(session="{{ PatientID * 20 }}"))
    long_id = "L" * 13  # 260 characters rendered: more than the 251 a folder name allows
    p = plan_of(m, [header("/src/a", PatientID="P1"), header("/src/b", study="1.2.4", PatientID=long_id)])
    assert [s.session for s in p.sessions] == ["P1" * 20]
    assert [(r.path, r.reason) for r in p.rejected] == [
        (
            "/src/b",
            "template '{{ PatientID * 20 }}' renders a label of 260 characters for study 1.2.4, longer "
            "than the 251 a folder name allows (255 bytes less the '.xml' XNAT appends): shorten the template",
        )
    ]


def test_every_file_is_accounted_for():
    hs = [header(f"/src/{i}", study=f"1.2.{i % 3}", inst=str(i), PatientID=f"P{i % 3}") for i in range(9)]
    hs.append(header("/src/x", study="1.2.9", Modality="CT", PatientID="P9"))
    m = manifest(src(where=(("Modality", ("MR",)),)))
    p = plan_of(m, hs, rejects=[Reject("/src/junk", "not DICOM: x")])
    planned = sum(s.file_count for s in p.sessions)
    assert planned + len(p.rejected) == len(hs) + 1


def test_fixed_session_with_two_studies_refuses_the_plan():
    m = manifest(src(session="S1", subject="s"))
    with pytest.raises(PlanError, match="holds 2 studies but maps them all to the fixed session S1"):
        plan_of(m, [header("/src/a", study="1.1"), header("/src/b", study="1.2")])


def test_two_studies_rendering_to_one_session_are_held_back():
    p = plan_of(manifest(src()), [header("/src/a", study="1.1"), header("/src/b", study="1.2")])
    assert p.sessions == () and len(p.held_back) == 2
    assert "2 studies render to project prj001 session PAT001_MR" in p.held_back[0].reason
    assert all(r.reason.startswith("held back: ") for r in p.rejected)


def test_files_of_a_study_disagreeing_on_label_values_are_held_back():
    p = plan_of(manifest(src()), [header("/src/a"), header("/src/b", inst="2", PatientID="OTHER")])
    assert p.sessions == () and "disagree on the values its labels use" in p.held_back[0].reason


def test_existing_foreign_row_holds_back_but_our_own_row_resumes():
    rows = (ExistingRow("prj001", "20200101_000000000", "PAT001_MR", "PAT001_MR", "1.2.3", "READY", None),)
    p = plan_of(manifest(src()), [header("/src/a")], facts=XnatFacts(existing_rows=rows))
    assert p.sessions == () and "XNAT would merge into it" in p.held_back[0].reason
    state = FakeState(timestamps={("prj001", "PAT001_MR", "1.2.3"): "20200101_000000000"})
    p2 = plan_of(manifest(src()), [header("/src/a")], state=state, facts=XnatFacts(existing_rows=rows))
    assert [s.timestamp for s in p2.sessions] == ["20200101_000000000"]


def test_archived_label_holds_back():
    facts = XnatFacts(archived=frozenset({("prj001", "PAT001_MR")}))
    p = plan_of(manifest(src()), [header("/src/a")], facts=facts)
    assert "already has an archived session labelled PAT001_MR" in p.held_back[0].reason


def test_timestamps_are_unique_and_kept_across_replans():
    hs = [header(f"/src/{i}", study=f"1.{i}", PatientID=f"P{i}") for i in range(3)]
    facts = XnatFacts(taken_timestamps=frozenset({"20240131_101112123"}))
    p = plan_of(manifest(src()), hs, facts=facts)
    assert [s.timestamp for s in p.sessions] == [
        "20240131_101112124",
        "20240131_101112125",
        "20240131_101112126",
    ]
    state = FakeState(timestamps={(s.project, s.session, s.study_uid): s.timestamp for s in p.sessions})
    later = build_plan(manifest(src()), [(0, h) for h in hs], [], state, XnatFacts(), datetime(2030, 1, 1))
    assert [s.timestamp for s in later.sessions] == [s.timestamp for s in p.sessions]
    assert later.plan_id != "" and later.sessions == p.sessions


def test_applied_sessions_are_unchanged_and_new_files_are_held_back():
    p = plan_of(manifest(src()), [header("/src/a")])
    s = p.sessions[0]
    applied = AppliedSession(
        s.action_id,
        p.plan_id,
        "prearchive",
        "prj001",
        "PAT001",
        "PAT001_MR",
        "1.2.3",
        s.timestamp,
        s.session_dir,
        s.url,
        s.prearchive_uri,
        s.row,
        1,
        1000,
        ("/src/a",),
        "applied",
    )
    again = plan_of(manifest(src()), [header("/src/a")], state=FakeState(sessions=[applied]))
    assert again.sessions == () and len(again.unchanged) == 1 and not again.has_changes
    more = plan_of(
        manifest(src()), [header("/src/a"), header("/src/b", inst="2")], state=FakeState(sessions=[applied])
    )
    assert "already migrated by an earlier apply" in more.held_back[0].reason


def test_target_refusals():
    hs = [header("/src/a")]
    with pytest.raises(PlanError, match="not writable"):
        plan_of(manifest(src()), hs, facts=XnatFacts(prearchive_writable=False))
    with pytest.raises(PlanError, match="not enough free space"):
        plan_of(manifest(src()), hs, facts=XnatFacts(free_bytes=10))
    with pytest.raises(PlanError, match="transfer: hardlink needs /src on the prearchive's filesystem"):
        plan_of(manifest(src(transfer="hardlink")), hs, facts=XnatFacts(same_filesystem={"/src": False}))
    with pytest.raises(PlanError, match="match no known"):
        plan_of(manifest(src()), hs, facts=XnatFacts(refusals=("columns match no known XNAT profile",)))


def test_cstore_session_has_routing_and_contexts_and_no_row():
    hs = [header("/src/a"), header("/src/b", inst="2", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")]
    p = plan_of(manifest(src(method="cstore")), hs)
    s = p.sessions[0]
    # A C-STORE session has no row, timestamp or folder of its own: XNAT's receiver makes them.
    assert isinstance(s, CstoreSession)
    assert not any(hasattr(s, name) for name in ("row", "timestamp", "session_dir", "url"))
    assert s.routing_line == "Project: prj001 Subject: PAT001 Session: PAT001_MR"
    assert [c.sop_class_uid for c in s.contexts] == ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"]


def test_cstore_without_routing_predicts_xnat_route():
    hs = [header("/src/a", StudyDescription="prjX")]
    s = plan_of(manifest(src(method="cstore", routing="none")), hs).sessions[0]
    assert (s.project, s.subject, s.session, s.routing_line) == ("prjX", "DOE_JOHN", "PAT001", None)


def test_plan_id_is_a_content_hash_and_json_round_trips():
    p = plan_of(manifest(src()), [header("/src/a")])
    assert p.plan_id == compute_plan_id(p)
    assert plan_from_dict(plan_to_dict(p)) == p
    assert compute_plan_id(replace(p, created="other")) == p.plan_id
    assert compute_plan_id(replace(p, state_serial=5)) != p.plan_id


def test_plan_json_matches_its_schema():
    import json

    import jsonschema

    from xnatmigrate.resources import schema_path

    schema = json.loads(schema_path("plan.schema.json").read_text())
    hs = [header("/src/a"), header("/src/b", study="9.9", PatientID="P9")]
    for m in (manifest(src()), manifest(src(method="cstore")), manifest(src(project=None))):
        p = plan_of(m, hs)
        jsonschema.Draft202012Validator(schema).validate(json.loads(json.dumps(plan_to_dict(p))))


def test_study_comments_routing_warns_when_patient_comments_would_win():
    hs = [header("/src/a", PatientComments="Project: other Session: X")]
    p = plan_of(manifest(src(method="cstore", routing="study_comments")), hs)
    assert any("PatientComments already says" in w for w in p.warnings)
    quiet = plan_of(manifest(src(method="cstore", routing="patient_comments")), hs)
    assert not any("PatientComments already says" in w for w in quiet.warnings)


# --- issue 11: two patients merged, incomplete studies ----------------------------------------------


@pytest.mark.parametrize("a,b", [("Ünïcödé", "Ünïcödö"), ("A/B", "A\\B"), ("DOE^JOHN", "DOE JOHN")])
def test_distinct_subject_values_sanitising_to_one_label_are_held_back_naming_both(a, b):
    m = manifest(src(subject="{{ PatientName }}", session="{{ PatientID }}_MR"))
    hs = [
        header("/src/1/a", study="1.1", PatientName=a, PatientID="P1"),
        header("/src/2/a", study="1.2", PatientName=b, PatientID="P2"),
        header("/src/3/a", study="1.3", PatientName="OTHER", PatientID="P3"),
    ]
    p = plan_of(m, hs)
    assert [s.study_uid for s in p.sessions] == ["1.3"]
    assert sorted(h.study_uid for h in p.held_back) == ["1.1", "1.2"]
    for h in p.held_back:
        assert repr(a) in h.reason and repr(b) in h.reason and "two patients would merge" in h.reason
    # The manifest may say they are one person.
    merged = plan_of(manifest(src(subject="{{ PatientName }}", merge_subjects=True)), hs)
    assert sorted(s.study_uid for s in merged.sessions) == ["1.1", "1.2", "1.3"] and not merged.held_back


def test_one_patient_in_many_studies_is_not_a_merge():
    m = manifest(src(subject="{{ PatientName }}", session="{{ PatientID }}_{{ StudyDate }}"))
    hs = [header("/src/a", study="1.1"), header("/src/b", study="1.2", StudyDate="20200101")]
    p = plan_of(m, hs)
    assert len(p.sessions) == 2 and not p.held_back


def test_session_collisions_name_the_raw_values():
    hs = [header("/src/a", study="1.1", PatientID="A/B"), header("/src/b", study="1.2", PatientID="A\\B")]
    p = plan_of(manifest(src()), hs)
    assert not p.sessions and len(p.held_back) == 2
    assert all("'A/B_MR' and 'A\\\\B_MR'" in h.reason for h in p.held_back)


@pytest.mark.parametrize(
    "reason", ["unreadable: Permission denied", "truncated: header ends early", "no SOPInstanceUID"]
)
def test_a_study_with_a_broken_file_in_its_folder_is_held_back(reason):
    hs = [header("/src/s1/a", study="1.1"), header("/src/s2/a", study="1.2", PatientID="P2")]
    broken = [Reject("/src/s1/b", reason), Reject("/src/s2/readme.txt", "not DICOM: no DICM prefix")]
    p = plan_of(manifest(src()), hs, rejects=broken)
    assert [s.study_uid for s in p.sessions] == ["1.2"]  # a text file next to a study holds nothing back
    (h,) = p.held_back
    assert h.study_uid == "1.1" and "/src/s1/b" in h.reason and reason in h.reason
    assert "allow_partial_studies" in h.reason
    assert any(r.path == "/src/s1/a" and r.reason.startswith("held back:") for r in p.rejected)
    partial = plan_of(manifest(src(allow_partial_studies=True)), hs, rejects=broken)
    assert sorted(s.study_uid for s in partial.sessions) == ["1.1", "1.2"]


class _CountingStudies:
    """A ``StudySource`` that counts how often each study's files are read, as the scan's is."""

    def __init__(self, headers):
        from xnatmigrate.planner import HeaderStudies

        self._inner = HeaderStudies(headers)
        self.reads: dict[tuple[int, str], int] = {}

    def studies(self):
        return self._inner.studies()

    def files_of(self, idx, uid):
        self.reads[(idx, uid)] = self.reads.get((idx, uid), 0) + 1
        return self._inner.files_of(idx, uid)


def test_a_plan_streamed_study_by_study_into_a_spool_is_the_plan_held_in_memory(tmp_path):
    import io
    import os

    from xnatmigrate.model import PlanSessions, SessionSpool, open_plan, write_plan_json
    from xnatmigrate.planner import draft_plan

    m = manifest(
        src(where=(("Modality", ("MR",)),)),
        src(source="/src2", method="cstore", session="{{ PatientID }}_{{ StudyDate }}"),
    )
    hs = [
        (0, header("/src/b", inst="2")),
        (0, header("/src/a")),
        (0, header("/src/c", study="9.9", series="9.9.1", PatientID="P2")),
        (0, header("/src/d", study="9.9", series="9.9.2", number="2", PatientID="P2", Modality="CT")),
        (1, header("/src2/x", study="7.7", series="7.7.1", PatientID="P3")),
        (1, header("/src2/y", study="7.7", series="7.7.1", inst="2", PatientID="P3")),
    ]
    held = build_plan(m, hs, [], FakeState(), XnatFacts(), NOW)
    source = _CountingStudies(hs)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    streamed = draft_plan(m, source, [], FakeState(), XnatFacts(), NOW, sink=SessionSpool(str(spool_dir)))
    assert isinstance(streamed.sessions, PlanSessions) and len(streamed.sessions) == 3
    assert list(streamed.sessions) == list(held.sessions)
    assert streamed.rejected == held.rejected and "filtered out by where" in held.rejected[0].reason
    # Once to group and once to make the session: never kept, so read again when needed.
    assert source.reads == {(0, "1.2.3"): 2, (0, "9.9"): 2, (1, "7.7"): 2}
    a, b = io.BytesIO(), io.BytesIO()
    assert write_plan_json(streamed, a) == held.plan_id == write_plan_json(held, b)
    assert a.getvalue() == b.getvalue()
    (tmp_path / "plan.json").write_bytes(a.getvalue())
    with (tmp_path / "plan.json").open("rb") as fh:
        assert open_plan(fh).sessions == held.sessions
    assert os.listdir(spool_dir) == []  # the spool is an unnamed file


def test_the_spool_refuses_a_session_changed_on_disk(tmp_path):
    import os

    from xnatmigrate.model import SessionSpool

    spool = SessionSpool(str(tmp_path))
    p = plan_of(manifest(src()), [header("/src/a")])
    spool.append(p.sessions[0])
    sessions = sessions_read = spool.sessions()
    os.pwrite(sessions._fd, b"X", 2)
    with pytest.raises(PlanError, match="changed while this plan was being applied"):
        sessions_read[0]
    with pytest.raises(PlanError):
        list(sessions.bodies())
