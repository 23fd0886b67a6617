"""What `plan` shows: the human summary (per project, held back, rejected, totals) and the --json document,
for small plans made by the real planner from the planner tests' helpers."""

import json

import pytest

from tests.unit.test_planner import header, manifest, plan_of, src
from xnatmigrate.explain import human_bytes, plan_json, plan_text
from xnatmigrate.model import Reject

HELD = "2 studies render to project prj002 session PAT004_MR (3.1, 3.2); make the session template tell them apart"


@pytest.fixture
def plan():
    """prj001: PAT001 (2 files) and PAT002 (1 file); prj002: PAT003 (3 files, 2 series) and PAT004's two
    studies, which both render to PAT004_MR and are held back; three files the scan rejected."""
    m = manifest(src(), src(source="/src2", project="prj002"))
    headers = [
        (0, header("/src/a1", study="1.1", series="1.1.1")),
        (0, header("/src/a2", study="1.1", series="1.1.1", inst="2")),
        (0, header("/src/b1", study="1.2", series="1.2.1", PatientID="PAT002")),
        (1, header("/src2/c1", study="2.1", series="2.1.1", PatientID="PAT003")),
        (1, header("/src2/c2", study="2.1", series="2.1.2", number="2", PatientID="PAT003")),
        (1, header("/src2/c3", study="2.1", series="2.1.2", number="2", inst="2", PatientID="PAT003")),
        (1, header("/src2/d1", study="3.1", series="3.1.1", PatientID="PAT004")),
        (1, header("/src2/e1", study="3.2", series="3.2.1", PatientID="PAT004")),
    ]
    rejects = [
        Reject("/src/junk.txt", "not DICOM: no DICM prefix"),
        Reject("/src2/cut/cut.dcm", "truncated: Pixel Data declares 32 bytes, file has 16 after it"),
        Reject("/src2/x.png", "not DICOM: PNG"),
    ]
    return plan_of(m, headers, rejects=rejects)


def test_json_counts_what_the_plan_adds_holds_back_and_rejects(plan):
    doc = plan_json(plan, "/s/plan.json", "/s/plan.sql")
    assert json.loads(json.dumps(doc)) == doc  # plain JSON, no default= needed
    assert (doc["plan_id"], doc["plan_file"], doc["sql_file"]) == (
        plan.plan_id,
        "/s/plan.json",
        "/s/plan.sql",
    )
    assert doc["summary"] == {
        "sessions": 3,
        "scans": 4,
        "files": 6,
        "bytes": 6000,
        "rejected": 5,  # the three the scan rejected and the two files of the held-back studies
        "held_back": 2,
        "unchanged": 0,
    }


def test_json_sessions(plan):
    sessions = plan_json(plan)["sessions"]
    got = [(s["project"], s["subject"], s["session"], s["scans"], s["files"], s["bytes"]) for s in sessions]
    assert got == [
        ("prj001", "PAT001", "PAT001_MR", 1, 2, 2000),
        ("prj001", "PAT002", "PAT002_MR", 1, 1, 1000),
        ("prj002", "PAT003", "PAT003_MR", 2, 3, 3000),
    ]
    first = sessions[0]
    assert (first["method"], first["build"], first["archive"]) == ("prearchive", "rest", False)
    assert first["timestamp"] == "20240131_101112123"
    assert first["session_dir"] == "/data/xnat/prearchive/prj001/20240131_101112123/PAT001_MR"
    assert first["prearchive_uri"] == "/prearchive/projects/prj001/20240131_101112123/PAT001_MR"
    assert (first["routing_line"], first["contexts"], first["associations_per_worker"]) == (None, 0, 0)


def test_json_held_back_and_rejected(plan):
    doc = plan_json(plan)
    assert doc["held_back"] == [
        {"project": "prj002", "session": "PAT004_MR", "study_uid": uid, "reason": HELD, "files": 1}
        for uid in ("3.1", "3.2")
    ]
    assert doc["rejected"] == [
        {"path": "/src/junk.txt", "reason": "not DICOM: no DICM prefix"},
        {
            "path": "/src2/cut/cut.dcm",
            "reason": "truncated: Pixel Data declares 32 bytes, file has 16 after it",
        },
        {"path": "/src2/d1", "reason": f"held back: {HELD}"},
        {"path": "/src2/e1", "reason": f"held back: {HELD}"},
        {"path": "/src2/x.png", "reason": "not DICOM: PNG"},
    ]
    assert doc["unchanged"] == [] and doc["warnings"] == [] and doc["skipped_checks"] == []


