"""The governor's reading of build times and the fleet status's grouping of failures
(``execute.fleet``: ``size_bucket``, ``slowdown``, ``cause_of``, ``causes``): pure functions."""

from __future__ import annotations

import pytest

from xnatmigrate.execute.fleet import BUILD_FLOOR_S, MIN_BUILDS, cause_of, causes, size_bucket, slowdown


def test_sessions_within_a_factor_of_two_share_a_size_bucket():
    assert size_bucket(0) == size_bucket(1) == 1
    assert size_bucket(2) == size_bucket(3) == 2
    assert size_bucket(64) == size_bucket(127) != size_bucket(128)


def test_slowdown_is_the_median_of_each_recent_build_over_its_own_buckets_usual_time():
    usual = {3: 2.0, 7: 20.0}  # small sessions build in 2 s, large ones in 20 s
    # A large session's 20 s is usual for it, not ten times a small one's.
    assert slowdown(usual, [(3, 2.0), (7, 20.0), (3, 2.2)]) == pytest.approx(1.0)
    assert slowdown(usual, [(3, 8.0), (7, 80.0), (3, 2.0), (7, 60.0), (3, 7.0)]) == pytest.approx(3.5)


def test_one_slow_build_among_usual_ones_is_not_a_slowdown():
    usual = {3: 2.0}
    assert slowdown(usual, [(3, 2.0), (3, 60.0), (3, 2.1), (3, 1.9), (3, 2.0)]) == pytest.approx(1.0)


def test_no_reading_until_enough_builds_compare_with_a_usual_time():
    assert slowdown({}, [(3, 9.0)] * 5) is None  # no usual time yet for their size
    assert slowdown({3: 1.0}, [(3, 9.0)] * (MIN_BUILDS - 1)) is None
    assert slowdown({3: 1.0}, [(3, 9.0)] * MIN_BUILDS + [(5, 1.0)] * 2) == pytest.approx(9.0)


def test_builds_quicker_than_the_floor_compare_as_the_floor():
    # Milliseconds against milliseconds (an empty session, a stand-in) is noise, not XNAT slowing down.
    assert slowdown({1: 0.002}, [(1, 0.02)] * 5) == pytest.approx(1.0)
    assert slowdown({1: 0.002}, [(1, BUILD_FLOOR_S * 4)] * 5) == pytest.approx(4.0)


def test_the_same_failure_on_two_sessions_reads_alike():
    a = cause_of(
        "source /data/a/1.dcm changed since plan (size 1024 → 2048); rerun `xnatmigrate plan`", "PAT001_x"
    )
    b = cause_of(
        "source /data/b/7.dcm changed since plan (size 10 → 20); rerun `xnatmigrate plan`", "PAT002_y"
    )
    assert a == b == "source … changed since plan (size # → #)"
    assert cause_of("XNAT refused the build of PAT001_x: HTTP 500", "PAT001_x") == (
        "XNAT refused the build of <session>: HTTP #"
    )
    assert cause_of("tag '1.2.840.1' is not 'x'") == "tag … is not …"


def test_failures_are_grouped_by_cause_most_sessions_first_with_an_example_each():
    got = causes(
        [
            ("S1", "XNAT refused the build of S1: HTTP 500; look at XNAT's log"),
            ("S2", "source /d/2.dcm vanished after plan; mount it"),
            ("S3", "XNAT refused the build of S3: HTTP 503; look at XNAT's log"),
            ("S4", "XNAT refused the build of S4: HTTP 500; look at XNAT's log"),
            ("S5", "XNAT refused the build of S5: HTTP 500; look at XNAT's log"),
        ]
    )
    assert [(c.cause, c.sessions) for c in got] == [
        ("XNAT refused the build of <session>: HTTP #", 4),
        ("source … vanished after plan", 1),
    ]
    assert got[0].labels == ("S1", "S3", "S4")  # the first few
    assert got[0].example == "XNAT refused the build of S1: HTTP 500; look at XNAT's log"
    assert causes([]) == ()
