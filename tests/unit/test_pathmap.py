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
