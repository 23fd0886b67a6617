"""The domain model: its vocabularies match the schemas, plans round-trip through JSON and refuse edits."""

from __future__ import annotations

import json
from dataclasses import replace
from enum import StrEnum
from typing import Any

import jsonschema
import pytest

from xnatmigrate.errors import PlanError
from xnatmigrate.model import (
    PLAN_FORMAT,
    SESSION_TYPES,
    Build,
    CstoreSession,
    DatabaseTarget,
    HeldBack,
    Method,
    Plan,
    PlannedFile,
    PlannedScan,
    PrearchiveSession,
    PresentationContext,
    Reject,
    Routing,
    ScpTarget,
    SourceSpec,
    Transfer,
    UnchangedSession,
    XnatTarget,
    compute_plan_id,
    json_text,
    open_plan,
    plan_from_dict,
    plan_to_dict,
    unreachable,
    with_plan_id,
    write_plan_json,
)
from xnatmigrate.resources import schema_path
from xnatmigrate.xnat_table import PROFILES

TS = "20240131_101112123"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def schema(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(schema_path(name).read_text(encoding="utf-8"))
    return data


def values(kind: type[StrEnum]) -> list[str]:
    return [m.value for m in kind]


# --- one spelling per vocabulary -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [("method", Method), ("transfer", Transfer), ("build", Build), ("routing", Routing)],
)
def test_manifest_schema_enums_are_the_model_enums(name: str, kind: type[StrEnum]) -> None:
    assert schema("manifest.schema.json")["$defs"][name]["enum"] == values(kind)


def test_plan_schema_enums_are_the_model_enums() -> None:
    defs = schema("plan.schema.json")["$defs"]
    routes = [ref["$ref"].rsplit("/", 1)[1] for ref in defs["session"]["oneOf"]]
    # One session definition per route, each naming its route as the constant ``method``.
    assert sorted(defs[r]["properties"]["method"]["const"] for r in routes) == sorted(values(Method))
    for r in routes:
        method = Method(defs[r]["properties"]["method"]["const"])
        assert SESSION_TYPES[method].method is method
        assert defs[r]["properties"]["build"]["enum"] == values(Build)
    assert defs["prearchive_session"]["properties"]["transfer"]["enum"] == values(Transfer)
    assert defs["cstore_session"]["properties"]["routing"]["enum"] == values(Routing)
    assert schema("plan.schema.json")["properties"]["table_profile"]["enum"] == [*PROFILES, None]


def test_a_member_is_its_string() -> None:
    assert isinstance(Method.CSTORE, str) and f"{Method.CSTORE}" == "cstore"
    assert json.dumps([Routing.STUDY_COMMENTS]) == '["study_comments"]'  # what plan.json and the ledger hold


# --- coercion -----------------------------------------------------------------------------------


def test_source_spec_coerces_strings_to_members() -> None:
    spelled: dict[str, Any] = {
        "method": "cstore",
        "transfer": "hardlink",
        "build": "scheduler",
        "routing": "study_comments",
    }
    spec = SourceSpec(0, None, "/src", "P1", None, "S", **spelled)
    assert (type(spec.method), type(spec.transfer), type(spec.build), type(spec.routing)) == (
        Method,
        Transfer,
        Build,
        Routing,
    )
    assert (spec.method, spec.transfer, spec.build, spec.routing) == (
        Method.CSTORE,
        Transfer.HARDLINK,
        Build.SCHEDULER,
        Routing.STUDY_COMMENTS,
    )
    with pytest.raises(ValueError, match="'ftp' is not a valid Method"):
        SourceSpec(0, None, "/src", "P1", None, "S", **{**spelled, "method": "ftp"})


