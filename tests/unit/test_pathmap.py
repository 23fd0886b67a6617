"""Per-host path maps (``pathmap.PathMap``): whole components, longest prefix, refusals."""

from __future__ import annotations

import pytest

from xnatmigrate.errors import SettingError
from xnatmigrate.pathmap import PathMap


def test_a_prefix_maps_whole_components_and_the_longest_wins():
    pm = PathMap.parse(["/mnt/pacs=/data/legacy", "/mnt/pacs/2019=/fast/2019/", "/x/=/y"])
    assert pm.path("/mnt/pacs/a/b.dcm") == "/data/legacy/a/b.dcm"
    assert pm.path("/mnt/pacs/2019/c.dcm") == "/fast/2019/c.dcm"
    assert pm.path("/mnt/pacs") == "/data/legacy"
    assert pm.path("/mnt/pacsX/a.dcm") == "/mnt/pacsX/a.dcm"  # not a component boundary
    assert pm.path("/x/1") == "/y/1"
    assert pm.path("/elsewhere/a") == "/elsewhere/a"


@pytest.mark.parametrize("entry", ["/a", "a=/b", "/a=b", "=/b"])
def test_an_entry_that_is_not_two_absolute_paths_is_refused_naming_it(entry):
    with pytest.raises(SettingError, match="is not FROM=TO with two absolute paths"):
        PathMap.parse([entry])


def test_the_environment_gives_the_map_when_no_option_does(monkeypatch):
    monkeypatch.setenv("XNATMIGRATE_PATH_MAP", "/a=/b;;/c=/d")
    assert PathMap.of(None).pairs == (("/a", "/b"), ("/c", "/d"))
    assert PathMap.of(["/e=/f"]).pairs == (("/e", "/f"),)
    monkeypatch.delenv("XNATMIGRATE_PATH_MAP")
    assert not PathMap.of(None)


def test_a_session_and_a_plan_are_mapped_as_this_host_sees_them():
    from dataclasses import replace

    from xnatmigrate.model import LookupDigest, Plan, PlannedFile, PlannedScan, PlannedScript, XnatTarget
    from xnatmigrate.testing.sessions import prearchive_session

    def f(src: str) -> PlannedFile:
        return PlannedFile(
            src, 10, 20, "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "x.dcm", 30, 40, "h"
        )

    s = prearchive_session((PlannedScan("1", "1.2.3", "1", "MR", (f("/mnt/pacs/a.dcm"), f("/other/b.dcm"))),))
    pm = PathMap.parse(["/mnt/pacs=/data/legacy", "/git/manifests=/home/me/manifests"])
    mapped, kept = pm.session(s).scans[0].files
    assert (mapped.source, mapped.size, mapped.mtime_ns, mapped.header_digest) == (
        "/data/legacy/a.dcm",
        10,
        20,
        "h",
    )
    assert (mapped.ino, mapped.ctime_ns) == (-1, -1)  # another mount may number them otherwise
    assert kept == s.scans[0].files[1]  # outside every prefix: untouched, still bound to its inode
    plan = Plan(
        plan_id="id",
        created="now",
        manifest_path="/git/manifests/m.yaml",
        manifest_digest="d",
        state_serial=0,
        table_profile=None,
        xnat=XnatTarget(),
        sessions=(s,),
        lookups=(LookupDigest("subjects", "/git/manifests/subjects.csv", "mrn", "sha", 3),),
        scripts=(PlannedScript("site", "sha", "text"), PlannedScript("/git/manifests/anon.das", "sha", "t")),
    )
    out = pm.plan(plan)
    assert (out.plan_id, out.manifest_path) == ("id", "/home/me/manifests/m.yaml")
    assert out.lookups[0].file == "/home/me/manifests/subjects.csv"
    assert [sc.name for sc in out.scripts] == ["site", "/home/me/manifests/anon.das"]
    assert out.sessions[0].scans[0].files[0].source == "/data/legacy/a.dcm" and len(out.sessions) == 1
    assert PathMap().plan(plan) is plan  # no map: the plan itself
    assert replace(out, sessions=()).sessions == ()