def test_summary_has_one_line_per_project_then_its_sessions(plan):
    lines = plan_text(plan).splitlines()
    assert lines[0] == "xnatmigrate will perform the following actions:"
    projects = [line for line in lines if line.startswith("  project ")]
    assert projects == [
        "  project prj001: + 2 session(s), 2 scan(s), 3 file(s), 3.0 KB",
        "  project prj002: + 1 session(s), 2 scan(s), 3 file(s), 3.0 KB",
    ]
    start = lines.index(projects[1])
    assert lines[start + 1].split() == [
        "+",
        "PAT003_MR",
        "3",
        "files",
        "3.0",
        "KB",
        "/data/xnat/prearchive/prj002/20240131_101112125/PAT003_MR",
    ]
    assert lines[start + 2] == "        build: rest, archive: no"
    assert "PAT004_MR" not in "\n".join(lines[: lines.index("  held back: 2 study(ies)")])  # not added


def test_summary_shows_held_back_rejected_and_totals(plan):
    text = plan_text(plan, "/s/plan.json", "/s/plan.sql")
    lines = text.splitlines()
    i = lines.index("  held back: 2 study(ies)")
    assert lines[i + 1 : i + 3] == [f"    ! 3.1: {HELD}", f"    ! 3.2: {HELD}"]
    assert lines[i + 3 : i + 7] == [
        "  rejected: 5 file(s)",
        "    - 2 × not DICOM (e.g. /src/junk.txt: not DICOM: no DICM prefix)",
        f"    - 2 × held back (e.g. /src2/d1: held back: {HELD})",
        "    - 1 × truncated (e.g. /src2/cut/cut.dcm: truncated: Pixel Data declares 32 bytes, file has 16 after it)",
    ]
    assert lines[-3:] == [
        "Plan: 3 session(s), 6 file(s), 6.0 KB to add; 0 unchanged; 5 file(s) rejected.",
        "Saved the plan to /s/plan.json and its SQL to /s/plan.sql",
        "Review it, then run `xnatmigrate apply` to carry it out.",
    ]


def test_summary_without_paths_says_nothing_of_saving(plan):
    assert plan_text(plan).splitlines()[-1].startswith("Plan: 3 session(s)")
    assert "Saved the plan" not in plan_text(plan)


def test_nothing_to_add_says_no_changes_and_cuts_long_lists():
    # Seven studies of one patient all render to PAT001_MR: all held back, nothing to add.
    p = plan_of(manifest(src()), [header(f"/src/{i}", study=f"9.{i}") for i in range(7)])
    lines = plan_text(p, "/s/plan.json").splitlines()
    assert "xnatmigrate will perform the following actions:" not in lines
    i = lines.index("  held back: 7 study(ies)")
    assert [line.split(":")[0] for line in lines[i + 1 : i + 6]] == [f"    ! 9.{n}" for n in range(5)]
    assert lines[i + 6] == "    … 2 more (see --json)"
    assert lines[-2:] == [
        "No changes. 0 session(s) unchanged; 7 file(s) rejected.",
        "Saved the plan to /s/plan.json",
    ]
    assert len(plan_json(p)["held_back"]) == 7  # the JSON has them all


def test_cstore_session_shows_routing_contexts_and_raw_labels():
    second_class = "1.2.840.10008.5.1.4.1.1.7"
    hs = [
        header("/src/a", PatientID="PAT 001"),
        header("/src/b", inst="2", PatientID="PAT 001", SOPClassUID=second_class),
    ]
    p = plan_of(manifest(src(method="cstore")), hs)
    lines = plan_text(p).splitlines()
    assert lines[3].split() == [
        "+",
        "PAT_001_MR",
        "2",
        "files",
        "2.0",
        "KB",
        "C-STORE",
        "→",
        "/prearchive/projects/prj001",
    ]
    assert lines[4:7] == [
        "        labels: project prj001, subject 'PAT 001' → PAT_001, session 'PAT 001_MR' → PAT_001_MR",
        "        routing: Project: prj001 Subject: PAT_001 Session: PAT_001_MR",
        "        2 presentation context(s) in 1 association(s) per --jobs worker; build: rest, archive: no",
    ]
    s = plan_json(p)["sessions"][0]
    assert (s["method"], s["timestamp"], s["session_dir"]) == ("cstore", None, None)
    assert s["routing_line"] == "Project: prj001 Subject: PAT_001 Session: PAT_001_MR"
    assert (s["contexts"], s["associations_per_worker"]) == (2, 1)
    assert s["raw_labels"] == {"subject": "PAT 001", "session": "PAT 001_MR"}


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (1_500_000, "1.5 MB"),
        (2_500_000_000, "2.5 GB"),
        (4.2e15, "4200.0 TB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text