def test_planned_sessions_coerce_strings_to_members() -> None:
    spelled: dict[str, Any] = {"build": "none", "transfer": "hardlink"}
    pre = replace(prearchive(), **spelled)
    assert type(pre.build) is Build and pre.build is Build.NONE
    assert type(pre.transfer) is Transfer and pre.transfer is Transfer.HARDLINK
    routed: dict[str, Any] = {"build": "scheduler", "routing": "none"}
    cs = replace(cstore(), **routed)
    assert type(cs.build) is Build and cs.build is Build.SCHEDULER
    assert type(cs.routing) is Routing and cs.routing is Routing.NONE
    unknown: dict[str, Any] = {"routing": "series_comments"}
    with pytest.raises(ValueError, match="'series_comments' is not a valid Routing"):
        replace(cstore(), **unknown)


def test_unreachable_raises() -> None:
    value: Any = "bogus"
    with pytest.raises(AssertionError, match="unhandled case 'bogus'"):
        unreachable(value)


# --- plan JSON round trip ------------------------------------------------------------------------


def scan(scan_id: str, *sources: str) -> PlannedScan:
    files = tuple(
        PlannedFile(
            src,
            1000 + i,
            1_700_000_000 + i,
            f"1.2.3.{scan_id}.{i}",
            MR,
            EXPLICIT_LE,
            f"SCANS/{scan_id}/DICOM/{i}.dcm",
        )
        for i, src in enumerate(sources)
    )
    return PlannedScan(scan_id, f"1.2.3.{scan_id}", scan_id, "MR", files)


# The prearchive columns as plan.json holds them (JSON values; lastmod is LOCALTIMESTAMP at insert).
ROW: dict[str, Any] = {
    "project": "P1",
    "timestamp": TS,
    "lastmod": None,
    "uploaded": "2024-01-31 10:11:12.123",
    "scan_date": "2013-12-11 00:00:00.0",
    "scan_time": "15:18:18",
    "subject": "SUBJ1",
    "foldername": "S1",
    "name": "S1",
    "tag": "1.2.3",
    "status": "RECEIVING",
    "url": f"/data/prearchive/P1/{TS}/S1",
    "autoarchive": "Manual",
    "prevent_anon": False,
    "prevent_auto_commit": True,
    "source": "xnatmigrate",
    "visit": None,
    "protocol": None,
    "timezone": None,
}


def prearchive() -> PrearchiveSession:
    return PrearchiveSession(
        action_id="a1a1a1a1a1a1a1a1",
        source_index=0,
        project="P1",
        subject="SUBJ1",
        session="S1",
        study_uid="1.2.3",
        build=Build.REST,
        archive=True,
        build_timeout=60.0,
        prearchive_uri=f"/prearchive/projects/P1/{TS}/S1",
        scans=(scan("1", "/src/a/1", "/src/a/2"), scan("2", "/src/a/3")),
        raw_labels={"session": "S1 ", "subject": "SUBJ1"},
        timestamp=TS,
        transfer=Transfer.COPY,
        session_dir=f"/data/prearchive/P1/{TS}/S1",
        url=f"/data/prearchive/P1/{TS}/S1",
        row=ROW,
    )


def cstore() -> CstoreSession:
    return CstoreSession(
        action_id="c5c5c5c5c5c5c5c5",
        source_index=1,
        project=None,
        subject=None,
        session="S2",
        study_uid="1.2.4",
        build=Build.SCHEDULER,
        archive=False,
        build_timeout=900.0,
        prearchive_uri="/prearchive/projects/Unassigned",
        scans=(scan("7", "/src/b/1"),),
        routing=Routing.PATIENT_COMMENTS,
        routing_line="Project: Unassigned Session: S2",
        contexts=(PresentationContext(MR, (EXPLICIT_LE,)),),
    )


