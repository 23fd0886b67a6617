"""execute.recheck: the headers about to reach XNAT are the ones planned, parsed or proven by bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_scan import image, part10
from xnatmigrate.execute import recheck
from xnatmigrate.model import BASE_KEYWORDS, PlannedFile, header_digest
from xnatmigrate.scan import read_header

KW = frozenset({*BASE_KEYWORDS, "PatientID"})


def planned(path: Path) -> PlannedFile:
    e = read_header(str(path), KW)
    assert e.header is not None and e.head_digest
    return PlannedFile(
        str(path), e.size, e.mtime_ns, "1.2", "1.2", "1.2", "a.dcm",
        header_digest=header_digest(e.header), head_digest=e.head_digest,
    )  # fmt: skip


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths recheck parses (its fallback), recorded."""
    seen: list[str] = []
    real = recheck.read_header

    def counting(path: str, keywords: Any) -> Any:
        seen.append(path)
        return real(path, keywords)

    monkeypatch.setattr(recheck, "read_header", counting)
    return seen


def test_unchanged_bytes_prove_the_header_without_a_parse(tmp_path: Path, parses: list[str]) -> None:
    part10(tmp_path / "a.dcm", image())
    f = planned(tmp_path / "a.dcm")
    assert recheck.changed([(f, str(tmp_path / "a.dcm"))], KW) == []
    assert parses == []


def test_other_header_bytes_with_the_planned_values_pass_after_a_parse(
    tmp_path: Path, parses: list[str]
) -> None:
    part10(tmp_path / "a.dcm", image())
    f = planned(tmp_path / "a.dcm")
    part10(tmp_path / "a.dcm", image(Manufacturer="ACME"))  # not a keyword read
    assert recheck.changed([(f, str(tmp_path / "a.dcm"))], KW) == []
    assert parses == [str(tmp_path / "a.dcm")]


def test_a_changed_value_is_named_even_when_the_size_is_kept(tmp_path: Path, parses: list[str]) -> None:
    part10(tmp_path / "a.dcm", image(PatientID="P1"))
    f = planned(tmp_path / "a.dcm")
    part10(tmp_path / "a.dcm", image(PatientID="P2"))
    assert recheck.changed([(f, str(tmp_path / "a.dcm"))], KW) == [
        f"{tmp_path / 'a.dcm'} has another header than the one planned"
    ]


@pytest.mark.parametrize("head", ["", "x:y", "999999:" + "0" * 32, "12:" + "0" * 32])
def test_no_usable_head_digest_falls_back_to_the_parse(tmp_path: Path, parses: list[str], head: str) -> None:
    import dataclasses

    part10(tmp_path / "a.dcm", image())
    f = dataclasses.replace(planned(tmp_path / "a.dcm"), head_digest=head)
    assert recheck.changed([(f, str(tmp_path / "a.dcm"))], KW) == []
    assert parses == [str(tmp_path / "a.dcm")]


def test_a_vanished_file_is_named(tmp_path: Path) -> None:
    part10(tmp_path / "a.dcm", image())
    f = planned(tmp_path / "a.dcm")
    (tmp_path / "a.dcm").unlink()
    [why] = recheck.changed([(f, str(tmp_path / "a.dcm"))], KW)
    assert why.startswith(f"{tmp_path / 'a.dcm'} no longer reads as the DICOM file planned")
