"""De-identification on the C-STORE route (issue 15, "C-STORE edits in memory before sending"): what
validate allows, what plan shows and refuses, and what the sender's in-memory edit makes of a file."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.unit.test_manifest import GOOD, problems_of, write
from tests.unit.test_planner import NOW, FakeState, header, manifest, plan_of, src
from xnatmigrate import anonymize
from xnatmigrate.errors import PlanError
from xnatmigrate.execute.dicom import load_payload
from xnatmigrate.execute.dicom.part10 import NotAnonymised
from xnatmigrate.explain import plan_text
from xnatmigrate.model import BASE_KEYWORDS, CstoreSession, PlannedScript, SiteFacts, XnatFacts
from xnatmigrate.planner import build_plan
from xnatmigrate.vocabulary import Routing

SCRIPT = 'version "6.1"\n(0010,0010) := subject\n-(0010,0030)\n(0008,0080) := "ANONYMISED"\n'


def scripted(text: str = SCRIPT, name: str = "/anon/a.das", site: bool = False, **kw: object):
    """A one-source manifest whose source names the script ``text`` (and XNAT's site script first)."""
    names = ("site", name) if site else (name,)
    m = manifest(src(method="cstore", scripts=names, **kw))
    return replace(m, scripts=(PlannedScript(name, hashlib.sha256(text.encode()).hexdigest(), text),))


# -- validate ---------------------------------------------------------------------------------------


def cstore_manifest(tmp_path: Path, method: str, anonymization: str = "anon.das") -> Path:
    (tmp_path / "anon.das").write_text(SCRIPT)
    text = GOOD.replace(
        "sources:\n", f"defaults:\n  method: {method}\n  anonymization: {anonymization}\nsources:\n"
    )
    return write(tmp_path, text)


def test_validate_allows_scripts_on_cstore_and_still_refuses_them_on_inbox(tmp_path):
    assert problems_of(cstore_manifest(tmp_path, "cstore")) == []
    assert problems_of(cstore_manifest(tmp_path, "cstore", "[site, anon.das]")) == []
    # The source files are read, never written, on C-STORE: hardlink says nothing about them there.
    hard = cstore_manifest(tmp_path, "cstore")
    hard.write_text(
        hard.read_text().replace("  method: cstore\n", "  method: cstore\n  transfer: hardlink\n")
    )
    assert problems_of(hard) == []
    inbox = cstore_manifest(tmp_path, "inbox")
    inbox.write_text(inbox.read_text().replace("xnat:\n", "xnat:\n  inbox: /data/xnat/inbox\n"))
    assert [p.message for p in problems_of(inbox) if "anonymization" in p.path] == [
        "method inbox: XNAT applies its own site script to every file it receives (GradualDicomImporter:390); "
        "editing files before XNAT's inbox importer reads them is not implemented: drop anonymization here, "
        "or use method: cstore or prearchive"
    ]
    project = cstore_manifest(tmp_path, "cstore", "project")
    assert any("applies the project's script itself" in p.message for p in problems_of(project))


# -- plan -------------------------------------------------------------------------------------------


def test_a_cstore_session_names_its_scripts_and_shows_what_they_do_to_its_first_file():
    p = plan_of(scripted(), [header("/src/a", PatientBirthDate="19700101"), header("/src/b", inst="2")])
    s = p.sessions[0]
    assert isinstance(s, CstoreSession) and s.anonymize == ("/anon/a.das",)
    assert {(e.name, e.action, e.value) for e in s.anonymized} == {
        ("PatientName", "set", "PAT001"),
        ("PatientBirthDate", "delete", None),
        ("InstitutionName", "set", "ANONYMISED"),
    }
    assert [sc.name for sc in p.scripts] == ["/anon/a.das"]
    text = plan_text(p)
    assert "anonymised by: a.das (in memory, before the routing is written)" in text
    assert "PatientName := 'PAT001'" in text and "- PatientBirthDate" in text


def test_a_script_failing_on_the_first_file_holds_the_study_back():
    needs_secret = 'version "6.1"\n(0020,0052) := newUID[]\n'
    p = plan_of(scripted(needs_secret), [header("/src/a")])
    assert p.sessions == ()
    assert "the anonymisation script fails on /src/a" in p.held_back[0].reason
    assert "XNATMIGRATE_ANON_SECRET" in p.held_back[0].reason


@pytest.mark.parametrize("uid", ["(0020,000D)", "(0008,0018)"])
def test_a_script_changing_the_uids_cstore_names_files_and_sessions_by_is_refused(uid):
    with pytest.raises(
        PlanError, match=r"sources\[0\].anonymization changes (Study|SOP)InstanceUID, which the C-STORE"
    ):
        plan_of(scripted(f'version "6.1"\n{uid} := hashUID[{uid}]\n'), [header("/src/a")])


def test_series_numbering_is_free_on_cstore_but_not_on_the_prearchive_route():
    """XNAT names files and scan folders from what it receives; the prearchive route names them itself."""
    text = 'version "6.1"\n(0020,0011) := "99"\n(0020,000E) := hashUID[(0020,000E)]\n'
    s = plan_of(scripted(text), [header("/src/a")]).sessions[0]
    assert {e.name for e in s.anonymized} == {"SeriesNumber", "SeriesInstanceUID"}
    pre = replace(scripted(text), sources=(replace(scripted(text).sources[0], method="prearchive"),))
    with pytest.raises(PlanError, match="which the prearchive route names files"):
        plan_of(pre, [header("/src/a")])


def test_without_a_routing_line_a_script_may_not_change_what_xnat_routes_by():
    with pytest.raises(
        PlanError, match=r"routes by PatientName with routing: none.*routing: patient_comments"
    ):
        plan_of(scripted(routing="none"), [header("/src/a")])
    # The tool's routing line decides the route: the same script is fine with it.
    assert plan_of(scripted(routing="patient_comments"), [header("/src/a")]).sessions


def test_site_anonymisation_on_says_xnat_applies_its_script_on_receipt_as_well():
    def warnings(m):
        facts = XnatFacts(site=SiteFacts(anonymization_enabled=True, site_script='version "6.1"\n'))
        return build_plan(m, [(0, header("/src/a"))], [], FakeState(), facts, NOW, BASE_KEYWORDS).warnings

    own = [w for w in warnings(scripted()) if "on receipt as well" in w]
    assert len(own) == 1 and "sources[0] (method: cstore)" in own[0] and "twice" not in own[0]
    both = [w for w in warnings(scripted(site=True)) if "on receipt as well" in w]
    assert len(both) == 1 and "applies XNAT's site script twice" in both[0]
    assert not [w for w in warnings(manifest(src(method="cstore"))) if "on receipt as well" in w]


# -- the sender's in-memory edit --------------------------------------------------------------------


def _file(tmp_path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = "2.25.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1", "2.25.2"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN1", "19700101"
    ds.PatientComments = "keep me?"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(8))
    path = tmp_path / "f.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _edit(text: str, routing: Routing = Routing.PATIENT_COMMENTS) -> anonymize.SessionEdit:
    sc = PlannedScript("/anon/a.das", hashlib.sha256(text.encode()).hexdigest(), text)
    labels = anonymize.variables("prj001", "SUBJ", "SESS")
    return anonymize.session_edit([sc.name], {sc.name: sc}, labels, None, anonymize.cstore_kept(routing))


def _sent(payload) -> Dataset:
    import io

    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(b"".join(bytes(p) for p in payload.pieces)), False, True)


