"""Lookup tables (issue 15.1): read from CSV/TSV, checked in validate, used by templates and where,
held back on a miss, pinned in the plan by digest."""

import textwrap
from datetime import datetime

import pytest

from xnatmigrate import labels
from xnatmigrate.errors import StalePlanError
from xnatmigrate.explain import plan_text
from xnatmigrate.manifest import check_manifest, load_manifest
from xnatmigrate.model import FileHeader, XnatFacts, compute_plan_id, plan_from_dict, plan_to_dict
from xnatmigrate.planner import build_plan

NOW = datetime(2024, 1, 31, 10, 11, 12, 123000)

MANIFEST = """\
version: 1
xnat:
  prearchive: /data/xnat/prearchive
  database: {{dsn: "postgresql://xnat@db:5432/xnat"}}
  url: https://xnat.example.org
lookups:
  subjects: {{file: {file}, key: mrn{extra}}}
sources:
  - source: /src
    project: prj001
    subject: "{subject}"
    session: "{session}"
{where}"""

SUBJECTS = "mrn,subject_label,arm\nPAT001,S-001,A\nPAT002,S-002,B\n"


class NoState:
    serial = 0

    def timestamp_for(self, project, session, study_uid):
        return None

    def all_timestamps(self):
        return set()

    def sources_of(self, action_id):
        return next((s.sources for s in self.sessions() if s.action_id == action_id), ())

    def sessions(self):
        return []


def write(tmp_path, table=SUBJECTS, *, name="subjects.csv", extra="", where="", **labels_):
    (tmp_path / name).write_bytes(table.encode("utf-8") if isinstance(table, str) else table)
    text = MANIFEST.format(
        file=name,
        extra=extra,
        subject=labels_.get("subject", "{{ lookups.subjects[PatientID].subject_label }}"),
        session=labels_.get("session", "{{ lookups.subjects[PatientID].subject_label }}_{{ Modality }}"),
        where=textwrap.indent(where, "    ") if where else "",
    )
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def errors(path):
    return [p for p in check_manifest(path)[1] if p.severity == "error"]


def header(path, patient, study):
    values = {
        "SOPInstanceUID": f"{study}.1.1",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "StudyInstanceUID": study,
        "SeriesInstanceUID": f"{study}.1",
        "SeriesNumber": "1",
        "InstanceNumber": "1",
        "Modality": "MR",
        "PatientID": patient,
        "StudyDate": "20131211",
    }
    return FileHeader(path=path, size=1000, mtime_ns=1, transfer_syntax="1.2.840.10008.1.2.1", values=values)


def plan_of(path, *headers):
    m = load_manifest(path)
    return build_plan(m, [(0, h) for h in headers], [], NoState(), XnatFacts(), NOW)


# --- validate -------------------------------------------------------------------------------------


def test_a_good_table_loads_with_its_digest_rows_and_lines(tmp_path):
    m = load_manifest(write(tmp_path))
    (t,) = m.lookups
    assert (t.name, t.key, t.columns) == ("subjects", "mrn", ("mrn", "subject_label", "arm"))
    assert t.file == str((tmp_path / "subjects.csv").resolve())
    assert t.rows["PAT002"].line == 3 and t.rows["PAT002"].values["subject_label"] == "S-002"
    import hashlib

    assert t.sha256 == hashlib.sha256(SUBJECTS.encode()).hexdigest()


def test_a_duplicate_key_is_an_error_naming_the_file_and_both_lines(tmp_path):
    (p,) = errors(write(tmp_path, SUBJECTS + "PAT001,S-009,A\n"))
    assert p.file.endswith("subjects.csv") and p.line == 4
    assert "duplicate key 'PAT001'" in p.message and "first at line 2" in p.message


def test_a_missing_key_column_is_an_error_at_the_header(tmp_path):
    (p,) = errors(write(tmp_path, "id,subject_label\nPAT001,S-001\n"))
    assert p.line == 1 and "key column 'mrn' is not in the header" in p.message


def test_a_picked_column_the_table_lacks_is_an_error(tmp_path):
    (p,) = errors(write(tmp_path, subject="{{ lookups.subjects[PatientID].label }}", session="x"))
    assert "picks column 'label'" in p.message and p.file.endswith("subjects.csv")


def test_a_value_that_is_not_a_valid_label_is_an_error_at_its_line(tmp_path):
    (p,) = errors(write(tmp_path, SUBJECTS + "PAT003,S 003,A\n"))
    assert p.line == 4 and "'S 003', which is not a valid XNAT label" in p.message


def test_a_column_only_where_needs_is_not_checked_as_a_label(tmp_path):
    # ``arm`` is never picked: its values need not be labels.
    path = write(tmp_path, SUBJECTS + "PAT003,S-003,not a label\n")
    assert errors(path) == []


def test_an_unknown_table_is_an_error_in_template_and_where(tmp_path):
    path = write(
        tmp_path,
        subject="{{ lookups.patients[PatientID].subject_label }}",
        session="x",
        where="where: {PatientID: {in_lookup: consent}}\n",
    )
    msgs = [p.message for p in errors(path)]
    assert any("no lookup table 'patients'" in m for m in msgs)
    assert any("no lookup table 'consent'" in m for m in msgs)


