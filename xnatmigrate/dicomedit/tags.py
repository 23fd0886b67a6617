"""Tag paths against a pydicom ``Dataset``: matching, reading, writing and deleting attributes.

Semantics follow mizer's dcm4che3 object (danielmarcus/xnat-monorepo, the mizer library's
``MizerDicomObject``): ``getString`` joins multiple values with a backslash and gives null for an absent
attribute (getStrings / joinMultipleValues); ``resolvePrivateTag`` finds a private block by scanning the
creator elements (gggg,0010)…(gggg,00FF) for an equal creator and, when writing, takes the first free
slot for a new one; ``assign`` writes only to a singular path and ignores a null value; ``delete`` visits
every attribute and removes each one the path matches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, get_private_entry, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from xnatmigrate.dicomedit.nodes import HEX_WILDCARDS, TagPath, TagStep

_INT_VRS = frozenset({"US", "UL", "SS", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_MULTI_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "UC"})
_BYTES_VRS = frozenset({"OB", "UN", "OW"})


class TagError(Exception):
    """A tag operation that mizer would fail on, or that xnatmigrate does not implement (message says which)."""


@dataclass(frozen=True)
class Located:
    """An attribute found by a path: the dataset that holds it, its tag, and a readable path for reports."""

    container: Dataset
    tag: int
    name: str


def digit_matches(pattern: str, digit: str) -> bool:
    """DE6Lexer.g4 HEXDIGIT: X any, @ even, # odd, else the same hex digit (case-insensitive)."""
    if pattern == "X":
        return True
    value = int(digit, 16)
    if pattern == "@":
        return value % 2 == 0
    if pattern == "#":
        return value % 2 == 1
    return int(pattern, 16) == value


def word_matches(pattern: str, value: int) -> bool:
    digits = f"{value:0{len(pattern)}X}"
    return all(digit_matches(p, d) for p, d in zip(pattern, digits))


def tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _creator_of(container: Dataset, group: int, block: int) -> str | None:
    elem = container.get((group << 16) | block)
    if elem is None or elem.value is None:
        return None
    return str(elem.value).rstrip(" \x00")


def _candidates(container: Dataset, step: TagStep) -> Iterator[int]:
    """Tags present in ``container`` that ``step`` names, in tag order."""
    if step.creator is None:
        if not (HEX_WILDCARDS & set(step.group + step.element)):
            tag = int(step.group + step.element, 16)
            if tag in container:
                yield tag
            return
        for elem in container:
            tag = int(elem.tag)
            if word_matches(step.group, tag >> 16) and word_matches(step.element, tag & 0xFFFF):
                yield tag
        return
    groups = sorted({int(e.tag) >> 16 for e in container if int(e.tag) >> 16 & 1})
    for group in groups:
        if not word_matches(step.group, group):
            continue
        for block in range(0x10, 0x100):
            if _creator_of(container, group, block) != step.creator:
                continue
            for low in range(0x100):
                tag = (group << 16) | (block << 8) | low
                if word_matches(step.element, low) and tag in container:
                    yield tag


def find(ds: Dataset, path: TagPath) -> Iterator[Located]:
    """Every attribute the path names, depth first, in tag and item order."""

    def walk(container: Dataset, index: int, prefix: str) -> Iterator[Located]:
        step = path.steps[index]
        last = index == len(path.steps) - 1
        for tag in list(_candidates(container, step)):
            name = prefix + tag_name(tag)
            if last:
                yield Located(container, tag, name)
                continue
            elem = container[tag]
            if elem.VR != "SQ" or not elem.value:
                continue
            items = list(enumerate(elem.value))
            if step.item != "%":
                items = [(i, item) for i, item in items if i == step.item]
            for i, item in items:
                yield from walk(item, index + 1, f"{name}[{i}]/")

    yield from walk(ds, 0, "")


def find_one(ds: Dataset, path: TagPath) -> Located | None:
    """The attribute a singular path names, or None when absent (private: the first block, resolvePrivateTag)."""
    return next(find(ds, path), None)


def element_string(elem: DataElement) -> str:
    """mizer ``getString`` of a present attribute: values joined by ``\\``; bytes read as UTF-8."""
    if elem.VR == "SQ":
        raise TagError(f"{tag_name(int(elem.tag))} is a sequence, which has no string value")
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)
        if raw.endswith(b"\x00"):
            raw = raw[:-1]
        return raw.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(_one(v) for v in value)
    return _one(value)


def _one(v: object) -> str:
    original = getattr(v, "original_string", None)
    if isinstance(original, str):
        return original
    return str(v)


def get_string(ds: Dataset, path: TagPath) -> str | None:
    located = find_one(ds, path)
    if located is None:
        return None
    return element_string(located.container[located.tag])


def get_vr(ds: Dataset, path: TagPath) -> str:
    """mizer ``getVR``: the attribute's VR, else the dictionary's, else UN."""
    located = find_one(ds, path)
    if located is not None:
        return str(located.container[located.tag].VR)
    last = path.steps[-1]
    if last.creator is None:
        try:
            return str(dictionary_VR(int(last.group + last.element, 16)))
        except KeyError:
            return "UN"
    return "UN"


