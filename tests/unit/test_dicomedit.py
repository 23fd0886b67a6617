"""The DicomEdit 6 interpreter: one test per construct and function, expected values derived by hand from
DicomEdit 6's source (cited per test) or, for hashed and shifted values, by the JDK (test_dicomedit_java.py).
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from xnatmigrate.dicomedit import Change, DicomEditError, combine, parse, preview
from xnatmigrate.dicomedit.functions import derived_uid, hash_uid, message_format, shift_datetime
from xnatmigrate.errors import XnatMigrateError

V = 'version "6.1"\n'
VARS = {"project": "PROJ1", "subject": "SUBJ1", "session": "SUBJ1_MR1"}
SECRET = "test-secret"


def _ds() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.1"
    ds.StudyDate = "20200105"
    ds.AcquisitionDateTime = "20200105101530.123456+0100"
    ds.Modality = "MR"
    ds.Manufacturer = "ACME"
    ds.StudyDescription = "Brain^Study"
    ds.SeriesDescription = "t1_mprage"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "Doe^John"
    ds.PatientID = "MRN123"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = "1.2.3.4.5.6"
    ds.SeriesInstanceUID = "1.2.3.4.5.6.7"
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x00191008, "CS", "IMAGE NUM 4")
    ds.add_new(0x0019100A, "US", 1)
    item0, item1 = Dataset(), Dataset()
    item0.ReferencedSOPInstanceUID = "1.9.1"
    item0.add_new(0x00290010, "LO", "SIEMENS CSA HEADER")
    item0.add_new(0x00291008, "CS", "NESTED")
    item1.ReferencedSOPInstanceUID = "1.9.2"
    ds.ReferencedImageSequence = Sequence([item0, item1])
    return ds


def _apply(
    script: str, ds: Dataset | None = None, variables: dict[str, str] | None = None
) -> tuple[Dataset, list[Change]]:
    ds = _ds() if ds is None else ds
    changes = parse(script, "t.das").apply(ds, VARS if variables is None else variables, secret=SECRET)
    return ds, changes


def _refused(script: str) -> str:
    with pytest.raises(DicomEditError) as e:
        parse(script, "site.das")
    return str(e.value)


# --- version, comments, errors ------------------------------------------------------------------------


def test_version_line_is_required_as_xnat_selects_de6_by_it() -> None:
    # VersionManager.PATTERN: a line exactly `version "…"`; without it XNAT runs DicomEdit 4.
    msg = _refused('(0010,0010) := "x"\n')
    assert msg.startswith("site.das: ") and "DicomEdit 4" in msg
    assert "version" in _refused('version "6.1" // trailing comment\n(0010,0010) := "x"\n')


def test_unsupported_version_is_refused_naming_the_line() -> None:
    # VersionManager.supportedVersionStrings: 6.0 … 6.7
    assert _refused('// c\nversion "7.0"\n').startswith('site.das:2: unsupported DicomEdit version "7.0"')


def test_comments_and_blank_lines() -> None:
    ds, changes = _apply(V + '// a comment\n\n   \n(0008,0070) := "X" // trailing\n// end')
    assert ds.Manufacturer == "X"
    assert changes == [Change(0x00080070, "Manufacturer", "set", "X")]


def test_crlf_line_ends() -> None:
    ds, _ = _apply(
        'version "6.1"\r\n// c\r\nif ((0008,0060) = "MR") {\r\n(0008,0070) := "mr"\r\n}\r\nelse {\r\n-(0008,0070)\r\n}\r\n'
    )
    assert ds.Manufacturer == "mr"


def test_escaped_newline_continues_the_statement_and_keeps_line_numbers() -> None:
    # DE6ScriptParser: EscNewlineRemover joins a line ending in a backslash with the next one
    ds, _ = _apply(V + '(0008,103E) := \\\n  format["{0}", \\\n (0008,0060)]\n(0008,0070) := "x"')
    assert ds.SeriesDescription == "MR" and ds.Manufacturer == "x"
    assert _refused(V + '(0008,103E) := \\\n "a"\n(0010,0010) := (0019,1010)').startswith("site.das:4:")


def test_error_is_a_one_line_xnatmigrate_error() -> None:
    with pytest.raises(XnatMigrateError) as e:
        parse(V + "(0010,0010) := \n", "p.das")
    assert str(e.value).startswith("p.das:2: DicomEdit syntax error")
    assert "\n" not in str(e.value)


def test_syntax_error_hints_new_uid_of_dicomedit_4() -> None:
    msg = _refused(V + "(0020,000D) := new UID\n")
    assert msg.startswith("site.das:2:") and "newUID[]" in msg


# --- assignment ---------------------------------------------------------------------------------------


def test_assign_string_literal_replaces_value() -> None:
    ds, changes = _apply(V + '(0010,0010) := "Anon^Person"')
    assert str(ds.PatientName) == "Anon^Person"
    assert changes == [Change(0x00100010, "PatientName", "set", "Anon^Person")]


def test_assign_creates_absent_attribute_with_dictionary_vr() -> None:
    ds, _ = _apply(V + '(0010,1010) := "042Y"')
    assert ds[0x00101010].VR == "AS" and ds.PatientAge == "042Y"


def test_assign_from_tag_and_multi_values_are_joined_by_backslash() -> None:
    # mizer getString: joinMultipleValues(getStrings) with "\\"
    ds, changes = _apply(V + "(0008,103E) := (0008,0008)")
    assert changes == [Change(0x0008103E, "SeriesDescription", "set", "ORIGINAL\\PRIMARY")]
    assert list(ds.SeriesDescription) == ["ORIGINAL", "PRIMARY"]  # the same bytes as dcm4che's putString


def test_assign_backslash_text_becomes_multiple_values() -> None:
    ds, _ = _apply(V + '(0008,0008) := "DERIVED\\\\SECONDARY"')  # script text: "DERIVED\\SECONDARY"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]


def test_assign_from_absent_attribute_does_nothing() -> None:
    # mizer assign: a null value is not written
    ds, changes = _apply(V + "(0010,0010) := (0010,2160)")
    assert str(ds.PatientName) == "Doe^John" and changes == []


def test_assign_same_value_records_no_change() -> None:
    _, changes = _apply(V + '(0008,0060) := "MR"')
    assert changes == []


def test_assign_if_exists() -> None:
    ds, changes = _apply(V + '(0010,0030) ?= "19000101"\n(0010,1010) ?= "001Y"')
    assert ds.PatientBirthDate == "19000101" and "PatientAge" not in ds
    assert changes == [Change(0x00100030, "PatientBirthDate", "set", "19000101")]


def test_assign_to_a_pattern_is_refused() -> None:
    msg = _refused(V + '(0010,XXXX) := "x"')
    assert msg.startswith("site.das:2: assignment to (0010,XXXX)")


def test_assign_numeric_vr_converts_text() -> None:
    ds, _ = _apply(V + '(0019,{SIEMENS MR HEADER}0A) := "4"')
    assert ds[0x0019100A].value == 4


def test_assign_unknown_vr_fails_the_file_with_its_line() -> None:
    with pytest.raises(DicomEditError, match=r"^t\.das:3: .*VR is unknown"):
        _apply(V + '\n(0011,{NOBODY KNOWS}01) := "x"')


def test_string_escapes_follow_extract_string_value() -> None:
    # extractStringValue: only "\\\\" → "\\"; "\\n" stays two characters
    _, changes = _apply(V + '(0008,103E) := "a\\\\b\\nc"')
    assert changes[0].value == "a\\b\\nc"


# --- deletion and tag patterns -----------------------------------------------------------------------


def test_delete_exact_tag() -> None:
    ds, changes = _apply(V + "-(0010,0030)")
    assert "PatientBirthDate" not in ds
    assert changes == [Change(0x00100030, "PatientBirthDate", "delete", None)]


def test_delete_absent_tag_is_no_change() -> None:
    _, changes = _apply(V + "-(0010,2160)")
    assert changes == []


def test_delete_with_x_wildcard() -> None:
    # X: any digit. (0008,103X) = 0x1030..0x103F: StudyDescription (1030), SeriesDescription (103E)
    ds, changes = _apply(V + "-(0008,103X)")
    assert [c.name for c in changes] == ["StudyDescription", "SeriesDescription"]
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds


def test_delete_with_even_and_odd_digit_wildcards() -> None:
    # @ even, # odd (DE6Lexer EVEN_HEXDIGIT / ODD_HEXDIGIT): 0010 0020 0030 0040 present
    _, even = _apply(V + "-(0010,00@@)")
    assert [c.name for c in even] == ["PatientID", "PatientSex"]  # 0020, 0040
    _, odd = _apply(V + "-(0010,00#X)")
    assert [c.name for c in odd] == ["PatientName", "PatientBirthDate"]  # 0010, 0030


def test_private_tag_by_creator_read_delete_and_assign() -> None:
    ds, changes = _apply(V + "(0008,103E) := (0019,{SIEMENS MR HEADER}08)\n-(0019,{SIEMENS MR HEADER}08)")
    assert ds.SeriesDescription == "IMAGE NUM 4" and 0x00191008 not in ds
    assert changes[-1] == Change(0x00191008, "(0019,1008)", "delete", None)


def test_private_block_with_element_wildcard_keeps_the_creator() -> None:
    # (gggg,{creator}XX): every element of the block; the creator element itself is not in the block
    ds, changes = _apply(V + "-(001#,{SIEMENS MR HEADER}XX)")
    assert [c.tag for c in changes] == [0x00191008, 0x0019100A]
    assert ds[0x00190010].value == "SIEMENS MR HEADER"


def test_private_assign_allocates_a_creator_block() -> None:
    # resolvePrivateTag(create=true): the first free creator slot of the group, (0009,0010)
    ds, changes = _apply(V + '(0009,{GEMS_IDEN_01}01) := "kept"')
    assert ds[0x00090010].value == "GEMS_IDEN_01" and ds[0x00091001].value == "kept"
    assert changes == [
        Change(0x00090010, "(0009,0010)", "set", "GEMS_IDEN_01"),
        Change(0x00091001, "(0009,1001)", "set", "kept"),
    ]


def test_private_tag_without_creator_is_refused() -> None:
    # DE6Lexer: an odd group takes PVT_ELEMENT ({creator}xx); (0019,1010) is a syntax error in DicomEdit 6
    msg = _refused(V + "\n-(0019,1010)")
    assert msg.startswith(
        "site.das:3: tag (0019,1010): DicomEdit 6 names an element of an odd (private) group"
    )


def test_file_meta_group_is_refused() -> None:
    assert "group 0002" in _refused(V + '(0002,0013) := "x"')


# --- sequences -----------------------------------------------------------------------------------------


def test_sequence_item_path_read_and_assign() -> None:
    ds, changes = _apply(V + "(0008,1140)[1]/(0008,1155) := (0008,1140)[0]/(0008,1155)")
    assert ds.ReferencedImageSequence[1].ReferencedSOPInstanceUID == "1.9.1"
    assert changes == [
        Change(0x00081155, "ReferencedImageSequence[1]/ReferencedSOPInstanceUID", "set", "1.9.1")
    ]


def test_sequence_any_item_delete() -> None:
    ds, changes = _apply(V + "-(0008,1140)[%]/(0008,1155)")
    assert all("ReferencedSOPInstanceUID" not in item for item in ds.ReferencedImageSequence)
    assert [c.name for c in changes] == [
        "ReferencedImageSequence[0]/ReferencedSOPInstanceUID",
        "ReferencedImageSequence[1]/ReferencedSOPInstanceUID",
    ]


def test_sequence_step_without_item_number_is_refused() -> None:
    assert "has no item number" in _refused(V + "-(0008,1140)/(0008,1155)")


def test_sequence_wildcard_is_refused() -> None:
    assert _refused(V + "-*/(0008,1155)").startswith("site.das:2: sequence wildcard `*`")


def test_assign_into_missing_item_fails_the_file() -> None:
    with pytest.raises(DicomEditError, match=r"^t\.das:2: .*\[5\] does not exist"):
        _apply(V + '(0008,1140)[5]/(0008,1155) := "1.2"')


# --- variables ----------------------------------------------------------------------------------------


def test_xnat_variables_and_initialization() -> None:
    ds, _ = _apply(V + 'label := "L-"\n(0010,0010) := subject\n(0010,0020) := session\n(0008,1030) := label')
    assert str(ds.PatientName) == "SUBJ1" and ds.PatientID == "SUBJ1_MR1" and ds.StudyDescription == "L-"


def test_variable_not_provided_is_null() -> None:
    # DiscoverVariablesTreeVisitor defines it (null); assigning null writes nothing
    ds, changes = _apply(V + "(0010,0010) := subject", variables={})
    assert str(ds.PatientName) == "Doe^John" and changes == []


def test_script_variable_overrides_provided_value_from_its_line_on() -> None:
    ds, _ = _apply(V + '(0010,0010) := session\nsession := "X"\n(0010,0020) := session')
    assert str(ds.PatientName) == "SUBJ1_MR1" and ds.PatientID == "X"


def test_initialization_from_tag_is_evaluated_then() -> None:
    ds, _ = _apply(V + 'old := (0010,0020)\n(0010,0020) := "new"\n(0010,4000) := old')
    assert ds.PatientComments == "MRN123"


def test_variable_only_in_function_arguments_is_refused() -> None:
    # DiscoverVariablesTreeVisitor.visitFunction does not visit arguments: XNAT fails every file
    msg = _refused(V + "(0010,0010) := lowercase[subject]")
    assert msg.startswith("site.das:2: variable subject is used only inside a function's arguments")
    parse(V + "(0010,0020) := subject\n(0010,0010) := lowercase[subject]")  # defined by the plain use
    ds, _ = _apply(V + "subject := subject\n(0010,0010) := lowercase[subject]")  # the fix the message gives
    assert str(ds.PatientName) == "subj1"


def test_list_value_outside_function_is_refused() -> None:
    assert _refused(V + 'x := {"a", "b"}').startswith("site.das:2: a list value outside a function argument")


def test_describe_is_accepted_and_export_refused() -> None:
    ds, changes = _apply(V + 'describe subject "Subject label"\ndescribe x hidden\n(0010,0010) := subject')
    assert str(ds.PatientName) == "SUBJ1" and changes == [Change(0x00100010, "PatientName", "set", "SUBJ1")]
    assert _refused(V + 'export subject "xnat:subjectData/label"').startswith(
        "site.das:2: DicomEdit statement `export"
    )


def test_echo_logs_the_value(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="xnatmigrate.dicomedit"):
        _, changes = _apply(V + "echo (0010,0020)\necho")
    assert "t.das:2: echo MRN123" in caplog.text and changes == []


# --- conditions ---------------------------------------------------------------------------------------


def test_conditional_equals_and_else() -> None:
    script = V + '(0008,0060) = "MR" ? (0008,103E) := "is mr" : (0008,103E) := "not mr"'
    ds, _ = _apply(script)
    assert ds.SeriesDescription == "is mr"
    other = _ds()
    other.Modality = "CT"
    ds, _ = _apply(script, other)
    assert ds.SeriesDescription == "not mr"


def test_conditional_not_equals_is_true_for_absent() -> None:
    # visitBooleanExpression: "!=" is s1 == null || !s1.equals(s2); "=" is s1 != null && …
    ds, _ = _apply(V + '(0010,2160) != "x" ? (0008,103E) := "ne"\n(0010,2160) = "x" ? (0008,1030) := "eq"')
    assert ds.SeriesDescription == "ne" and ds.StudyDescription == "Brain^Study"


def test_conditional_regex_is_a_whole_match() -> None:
    # String.matches: the whole string; "\\\\d" in the script text is the regex \d
    ds, _ = _apply(
        V
        + '(0010,0020) ~ "MRN\\\\d+" ? (0008,103E) := "whole"\n'
        + '(0010,0020) ~ "MRN" ? (0008,1030) := "prefix"\n'
        + '(0010,0020) !~ "CT.*" ? (0008,0070) := "not ct"'
    )
    assert (
        ds.SeriesDescription == "whole"
        and ds.StudyDescription == "Brain^Study"
        and ds.Manufacturer == "not ct"
    )


def test_conditional_with_variable_as_in_xnat_default() -> None:
    script = V + 'project != "Unassigned" ? (0008,1030) := project'
    assert _apply(script)[0].StudyDescription == "PROJ1"
    assert _apply(script, variables={**VARS, "project": "Unassigned"})[0].StudyDescription == "Brain^Study"


def test_if_elseif_else() -> None:
    script = V + (
        'if ((0008,0060) = "MR") {\n  (0008,103E) := "mr"\n}\n'
        'elseif ((0008,0060) ~ "C.") { (0008,103E) := "c?" }\n'
        "else {\n  -(0008,103E)\n}\n"
    )
    results = []
    for modality in ("MR", "CT", "PT"):
        ds = _ds()
        ds.Modality = modality
        results.append(_apply(script, ds)[0].get("SeriesDescription"))
    assert results == ["mr", "c?", None]


def test_invalid_regex_is_refused() -> None:
    assert "regular expression" in _refused(V + '(0010,0020) ~ "\\\\p{Alpha}+" ? -(0010,0020)')


def test_boolean_function_condition_is_refused() -> None:
    assert "used as a condition" in _refused(V + 'lowercase["x"] ? -(0010,0020)')


# --- removeAllPrivateTags -----------------------------------------------------------------------------


def test_remove_all_private_tags_including_sequence_items() -> None:
    ds, changes = _apply(V + "removeAllPrivateTags")
    assert not any(e.tag.is_private for e in ds)
    assert not any(e.tag.is_private for e in ds.ReferencedImageSequence[0])
    assert [c.name for c in changes] == [
        "ReferencedImageSequence[0]/(0029,0010)",
        "ReferencedImageSequence[0]/(0029,1008)",
        "(0019,0010)",
        "(0019,1008)",
        "(0019,100A)",
    ]


# --- functions ----------------------------------------------------------------------------------------


def test_hash_uid_of_tag_and_of_string() -> None:
    ds, _ = _apply(V + '(0020,000D) := hashUID[(0020,000D)]\n(0020,000E) := hashUID["1.2.3.4.5.6"]')
    assert ds.StudyInstanceUID == ds.SeriesInstanceUID == hash_uid("1.2.3.4.5.6")
    assert ds.StudyInstanceUID.startswith("2.25.")


def test_hash_uid_of_absent_tag_writes_nothing() -> None:
    # UIDValue.getHashedUID(null) is null; assign ignores null
    _, changes = _apply(V + "(0020,0052) := hashUID[(0020,0052)]")
    assert changes == []


def test_new_uid_is_derived_and_reproducible() -> None:
    script = V + "(0020,000D) := newUID[]\n(0020,000E) := newUID[]"
    a, _ = _apply(script)
    b, _ = _apply(script)
    assert a.StudyInstanceUID == b.StudyInstanceUID != a.SeriesInstanceUID
    assert a.StudyInstanceUID == derived_uid(SECRET.encode(), "newUID", "1.2.3.4.5.6.7.1", "2:16", "1")


def test_new_uid_without_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XNATMIGRATE_ANON_SECRET", raising=False)
    with pytest.raises(DicomEditError, match=r"^t\.das:2: newUID needs a secret.*XNATMIGRATE_ANON_SECRET"):
        parse(V + "(0020,000D) := newUID[]", "t.das").apply(_ds(), VARS)


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNATMIGRATE_ANON_SECRET", SECRET)
    ds = _ds()
    parse(V + "(0020,000D) := newUID[]", "t.das").apply(ds, VARS)
    assert ds.StudyInstanceUID == derived_uid(SECRET.encode(), "newUID", "1.2.3.4.5.6.7.1", "2:16", "1")


def test_format_uses_message_format() -> None:
    # FormatScriptFunction → MessageFormat.format: {n}, '' is a quote, '…' literal, missing index kept
    ds, _ = _apply(
        V + "(0010,0020) := session\n(0008,103E) := format[\"{0}_{1} it''s '{0}' {3}\", (0008,0060), session]"
    )
    assert ds.SeriesDescription == "MR_SUBJ1_MR1 it's {0} {3}"


def test_format_prints_null_and_flattens_lists() -> None:
    ds, _ = _apply(V + '(0008,103E) := format["{0}|{1}|{2}", (0010,2160), {"a", "b"}]')
    assert ds.SeriesDescription == "null|a|b"


def test_format_type_is_refused_when_applied() -> None:
    with pytest.raises(DicomEditError, match="format type"):
        _apply(V + '(0008,103E) := format["{0,number}", "1"]')


def test_concatenate() -> None:
    ds, _ = _apply(V + '(0008,103E) := concatenate[(0008,0060), "-", 7]')
    assert ds.SeriesDescription == "MR-7"


def test_concatenate_null_fails_the_file() -> None:
    with pytest.raises(DicomEditError, match=r"^t\.das:2: concatenate argument 1 is null"):
        _apply(V + "(0008,103E) := concatenate[(0010,2160)]")


def test_lowercase_and_uppercase() -> None:
    ds, _ = _apply(V + '(0008,103E) := uppercase[(0008,103E)]\n(0008,0070) := lowercase["AcMe"]')
    assert ds.SeriesDescription == "T1_MPRAGE" and ds.Manufacturer == "acme"


def test_substring() -> None:
    ds, _ = _apply(V + "(0010,0020) := substring[(0010,0020), 0, 3]")
    assert ds.PatientID == "MRN"
    with pytest.raises(DicomEditError, match="index out of range"):
        _apply(V + "(0010,0020) := substring[(0010,0020), 2, 10]")


def test_replace_is_literal_and_global() -> None:
    ds, _ = _apply(
        V + '(0008,1030) := replace[(0008,1030), "^", "."]\n(0008,103E) := replace["a.a.a", ".", "-"]'
    )
    assert ds.StudyDescription == "Brain.Study" and ds.SeriesDescription == "a-a-a"


def test_shift_date_by_increment_defaults_to_days() -> None:
    # ShiftDateByIncrementFunction: units default "days"; 2020-01-05 - 10 days = 2019-12-26
    ds, _ = _apply(V + '(0008,0020) := shiftDateByIncrement[(0008,0020), "-10"]')
    assert ds.StudyDate == "20191226"
    assert shift_datetime("20200105", -10, "days") == "20191226"


def test_shift_date_refuses_a_non_da_attribute() -> None:
    with pytest.raises(DicomEditError, match="VR DT, and the argument must have VR DA"):
        _apply(V + "(0008,0020) := shiftDateByIncrement[(0008,002A), 1]")


def test_shift_datetime_by_increment_defaults_to_seconds_and_keeps_fraction_and_zone() -> None:
    ds, _ = _apply(V + "(0008,002A) := shiftDateTimeByIncrement[(0008,002A), 3600]")
    assert ds.AcquisitionDateTime == "20200105111530.123456+0100"
    ds, _ = _apply(V + '(0008,002A) := shiftDateTimeByIncrement[(0008,002A), -1, "years"]')
    assert ds.AcquisitionDateTime == "20190105101530.123456+0100"  # 365 days back; 2019 is not a leap year


def test_shift_of_absent_date_fails_the_file() -> None:
    with pytest.raises(DicomEditError, match="empty or absent"):
        _apply(V + "(0008,0021) := shiftDateByIncrement[(0008,0021), 1]")


def test_map_referenced_uids_is_consistent_across_files() -> None:
    script = V + 'mapReferencedUIDs["1.2.826.0.1", "(0020,000D)", (0020,000E)]'
    a, changes = _apply(script)
    b, _ = _apply(script)
    expected = derived_uid(SECRET.encode(), "mapReferencedUIDs", "1.2.3.4.5.6", prefix="1.2.826.0.1")
    assert a.StudyInstanceUID == b.StudyInstanceUID == expected and expected.startswith("1.2.826.0.1.")
    assert [c.name for c in changes] == ["StudyInstanceUID", "SeriesInstanceUID"]


def test_map_referenced_uids_refuses_nested_paths_and_value_use() -> None:
    assert "nested path" in _refused(V + 'mapReferencedUIDs["1.2", "(0008,1140)[%]/(0008,1155)"]')
    assert "statement of its own" in _refused(V + '(0010,0010) := mapReferencedUIDs["1.2", "(0020,000D)"]')


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            '(0008,0020) := getURL["http://x"]',
            "site.das:2: DicomEdit function getURL is not implemented by xnatmigrate",
        ),
        ('alterPixels["rectangle", "l=1"]', "site.das:2: DicomEdit function alterPixels is not implemented"),
        (
            "retainPrivateTags[(0019,{SIEMENS MR HEADER}08)]",
            "site.das:2: DicomEdit function retainPrivateTags",
        ),
        ('(0010,0010) := frobnicate["x"]', "site.das:2: frobnicate[…] is not a DicomEdit 6 function"),
        (
            '(0010,0010) := lowercase["a", "b"]',
            "site.das:2: DicomEdit function lowercase takes 1 arguments, not 2",
        ),
    ],
)
def test_unimplemented_functions_are_refused_with_line_and_name(script: str, expected: str) -> None:
    msg = _refused(V + script)
    assert msg.startswith(expected)
    assert "; " in msg  # what happened; what to do


# --- XNAT's default script, combination, determinism ---------------------------------------------------

# XNAT's default anonymisation script: DefaultAnonUtils.DEFAULT_ANON_SCRIPT =
# "classpath*:META-INF/xnat/defaults/**/id.das" (xnat-web, org.nrg.xnat.helpers.merge.anonymize); its
# statements as XNAT serves them from /xapi/anonymize/default and as XNAT's own MizerService tests use.
XNAT_DEFAULT = """//
// XNAT http://www.xnat.org
// Copyright (c) 2005-2017, Washington University School of Medicine and Howard Hughes Medical Institute
// All Rights Reserved
//
// Released under the Simplified BSD.
//

