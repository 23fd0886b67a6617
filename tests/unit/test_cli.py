"""The command line as a user meets it: exit codes (0, 1, and 2 with --detailed-exitcode), one-line errors
without a traceback, --debug for the traceback, --json output that parses, on a tiny manifest in tmp_path
(validate, and plan --offline: no database, no XNAT)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xnatmigrate import cli
from xnatmigrate.errors import ManifestError, PlanError
from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

REPO = Path(__file__).resolve().parents[2]
# One patient, two studies of one image each.
SPEC = CorpusSpec(patients=1, studies_per_patient=2, series_per_study=1, images_per_series=1, rows=4, seed=2)
UNKNOWN_KEY = "unknown key 'colour'; allowed here: "  # then the keys the manifest language knows


def one_problem_line(err: str, manifest: Path) -> bool:
    return err.startswith(f"{manifest}:12: $.sources[0].colour: {UNKNOWN_KEY}") and err.count("\n") == 1


@pytest.fixture
def site(tmp_path: Path) -> Path:
    build_corpus(tmp_path / "legacy", SPEC)
    (tmp_path / "prearchive").mkdir()
    return tmp_path


def write_manifest(
    site: Path, name: str = "m.yaml", session: str = "{{ PatientID }}_{{ StudyDate }}", extra=""
):
    path = site / name
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            xnat:
              prearchive: {site / "prearchive"}
              database: {{dsn_env: XNATMIGRATE_TEST_CLI_DSN}}
            defaults:
              build: none
            sources:
              - source: {site / "legacy"}
                project: prj001
                subject: "{{{{ PatientID }}}}"
                session: "{session}"
            """
        )
        + extra
    )
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- validate ---------------------------------------------------------------------------------------


def test_validate_a_good_manifest(site, capsys):
    m = write_manifest(site)
    assert run(capsys, "validate", str(m)) == (0, "1 manifest(s) valid\n", "")
    code, out, err = run(capsys, "validate", "--json", str(m))
    assert (code, json.loads(out), err) == (0, {"valid": True, "problems": []}, "")


def test_validate_a_bad_manifest_says_where_in_one_line(site, capsys):
    m = write_manifest(site, extra="    colour: red\n")
    code, out, err = run(capsys, "validate", str(m))
    assert (code, out) == (1, "")
    assert one_problem_line(err, m), err
    code, out, err = run(capsys, "validate", "--json", str(m))
    assert (code, err) == (1, "")
    doc = json.loads(out)
    assert doc["valid"] is False and len(doc["problems"]) == 1
    problem = doc["problems"][0]
    assert problem.pop("message").startswith(UNKNOWN_KEY)
    assert problem == {"file": str(m), "line": 12, "path": "$.sources[0].colour", "severity": "error"}


def test_validate_counts_every_manifest_and_fails_if_one_is_bad(site, capsys):
    good, bad = write_manifest(site, "a.yaml"), write_manifest(site, "b.yaml", extra="    colour: red\n")
    assert run(capsys, "validate", str(good), str(good))[:2] == (0, "2 manifest(s) valid\n")
    code, out, err = run(capsys, "validate", str(good), str(bad))
    assert (code, out) == (1, "") and err.startswith(f"{bad}:12: ")


# --- plan --offline ---------------------------------------------------------------------------------


def test_plan_exit_codes_with_and_without_detailed_exitcode(site, capsys):
    m = write_manifest(site)
    code, out, _ = run(capsys, "plan", str(m), "--offline", "--state-dir", str(site / "s1"))
    assert code == 0 and "Plan: 2 session(s), 2 file(s)" in out
    code, out, _ = run(
        capsys, "plan", str(m), "--offline", "--state-dir", str(site / "s2"), "--detailed-exitcode"
    )
    assert code == 2 and "Plan: 2 session(s), 2 file(s)" in out  # success, with changes to apply
    assert (site / "s2" / "plan.json").is_file() and (site / "s2" / "plan.sql").is_file()


