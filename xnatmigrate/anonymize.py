"""De-identification of the files the prearchive and C-STORE routes hand XNAT: the plan's DicomEdit scripts,
applied as XNAT applies its site script to a file it receives (GradualDicomImporter:390), before the file
is stored (prearchive) or sent (C-STORE, in memory: the sources are never written).

Shared by the planner (what the scripts do to a study's first file, from its scanned header values) and
by apply (the bytes staged or sent are the edited ones). Invariants:

- The same source bytes, scripts, labels and secret give the same output bytes (dicomedit is
  deterministic), so a rerun re-derives a staged file and compares it instead of trusting a record.
- The attributes the prearchive route names files, scan folders and the row by (``NAMING``: xnat-
  reference.md §2, and the row's ``tag``) must come out unchanged: the plan's paths were computed from the
  values scanned. A script that changes one is refused at plan (from the first file) and, should a
  file still see it changed, fails its session at apply; nothing is named by values the plan did not show.
  The C-STORE route keeps its own set (``cstore_kept``): what the request, the ledger and locate name a
  file and its session by, and what XNAT's identifier routes by when the tool writes no routing line.
- Pixel Data and every attribute the scripts leave alone are written back as read: their bytes are
  copied from the source (``_spliced``), only what the scripts read or set is encoded again (by
  pydicom, in the original encoding), else the whole data set is (``enforce_file_format=False``).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element

from . import dicombytes, dicomedit
from .errors import AnonymizationError, DicomEditError
from .model import PlannedScript, ScriptEdit
from .vocabulary import Routing

# What the prearchive route derives paths and the row from (§2 file names and scan folders; the row's
# tag is the StudyInstanceUID): a script may not change them (see the module docstring).
NAMING = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "SeriesNumber",
    "InstanceNumber",
)
SITE_SCRIPT_NAME = "site"


@dataclass(frozen=True)
class Kept:
    """The attributes a route relies on as planned, which a script may not change, and why (messages)."""

    keywords: tuple[str, ...]
    why: str

    @property
    def tags(self) -> dict[int, str]:
        return _tags_of(self.keywords)


@functools.cache
def _tags_of(keywords: tuple[str, ...]) -> dict[int, str]:
    return {t: k for k in keywords if (t := tag_for_keyword(k)) is not None}


PREARCHIVE_KEPT = Kept(
    NAMING, "which the plan named the file and the row by; nothing of the session was published"
)

# C-STORE: the request names the file by SOPInstanceUID and SOPClassUID (the presentation contexts were
# planned from it) and the ledger records it by that UID; apply finds the session XNAT's receiver made by
# its StudyInstanceUID (the row's tag, GradualDicomImporter groups files by it, §3). Sending under
# anonymised UIDs is not implemented: they must come out unchanged. XNAT names files and scan folders
# itself from what it receives, so SeriesInstanceUID, SeriesNumber and InstanceNumber are free.
_CSTORE_UIDS = ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID")
# What XNAT's identifier routes by (§5, labels.predict_route) when the tool writes no routing line; with
# routing: study_comments, PatientComments, which it reads first. The routing element the tool writes
# itself is written after the scripts ran, so a script's edit of it never reaches XNAT.
_ROUTED_BY = {
    Routing.PATIENT_COMMENTS: (),
    Routing.STUDY_COMMENTS: ("PatientComments",),
    Routing.NONE: (
        "PatientComments",
        "StudyComments",
        "StudyDescription",
        "AccessionNumber",
        "PatientName",
        "PatientID",
    ),
}


def cstore_kept(routing: Routing) -> Kept:
    """What a script may not change on a C-STORE session routed by ``routing`` (see ``_CSTORE_UIDS``)."""
    return Kept(
        _CSTORE_UIDS + _ROUTED_BY[routing],
        "which the C-STORE request, the ledger and locate name the file and its session by"
        + (" or XNAT's receiver routes it by (§5)" if _ROUTED_BY[routing] else "")
        + "; the file was not sent",
    )


def shown_name(name: str) -> str:
    """How messages name a script: XNAT's site script, or the file's name."""
    return "XNAT's site anonymisation script" if name == SITE_SCRIPT_NAME else name


def chain_of(names: Sequence[str], scripts: Mapping[str, PlannedScript]) -> dicomedit.ScriptChain:
    """The scripts ``names`` in order, parsed (DicomEditError naming the script and line)."""
    return dicomedit.combine(*(_parsed(scripts[n]) for n in names))


_PARSED: dict[str, dicomedit.Script] = {}


def _parsed(script: PlannedScript) -> dicomedit.Script:
    hit = _PARSED.get(script.sha256)
    if hit is None:
        hit = _PARSED[script.sha256] = dicomedit.parse(script.text, shown_name(script.name))
    return hit


def variables(project: str | None, subject: str | None, session: str) -> dict[str, str]:
    """What XNAT hands its scripts (BaseMizerService.createContext): project ("Unassigned" for none),
    subject and session labels."""
    out = {"project": project or "Unassigned", "session": session}
    if subject:
        out["subject"] = subject
    return out


def read_keywords(script: dicomedit.Script | dicomedit.ScriptChain) -> frozenset[str]:
    """The keywords of the plain top-level attributes a script names: the scan reads them, so the
    plan's preview sees their values."""
    scripts = script.scripts if isinstance(script, dicomedit.ScriptChain) else (script,)
    out: set[str] = set()
    for s in scripts:
        for path in _paths(s.statements):
            if len(path.steps) != 1 or not path.singular:
                continue
            step = path.steps[0]
            if step.creator is not None:
                continue
            keyword = keyword_for_tag(int(step.group + step.element, 16))
            if keyword:
                out.add(keyword)
    return frozenset(out)


