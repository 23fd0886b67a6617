"""Labels, scan folders and file names as XNAT makes them (xnat-reference.md §2, §5, §6)."""

import re

import pytest

from xnatmigrate import labels

# Computed with the JDK (openjdk 17): Long.toString(List.of(a, b).hashCode() & 0xffffffffL, 36).
JDK_HASHES = [
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", "14o7axy"),
    (
        "1.2.840.10008.5.1.4.1.1.2",
        "1.3.6.1.4.1.9590.100.1.2.227305838311957143831006521212591024213",
        "183rs1k",
    ),
    ("", "", "qp"),
    ("a", "b", "34y"),
    ("1.2.840.10008.5.1.4.1.1.7", "2.25.123456789012345678901234567890", "1l4anfg"),
]


@pytest.mark.parametrize(("a", "b", "expected"), JDK_HASHES)
def test_xnat_hash_matches_the_jdk(a, b, expected):
    assert labels.xnat_hash(a, b) == expected


def test_java_string_hash_uses_utf16_code_units():
    # "Ünïcødé𝄞".hashCode() & 0xffffffffL on the JDK; the clef is a surrogate pair in UTF-16.
    assert labels.java_string_hash("Ünïcødé𝄞") == 660894721


def test_file_name_follows_xnat_default_template():
    values = {
        "StudyInstanceUID": "1.2.3",
        "SeriesNumber": "5",
        "InstanceNumber": "12",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "SOPInstanceUID": "1.2.3.4.5",
    }
    assert labels.file_name(values) == "1.2.3-5-12-14o7axy.dcm"


def test_file_name_marks_missing_values():
    values = {"StudyInstanceUID": "1.2.3", "SOPClassUID": "a", "SOPInstanceUID": "b"}
    assert labels.file_name(values) == "1.2.3-no-value-for-SeriesNumber-no-value-for-InstanceNumber-34y.dcm"


def test_file_name_strips_leading_dots():
    assert labels.file_name({"X": ".hidden"}, template="${X}") == "hidden.dcm"


@pytest.mark.parametrize(
    ("number", "uid", "expected"),
    [
        ("5", "1.2.3", "5"),
        ("1001", None, "1001"),
        ("5 A", "1.2.3", "1_2_3"),  # not a valid file name → sanitised SeriesInstanceUID
        (None, "1.2.3", "1_2_3"),
        (None, None, "NA"),
        ("+5", None, "NA"),
    ],
)
def test_scan_folder_follows_restructurer(number, uid, expected):
    assert labels.scan_folder(number, uid) == expected


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("DOE^JOHN", "DOE_JOHN"), ("a.b c", "a_b_c"), ("ok-1_2", "ok-1_2"), ("Müller", "M_ller")],
)
def test_sanitize_like_labels_to_label_chars(raw, clean):
    assert labels.sanitize(raw) == clean
    assert labels.is_valid_label(clean)


def test_template_rendering_and_missing_value():
    assert (
        labels.render("{{ PatientID }}_{{ StudyDate }}", {"PatientID": "P1", "StudyDate": "2020"})
        == "P1_2020"
    )
    with pytest.raises(labels.MissingValue) as exc:
        labels.render("{{ PatientID }}_{{ StudyDate }}", {"PatientID": "P1"})
    assert exc.value.keyword == "StudyDate"


def test_template_is_sandboxed():
    with pytest.raises(labels.TemplateError):
        labels.render("{{ PatientID.__class__.__mro__[1].__subclasses__() }}", {"PatientID": "x"})


HEADER = {"PatientID": "P1", "StudyInstanceUID": "1.2.3", "SeriesNumber": "300000000"}


@pytest.mark.parametrize(
    "template",
    [
        "{{ PatientID * (SeriesNumber|int) }}",  # the repeat validate cannot see: a header value
        "{{ [PatientID] * (SeriesNumber|int) }}",
        "{{ PatientID|center(SeriesNumber|int) }}",
        "{{ PatientID.ljust(SeriesNumber|int) }}",
        "{{ ('%' ~ SeriesNumber ~ 's') % PatientID }}",
        "{{ ('{:>' ~ SeriesNumber ~ '}').format(PatientID) }}",
        "{{ PatientID|batch(SeriesNumber|int, 'x')|list }}",
        "{{ 7 ** (SeriesNumber|int) }}",
        "{{ (PatientID * 60)|replace('', PatientID * 60)|replace('', PatientID * 60) }}",
    ],
)
def test_a_label_cannot_grow_without_bound(template):
    # Each would build hundreds of MB (or never finish); the sandbox stops it at a few KB.
    with pytest.raises(labels.LabelTooLong, match=r"for study 1\.2\.3, longer than the 251 a folder name"):
        labels.render(template, HEADER)


