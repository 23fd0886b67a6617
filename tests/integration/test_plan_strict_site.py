"""plan against a stand-in configured as a strict XNAT site (issue 12 §2): site anonymisation on, an
auto-archive project, receiver routing expressions, a direct-archive receiver, a custom file-name
template. Each finding is said in plain words and the exit code is as documented."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.sites import NOW, Site
from tests.xnat_standin import XnatStandIn
from xnatmigrate import api, cli
from xnatmigrate.errors import PlanError


@pytest.fixture
def strict(tmp_path, pg_dsn, monkeypatch):
    s = Site(tmp_path / "site", pg_dsn.dsn)
    receivers = [
        {
            "aeTitle": "XNAT",
            "port": 8104,
            "directArchive": True,
            "routingExpressionsEnabled": True,
            "projectRoutingExpression": "(0008,1030):Study of (\\w+)",
        }
    ]
    with XnatStandIn(
        pg_dsn.dsn,
        s.prearchive,
        s.archive_dir,
        projects={"prj001": 4},
        receivers=receivers,
        site_config={"dicomFileNameTemplate": "${ReferringPhysicianName}-${SOPInstanceUID}"},
    ) as xnat:
        xnat.anonymize_site_enabled = True
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)
        s.xnat = xnat  # type: ignore[attr-defined]
        yield s


def manifest(site: Site, method: str, extra: str = "") -> Path:
    m = site.root / f"{method}.yaml"
    m.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {site.prearchive}
              database: {{dsn_env: XNATMIGRATE_TEST_SITE_DSN}}
              url: {site.xnat.url}
              scp: {{host: 127.0.0.1, port: 8104, called_aet: XNAT}}
            defaults:
              method: {method}
              build: rest
            {extra}
            sources:
              - source: {site.source}
                project: prj001
                subject: "{{{{ PatientID }}}}"
                session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
            """
        )
    )
    return m


def test_prearchive_route_is_refused_naming_the_anonymisation_and_the_template(strict, capsys):
    m = manifest(strict, "prearchive")
    assert cli.main(["plan", str(m), "--state-dir", str(strict.root / "s1")]) == 1
    err = capsys.readouterr().err
    assert "XNAT's site anonymisation is on" in err and "anonymization: none" in err
    assert "dicomFileNameTemplate is '${ReferringPhysicianName}-${SOPInstanceUID}'" in err
    # Said to be clean data: only the template is left in the way.
    m2 = manifest(strict, "prearchive", "  anonymization: none")
    with pytest.raises(PlanError) as ei:
        api.plan(m2, state_dir=strict.root / "s2", now=NOW)
    assert "site anonymisation" not in str(ei.value) and "dicomFileNameTemplate" in str(ei.value)


def test_cstore_to_an_auto_archive_project_is_refused_unless_archive_agrees(strict, capsys):
    m = manifest(strict, "cstore")
    assert cli.main(["plan", str(m), "--state-dir", str(strict.root / "s1")]) == 1
    err = capsys.readouterr().err
    assert "prj001 auto-archives (prearchive code 4)" in err and "set archive: true" in err


def test_cstore_with_archive_true_plans_and_says_what_xnat_will_do(strict, capsys):
    m = manifest(strict, "cstore", "  archive: true")
    assert cli.main(["plan", str(m), "--state-dir", str(strict.root / "s1"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    warnings = " | ".join(doc["warnings"])
    assert "arrive anonymised by XNAT" in warnings
    assert "archives directly" in warnings and "no review" in warnings
    assert "(0008,1030):Study of (\\w+)" in warnings and "win over" in warnings
    plan = api.load_plan(strict.root / "s1" / "plan.json")
    assert plan.sessions and all(s.direct_archive for s in plan.sessions)