def _private_tag(container: Dataset, step: TagStep, create: bool) -> tuple[int, int | None]:
    """resolvePrivateTag: (tag, creator tag added or None). Raises TagError when no slot is free."""
    group = int(step.group, 16)
    low = int(step.element, 16)
    for block in range(0x10, 0x100):
        if _creator_of(container, group, block) == step.creator:
            return (group << 16) | (block << 8) | low, None
    if not create:
        raise TagError(f"no private block {step.creator!r} in group {group:04X}")
    for block in range(0x10, 0x100):
        creator_tag = (group << 16) | block
        if creator_tag not in container:
            container.add_new(creator_tag, "LO", step.creator)
            return (group << 16) | (block << 8) | low, creator_tag
    raise TagError(f"no free private creator slot in group {group:04X} for {step.creator!r}")


def _vr_for_new(tag: int, creator: str | None) -> str:
    try:
        if creator is None:
            vr = str(dictionary_VR(tag))
        else:
            vr = str(get_private_entry(tag, creator)[0])
    except KeyError:
        raise TagError(
            f"{tag_name(tag)} is not in the data dictionary, so its VR is unknown; xnatmigrate does not create "
            "attributes of unknown VR"
        ) from None
    if " or " in vr:
        raise TagError(f"{tag_name(tag)} has an ambiguous VR ({vr}); xnatmigrate does not create it")
    return vr


def _typed(vr: str, value: str) -> object:
    if vr in _SINGLE_TEXT_VRS:
        return value
    if vr in _MULTI_TEXT_VRS:
        parts = value.split("\\")
        return parts if len(parts) > 1 else value
    try:
        if vr in _INT_VRS:
            ints = [int(p) for p in value.split("\\")]
            return ints if len(ints) > 1 else ints[0]
        if vr in _FLOAT_VRS:
            floats = [float(p) for p in value.split("\\")]
            return floats if len(floats) > 1 else floats[0]
    except ValueError:
        raise TagError(f"{value!r} is not a valid {vr} value") from None
    raise TagError(f"xnatmigrate does not assign text to an attribute of VR {vr}")


@dataclass(frozen=True)
class Written:
    """What an assignment did: the attribute's readable path, old string (None: was absent), new string,
    and a private creator element it had to add (its tag and readable path)."""

    tag: int
    name: str
    old: str | None
    new: str
    creator: tuple[int, str] | None


def assign(ds: Dataset, path: TagPath, value: str) -> Written:
    """mizer ``assign``: write ``value`` at a singular path, creating the attribute (and a private block)
    when absent. Every sequence item on the way must exist (xnatmigrate does not create items)."""
    container = ds
    prefix = ""
    for step in path.steps[:-1]:
        if step.creator is None:
            seq_tag = int(step.group + step.element, 16)
        else:
            seq_tag = _private_tag(container, step, create=False)[0]
        elem = container.get(seq_tag)
        assert isinstance(step.item, int)
        if elem is None or elem.VR != "SQ" or len(elem.value) <= step.item:
            raise TagError(
                f"{path.text}: sequence item {prefix}{tag_name(seq_tag)}[{step.item}] does not exist"
            )
        prefix += f"{tag_name(seq_tag)}[{step.item}]/"
        container = elem.value[step.item]
    last = path.steps[-1]
    creator_added: tuple[int, str] | None = None
    if last.creator is None:
        tag = int(last.group + last.element, 16)
    else:
        tag, creator_tag = _private_tag(container, last, create=True)
        if creator_tag is not None:
            creator_added = (creator_tag, prefix + tag_name(creator_tag))
    existing = container.get(tag)
    if existing is not None:
        old: str | None = element_string(existing)
        existing.value = _typed(str(existing.VR), value)
    else:
        old = None
        vr = _vr_for_new(tag, last.creator)
        container.add_new(tag, vr, _typed(vr, value))
    return Written(tag, prefix + tag_name(tag), old, value, creator_added)


def overwrite(located: Located, value: str) -> None:
    """Set the value of an attribute that exists, keeping its VR (mizer putString on a present tag)."""
    elem = located.container[located.tag]
    elem.value = _typed(str(elem.VR), value)


def delete(ds: Dataset, path: TagPath) -> list[Located]:
    """mizer ``delete``: remove every attribute the path matches; returns what was removed."""
    found = list(find(ds, path))
    for located in found:
        del located.container[located.tag]
    return found


def remove_all_private(ds: Dataset) -> list[Located]:
    """``removeAllPrivateTags``: every private attribute (creators included), in sequence items too."""
    removed: list[Located] = []

    def walk(container: Dataset, prefix: str) -> None:
        for elem in list(container):
            tag = int(elem.tag)
            if elem.tag.is_private:
                removed.append(Located(container, tag, prefix + tag_name(tag)))
                del container[tag]
            elif elem.VR == "SQ" and elem.value:
                for i, item in enumerate(elem.value):
                    walk(item, f"{prefix}{tag_name(tag)}[{i}]/")

    walk(ds, "")
    return removed
