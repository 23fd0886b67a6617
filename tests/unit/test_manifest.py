"""Manifest language v1: every rule refuses what it should, with file:line: $.path: message."""

import json
import textwrap
from pathlib import Path

import pytest

from xnatmigrate import cli
from xnatmigrate.errors import ManifestError
from xnatmigrate.manifest import DEFAULT_SESSION, DEFAULT_SUBJECT, check_manifest, load_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "manifests").glob("*.yaml"))

GOOD = """\
version: 1
xnat:
  prearchive: /data/xnat/prearchive
  database: {dsn: "postgresql://xnat@db:5432/xnat"}
  url: https://xnat.example.org
  scp: {host: xnat.example.org, port: 8104, called_aet: XNAT, calling_aet: XNATMIGRATE}
sources:
  - source: /data/a
    project: prj001
    subject: s1
    session: s1_MR1
"""


def write(tmp_path, text, name="m.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(path):
    return [p for p in check_manifest(path)[1] if p.severity == "error"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_are_valid(example):
    assert problems_of(example) == []


def test_good_manifest_freezes_with_defaults(tmp_path):
    m = load_manifest(write(tmp_path, GOOD))
    src = m.sources[0]
    assert (src.project, src.subject, src.session) == ("prj001", "s1", "s1_MR1")
    assert (src.method, src.transfer, src.build, src.archive) == ("prearchive", "copy", "rest", False)
    assert m.xnat.scp.port == 8104 and m.xnat.url_root == "/data/xnat/prearchive"
    assert len(m.digest) == 64


def test_defaults_apply_and_sources_override(tmp_path):
    text = GOOD.replace("sources:", "defaults:\n  method: cstore\n  build: none\nsources:") + (
        "  - source: /data/b\n    project: prj001\n    method: prearchive\n"
    )
    m = load_manifest(write(tmp_path, text))
    assert m.sources[0].method == "cstore" and m.sources[0].build == "none"
    assert m.sources[1].method == "prearchive"
    # Unnamed subject/session fall back to XNAT's receiver defaults (§5/§6).
    assert (m.sources[1].subject, m.sources[1].session) == (DEFAULT_SUBJECT, DEFAULT_SESSION)


def test_relative_source_is_relative_to_the_manifest(tmp_path):
    m = load_manifest(write(tmp_path, GOOD.replace("/data/a", "data/a")))
    assert m.sources[0].source == str(tmp_path / "data" / "a")


BAD = [
    # (name, replacement applied to GOOD (old, new) or full text, expected line, path, fragment)
    (
        "unknown top key",
        ("version: 1\n", "version: 1\ncolour: blue\n"),
        2,
        "$.colour",
        "unknown key 'colour'",
    ),
    (
        "unknown source key",
        ("    session: s1_MR1\n", "    session: s1_MR1\n    sesion: x\n"),
        12,
        "$.sources[0].sesion",
        "unknown key 'sesion'",
    ),
    ("unknown xnat key", ("  url:", "  uri: x\n  url:"), 5, "$.xnat.uri", "unknown key"),
    ("bad version", ("version: 1", "version: 2"), 1, "$.version", "version 2 is not supported"),
    (
        "missing sources",
        ("sources:\n  - source: /data/a\n    project: prj001\n    subject: s1\n    session: s1_MR1\n", ""),
        1,
        "$",
        "'sources' is a required property",
    ),
    (
        "bad method",
        ("    session: s1_MR1\n", "    session: s1_MR1\n    method: ftp\n"),
        12,
        "$.sources[0].method",
        "use one of prearchive, cstore",
    ),
    (
        "invalid fixed label",
        ("project: prj001", "project: prj 001"),
        9,
        "$.sources[0].project",
        "not a valid XNAT label",
    ),
    (
        "dot in label",
        ("session: s1_MR1", "session: s1.MR1"),
        11,
        "$.sources[0].session",
        "not a valid XNAT label",
    ),
    (
        "unknown template keyword",
        ("session: s1_MR1", 'session: "{{ PatientNmae }}"'),
        11,
        "$.sources[0].session",
        "PatientNmae, which is not a DICOM keyword",
    ),
    (
        "template syntax",
        ("session: s1_MR1", 'session: "{{ PatientID "'),
        11,
        "$.sources[0].session",
        "template syntax error",
    ),
    (
        "unbounded template",
        ("session: s1_MR1", 'session: "{{ PatientID * 300000000 }}"'),
        11,
        "$.sources[0].session",
        "repeats by 300000000, which makes a label longer than the 251 characters",
    ),
    (
        "template loop",
        ("session: s1_MR1", 'session: "{% for i in range(9) %}{{ PatientID }}{% endfor %}"'),
        11,
        "$.sources[0].session",
        "may not use {% for %} loops",
    ),
    (
        "fixed label too long",
        ("session: s1_MR1", "session: " + "s" * 252),
        11,
        "$.sources[0].session",
        "the label is 252 characters long",
    ),
    (
        "where keyword",
        ("    session: s1_MR1\n", "    session: s1_MR1\n    where: {Modalty: MR}\n"),
        12,
        "$.sources[0].where.Modalty",
        "not a DICOM keyword",
    ),
    (
        "password in dsn",
        ('dsn: "postgresql://xnat@db:5432/xnat"', 'dsn: "postgresql://xnat:pw@db/xnat"'),
        4,
        "$.xnat.database.dsn",
        "holds a password",
    ),
    (
        "password keyword dsn",
        ('dsn: "postgresql://xnat@db:5432/xnat"', 'dsn: "host=db password=pw"'),
        4,
        "$.xnat.database.dsn",
        "holds a password",
    ),
    (
        "password query dsn",
        ('dsn: "postgresql://xnat@db:5432/xnat"', 'dsn: "postgresql://db/x?password=pw"'),
        4,
        "$.xnat.database.dsn",
        "holds a password",
    ),
    (
        "password in url",
        ("url: https://xnat.example.org", "url: https://admin:secret@xnat.example.org"),
        5,
        "$.xnat.url",
        "the URL holds a password",
    ),
    (
        "ae too long",
        ("called_aet: XNAT", "called_aet: ABCDEFGHIJKLMNOPQ"),
        6,
        "$.xnat.scp.called_aet",
        "longer than 16",
    ),
    (
        "ae backslash",
        ("calling_aet: XNATMIGRATE", 'calling_aet: "A\\\\B"'),
        6,
        "$.xnat.scp.calling_aet",
        "no backslash",
    ),
    (
        "ae control char",
        ("calling_aet: XNATMIGRATE", 'calling_aet: "A\\tB"'),
        6,
        "$.xnat.scp.calling_aet",
        "no backslash or control",
    ),
    (
        "ae all spaces",
        ("calling_aet: XNATMIGRATE", 'calling_aet: "   "'),
        6,
        "$.xnat.scp.calling_aet",
        "AE title",
    ),
    ("port zero", ("port: 8104", "port: 0"), 6, "$.xnat.scp.port", "minimum"),
    ("port too high", ("port: 8104", "port: 65536"), 6, "$.xnat.scp.port", "maximum"),
    (
        "cstore needs scp",
        ("  scp: {host: xnat.example.org, port: 8104, called_aet: XNAT, calling_aet: XNATMIGRATE}\n", ""),
        None,
        "$.sources[0]",
        None,
    ),
    (
        "prearchive needs database",
        ('  database: {dsn: "postgresql://xnat@db:5432/xnat"}\n', ""),
        7,
        "$.sources[0]",
        "method prearchive needs xnat.database",
    ),
    (
        "prearchive needs root",
        ("  prearchive: /data/xnat/prearchive\n", ""),
        7,
        "$.sources[0]",
        "method prearchive needs xnat.prearchive",
    ),
    (
        "rest build needs url",
        ("  url: https://xnat.example.org\n", ""),
        7,
        "$.sources[0]",
        "build: rest needs xnat.url",
    ),
    (
        "file_mode not octal",
        ("  url: https", '  file_mode: "0999"\n  url: https'),
        5,
        "$.xnat.file_mode",
        "octal",
    ),
    (
        "archive without project",
        ("    project: prj001\n", "    archive: true\n"),
        8,
        "$.sources[0]",
        "archive: true needs a project",
    ),
]


@pytest.mark.parametrize(("name", "change", "line", "path", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_each_rule_refuses(tmp_path, name, change, line, path, fragment):
    text = GOOD.replace(*change)
    assert text != GOOD, "the test's replacement did not apply"
    if name == "cstore needs scp":
        text = text.replace("    session: s1_MR1\n", "    session: s1_MR1\n    method: cstore\n")
        fragment = "method cstore needs xnat.scp"
        line = 7
    probs = problems_of(write(tmp_path, text))
    assert any(
        p.path == path and fragment in p.message and (line is None or p.line == line) for p in probs
    ), [p.render() for p in probs]


HARDLINK_MODE = GOOD.replace("  url:", '  file_mode: "0664"\n  url:').replace(
    "    session: s1_MR1\n", "    session: s1_MR1\n    transfer: hardlink\n"
)


@pytest.mark.parametrize("owner", [False, True], ids=["file_mode", "file_owner"])
def test_hardlink_with_mode_or_owner_needs_an_acknowledgement(tmp_path, owner):
    text = HARDLINK_MODE
    if owner:
        text = text.replace('  file_mode: "0664"\n', "  file_owner: xnat:xnat\n")
    probs = problems_of(write(tmp_path, text))
    assert [(p.line, p.path) for p in probs] == [(13, "$.sources[0].transfer")], [p.render() for p in probs]
    assert "changes the source files too" in probs[0].message
    assert "hardlink_changes_sources: true" in probs[0].message
    acked = text.replace("transfer: hardlink\n", "transfer: hardlink\n    hardlink_changes_sources: true\n")
    m = load_manifest(write(tmp_path, acked))
    assert m.sources[0].hardlink_changes_sources is True


def test_hardlink_acknowledgement_in_defaults_and_copy_needs_none(tmp_path):
    text = HARDLINK_MODE.replace("sources:", "defaults:\n  hardlink_changes_sources: true\nsources:")
    assert problems_of(write(tmp_path, text)) == []
    assert problems_of(write(tmp_path, HARDLINK_MODE.replace("hardlink", "copy"))) == []
    not_acked = HARDLINK_MODE.replace("sources:", "defaults:\n  hardlink_changes_sources: false\nsources:")
    assert [p.path for p in problems_of(write(tmp_path, not_acked))] == ["$.sources[0].transfer"]


def test_follow_links_is_a_per_source_choice_off_by_default(tmp_path):
    assert load_manifest(write(tmp_path, GOOD)).sources[0].follow_links is False
    text = GOOD.replace("sources:", "defaults:\n  follow_links: true\nsources:") + (
        "  - source: /data/b\n    project: prj001\n    follow_links: false\n"
    )
    assert [s.follow_links for s in load_manifest(write(tmp_path, text)).sources] == [True, False]
    bad = [p.path for p in problems_of(write(tmp_path, GOOD + "    follow_links: yes please\n"))]
    assert bad == ["$.sources[0].follow_links"]


def test_duplicate_keys_are_errors_with_both_lines(tmp_path):
    p = write(tmp_path, GOOD.replace("    subject: s1\n", "    subject: s1\n    subject: s2\n"))
    probs = problems_of(p)
    assert len(probs) == 1
    assert probs[0].line == 11 and "first at line 10" in probs[0].message
    assert probs[0].render().startswith(f"{p}:11: $.sources[0].subject: duplicate key")


def test_two_sources_same_fixed_session(tmp_path):
    text = GOOD + "  - source: /data/b\n    project: prj001\n    subject: s2\n    session: s1_MR1\n"
    probs = problems_of(write(tmp_path, text))
    assert [p.path for p in probs] == ["$.sources[1].session"]
    assert "sources[0] already names project prj001 session s1_MR1" in probs[0].message


def test_same_session_label_in_other_projects_is_fine(tmp_path):
    text = GOOD + "  - source: /data/b\n    project: prj002\n    subject: s2\n    session: s1_MR1\n"
    assert problems_of(write(tmp_path, text)) == []


def test_unassigned_warns_but_is_valid(tmp_path):
    manifest, probs = check_manifest(write(tmp_path, GOOD.replace("    project: prj001\n", "")))
    assert manifest is not None and manifest.sources[0].project is None
    assert [p.severity for p in probs] == ["warning"] and "Unassigned" in probs[0].message


BILLION_LAUGHS = GOOD + 'x0: &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
for _i in range(1, 10):
    BILLION_LAUGHS += f"x{_i}: &x{_i} [{', '.join([f'*x{_i - 1}'] * 9)}]\n"


def test_alias_bomb_is_refused_at_its_line(tmp_path):
    # 9**10 values if expanded (3.5 billion): refused from the alias counts, without expanding.
    probs = problems_of(write(tmp_path, BILLION_LAUGHS))
    assert [(p.line, p.path) for p in probs] == [(21, "$")], [p.render() for p in probs]
    assert "YAML aliases expand this manifest to more than" in probs[0].message
    assert "write the repeated values out" in probs[0].message


def test_recursive_alias_is_refused(tmp_path):
    probs = problems_of(write(tmp_path, GOOD + "loop: &loop [1, *loop]\n"))
    assert [(p.line, p.path) for p in probs] == [(12, "$")], [p.render() for p in probs]
    assert "recursive alias" in probs[0].message


def test_too_deep_yaml_is_one_problem(tmp_path):
    probs = problems_of(write(tmp_path, GOOD + "deep: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert [p.message for p in probs] == ["the YAML is nested too deeply to read; flatten the manifest"]


def test_ordinary_aliases_still_work(tmp_path):
    text = GOOD.replace("    project: prj001\n", "    project: &p prj001\n") + (
        '  - source: /data/b\n    project: *p\n    include: &g ["**/*.dcm"]\n    exclude: *g\n'
    )
    m = load_manifest(write(tmp_path, text))
    assert m.sources[1].project == "prj001" and m.sources[1].exclude == ("**/*.dcm",)


def test_yaml_syntax_error_gives_its_line(tmp_path):
    # The mistake and the place YAML notices it are one line (an unclosed "[" would be noticed a line later).
    probs = problems_of(write(tmp_path, GOOD.replace("    subject: s1", "    subject: s1: x")))
    assert [(p.line, p.message) for p in probs] == [
        (10, "YAML syntax error: mapping values are not allowed here; fix the YAML at this line")
    ]


def test_empty_file_is_an_error(tmp_path):
    probs = problems_of(write(tmp_path, "# nothing here\n"))
    assert probs[0].message.startswith("the manifest is empty")


def test_not_a_mapping(tmp_path):
    assert "a manifest is a mapping" in problems_of(write(tmp_path, "- 1\n- 2\n"))[0].message


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("project: prj001", "project: bad label").replace("port: 8104", "port: 0")
    text = text.replace("version: 1\n", "version: 1\nextra: 1\n")
    assert len(problems_of(write(tmp_path, text))) == 3


def test_load_manifest_raises_with_all_problems(tmp_path):
    with pytest.raises(ManifestError) as exc:
        load_manifest(write(tmp_path, GOOD.replace("port: 8104", "port: 0").replace("prj001", "p 1")))
    assert len(exc.value.problems) == 2


def test_check_sources(tmp_path):
    p = write(tmp_path, GOOD)
    assert problems_of(p) == []
    probs = check_manifest(p, check_sources=True)[1]
    assert any("/data/a is not a folder" in x.message for x in probs)
    (tmp_path / "here").mkdir()
    p2 = write(tmp_path, GOOD.replace("/data/a", "here"), "m2.yaml")
    assert [x for x in check_manifest(p2, check_sources=True)[1] if x.severity == "error"] == []


def test_cli_validate_exit_codes_and_json(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    bad = write(tmp_path, GOOD.replace("port: 8104", "port: 0"), "bad.yaml")
    assert cli.main(["validate", str(good)]) == 0
    assert "1 manifest(s) valid" in capsys.readouterr().out
    assert cli.main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:6: $.xnat.scp.port:" in err
    assert cli.main(["validate", "--json", str(bad)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is False
    assert doc["problems"][0] == {
        "file": str(bad),
        "line": 6,
        "path": "$.xnat.scp.port",
        "message": doc["problems"][0]["message"],
        "severity": "error",
    }


def test_cli_validate_unreadable_file(tmp_path, capsys):
    assert cli.main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read the manifest" in capsys.readouterr().err