def hand_made_plan() -> Plan:
    return with_plan_id(
        Plan(
            plan_id="",
            created="2024-01-31T10:11:12",
            manifest_path="/m/manifest.yaml",
            manifest_digest="ab" * 32,
            state_serial=3,
            table_profile="1.8.2",
            xnat=XnatTarget(
                prearchive="/data/prearchive",
                database=DatabaseTarget(dsn_env="XNAT_DSN"),
                url="http://xnat.example.org",
                scp=ScpTarget("xnat.example.org"),
                file_mode=0o640,
            ),
            sessions=(prearchive(), cstore()),
            unchanged=(UnchangedSession("P1", "S0", "1.2.0", "applied by an earlier plan"),),
            held_back=(HeldBack("P1", "S9", "1.2.9", "archived with the same label", ("/src/c/1",)),),
            rejected=(Reject("/src/junk", "not DICOM"),),
            warnings=("a warning",),
            skipped_checks=("free space",),
        )
    )


def as_json(plan: Plan) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(plan_to_dict(plan)))
    return data


def test_plan_json_round_trip() -> None:
    plan = hand_made_plan()
    data = as_json(plan)
    jsonschema.Draft202012Validator(schema("plan.schema.json")).validate(data)
    assert [s["method"] for s in data["sessions"]] == ["prearchive", "cstore"]
    back = plan_from_dict(data)
    assert back == plan
    pre, cs = back.sessions
    assert isinstance(pre, PrearchiveSession) and isinstance(cs, CstoreSession)
    assert type(pre.transfer) is Transfer and type(cs.routing) is Routing and type(cs.build) is Build
    assert back.plan_id == compute_plan_id(back) == plan.plan_id
    assert len(plan.plan_id) == 64 and plan.format == PLAN_FORMAT


def test_created_is_not_part_of_the_plan_id() -> None:
    data = as_json(hand_made_plan())
    data["created"] = "2030-01-01T00:00:00"
    assert plan_from_dict(data).created == "2030-01-01T00:00:00"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["sessions"][0].update(session="S1-renamed"), id="label"),
        pytest.param(
            lambda d: d["sessions"][1]["scans"][0]["files"][0].update(source="/elsewhere"), id="source"
        ),
        pytest.param(lambda d: d["sessions"][0]["row"].update(tag="9.9.9"), id="row"),
        pytest.param(lambda d: d.update(plan_id="0" * 64), id="plan_id"),
    ],
)
def test_a_hand_edited_plan_is_refused(edit: Any) -> None:
    data = as_json(hand_made_plan())
    plan_from_dict(data)  # unedited: accepted
    edit(data)
    with pytest.raises(PlanError) as err:
        plan_from_dict(data)
    msg = str(err.value)
    assert "does not match its plan_id" in msg and "re-run `xnatmigrate plan`" in msg and "\n" not in msg


@pytest.mark.parametrize("fmt", [1, None, "2"])
def test_another_plan_format_is_refused_in_one_line(fmt: Any) -> None:
    data = as_json(hand_made_plan())
    if fmt is None:
        del data["format"]
    else:
        data["format"] = fmt
    with pytest.raises(PlanError) as err:
        plan_from_dict(data)
    msg = str(err.value)
    assert f"plan format {fmt!r}" in msg and f"reads format {PLAN_FORMAT}" in msg
    assert "re-run `xnatmigrate plan`" in msg and "\n" not in msg


# --- plan.json written in one pass (issue 13: a plan of 100,000s of files) ----------------------


def big_plan() -> Plan:
    """Every top-level list non-empty, more rejects than one batch, a path that is not UTF-8."""
    odd = "/src/bad\udcff.dcm"  # os.fsdecode(b"/src/bad\xff.dcm")
    plan = hand_made_plan()
    pre = replace(prearchive(), scans=(scan("1", "/src/a/1", odd), scan("2", "/src/a/é")))
    return replace(
        plan,
        sessions=(pre, cstore()),
        rejected=tuple(Reject(f"/src/junk/{i:04d}", "not DICOM") for i in range(1200)) + (Reject(odd, "x"),),
        scan_keywords=("PatientID", "StudyDate"),
    )


