"""Groups of group commit: consecutive, one route, within every limit, each session exactly once."""

from __future__ import annotations

import pytest

from xnatmigrate.execute import grouping
from xnatmigrate.model import Build, CstoreSession, InboxSession, PlannedFile, PlannedScan, Transfer
from xnatmigrate.testing.sessions import cstore_session, prearchive_session

MR = "1.2.840.10008.5.1.4.1.1.4"


def _scans(n: int = 2) -> tuple[PlannedScan, ...]:
    files = tuple(
        PlannedFile(f"/src/{i}", 10, 1, f"1.2.3.{i}", MR, "1.2.840.10008.1.2.1", f"SCANS/1/DICOM/{i}.dcm")
        for i in range(n)
    )
    return (PlannedScan("1", "1.2.3", "1", "MR", files),)


def _pre(label: str = "S0"):
    return prearchive_session(_scans(), label=label, action_id=label)


def _cstore() -> CstoreSession:
    return cstore_session(_scans(), build=Build.NONE)


def _inbox(label: str) -> InboxSession:
    return InboxSession(
        action_id=label, source_index=0, project="P1", subject="S", session=label, study_uid=f"1.2.{label}",
        build=Build.REST, archive=False, build_timeout=1.0, prearchive_uri="/prearchive/projects/P1",
        scans=_scans(), transfer=Transfer.HARDLINK, inbox_parent="/inbox/P1", inbox_url_parent="/inbox/P1",
    )  # fmt: skip


def _sizes(groups):
    return [[s.session for s in g] for g in groups]


def test_groups_close_at_each_limit_and_keep_plan_order():
    sessions = [_pre(f"S{i}") for i in range(7)]
    per = sessions[0].file_count
    got = list(grouping.groups(sessions, grouping.Limits(files=3 * per, sessions=10, bytes=10**12)))
    assert _sizes(got) == [["S0", "S1", "S2"], ["S3", "S4", "S5"], ["S6"]]
    got = list(grouping.groups(sessions, grouping.Limits(files=10**9, sessions=2, bytes=10**12)))
    assert [len(g) for g in got] == [2, 2, 2, 1]
    one = sessions[0].bytes
    got = list(grouping.groups(sessions, grouping.Limits(files=10**9, sessions=99, bytes=2 * one)))
    assert [len(g) for g in got] == [2, 2, 2, 1]


def test_a_session_past_the_limits_is_a_group_of_its_own():
    sessions = [_pre(f"S{i}") for i in range(3)]
    got = list(grouping.groups(sessions, grouping.Limits(files=1, sessions=99, bytes=1)))
    assert _sizes(got) == [["S0"], ["S1"], ["S2"]]


def test_a_route_change_closes_the_group():
    a, b = _pre(), _cstore()
    got = list(grouping.groups([a, a, b, b, a], grouping.Limits(files=10**9, sessions=99, bytes=10**12)))
    assert [len(g) for g in got] == [2, 2, 1]
    assert [type(g[0]).__name__ for g in got] == ["PrearchiveSession", "CstoreSession", "PrearchiveSession"]


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_GROUP_SESSIONS", "7")
    assert grouping.Limits.from_settings().sessions == 7
    monkeypatch.setenv("XNATMIGRATE_GROUP_FILES", "0")
    from xnatmigrate.errors import SettingError

    with pytest.raises(SettingError, match="XNATMIGRATE_GROUP_FILES"):
        grouping.Limits.from_settings()


def test_an_inbox_plans_first_group_is_an_eighth_so_xnat_starts_importing_sooner():
    """Its staging is the one nothing overlaps (apply links the next group while XNAT imports it)."""
    per = _inbox("I0").file_count
    sessions = [_inbox(f"I{i}") for i in range(40)]
    limits = grouping.Limits(files=16 * per, sessions=99, bytes=10**12)
    got = list(grouping.groups(sessions, limits))
    assert [len(g) for g in got] == [2, 16, 16, 6]
    assert [s for g in got for s in g] == sessions
    # Other routes keep whole groups from the start; a small inbox plan stays one group.
    assert [len(g) for g in grouping.groups([_pre(f"S{i}") for i in range(20)], limits)] == [16, 4]
    assert [len(g) for g in grouping.groups(sessions[:2], limits)] == [2]
