"""api.py without services: the steps of each route, status from the ledger, loading and freshness of a plan."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from xnatmigrate import api
from xnatmigrate.errors import PlanError, StalePlanError, StateError
from xnatmigrate.model import (
    APPLY_STEPS,
    PLAN_FORMAT,
    CstoreSession,
    Method,
    Outcome,
    Plan,
    PlannedFile,
    PlannedScan,
    SessionState,
    Step,
    XnatTarget,
    plan_to_dict,
    with_plan_id,
)
from xnatmigrate.state import StateStore
from xnatmigrate.testing.sessions import cstore_session as make_cstore_session
from xnatmigrate.testing.sessions import prearchive_session

TARGET = XnatTarget(prearchive="/data/prearchive", url="http://xnat.example.org")
MR = "1.2.840.10008.5.1.4.1.1.4"


def scans(prefix: str) -> tuple[PlannedScan, ...]:
    f = PlannedFile(f"/src/{prefix}/1", 10, 1, "1.2.3.1", MR, "1.2.840.10008.1.2.1", "SCANS/1/DICOM/1.dcm")
    return (PlannedScan("1", "1.2.3", "1", "MR", (f,)),)


def cstore_session(action_id: str = "c1", archive: bool = False) -> CstoreSession:
    return make_cstore_session(scans("c"), action_id=action_id, archive=archive)


def plan_of(manifest: Path, serial: int = 0) -> Plan:
    return with_plan_id(
        Plan(
            plan_id="",
            created="2024-01-31T10:11:12",
            manifest_path=str(manifest),
            manifest_digest=hashlib.sha256(manifest.read_bytes()).hexdigest(),
            state_serial=serial,
            table_profile=None,
            xnat=TARGET,
            sessions=(),
        )
    )


def by_id(statuses: list[api.SessionStatus]) -> dict[str, api.SessionStatus]:
    return {s.action_id: s for s in statuses}


# --- steps_for -----------------------------------------------------------------------------------


def test_steps_for_each_route() -> None:
    prearchive = (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD)
    cstore = (Step.SEND, Step.LOCATE, Step.BUILD)
    assert api.steps_for(Method.PREARCHIVE) == prearchive
    assert api.steps_for(Method.PREARCHIVE, archive=True) == (*prearchive, Step.ARCHIVE)
    assert api.steps_for(Method.CSTORE) == cstore
    assert api.steps_for(Method.CSTORE, archive=True) == (*cstore, Step.ARCHIVE)
    every = {step for m in Method for step in api.steps_for(m, archive=True)}
    assert every == APPLY_STEPS  # no apply step that no route takes, none outside the vocabulary


# --- status --------------------------------------------------------------------------------------


def test_status_shows_the_last_step_and_what_remains_without_a_plan(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        # archive=True lives only in the ledger: no plan.json is ever written here.
        pre = replace(prearchive_session(scans("p"), action_id="p1"), archive=True)
        store.register_session("plan-1", pre, TARGET)
        store.record_step("p1", Step.STAGE)
        store.record_step("p1", Step.PUBLISH, Outcome.DONE, {"path": "/x"})

        store.register_session("plan-1", cstore_session("c1"), TARGET)
        store.record_step("c1", Step.SEND)
        store.record_step("c1", Step.LOCATE, Outcome.FAILED)
        store.set_session_status("c1", SessionState.FAILED)

        store.register_session("plan-1", cstore_session("c2"), TARGET)
        for step in (Step.SEND, Step.LOCATE, Step.BUILD):
            store.record_step("c2", step)
        store.set_session_status("c2", SessionState.APPLIED)
        store.record_observation("c2", {"seen": "built"})

        store.register_session("plan-1", prearchive_session(scans("q"), action_id="p3", label="S3"), TARGET)
    assert not (tmp_path / api.PLAN_FILE).exists()

    got = by_id(api.status(tmp_path))
    assert sorted(got) == ["c1", "c2", "p1", "p3"]
    p1, c1, c2, p3 = got["p1"], got["c1"], got["c2"], got["p3"]
    assert (p1.method, p1.status, p1.last_step, p1.last_outcome) == (
        Method.PREARCHIVE,
        SessionState.APPLYING,
        Step.PUBLISH,
        Outcome.DONE,
    )
    assert p1.remaining == (Step.INSERT, Step.BUILD, Step.ARCHIVE)  # ARCHIVE: the ledger's archive flag
    assert (p1.project, p1.session, p1.prearchive_uri) == (
        "P1",
        "S1",
        "/prearchive/projects/P1/20240131_101112123/S1",
    )
    assert (c1.method, c1.status, c1.last_step, c1.last_outcome) == (
        Method.CSTORE,
        SessionState.FAILED,
        Step.LOCATE,
        Outcome.FAILED,
    )
    assert c1.remaining == (Step.LOCATE, Step.BUILD)  # a failed step still remains
    assert (c2.status, c2.last_step, c2.remaining) == (SessionState.APPLIED, Step.BUILD, ())
    assert c2.observed is not None and c2.observed["seen"] == "built"  # what refresh last recorded
    assert (p3.last_step, p3.last_outcome, p3.observed) == (None, None, None)
    assert p3.remaining == (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD)  # archive=False: no ARCHIVE


def test_status_a_reverted_step_remains_and_a_reverted_session_is_finished(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        store.register_session("plan-1", prearchive_session(scans("p"), action_id="p1"), TARGET)
        store.record_step("p1", Step.STAGE)
        store.record_step("p1", Step.PUBLISH)
        store.record_step("p1", Step.PUBLISH, Outcome.REVERTED)
        # A session revert removed: every apply step reverted (as revert records it), nothing remains.
        store.register_session("plan-1", prearchive_session(scans("q"), action_id="p2", label="S2"), TARGET)
        for step in (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD):
            store.record_step("p2", step)
        for step in (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD):
            store.record_step("p2", step, Outcome.REVERTED)
        store.set_session_status("p2", SessionState.REVERTED)
    got = by_id(api.status(tmp_path))
    p1, p2 = got["p1"], got["p2"]
    assert (p1.status, p1.last_step, p1.last_outcome) == (
        SessionState.APPLYING,
        Step.PUBLISH,
        Outcome.REVERTED,
    )
    assert p1.remaining == (Step.PUBLISH, Step.INSERT, Step.BUILD)
    assert (p2.status, p2.last_step, p2.last_outcome, p2.remaining) == (
        SessionState.REVERTED,
        Step.BUILD,
        Outcome.REVERTED,
        (),
    )


def test_status_of_an_old_ledger_takes_archive_from_the_saved_plan(tmp_path: Path) -> None:
    pre = replace(prearchive_session(scans("p"), action_id="p1"), archive=True)
    with StateStore(tmp_path) as store:
        store.register_session("plan-1", pre, TARGET)
        # A ledger written before targets were recorded has no archive flag of its own.
        with store.tx():
            store.db.execute("DELETE FROM session_targets")
    assert api.status(tmp_path)[0].remaining == (Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD)
    plan = with_plan_id(replace(plan_of(write_manifest(tmp_path)), sessions=(pre,)))
    (tmp_path / api.PLAN_FILE).write_text(json.dumps(plan_to_dict(plan)), encoding="utf-8")
    assert api.status(tmp_path)[0].remaining == (
        Step.STAGE,
        Step.PUBLISH,
        Step.INSERT,
        Step.BUILD,
        Step.ARCHIVE,
    )


def test_status_without_a_state_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state in .*run `xnatmigrate plan MANIFEST` first"):
        api.status(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


# --- load_plan -----------------------------------------------------------------------------------


def test_load_plan_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as err:
        api.load_plan(tmp_path / "plan.json")
    assert str(err.value) == f"no plan at {tmp_path / 'plan.json'}: run `xnatmigrate plan MANIFEST` first"


@pytest.mark.parametrize(
    "content",
    [b'{"format": 2, "plan_id": ', b"\xff\xfe not UTF-8", b""],
    ids=["truncated", "not-utf8", "empty"],
)
def test_load_plan_of_a_damaged_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(PlanError) as err:
        api.load_plan(path)
    msg = str(err.value)
    assert msg.startswith(f"cannot read the plan {path} (") and msg.endswith("; re-run `xnatmigrate plan`")
    assert "\n" not in msg


def test_load_plan_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"^cannot read the plan .*re-run `xnatmigrate plan`$"):
        api.load_plan(tmp_path)


def test_load_plan_of_json_missing_its_content(tmp_path: Path) -> None:
    # Format and id are right (the id is the hash of this content), but the plan itself is missing.
    body = {"format": PLAN_FORMAT}
    plan_id = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**body, "plan_id": plan_id}), encoding="utf-8")
    with pytest.raises(PlanError) as err:
        api.load_plan(path)
    assert str(err.value).startswith("the plan file is damaged (") and "\n" not in str(err.value)


def test_load_plan_round_trip(tmp_path: Path) -> None:
    plan = plan_of(write_manifest(tmp_path))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_to_dict(plan)), encoding="utf-8")
    assert api.load_plan(path) == plan


# --- check_fresh ---------------------------------------------------------------------------------


def write_manifest(tmp_path: Path, text: str = "version: 1\n") -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_check_fresh_accepts_an_unchanged_plan(tmp_path: Path) -> None:
    plan = plan_of(write_manifest(tmp_path))
    with StateStore(tmp_path / "state") as store:
        api.check_fresh(plan, store)
        store.begin_plan(plan.plan_id)  # serial 0 → 1, but it is this plan being applied: a rerun resumes
        assert store.serial() == 1
        api.check_fresh(plan, store)
        store.begin_plan("another-plan")  # serial 2, another plan applied since...
        later = plan_of(write_manifest(tmp_path), serial=store.serial())
        api.check_fresh(later, store)  # ...but a plan made after it is fresh while the serial stays


def test_check_fresh_refuses_a_changed_manifest(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    plan = plan_of(manifest)
    manifest.write_text("version: 1\n# edited\n", encoding="utf-8")
    with StateStore(tmp_path / "state") as store, pytest.raises(StalePlanError) as err:
        api.check_fresh(plan, store)
    assert str(err.value) == (
        f"the manifest {manifest} changed since the plan; re-run `xnatmigrate plan` and review the new plan"
    )


def test_check_fresh_refuses_a_missing_manifest(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    plan = plan_of(manifest)
    manifest.unlink()
    with StateStore(tmp_path / "state") as store, pytest.raises(StalePlanError, match="is gone; re-run"):
        api.check_fresh(plan, store)


def test_check_fresh_refuses_a_moved_state_serial(tmp_path: Path) -> None:
    plan = plan_of(write_manifest(tmp_path))
    with StateStore(tmp_path / "state") as store:
        store.begin_plan("another-plan")  # another plan was applied since: serial 0 → 1
        with pytest.raises(StalePlanError) as err:
            api.check_fresh(plan, store)
        assert "the state moved on since this plan (serial 0 → 1)" in str(err.value)
        store.bump_serial()
        with pytest.raises(StalePlanError, match=r"\(serial 0 → 2\)"):
            api.check_fresh(plan, store)