@pytest.mark.parametrize("make", [hand_made_plan, big_plan, lambda: replace(hand_made_plan(), sessions=())])
def test_plan_json_is_written_in_one_pass_with_its_id(make: Any, tmp_path: Any) -> None:
    from xnatmigrate.model import _content_hash

    plan = make()
    path = tmp_path / "plan.json"
    with path.open("wb") as fh:
        plan_id = write_plan_json(replace(plan, plan_id="ignored"), fh)
    text = path.read_bytes().decode("utf-8")  # valid UTF-8 whatever the paths
    data = json.loads(text)
    # The id is the content hash of what was written (what plan_from_dict checks), as before.
    assert plan_id == data["plan_id"] == compute_plan_id(plan) == _content_hash(plan_to_dict(plan))
    # The canonical JSON, one session per line (no other newline can appear: JSON escapes them).
    assert text.replace("\n", "") == json_text(
        plan_to_dict(replace(plan, plan_id=plan_id)), sort_keys=True, separators=(",", ":")
    )
    assert text.count("\n") == (len(plan.sessions) + 1 if plan.sessions else 0)
    assert plan_from_dict(data) == replace(plan, plan_id=plan_id)
    with path.open("rb") as fh:
        assert open_plan(fh) == replace(plan, plan_id=plan_id)


def _written(plan: Plan, path: Any) -> Any:
    with path.open("wb") as fh:
        write_plan_json(plan, fh)
    return path


def test_a_plan_opened_reads_its_sessions_from_the_file_as_they_are_used(tmp_path: Any) -> None:
    from xnatmigrate.model import PlanSessions

    plan = hand_made_plan()
    path = _written(plan, tmp_path / "plan.json")
    with path.open("rb") as fh:
        opened = open_plan(fh)
    # The file handed in is closed; the sessions keep their own descriptor.
    assert isinstance(opened.sessions, PlanSessions) and len(opened.sessions) == len(plan.sessions) == 2
    assert opened.sessions[-1] == plan.sessions[1] and opened.sessions[0:2] == plan.sessions
    assert list(opened.sessions) == list(plan.sessions)
    assert compute_plan_id(opened) == plan.plan_id  # and it writes back to the same bytes
    with pytest.raises(IndexError):
        opened.sessions[2]
    # A plan written again meanwhile (atomic rename: another file) leaves this one as it was checked.
    other = tmp_path / "new.json"
    _written(replace(plan, sessions=plan.sessions[:1]), other)
    other.replace(path)
    assert opened.sessions[1] == plan.sessions[1]


def test_a_plan_changed_in_place_under_a_running_apply_is_refused(tmp_path: Any) -> None:
    plan = hand_made_plan()
    path = _written(plan, tmp_path / "plan.json")
    with path.open("rb") as fh:
        opened = open_plan(fh)
    raw = path.read_bytes()
    with path.open("r+b") as fh:  # same length, same inode: only the digest taken at load can tell
        fh.write(raw.replace(b'"session":"S1"', b'"session":"S9"', 1))
    with pytest.raises(PlanError, match="plan.json changed while this plan was being applied"):
        opened.sessions[0]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda b: b.replace(b'"session":"S1"', b'"session":"S9"', 1), id="a session"),
        pytest.param(lambda b: b.replace(b'"tag":"1.2.3"', b'"tag":"1.2.4"', 1), id="a row"),
        pytest.param(lambda b: b.replace(b'"state_serial":3', b'"state_serial":4', 1), id="after sessions"),
        pytest.param(lambda b: b.replace(b"/m/manifest.yaml", b"/m/other.yaml", 1), id="before sessions"),
        pytest.param(lambda b: b.replace(b"},\n{", b"}\n,{", 1), id="a comma moved"),
        pytest.param(lambda b: b.replace(b"},\n{", b"},\n\n{", 1), id="a line added"),
    ],
)
def test_an_edited_plan_file_is_refused_when_opened(edit: Any, tmp_path: Any) -> None:
    path = _written(hand_made_plan(), tmp_path / "plan.json")
    raw = path.read_bytes()
    changed = edit(raw)
    assert changed != raw
    path.write_bytes(changed)
    with path.open("rb") as fh, pytest.raises(PlanError) as err:
        open_plan(fh)
    assert "re-run `xnatmigrate plan`" in str(err.value)


