"""What XNAT's site settings make of a plan (issue 12 §2), on the pure planner with SiteFacts given."""

from __future__ import annotations

import pytest

from tests.unit.test_planner import NOW, FakeState, header, manifest, plan_of, src
from xnatmigrate import labels
from xnatmigrate.errors import PlanError
from xnatmigrate.model import BASE_KEYWORDS, Receiver, SiteFacts, XnatFacts
from xnatmigrate.planner import build_plan

KEYWORDS = frozenset(BASE_KEYWORDS)


def planned(m, site: SiteFacts, hs=None):
    hs = hs or [header("/src/a")]
    return build_plan(m, [(0, h) for h in hs], [], FakeState(), XnatFacts(site=site), NOW, KEYWORDS)


def test_site_anonymisation_refuses_the_prearchive_route_unless_the_manifest_says_none():
    with pytest.raises(PlanError, match=r"site anonymisation is on .*sources\[0\].*anonymization: none"):
        planned(manifest(src()), SiteFacts(anonymization_enabled=True))
    p = planned(manifest(src(anonymization="none")), SiteFacts(anonymization_enabled=True))
    assert len(p.sessions) == 1
    assert planned(manifest(src()), SiteFacts(anonymization_enabled=False)).sessions


def test_site_anonymisation_is_announced_for_cstore():
    p = planned(manifest(src(method="cstore")), SiteFacts(anonymization_enabled=True))
    assert any("arrive anonymised by XNAT" in w for w in p.warnings)


@pytest.mark.parametrize("code", [4, 5])
def test_an_auto_archive_project_refuses_what_xnat_would_archive_against_the_manifest(code):
    site = SiteFacts(prearchive_codes={"prj001": code})
    with pytest.raises(
        PlanError, match=rf"prj001 auto-archives \(prearchive code {code}\).*GradualDicomImporter:506"
    ):
        planned(manifest(src(method="cstore")), site)
    with pytest.raises(PlanError, match=r"isAutoArchive:92-110"):
        planned(manifest(src(build="scheduler")), site)
    # REST builds never auto-archive; archive: true agrees with the project.
    assert planned(manifest(src(build="rest")), site).sessions
    assert planned(manifest(src(method="cstore", archive=True)), site).sessions
    assert planned(manifest(src(method="cstore")), SiteFacts(prearchive_codes={"prj001": 0})).sessions


def test_a_direct_archive_receiver_marks_the_sessions_and_says_so():
    site = SiteFacts(receivers=(Receiver("XNAT", 8104, direct_archive=True),))
    p = planned(manifest(src(method="cstore")), site)
    assert p.sessions[0].direct_archive is True
    assert any("archives directly" in w and "no review" in w for w in p.warnings)
    other = planned(manifest(src(method="cstore")), SiteFacts(receivers=(Receiver("XNAT", 8104),)))
    assert other.sessions[0].direct_archive is False


def test_routing_expressions_are_named_in_a_warning():
    r = Receiver("XNAT", 8104, routing_expressions=True, expressions=("(0008,1030):(.*)",))
    p = planned(manifest(src(method="cstore")), SiteFacts(receivers=(r,)))
    assert any("(0008,1030):(.*)" in w and "win over" in w for w in p.warnings)


def test_the_sites_file_name_template_is_followed_or_refused():
    t = "${SOPInstanceUID}-${HashSOPClassUIDWithSOPInstanceUID}"
    p = planned(manifest(src()), SiteFacts(file_name_template=t))
    f = p.sessions[0].files[0]
    assert f.dest.endswith(labels.file_name(header("/src/a").values, t)) and f.dest.endswith(".dcm")
    assert labels.file_name(header("/src/a").values) not in f.dest
    with pytest.raises(
        PlanError, match=r"dicomFileNameTemplate is '\$\{ReferringPhysicianName\}'.*did not read"
    ):
        planned(manifest(src()), SiteFacts(file_name_template="${ReferringPhysicianName}"))
    # C-STORE: XNAT names the files itself.
    assert planned(
        manifest(src(method="cstore")), SiteFacts(file_name_template="${ReferringPhysicianName}")
    ).sessions


def test_unknown_settings_decide_nothing():
    assert plan_of(manifest(src()), [header("/src/a")]).sessions