def test_a_rendered_label_longer_than_a_folder_name_is_refused():
    values = {**HEADER, "SeriesNumber": "126"}
    assert len(labels.render("{{ PatientID * 125 }}x", values)) == 251
    with pytest.raises(labels.LabelTooLong, match="renders a label of 252 characters for study 1.2.3") as exc:
        labels.render("{{ PatientID * (SeriesNumber|int) }}", values)
    # The planner rejects a file it cannot label (as for a missing value), naming the reason.
    assert isinstance(exc.value, labels.MissingValue)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{{ PatientID * 300000000 }}", "repeats by 300000000"),
        ("{{ 300000000 * PatientID }}", "repeats by 300000000"),
        ("{{ 10 ** 1000 }}", "raises to 1000"),
        ("{{ PatientID|center(300000000) }}", "passes 300000000 as a width or count"),
        ("{{ range(100000)|join }}", "passes 100000 as a width or count"),
        ("{% for i in range(9) %}{{ PatientID }}{% endfor %}", "may not use {% for %} loops"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "may not use macros"),
    ],
)
def test_unbounded_templates_are_refused_before_rendering(template, fragment):
    with pytest.raises(labels.TemplateError, match=re.escape(fragment)):
        labels.template_keywords(template)


def test_arithmetic_errors_are_template_errors():
    with pytest.raises(
        labels.TemplateError, match="failed for study 1.2.3: division by zero; fix the template"
    ):
        labels.render("{{ 1 / (PatientID|length - 2) }}", HEADER)


def test_unknown_keywords_are_found():
    assert labels.unknown_keywords({"PatientID", "PatientIDD"}) == ["PatientIDD"]


def test_routing_line():
    assert labels.routing_line("P1", "S01", "S01_MR1") == "Project: P1 Subject: S01 Session: S01_MR1"
    assert labels.routing_line(None, "S", "E") == "Subject: S Session: E"
    with pytest.raises(ValueError):
        labels.routing_line("P 1", "S", "E")


def test_predict_route_follows_classic_identifier_order():
    values = {
        "PatientComments": "Project: P1 Subject: S1 Session: E1",
        "StudyComments": "Project: P2",
        "StudyDescription": "P3",
        "PatientName": "DOE^JOHN",
        "PatientID": "ID 7",
    }
    assert labels.predict_route(values) == ("P1", "S1", "E1")
    values.pop("PatientComments")
    assert labels.predict_route(values) == ("P2", "DOE_JOHN", "ID_7")
    # No DOTALL in XNAT's regex: `.*` cannot cross newlines, so a key two lines down is not seen.
    assert labels.predict_route({"PatientComments": "a\nb\nProject: P1"}) == (None, None, "dicom_upload")
    # Java's \w is ASCII: a non-ASCII value does not match at all.
    assert labels.predict_route({"PatientComments": "Project: Pé"})[0] is None


def test_java_dot_does_not_cross_a_carriage_return():
    # Java's `.` stops at \r too (and \u0085, \u2028, \u2029), Python's only at \n.
    assert labels.comment_assignments("a\rb\rProject: P1") == {}
    assert labels.comment_assignments("x Project: P1, Session: S") == {"Project": "P1", "Session": "S"}


def test_a_trailing_newline_is_not_a_valid_label():
    assert not labels.is_valid_label("prj001\n")


def test_a_missing_hash_operand_is_hashed_as_xnat_writes_it():
    """TemplatizedDicomFileNamer:93-96: the operand's placeholder text is hashed, not an empty string."""
    values = {
        "StudyInstanceUID": "1.2",
        "SeriesNumber": "3",
        "InstanceNumber": "4",
        "SOPInstanceUID": "1.2.3.4",
    }
    name = labels.file_name(values)
    assert name == f"1.2-3-4-{labels.xnat_hash('no-value-for-SOPClassUID', '1.2.3.4')}.dcm"
    assert labels.xnat_hash("no-value-for-SOPClassUID", "1.2.3.4") != labels.xnat_hash("", "1.2.3.4")


def test_sanitize_does_not_trim():
    assert labels.sanitize(" PAT 01 ") == "_PAT_01_"


def _reference_file_name(values, template=labels.XNAT_FILE_NAME_TEMPLATE):
    """file_name as it was written before it was compiled per template (issue 13)."""

    def value_of(var):
        m = labels._HASH_VAR.match(var)
        if m:
            a, b = m.groups()
            return labels.xnat_hash(
                values.get(a) or f"no-value-for-{a}", values.get(b) or f"no-value-for-{b}"
            )
        return values.get(var) or f"no-value-for-{var}"

    name = labels._TEMPLATE_VAR.sub(lambda m: value_of(m.group(1)), template)
    if "." not in template.rsplit("}", 1)[-1]:
        name += ".dcm"
    return name.lstrip(".")


@pytest.mark.parametrize(
    "template",
    [
        labels.XNAT_FILE_NAME_TEMPLATE,
        "${X}",
        ".${X}.dcm",
        "a${X}b${HashXWithY}c",
        "${HashYWithX}_${Y}.${X}",
        "plain",
        "${X}${X}.DCM",
    ],
)
@pytest.mark.parametrize(
    "values",
    [
        {},
        {"X": ".hidden", "Y": "é"},
        {
            "StudyInstanceUID": "1.2.3",
            "SeriesNumber": "5",
            "InstanceNumber": "12",
            "SOPClassUID": "1.2",
            "SOPInstanceUID": "1.2.3.4",
            "X": "x" * 300,
            "Y": "",
        },
    ],
)
def test_the_compiled_file_namer_names_as_before(template, values):
    assert labels.file_namer(template)(values) == _reference_file_name(values, template)
    assert labels.file_name(values, template) == _reference_file_name(values, template)