def test_a_plan_file_cut_short_is_damaged_not_applied(tmp_path: Any) -> None:
    path = _written(hand_made_plan(), tmp_path / "plan.json")
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(b"\n", raw.index(b"\n") + 1) + 1])  # the first session only
    with path.open("rb") as fh, pytest.raises(PlanError, match="damaged"):
        open_plan(fh)


def test_a_plan_in_one_line_or_reformatted_is_still_read_whole(tmp_path: Any) -> None:
    plan = hand_made_plan()
    path = tmp_path / "plan.json"
    for text in (json_text(plan_to_dict(plan), sort_keys=True), json.dumps(plan_to_dict(plan), indent=1)):
        path.write_text(text, encoding="utf-8")
        with path.open("rb") as fh:
            assert open_plan(fh) == plan


def test_the_flat_path_for_files_equals_the_generic_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from xnatmigrate import model

    s = scan("1", "/src/a/1", "/src/a/2")
    flat = model._plain(s)
    # Its shortcut holds only while every field of a PlannedFile is a str or an int.
    assert all(type(v) in (str, int) for f in flat["files"] for v in f.values())
    monkeypatch.setattr(model, "_FAST_PLAIN", {})
    generic = model._plain(s)
    assert generic == flat and list(generic) == list(flat)
    assert [list(f) for f in generic["files"]] == [list(f) for f in flat["files"]]


def test_a_value_pool_shares_equal_strings_but_not_sop_instance_uids() -> None:
    from xnatmigrate.model import ValuePool

    pool = ValuePool()
    a = pool.header(json.loads('{"StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4"}'))
    b = pool.header(json.loads('{"StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.5"}'))
    assert a == {"StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4"}
    (ka, va), (kb, vb) = next(iter(a.items())), next(iter(b.items()))
    assert ka is kb and va is vb
    assert pool.text("".join(["1.2", ".840"])) is pool.text("1.2.840")


def test_header_values_are_a_read_only_mapping_equal_to_the_dict_of_their_items() -> None:
    import pickle

    from xnatmigrate.model import HeaderValues, ValuePool, header_digest, plain_header

    pool = ValuePool()
    raw = {"StudyInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4", "Modality": "MR"}
    hv = pool.header(raw)
    assert isinstance(hv, HeaderValues)
    assert hv == raw and raw == hv and hv != {**raw, "Modality": "CT"}
    assert list(hv) == list(raw) and list(hv.items()) == list(raw.items()) and len(hv) == 3
    assert hv["Modality"] == "MR" and hv.get("Modality") == "MR"
    assert hv.get("PatientID") is None and hv.get("PatientID", "x") == "x" and "PatientID" not in hv
    with pytest.raises(KeyError):
        hv["PatientID"]
    assert plain_header(hv) == raw and type(plain_header(hv)) is dict
    assert json.dumps(plain_header(hv)) == json.dumps(raw)
    assert header_digest(hv) == header_digest(raw)
    assert pickle.loads(pickle.dumps(hv)) == raw
    assert "Modality" in repr(hv)


def test_headers_of_one_key_order_share_one_index_and_take_less_memory_than_dicts() -> None:
    import sys

    from xnatmigrate.model import ValuePool

    pool = ValuePool()
    keys = [f"Keyword{i}" for i in range(15)]
    a = pool.header({k: f"a{i}" for i, k in enumerate(keys)})
    b = pool.header({k: f"b{i}" for i, k in enumerate(keys)})
    c = pool.header({k: "v" for k in reversed(keys)})
    assert a._index is b._index and c._index is not a._index
    assert list(c) == list(reversed(keys))
    # What one more file costs: the mapping and its tuple, not a dict (the index is shared).
    per_file = sys.getsizeof(b) + sys.getsizeof(b._values)
    assert per_file < sys.getsizeof(dict(b)) * 0.6