def test_the_payload_holds_the_edited_file_with_the_routing_written_after_the_scripts(tmp_path):
    path = _file(tmp_path)
    before = path.read_bytes()
    script = SCRIPT + '(0010,4000) := "from the script"\n'
    payload = load_payload(str(path), None, 0x00104000, "Project: prj001", _edit(script))
    ds = _sent(payload)
    assert str(ds.PatientName) == "SUBJ" and "PatientBirthDate" not in ds
    assert ds.PatientComments == "Project: prj001"  # the routing line wins over the script's value
    assert ds.PixelData == bytes(range(8)) and ds.SOPInstanceUID == "2.25.7"
    assert payload.tail_length == 0  # nothing read from the file after the edit
    assert path.read_bytes() == before  # the source is never written
    # Deterministic: the same file, script and labels give the same bytes.
    again = load_payload(str(path), None, 0x00104000, "Project: prj001", _edit(script))
    assert b"".join(map(bytes, again.pieces)) == b"".join(map(bytes, payload.pieces))
    # Without a routing line the scripts' bytes go as they are.
    plain = _sent(load_payload(str(path), None, None, "", _edit(script)))
    assert plain.PatientComments == "from the script"


def test_a_file_its_scripts_fail_on_is_not_sent(tmp_path):
    path = _file(tmp_path)
    with pytest.raises(NotAnonymised, match="not sent: .*newUID needs a secret"):
        load_payload(
            str(path), None, 0x00104000, "Project: prj001", _edit('version "6.1"\n(0020,0052) := newUID[]\n')
        )
    with pytest.raises(NotAnonymised, match="changes SOPInstanceUID of .*f.dcm, which the C-STORE request"):
        load_payload(str(path), None, None, "", _edit('version "6.1"\n(0008,0018) := "2.25.8"\n'))


@pytest.mark.parametrize(
    "script",
    [
        SCRIPT,  # the routing element's place is in what the edit left in place (Pixel Data's side)
        SCRIPT + '(0020,0010) := "S1"\n',  # in the bytes the edit made (an element after it re-encoded)
        'version "6.1"\n',  # nothing edited: the whole data set left in place
        'version "6.1"\nremoveAllPrivateTags\n',  # the whole parse
    ],
)
@pytest.mark.parametrize("tag", [None, 0x00104000, 0x00324000])
def test_the_payload_is_the_whole_edit_with_the_routing_spliced_in(tmp_path, script, tag):
    from xnatmigrate.execute.dicom import part10

    path = _file(tmp_path)
    edit = _edit(script)
    chain = anonymize.chain_of([sc.name for sc in edit.scripts], {sc.name: sc for sc in edit.scripts})
    whole = anonymize._edited_whole(chain, path.read_bytes(), dict(edit.labels), None, str(path), edit.kept)
    want = part10._payload(whole, str(path), None, tag, "Project: prj001", edited=True)
    got = load_payload(str(path), None, tag, "Project: prj001", edit)
    assert b"".join(map(bytes, got.pieces)) == b"".join(map(bytes, want.pieces))
    assert (got.length, got.transfer_syntax, got.tail_length) == (want.length, want.transfer_syntax, 0)