@pytest.mark.parametrize(
    "template",
    ["{{ lookups.subjects }}", "{{ lookups.subjects[PatientID] }}", "{{ lookups.subjects['PAT001'].arm }}"],
)
def test_other_uses_of_lookups_are_refused(tmp_path, template):
    (p,) = errors(write(tmp_path, subject=template, session="x"))
    assert "lookups.TABLE[Keyword].column" in p.message


def test_a_tsv_table_and_a_bom_and_quoted_delimiters(tmp_path):
    tsv = '\ufeffmrn\tsubject_label\tarm\nPAT001\tS-001\t"A\tB"\n'
    m = load_manifest(write(tmp_path, tsv.encode("utf-8"), name="subjects.tsv"))
    assert m.lookups[0].rows["PAT001"].values["arm"] == "A\tB"


def test_a_table_that_is_not_utf8_names_its_line(tmp_path):
    (p,) = errors(write(tmp_path, b"mrn,subject_label\nPAT001,S-001\nPAT\xe9,S-002\n"))
    assert p.line == 3 and "not UTF-8" in p.message


def test_a_row_with_the_wrong_number_of_fields_names_its_line(tmp_path):
    (p,) = errors(write(tmp_path, SUBJECTS + "PAT003,S-003\n"))
    assert p.line == 4 and "2 field(s), the header 3" in p.message


def test_a_missing_table_file_is_one_clear_error(tmp_path):
    path = write(tmp_path)
    (tmp_path / "subjects.csv").unlink()
    (p,) = errors(path)
    assert "cannot read lookup table subjects" in p.message


def test_templates_read_the_key_keyword(tmp_path):
    assert labels.template_keywords("{{ lookups.subjects[PatientID].subject_label }}") == {"PatientID"}


# --- plan -----------------------------------------------------------------------------------------


def test_labels_come_from_the_row_and_the_plan_names_it(tmp_path):
    plan = plan_of(write(tmp_path), header("/src/a", "PAT002", "1.2.3"))
    (s,) = plan.sessions
    assert (s.subject, s.session) == ("S-002", "S-002_MR")
    assert [(m.table, m.keyword, m.key, m.line) for m in s.mapped_by] == [
        ("subjects", "PatientID", "PAT002", 3)
    ]
    assert "subjects[PatientID=PAT002] (subjects.csv line 3)" in plan_text(plan)


def test_a_study_whose_key_is_missing_is_held_back_naming_table_column_and_value(tmp_path):
    plan = plan_of(write(tmp_path), header("/src/a", "PAT001", "1.2.3"), header("/src/b", "PAT404", "1.2.4"))
    assert [s.study_uid for s in plan.sessions] == ["1.2.3"]
    (held,) = plan.held_back
    assert held.study_uid == "1.2.4" and held.files == ("/src/b",)
    assert "'PAT404' is not in lookup table subjects" in held.reason and "column subject_label" in held.reason


def test_where_in_lookup_admits_only_listed_keys(tmp_path):
    path = write(
        tmp_path,
        subject="{{ PatientID }}",
        session="{{ PatientID }}_MR",
        where="where: {PatientID: {in_lookup: subjects}}\n",
    )
    plan = plan_of(path, header("/src/a", "PAT001", "1.2.3"), header("/src/b", "PAT404", "1.2.4"))
    assert [s.study_uid for s in plan.sessions] == ["1.2.3"]
    (r,) = plan.rejected
    assert r.path == "/src/b" and "PAT404 not in lookup table subjects" in r.reason


def test_the_table_digest_is_in_the_plan_id(tmp_path):
    h = header("/src/a", "PAT001", "1.2.3")
    first = plan_of(write(tmp_path), h)
    # Same labels for PAT001, but another row changes the table: the plan id must change.
    second = plan_of(write(tmp_path, SUBJECTS + "PAT003,S-003,A\n"), h)
    assert first.sessions[0].subject == second.sessions[0].subject
    assert first.lookups[0].sha256 != second.lookups[0].sha256
    assert compute_plan_id(first) != compute_plan_id(second)
    again = plan_from_dict(plan_to_dict(second))
    assert again.lookups == second.lookups and again.sessions[0].mapped_by == second.sessions[0].mapped_by


def test_apply_refuses_a_plan_once_its_table_changed(tmp_path):
    from xnatmigrate import api

    plan = plan_of(write(tmp_path), header("/src/a", "PAT001", "1.2.3"))

    class Store:
        def serial(self):
            return plan.state_serial

        def current_plan(self):
            return plan.plan_id

    api.check_fresh(plan, Store())  # unchanged: fresh
    (tmp_path / "subjects.csv").write_text(SUBJECTS.replace("S-002", "S-020"))
    with pytest.raises(StalePlanError, match="lookup table subjects .* changed since the plan"):
        api.check_fresh(plan, Store())
    (tmp_path / "subjects.csv").unlink()
    with pytest.raises(StalePlanError, match="lookup table subjects .* is gone"):
        api.check_fresh(plan, Store())
