"""The interpreter's derived values against the JDK: tests/java/DicomEditRef.java, compiled and run here.

DicomEditRef re-implements XNAT's Java (mizer UIDValue.getHashedUID, DefaultDicomDateTimeShifter with
MidPointDateTimeFactory) with the JDK classes XNAT relies on, and calls java.text.MessageFormat and
String.matches / substring / replace / toLowerCase / toUpperCase themselves; the Python results go through
``parse(...).apply`` where a function reads a dataset.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from xnatmigrate.dicomedit import DicomEditError, parse
from xnatmigrate.dicomedit.functions import derived_uid, message_format, shift_datetime

JAVA_SOURCE = Path(__file__).resolve().parents[1] / "java" / "DicomEditRef.java"
SECRET = "java-check-secret"


@pytest.fixture(scope="module")
def java(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("javac/java not on PATH: the JDK reference values cannot be computed")
    out = tmp_path_factory.mktemp("dicomedit_java")
    subprocess.run(["javac", "-d", str(out), str(JAVA_SOURCE)], check=True, timeout=240)
    return ["java", "-cp", str(out), "DicomEditRef"]


def _ask(java: list[str], requests: list[list[str | None]]) -> list[str]:
    for r in requests:
        assert all(f is None or ("\t" not in f and "\n" not in f) for f in r)
    text = "".join("\t".join("\\N" if f is None else f for f in r) + "\n" for r in requests)
    done = subprocess.run(
        java, input=text, capture_output=True, text=True, encoding="utf-8", timeout=240, check=True
    )
    answers = done.stdout.split("\n")[:-1]
    assert len(answers) == len(requests)
    return answers


UID_INPUTS = [
    "",
    "1",
    "1.2",
    "1.2.3",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.4.90",
    "1.3.12.2.1107.5.2.32.35162.2012021515511672603685195",
    "1.3.12.2.1107.5.2.32.35162.30000012021515123456700000003",
    "2.25.148370922854076938159295778886134140470",
    "2.16.840.1.113669.632.20.121711.10000158860",
    "1.2.276.0.7230010.3.1.4.8323329.1.1",
    "999.999.999.999.999.999.999.999.999.999.999.999.999.999.999.99",
    "foo",
    "bar",
    "MRN123",
    "Doe^John",
    "SUBJ1_MR1",
    "éàü",
    "日本語",
    " leading space",
    "trailing space ",
    "0",
    "00",
    "a" * 64,
    "x" * 1000,
] + [f"1.2.826.0.1.3680043.8.498.{i * 7919}" for i in range(1, 26)]


@pytest.mark.filterwarnings("ignore:The value length")
def test_hash_uid_equals_xnat_over_many_inputs(java: list[str]) -> None:
    assert len(UID_INPUTS) >= 50
    expected = _ask(java, [["hashUID", s] for s in UID_INPUTS])
    script = parse('version "6.1"\n(0008,0018) := hashUID[(0020,000D)]\n', "h.das")
    got = []
    for s in UID_INPUTS:
        ds = Dataset()
        ds.add_new(0x0020000D, "LO", s)  # LO keeps any text; the function reads the string
        ds.SOPInstanceUID = "1.2.3"
        script.apply(ds, {})
        got.append(str(ds.SOPInstanceUID))
    assert got == expected


DATES = [
    "20200105",
    "20200229",
    "20191231",
    "20000101",
    "19700101",
    "20210131",
    "2020",
    "202002",
    "202102",
    "202004",
]
DATETIMES = [
    "20200105101530.123456+0100",
    "20200105101530",
    "202001051015",
    "2020010510",
    "20200105",
    "20201231235959.9-0500",
    "20200301000000",
    "2020",
    "202003",
    "20200105101530+0000",
]
SHIFTS = [
    (-10, "days"),
    (1, "days"),
    (365, "days"),
    (-1, "years"),
    (3, "hours"),
    (-90, "minutes"),
    (86399, "seconds"),
    (0, "Days"),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_shift_date_by_increment_equals_xnat(java: list[str]) -> None:
    cases = [(d, n, u) for d in DATES for n, u in SHIFTS]
    expected = _ask(java, [["shift", d, str(n), u] for d, n, u in cases])
    got = []
    for d, n, u in cases:
        ds = Dataset()
        ds.StudyDate = d
        script = parse(
            f'version "6.1"\n(0008,0020) := shiftDateByIncrement[(0008,0020), {n}, "{u}"]\n', "d.das"
        )
        script.apply(ds, {})
        got.append(ds.StudyDate)
    assert got == expected


# Where the midpoint chosen for a missing field decides the result (MidPointDateTimeFactory): one second
# either side of a boundary reached from the midpoint.
MIDPOINT_EDGES = [
    ("202002", 1252800, "seconds"),  # 29 days: the 15th at 12:00, + 14.5 days = 1 March
    ("202004", -1296001, "seconds"),  # 30 days: the 16th at 00:00, - 15 days - 1 s = 31 March
    ("2020", -15724801, "seconds"),  # year only: 1 July 00:00, - 182 days - 1 s = 2019
    ("20200105", -43201, "seconds"),  # day: 12:00
    ("202001051015", 29, "seconds"),  # minute: :30
    ("202001051015", 30, "seconds"),
    ("2020010510", 1799, "seconds"),  # hour: :30:00
    ("2020010510", 1800, "seconds"),
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_shift_datetime_equals_xnat(java: list[str]) -> None:
    cases = [(d, n, u) for d in DATETIMES for n, u in SHIFTS] + MIDPOINT_EDGES
    expected = _ask(java, [["shift", d, str(n), u] for d, n, u in cases])
    assert [shift_datetime(d, n, u) for d, n, u in cases] == expected


def test_shift_errors_agree(java: list[str]) -> None:
    bad = [("2020-01-05", 1, "days"), ("20200105", 1, "weeks"), ("20201332", 1, "days")]
    expected = _ask(java, [["shift", d, str(n), u] for d, n, u in bad])
    assert all(e.startswith("ERROR") for e in expected)
    for d, n, u in bad:
        with pytest.raises(ValueError):
            shift_datetime(d, n, u)


FORMATS: list[list[str | None]] = [
    ["{0}", "a"],
    ["{0}_{1}", "SUBJ", "MR1"],
    ["{1}{0}", "a", "b"],
    ["{0}{0}", "x"],
    ["{3}", "a"],
    ["it''s {0}", "x"],
    ["'{0}' {0}", "x"],
    ["'quoted'", "x"],
    ["'unterminated {0}", "x"],
    ["a}b {0}", "x"],
    ["{0}", None],
    ["no elements", "x"],
    ["{0}-{1}-{2}", "1", "2", "3"],
    ["{10}", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "ten"],
    ["''", "x"],
    ["{+0}", "x"],
]


def test_format_equals_java_message_format(java: list[str]) -> None:
    expected = _ask(java, [["format", *f] for f in FORMATS])
    got = [message_format(str(f[0]), f[1:]) for f in FORMATS]
    assert got == expected


def test_format_errors_agree(java: list[str]) -> None:
    bad: list[list[str | None]] = [["{0", "x"], ["{ 0}", "x"], ["{a}", "x"]]
    assert all(e.startswith("ERROR") for e in _ask(java, [["format", *f] for f in bad]))
    for f in bad:
        with pytest.raises(ValueError):
            message_format(str(f[0]), f[1:])


REGEXES = [
    ("MR", "MR"),
    ("MR", "M"),
    ("MRN123", "MRN\\d+"),
    ("MRN123", "MRN"),
    ("abc", "a.c"),
    ("Brain^Study", ".*\\^.*"),
    ("", ".*"),
    ("", ".+"),
    ("CT", "C[TR]"),
    ("ct", "(?i)CT"),
    ("1.2.3", "[0-9.]+"),
    ("x1", "\\w\\d"),
    ("a b", "a\\sb"),
    ("aaa", "a{2,3}"),
]


def test_regex_condition_equals_java_string_matches(java: list[str]) -> None:
    cases = [(s, r) for s, r in REGEXES if "\n" not in s]  # the protocol is line-based
    expected = _ask(java, [["matches", s, r] for s, r in cases])
    got = []
    for s, r in cases:
        escaped = r.replace("\\", "\\\\")
        script = parse(
            f'version "6.1"\n(0008,103E) ~ "{escaped}" ? (0008,0070) := "yes" : (0008,0070) := "no"\n'
        )
        ds = Dataset()
        ds.SeriesDescription = s
        script.apply(ds, {})
        got.append("true" if ds.Manufacturer == "yes" else "false")
    assert got == expected


STRINGS = [
    ["substring", "MRN123", "0", "3"],
    ["substring", "MRN123", "3", "6"],
    ["substring", "MRN123", "2", "2"],
    ["substring", "MRN123", "4", "2"],
    ["substring", "MRN123", "0", "7"],
    ["replace", "a.a.a", ".", "-"],
    ["replace", "Brain^Study", "^", " "],
    ["replace", "abc", "", "-"],
    ["replace", "aaaa", "aa", "b"],
    ["lowercase", "AcMe Ä"],
    ["uppercase", "t1_mprage straße"],
]


def test_string_functions_equal_java(java: list[str]) -> None:
    expected = _ask(java, [list(s) for s in STRINGS])
    got = []
    for fn, *args in STRINGS:
        quoted = ", ".join(a if a.isdigit() else f'"{a}"' for a in args)
        ds = Dataset()
        try:
            parse(f'version "6.1"\n(0008,103E) := {fn}[{quoted}]\n').apply(ds, {})
            got.append(ds.SeriesDescription)
        except DicomEditError:
            got.append("ERROR")
    assert got == [("ERROR" if e.startswith("ERROR") else e) for e in expected]


def test_derived_uids_equal_the_documented_hmac(java: list[str]) -> None:
    cases = [
        ("2.25", ["newUID", "1.2.3.4", "2:16", "1"]),
        ("2.25", ["newUID", "1.2.3.4", "2:16", "2"]),
        ("2.25", ["newUID", "1.2.3.5", "2:16", "1"]),
        ("1.2.826.0.1.", ["mapReferencedUIDs", "1.2.3.4.5.6"]),
        ("1.2.826.0.1", ["mapReferencedUIDs", "1.2.3.4.5.6"]),
        ("1.2.826.0.1", ["mapReferencedUIDs", ""]),
        ("9.9", ["mapReferencedUIDs", "éàü"]),
    ]
    expected = _ask(java, [["derive", SECRET, prefix, *parts] for prefix, parts in cases])
    got = [derived_uid(SECRET.encode(), *parts, prefix=prefix) for prefix, parts in cases]
    assert got == expected
    # and through the interpreter: newUID on line 2, column 16, first call in the file
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    parse('version "6.1"\n(0020,000D) := newUID[]\n').apply(ds, {}, secret=SECRET)
    assert ds.StudyInstanceUID == expected[0]