def _paths(node: object) -> Iterator[dicomedit.nodes.TagPath]:
    if isinstance(node, dicomedit.nodes.TagPath):
        yield node
    elif isinstance(node, tuple | list):
        for item in node:
            yield from _paths(item)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            yield from _paths(getattr(node, f.name))


def dataset_of(values: Mapping[str, str]) -> Dataset:
    """A data set holding the scanned header values (strings, as the scan keeps them) with their VRs."""
    ds = Dataset()
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        try:
            vr = dictionary_VR(tag)
            if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
                parsed: object = [int(v) for v in value.split("\\")] if value else None
            elif vr in ("FL", "FD"):
                parsed = [float(v) for v in value.split("\\")] if value else None
            elif vr == "SQ":
                continue
            else:
                parsed = value.split("\\") if "\\" in value else value
            ds.add_new(tag, vr.split(" or ")[0], parsed)
        except (KeyError, ValueError, TypeError):
            continue  # a value the dictionary cannot hold as read: the preview goes without it
    return ds


def preview(
    chain: dicomedit.ScriptChain,
    values: Mapping[str, str],
    labels: Mapping[str, str],
    secret: str | None,
    kept: Kept = PREARCHIVE_KEPT,
) -> tuple[tuple[ScriptEdit, ...], list[str]]:
    """What the scripts do to a file with these header values: the edits, and the ``kept`` keywords changed.

    Raises DicomEditError when a script fails on them (as XNAT would fail the file).
    """
    ds = dataset_of(values)
    changes = chain.apply(ds, labels, secret=secret)
    edits = tuple(ScriptEdit(c.name, c.action, c.value) for c in changes)
    tags = kept.tags
    renamed = sorted(
        {tags[c.tag] for c in changes if c.tag in tags and values.get(tags[c.tag]) != _text(ds, c.tag)}
    )
    return edits, renamed


def edit_bytes(
    chain: dicomedit.ScriptChain,
    data: bytes,
    labels: Mapping[str, str],
    secret: str | None,
    what: str,
    kept: Kept = PREARCHIVE_KEPT,
) -> bytes:
    """The file ``data`` with the scripts applied, encoded as it was read (Pixel Data untouched).

    Raises AnonymizationError when a ``kept`` attribute changed or a script fails on the file, naming
    ``what`` (the source file).
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on bad input
        raise AnonymizationError(
            f"cannot read {what} to anonymise it: {exc}; re-run `xnatmigrate plan`"
        ) from None
    tags = kept.tags
    before = {tag: _text(ds, tag) for tag in tags}
    try:
        chain.apply(ds, labels, secret=secret)
    except DicomEditError as exc:
        raise AnonymizationError(f"{exc} (on {what})") from None
    renamed = sorted(tags[t] for t in tags if _text(ds, t) != before[t])
    if renamed:
        raise AnonymizationError(
            f"the anonymisation script changes {', '.join(renamed)} of {what}, {kept.why}: fix the script, "
            "then re-run plan"
        )
    spliced = _spliced(ds, data)
    return spliced if spliced is not None else _written(ds)


@dataclass(frozen=True)
class SessionEdit:
    """One session's de-identification as apply hands it to the C-STORE sender: its scripts in order with
    the text the plan pinned, the labels XNAT hands them (``variables``), the secret, and what must stay.

    Picklable, so worker processes get it; each parses a script once (by SHA-256, ``_parsed``). The
    secret is left out of the repr: the object may reach a log or a traceback.
    """

    scripts: tuple[PlannedScript, ...]
    labels: tuple[tuple[str, str], ...]
    kept: Kept
    secret: str | None = field(default=None, repr=False)

    def __call__(self, data: bytes, what: str) -> bytes:
        """``edit_bytes`` of ``data`` (the file ``what``) with this session's scripts."""
        chain = chain_of([sc.name for sc in self.scripts], {sc.name: sc for sc in self.scripts})
        return edit_bytes(chain, data, dict(self.labels), self.secret, what, self.kept)