version "6.1"
project != "Unassigned" ? (0008,1030) := project
(0010,0010) := subject
(0010,0020) := session
"""


def test_xnat_default_script_exact_result() -> None:
    ds, changes = _apply(XNAT_DEFAULT)
    assert (ds.StudyDescription, str(ds.PatientName), ds.PatientID) == ("PROJ1", "SUBJ1", "SUBJ1_MR1")
    assert changes == [
        Change(0x00081030, "StudyDescription", "set", "PROJ1"),
        Change(0x00100010, "PatientName", "set", "SUBJ1"),
        Change(0x00100020, "PatientID", "set", "SUBJ1_MR1"),
    ]
    untouched = _ds()
    for elem in untouched:
        if int(elem.tag) not in (0x00081030, 0x00100010, 0x00100020):
            assert ds[elem.tag] == elem


def test_combine_applies_site_then_project_each_with_its_own_variables() -> None:
    site = parse(V + '(0008,0070) := "site"\nx := "from site"', "site.das")
    project = parse(
        V + '(0008,0070) := concatenate[(0008,0070), "+project"]\n(0010,4000) := x', "project.das"
    )
    ds = _ds()
    changes = combine(site, project).apply(ds, VARS)
    assert ds.Manufacturer == "site+project"
    assert "PatientComments" not in ds  # x is not the site script's variable in the project script
    assert [c.value for c in changes] == ["site", "site+project"]
    assert combine(site, project).digest != combine(project, site).digest


def test_digest_is_sha256_of_text() -> None:
    import hashlib

    assert parse(XNAT_DEFAULT).digest == hashlib.sha256(XNAT_DEFAULT.encode()).hexdigest()


def test_preview_does_not_modify() -> None:
    ds = _ds()
    before = copy.deepcopy(ds)
    changes = preview(parse(XNAT_DEFAULT), ds, VARS)
    assert ds == before and len(changes) == 3


def _bytes(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_apply_is_deterministic_to_the_byte() -> None:
    script = parse(
        XNAT_DEFAULT
        + "(0020,000D) := hashUID[(0020,000D)]\n(0008,0018) := newUID[]\n"
        + '(0008,0020) := shiftDateByIncrement[(0008,0020), -3]\nmapReferencedUIDs["1.2.3", "(0020,000E)"]\n'
        + "removeAllPrivateTags\n(0009,{GEMS_IDEN_01}01) := session"
    )
    original = _ds()
    a, b = copy.deepcopy(original), copy.deepcopy(original)
    script.apply(a, VARS, secret=SECRET)
    script.apply(b, VARS, secret=SECRET)
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(copy.deepcopy(original))
    c = copy.deepcopy(original)
    script.apply(c, VARS, secret="another secret")
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.StudyInstanceUID == a.StudyInstanceUID


def test_message_format_edge_cases_by_hand() -> None:
    # java.text.MessageFormat: a lone "}" is literal; an unterminated quote keeps the rest literal
    assert message_format("a}b", []) == "a}b"
    assert message_format("'{0} {1}", ["x"]) == "{0} {1}"
    with pytest.raises(ValueError, match="argument number"):
        message_format("{ 0}", ["x"])