def test_plan_with_nothing_to_add_exits_0_even_with_detailed_exitcode_and_1_with_strict(site, capsys):
    # Both studies render to the session label PAT001: both held back, nothing to add.
    m = write_manifest(site, session="{{ PatientID }}")
    state = str(site / "s")
    code, out, err = run(capsys, "plan", str(m), "--offline", "--state-dir", state, "--detailed-exitcode")
    assert code == 0 and "No changes." in out and "  held back: 2 study(ies)" in out
    code, out, err = run(
        capsys, "plan", str(m), "--offline", "--state-dir", state, "--detailed-exitcode", "--strict"
    )
    assert code == 1
    assert err.splitlines()[-1] == "error: 2 study(ies) held back and --strict is set"


def test_plan_json_is_one_json_document(site, capsys):
    m = write_manifest(site)
    state = site / "s"
    code, out, _ = run(capsys, "plan", str(m), "--offline", "--state-dir", str(state), "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["plan_file"], doc["sql_file"]) == (str(state / "plan.json"), str(state / "plan.sql"))
    assert doc["summary"]["sessions"] == 2 and doc["summary"]["files"] == 2
    dates = {p.name.split("_")[0] for p in (site / "legacy" / "PAT001").iterdir()}  # <StudyDate>_<n>
    assert {(s["project"], s["session"]) for s in doc["sessions"]} == {
        ("prj001", f"PAT001_{d}") for d in dates
    }
    assert doc["scan"]["files_seen"] == 2 and doc["scan"]["cache_hits"] == 0
    assert doc["plan_id"] == json.loads((state / "plan.json").read_text())["plan_id"]


def test_plan_of_an_invalid_manifest_prints_its_problems_and_exits_1(site, capsys):
    m = write_manifest(site, extra="    colour: red\n")
    code, out, err = run(
        capsys, "plan", str(m), "--offline", "--state-dir", str(site / "s"), "--detailed-exitcode"
    )
    assert (code, out) == (1, "") and one_problem_line(err, m), err
    code, out, err = run(capsys, "plan", str(m), "--offline", "--state-dir", str(site / "s"), "--json")
    assert code == 1 and json.loads(out)["valid"] is False
    assert not (site / "s" / "plan.json").exists()
    with pytest.raises(ManifestError):
        cli.main(["--debug", "plan", str(m), "--offline", "--state-dir", str(site / "s")])


# --- errors -----------------------------------------------------------------------------------------


def test_an_error_is_one_line_without_traceback(tmp_path, capsys):
    state = tmp_path / "empty"
    message = f"no plan at {state / 'plan.json'}: run `xnatmigrate plan MANIFEST` first"
    assert run(capsys, "apply", "--state-dir", str(state)) == (1, "", f"error: {message}\n")
    code, out, err = run(capsys, "apply", "--state-dir", str(state), "--json")
    assert (code, json.loads(out), err) == (1, {"error": message, "kind": "PlanError"}, f"error: {message}\n")


def test_debug_re_raises_the_error(tmp_path):
    with pytest.raises(PlanError, match="^no plan at "):
        cli.main(["--debug", "apply", "--state-dir", str(tmp_path / "empty")])


def test_python_m_xnatmigrate_exits_1_with_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xnatmigrate", "apply", "--state-dir", str(tmp_path / "empty")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.startswith("error: no plan at ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_apply_starts_without_the_planners_and_drivers_it_does_not_need():
    """`apply` starts without pydicom, psycopg, Jinja, jsonschema or lark (issue 14: they were a second of
    imports at every start); each is imported where a route or command needs it."""
    code = (
        "import sys\n"
        "import xnatmigrate.cli, xnatmigrate.execute.apply\n"
        "heavy = ('pydicom', 'psycopg', 'jinja2', 'jsonschema', 'lark', 'pynetdicom', 'yaml', 'numpy')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
