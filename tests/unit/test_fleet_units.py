"""How a plan is cut into work units (``execute.fleet.units_of``): whole studies, plan order, bounded."""

from __future__ import annotations

from dataclasses import dataclass

from xnatmigrate.execute.fleet import units_of


@dataclass(frozen=True)
class _S:
    action_id: str
    study_uid: str
    file_count: int
    bytes: int = 0


def _plan(*spec: tuple[str, int]) -> list[_S]:
    return [_S(f"a{i}", study, n, n * 1000) for i, (study, n) in enumerate(spec)]


def test_units_follow_plan_order_and_hold_up_to_the_bound():
    plan = _plan(("s1", 2), ("s2", 2), ("s3", 2), ("s4", 1), ("s5", 3))
    assert units_of(plan, set(), 4) == [[0, 1], [2, 3], [4]]  # type: ignore[arg-type]


def test_a_study_bigger_than_the_bound_is_a_unit_of_its_own():
    plan = _plan(("s1", 1), ("big", 50), ("s3", 1))
    assert units_of(plan, set(), 4) == [[0], [1], [2]]  # type: ignore[arg-type]


def test_every_session_of_one_study_is_in_one_unit_even_far_apart_in_the_plan():
    # The same StudyInstanceUID in two projects: two sessions, one unit, so no two workers touch it at once.
    plan = _plan(("s1", 2), ("s2", 2), ("s3", 2), ("s1", 2))
    units = units_of(plan, set(), 4)  # type: ignore[arg-type]
    assert units == [[0, 1, 3], [2]]
    assert sorted(i for u in units for i in u) == [0, 1, 2, 3]


def test_applied_sessions_are_left_out_and_nothing_left_is_no_unit():
    plan = _plan(("s1", 2), ("s2", 2), ("s3", 2))
    assert units_of(plan, {"a0", "a2"}, 4) == [[1]]  # type: ignore[arg-type]
    assert units_of(plan, {"a0", "a1", "a2"}, 4) == []  # type: ignore[arg-type]


def test_units_are_bounded_by_bytes_too():
    plan = _plan(("s1", 2), ("s2", 2), ("s3", 2))  # 2,000 bytes each
    assert units_of(plan, set(), 100, 4000) == [[0, 1], [2]]  # type: ignore[arg-type]
    assert units_of(plan, set(), 100, 3999) == [[0], [1], [2]]  # type: ignore[arg-type]
    assert units_of(plan, set(), 100) == [[0, 1, 2]]  # type: ignore[arg-type]