def session_edit(
    names: Sequence[str],
    scripts: Mapping[str, PlannedScript],
    labels: Mapping[str, str],
    secret: str | None,
    kept: Kept,
) -> SessionEdit:
    """The ``SessionEdit`` of a session naming ``names`` of the plan's ``scripts``."""
    return SessionEdit(tuple(scripts[n] for n in names), tuple(sorted(labels.items())), kept, secret)


def _written(ds: Dataset) -> bytes:
    """``ds`` encoded whole by pydicom, as it was read (``enforce_file_format=False``)."""
    out = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(out, enforce_file_format=False)
    else:  # pydicom 2.4
        ds.save_as(out, write_like_original=True)
    return out.getvalue()


def _spliced(ds: Dataset, data: bytes) -> bytes | None:
    """``_written(ds)`` without re-encoding what the scripts left alone: each top-level element pydicom
    still holds raw (never read nor set) is copied from ``data`` at its offset, the others are encoded
    by pydicom's own element writer, in tag order, group lengths left out as pydicom leaves them out.
    Equal to ``_written(ds)`` byte for byte for a file whose elements pydicom would write back as they
    are (tests compare both), in about two thirds of the time (bench/notes.md). None where that cannot
    be had this way (no file meta, a deflated or re-encoded data set, bytes the walker cannot follow).
    """
    if int(pydicom.__version__.split(".")[0]) < 3 or data[128:132] != b"DICM":
        return None
    implicit, little = ds.original_encoding
    if implicit is None or little is None or ds.original_character_set != ds._character_set:
        return None
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if ts == dicombytes.DEFLATED_EXPLICIT_VR_LE or dicombytes.encoding(ts) != (implicit, little):
        return None
    found = _top_level_spans(data, implicit, little)
    if found is None:
        return None
    meta_end, spans = found
    if _meta_length_holds(data, meta_end):
        # The scripts edit the data set, never the file meta (dicomedit), and pydicom would write these
        # same elements with this same group length: the preamble and file meta as they were.
        head = data[:meta_end]
    else:
        shell = Dataset()
        shell.file_meta = ds.file_meta
        shell.preamble = ds.preamble
        shell.set_original_encoding(implicit, little, ds.original_character_set)
        head = _written(shell)  # preamble and file meta, exactly as the whole write makes them
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    encodings = ds.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # pydicom does not write retired group lengths (PS3.5 7.2)
        item = ds.get_item(tag)
        span = spans.get(int(tag))
        if item is not None and item.is_raw and span is not None:
            fp.write(data[span[0] : span[1]])
        else:
            write_data_element(fp, ds[tag], encodings)
    return head + fp.getvalue()


def _meta_length_holds(data: bytes, meta_end: int) -> bool:
    """The file meta starts with (0002,0000) UL whose value is the length of the rest of the meta."""
    if meta_end < 144 or data[132:138] != b"\x02\x00\x00\x00UL" or data[138:140] != b"\x04\x00":
        return False
    return int.from_bytes(data[140:144], "little") == meta_end - 144


def _top_level_spans(
    data: bytes, implicit: bool, little: bool
) -> tuple[int, dict[int, tuple[int, int]]] | None:
    """Where the file meta ends, and (start, end) of each top-level data-set element of a Part 10 file;
    None when the walker cannot follow the bytes."""
    pos, end = 132, len(data)
    try:
        while pos + 4 <= end and dicombytes.read_tag(data, pos, True) >> 16 == 0x0002:
            pos = dicombytes.skip_element(data, pos, end, False, True)  # file meta: explicit VR LE
        meta_end = pos
        spans: dict[int, tuple[int, int]] = {}
        while pos < end:
            tag = dicombytes.read_tag(data, pos, little)
            nxt = dicombytes.skip_element(data, pos, end, implicit, little)
            spans[tag] = (pos, nxt)
            pos = nxt
    except (dicombytes.Malformed, struct.error):
        return None
    return meta_end, spans


def _text(ds: Dataset, tag: int) -> str | None:
    elem = ds.get(tag)
    return None if elem is None or elem.value is None else str(elem.value)
