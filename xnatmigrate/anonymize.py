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
- ``edit_split`` gives those same bytes without parsing the whole data set: when the scripts name
  attributes one by one (``_reads``), pydicom parses only those (``_edited_part``), a study's files
  share the outcome (``_MEMO``), and what follows the last element edited is left in the source's
  bytes for the caller to pass on (the sender never copies Pixel Data). Anything it cannot be sure of
  takes the whole parse (``_edited_whole``); tests/unit/test_anonymize.py holds the two equal.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import struct
from collections.abc import Iterator, Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import cast

import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag

from . import dicombytes, dicomedit
from .dicomedit.parser import Refused, parse_path_text
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
    """The scripts ``names`` in order, parsed (DicomEditError naming the script and line); the same
    object for the same scripts, so what ``edit_split`` works out of a chain is worked out once."""
    planned = tuple(scripts[n] for n in names)
    key = tuple((sc.sha256, sc.name) for sc in planned)
    hit = _CHAINS.get(key)
    if hit is None:
        hit = dicomedit.combine(*(_parsed(sc) for sc in planned))
        if len(_CHAINS) >= _CACHED:
            _CHAINS.clear()
        _CHAINS[key] = hit
    return hit


_CACHED = 256  # chains (and what the splice reads of each) kept per process
_CHAINS: dict[tuple[tuple[str, str], ...], dicomedit.ScriptChain] = {}


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
    head, rest = edit_split(chain, data, labels, secret, what, kept)
    return head if rest == len(data) else b"".join((head, memoryview(data)[rest:]))


def edit_split(
    chain: dicomedit.ScriptChain,
    data: bytes,
    labels: Mapping[str, str],
    secret: str | None,
    what: str,
    kept: Kept = PREARCHIVE_KEPT,
) -> tuple[bytes, int]:
    """``edit_bytes`` as ``(head, rest)``: the edited file is ``head`` followed by ``data[rest:]``, the
    source's own bytes from the first element after the last one the scripts touched (Pixel Data, in
    most files), so a caller that sends or writes pieces never copies them.

    When the scripts name only plain top-level attributes (``_reads``), pydicom parses only those
    (and what it consults itself), cut out of ``data``; the rest is walked, never decoded. The bytes are
    those of the whole parse (``_edited_whole``); files and scripts it cannot be sure of take that.
    """
    reads = _reads(chain, kept)
    if reads is not None:
        done = _edited_part(chain, data, labels, secret, what, kept, reads)
        if done is not None:
            return done
    return _edited_whole(chain, data, labels, secret, what, kept), len(data)


def _edited_whole(
    chain: dicomedit.ScriptChain,
    data: bytes,
    labels: Mapping[str, str],
    secret: str | None,
    what: str,
    kept: Kept,
) -> bytes:
    """The whole data set parsed by pydicom, edited, then spliced (``_spliced``) or written whole."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on bad input
        raise AnonymizationError(
            f"cannot read {what} to anonymise it: {exc}; re-run `xnatmigrate plan`"
        ) from None
    failure = _failure(chain, ds, labels, secret, kept)
    if failure is not None:
        raise AnonymizationError(what.join(failure))
    spliced = _spliced(ds, data)
    return spliced if spliced is not None else _written(ds)


def _failure(
    chain: dicomedit.ScriptChain,
    ds: Dataset,
    labels: Mapping[str, str],
    secret: str | None,
    kept: Kept,
) -> tuple[str, str] | None:
    """The scripts applied to ``ds``; when one fails or a ``kept`` attribute changed, the message as
    (before, after) the file's name."""
    tags = kept.tags
    before = {tag: _text(ds, tag) for tag in tags}
    try:
        chain.apply(ds, labels, secret=secret)
    except DicomEditError as exc:
        return f"{exc} (on ", ")"
    renamed = sorted(tags[t] for t in tags if _text(ds, t) != before[t])
    if renamed:
        return (
            f"the anonymisation script changes {', '.join(renamed)} of ",
            f", {kept.why}: fix the script, then re-run plan",
        )
    return None


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

    def __call__(self, data: bytes, what: str) -> tuple[bytes, int]:
        """``edit_split`` of ``data`` (the file ``what``) with this session's scripts: the edited file is
        the head returned, then ``data`` from the offset returned."""
        chain = chain_of([sc.name for sc in self.scripts], {sc.name: sc for sc in self.scripts})
        return edit_split(chain, data, dict(self.labels), self.secret, what, self.kept)


def session_edit(
    names: Sequence[str],
    scripts: Mapping[str, PlannedScript],
    labels: Mapping[str, str],
    secret: str | None,
    kept: Kept,
) -> SessionEdit:
    """The ``SessionEdit`` of a session naming ``names`` of the plan's ``scripts``, its chain parsed here
    already (the sender's worker processes fork with it)."""
    chain_of(names, scripts)
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
    head = _head(ds, data, meta_end)
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


def _head(ds: Dataset, data: bytes, meta_end: int) -> bytes:
    """The preamble and file meta of the edited file, as ``_written(ds)`` begins."""
    if _meta_length_holds(data, meta_end):
        # The scripts edit the data set, never the file meta (dicomedit), and pydicom would write these
        # same elements with this same group length: the preamble and file meta as they were.
        return data[:meta_end]
    implicit, little = ds.original_encoding
    shell = Dataset()
    shell.file_meta = ds.file_meta
    shell.preamble = ds.preamble
    shell.set_original_encoding(implicit, little, ds.original_character_set)
    return _written(shell)  # preamble and file meta, exactly as the whole write makes them


# What pydicom consults of a data set besides the attributes the scripts name: the character set (to
# decode and encode every text value; ``_spliced`` encodes with it), the SOP Instance UID
# (``Script.apply``: newUID derives from it) and Pixel Representation (read as a sequence is decoded, for
# the US or SS of its items).
_CHARSET, _SOP_INSTANCE, _PIXEL_REPRESENTATION = 0x00080005, 0x00080018, 0x00280103


@dataclass(frozen=True, eq=False)
class _Reads:
    """What an edit by one chain, keeping ``kept``, needs of a file (``_reads``).

    ``tags``: the top-level elements pydicom must see for the scripts to do what they do to the whole
    data set. ``keyed``: those the scripts' outcome depends on (what they name, the character set,
    Pixel Representation, the SOP Instance UID when a script derives UIDs): files equal in these get the
    same outcome (``_MEMO``). ``read``: the rest of ``tags``, which are only read (and so encoded again
    by pydicom, ``_again``). ``memo``: whether outcomes may be reused (no ``echo``, which logs per file).
    Compared by identity: a memo key holds it, so it is never mistaken for another chain's.
    """

    tags: frozenset[int]
    keyed: tuple[int, ...]
    read: frozenset[int]
    memo: bool


_READS: dict[tuple[int, Kept], tuple[dicomedit.ScriptChain, _Reads | None]] = {}


def _reads(chain: dicomedit.ScriptChain, kept: Kept) -> _Reads | None:
    """What ``chain`` keeping ``kept`` needs of a file (``_Reads``), or None when that cannot be told
    from the scripts (``_named``). Worked out once per chain (``chain_of`` gives the same object for the
    same scripts)."""
    key = (id(chain), kept)
    hit = _READS.get(key)
    if hit is not None and hit[0] is chain:
        return hit[1]
    named = _named(chain)
    reads: _Reads | None = None
    if named is not None and _CHARSET not in named[0] and all(map(_plain, kept.tags)):
        tags, derives, echoes = named
        keyed = tags | {_CHARSET, _PIXEL_REPRESENTATION} | ({_SOP_INSTANCE} if derives else set())
        read = (set(kept.tags) | {_SOP_INSTANCE}) - keyed
        reads = _Reads(frozenset(keyed | read), tuple(sorted(keyed)), frozenset(read), not echoes)
    if len(_READS) >= _CACHED:
        _READS.clear()
    _READS[key] = (chain, reads)
    return reads


def _named(chain: dicomedit.ScriptChain) -> tuple[set[int], bool, bool] | None:
    """The top-level tags the scripts' tag paths start at (a sequence's tag for a path into it), whether
    a script calls ``newUID`` and whether one echoes; None when a script may reach attributes no path
    names one by one: ``removeAllPrivateTags``, a digit wildcard or a private creator in a path's first
    step (pydicom's iteration decodes every element), a ``mapReferencedUIDs`` path computed at run
    time, or an attribute ``_plain`` refuses."""
    out: set[int] = set()
    seen = {"newUID": False, "echo": False}

    def path(p: dicomedit.nodes.TagPath) -> bool:
        first = p.steps[0]
        if first.creator is not None or dicomedit.nodes.HEX_WILDCARDS & set(first.group + first.element):
            return False
        tag = int(first.group + first.element, 16)
        out.add(tag)
        return _plain(tag)

    def visit(node: object) -> bool:
        if isinstance(node, dicomedit.nodes.RemoveAllPrivateTags):
            return False
        if isinstance(node, dicomedit.nodes.TagPath):
            return path(node)
        if isinstance(node, dicomedit.nodes.Echo):
            seen["echo"] = True
        if isinstance(node, dicomedit.nodes.Call):
            seen["newUID"] |= node.name == "newUID"
            if node.name == "mapReferencedUIDs":
                for arg in node.args[1:]:
                    if isinstance(arg, dicomedit.nodes.Str):
                        try:
                            if not path(parse_path_text(arg.value, node.line)):
                                return False
                        except Refused:
                            return False  # the whole parse fails the file, as it always did
                    elif not isinstance(arg, dicomedit.nodes.TagRef):
                        return False
        if isinstance(node, tuple | list):
            return all(visit(item) for item in node)
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return all(visit(getattr(node, f.name)) for f in dataclasses.fields(node))
        return True

    if not all(visit(s.statements) for s in chain.scripts):
        return None
    return out, seen["newUID"], seen["echo"]


def _plain(tag: int) -> bool:
    """A public data-set attribute whose decoding needs nothing else of the data set: not a private
    tag (its VR comes from its creator), not the file meta or an item tag, and not of a VR pydicom
    settles from other attributes (US or SS, OB or OW, …)."""
    group = tag >> 16
    if group & 1 or group < 0x0008 or group >= 0xFFFE:
        return False
    try:
        return " or " not in dictionary_VR(tag)
    except KeyError:
        return True  # not in the dictionary: UN when implicit, as written when explicit


_COPY = b""  # an outcome: the element's bytes copied as they are


@dataclass(frozen=True)
class _Outcome:
    """What the scripts did to the ``_Reads.keyed`` elements of a file, to be had again for any file
    equal in them: per tag, its bytes (``_COPY``: as they were; None: gone), the elements added, and
    what the read-only elements are decoded and encoded with (``_again``); or the failure (the message
    before and after the file's name, ``_failure``) or that the whole parse must decide (``fallback``)."""

    elements: dict[int, bytes | None]
    added: tuple[tuple[int, bytes], ...]
    decode: str | MutableSequence[str]
    encode: object
    failure: tuple[str, str] | None = None
    fallback: bool = False


_MEMO: dict[tuple[object, ...], _Outcome] = {}
_MEMO_LIMIT = 4096


def _edited_part(
    chain: dicomedit.ScriptChain,
    data: bytes,
    labels: Mapping[str, str],
    secret: str | None,
    what: str,
    kept: Kept,
    reads: _Reads,
) -> tuple[bytes, int] | None:
    """``edit_split`` with pydicom parsing only the elements in ``reads.tags`` (and the first, whose VR
    tells pydicom the encoding, and any of undefined length, which it decodes as it reads), cut out of
    ``data``; every other element is walked, and copied as it is. The scripts' outcome is reused for
    the next file equal in the elements it depends on (``_MEMO``: the files of a study share the
    patient's and the study's attributes). None where the whole parse must decide: what ``_spliced``
    refuses, bytes out of tag order, an item tag at the top level."""
    if int(pydicom.__version__.split(".")[0]) < 3 or data[128:132] != b"DICM":
        return None
    walked = _walk(data)
    if walked is None:
        return None
    meta_end, ts, ts_raw, elements = walked
    implicit, little = dicombytes.encoding(ts)
    memo = (
        reads.memo
        and not any(e[3] for e in elements)  # decoded as read: the whole parse encodes them
        and _meta_length_holds(data, meta_end)
        and (
            not elements
            or dicombytes.looks_explicit(data[elements[0][1] + 4 : elements[0][1] + 6]) != implicit
        )
    )
    key: tuple[object, ...] = ()
    if memo:
        where = {e[0]: e for e in elements}
        held = tuple(data[where[t][1] : where[t][2]] if t in where else None for t in reads.keyed)
        # The secret as Script.apply takes it (the environment's when none is given).
        effective = secret if secret is not None else os.environ.get(dicomedit.SECRET_ENV)
        key = (reads, tuple(sorted(labels.items())), effective, ts_raw, held)
        outcome = _MEMO.get(key)
        if outcome is not None:
            return _from_outcome(outcome, data, meta_end, elements, implicit, little, reads, what)
    view = memoryview(data)
    parts = [view[:meta_end]]
    loaded: set[int] = set()
    for i, (tag, start, end, undefined) in enumerate(elements):
        if not i or undefined or tag in reads.tags:
            parts.append(view[start:end])
            loaded.add(tag)
    try:
        ds = pydicom.dcmread(io.BytesIO(b"".join(parts)), force=True)
    except Exception:  # pydicom raises many types on bad input: the whole parse says what
        return None
    if (
        ds.original_encoding != (implicit, little)
        or str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "") != ts
    ):
        return None
    failure = _failure(chain, ds, labels, secret, kept)
    if failure is not None:
        if memo:
            _remember(key, _Outcome({}, (), "", None, failure=failure))
        raise AnonymizationError(what.join(failure))
    fallback = ds.original_character_set != ds._character_set
    encodings = ds.get("SpecificCharacterSet", default_encoding)  # decodes it, as the whole splice does
    added = [int(t) for t in sorted(ds.keys()) if int(t) not in loaded]  # keys: iterating decodes all
    fallback = fallback or any(t not in reads.tags for t in added)  # set where no path names it
    if fallback:
        if memo:
            _remember(key, _Outcome({}, (), "", None, fallback=True))
        return None

    def encoded(tag: int) -> bytes | None:
        item = ds.get_item(tag)
        if item is None:
            return None
        if item.is_raw:
            return _COPY
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_data_element(fp, ds[tag], encodings)
        return fp.getvalue()

    new = tuple((t, encoded(t) or b"") for t in added)
    if memo:
        outcome = _Outcome(
            {t: encoded(t) for t in reads.keyed},
            new,
            ds.original_character_set or ds._character_set,
            encodings,
        )
        _remember(key, outcome)
        return _from_outcome(outcome, data, meta_end, elements, implicit, little, reads, what)
    head = _head(ds, data, meta_end)
    return _assembled(head, data, elements, {t: encoded(t) for t in loaded}, new)


def _remember(key: tuple[object, ...], outcome: _Outcome) -> None:
    if len(_MEMO) >= _MEMO_LIMIT:
        _MEMO.clear()
    _MEMO[key] = outcome


def _from_outcome(
    outcome: _Outcome,
    data: bytes,
    meta_end: int,
    elements: list[tuple[int, int, int, bool]],
    implicit: bool,
    little: bool,
    reads: _Reads,
    what: str,
) -> tuple[bytes, int] | None:
    """The edited file of a remembered outcome: its elements, the read-only ones encoded again."""
    if outcome.failure is not None:
        raise AnonymizationError(what.join(outcome.failure))
    if outcome.fallback:
        return None
    decided: dict[int, bytes | None] = dict(outcome.elements)
    for tag, start, end, _ in elements:
        if tag in reads.read:
            again = _again(data, tag, start, end, implicit, little, outcome.decode, outcome.encode)
            if again is None:
                return None
            decided[tag] = again
    return _assembled(data[:meta_end], data, elements, decided, outcome.added)


_UI = "UI"
_REENCODED: dict[tuple[object, ...], bytes] = {}


def _again(
    data: bytes,
    tag: int,
    start: int,
    end: int,
    implicit: bool,
    little: bool,
    decode: str | MutableSequence[str],
    encode: object,
) -> bytes | None:
    """A top-level element only read (decoded by pydicom, so written again by its element writer), as
    that makes it: ``_COPY`` for a UID it would write as it is, else what pydicom writes (remembered
    by the element's bytes: the study's UID is the same in all its files). None for a VR whose
    decoding needs the rest of the data set (a sequence, an ambiguous VR)."""
    if implicit:
        head = 8
        try:
            vr: str | None = None
            known = str(dictionary_VR(tag))
        except KeyError:
            known = "UN"
    else:
        raw_vr = data[start + 4 : start + 6]
        head = 12 if raw_vr in dicombytes.LONG_LENGTH_VRS else 8
        vr = known = raw_vr.decode("ascii")
    if known == _UI:
        value = data[start + head : end]
        stripped = value.rstrip(b"\0 ")
        if stripped + (b"\0" if len(stripped) % 2 else b"") == value:
            return _COPY  # convert_UI strips the padding, write_UI pads with one NUL: the same bytes
    if known == "SQ" or known == "UN" or " or " in known:
        return None
    key = (data[start:end], implicit, little, str(decode), str(encode))
    hit = _REENCODED.get(key)
    if hit is None:
        value = data[start + head : end]
        # As pydicom's reader makes it (filereader.data_element_generator).
        raw = RawDataElement(
            BaseTag(tag),
            vr,
            end - start - head,
            value if value else cast(bytes | None, empty_value_for_VR(vr, raw=True)),
            start + head,
            implicit,
            little,
        )
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_data_element(fp, convert_raw_data_element(raw, encoding=decode), encode)  # type: ignore[arg-type]
        hit = fp.getvalue()
        if len(_REENCODED) >= _MEMO_LIMIT:
            _REENCODED.clear()
        _REENCODED[key] = hit
    return hit


def _assembled(
    head: bytes,
    data: bytes,
    elements: list[tuple[int, int, int, bool]],
    decided: Mapping[int, bytes | None],
    added: Sequence[tuple[int, bytes]],
) -> tuple[bytes, int]:
    """``head``, then the data set in tag order: each element of ``data`` as ``decided`` (bytes, None:
    gone, ``_COPY`` or not decided: as it is), ``added`` where they belong, no retired group lengths
    (as ``_spliced``); the elements copied up to the end left in ``data`` (the offset returned)."""
    plan: list[tuple[int, int, int, bytes]] = []  # (tag, start, end, b"") copied, (tag, -1, -1, bytes)
    pending = iter(added)
    new = next(pending, None)
    for tag, start, end, _ in elements:
        while new is not None and new[0] < tag:
            plan.append((new[0], -1, -1, new[1]))
            new = next(pending, None)
        got = decided.get(tag, _COPY)
        if got is None:
            continue
        plan.append((tag, -1, -1, got) if got else (tag, start, end, b""))
    while new is not None:
        plan.append((new[0], -1, -1, new[1]))
        new = next(pending, None)
    plan = [p for p in plan if p[0] & 0xFFFF or p[0] >> 16 <= 6]  # no retired group lengths (_spliced)
    rest, k = len(data), len(plan)
    while k and plan[k - 1][2] == rest:  # the elements copied up to the end stay where they are
        k -= 1
        rest = plan[k][1]
    view = memoryview(data)
    return b"".join([head, *(view[p[1] : p[2]] if p[1] >= 0 else p[3] for p in plan[:k])]), rest


def _walk(data: bytes) -> tuple[int, str, bytes, list[tuple[int, int, int, bool]]] | None:
    """Where the file meta of a Part 10 file ends, its transfer syntax (as text and as stored), and
    (tag, start, end, undefined
    length) of each top-level data-set element, in strictly ascending tag order; None when the walker
    cannot follow the bytes (as ``_top_level_spans``), there is no transfer syntax, the data set is
    deflated, the tags are not in order or an item tag stands at the top level (pydicom would reorder
    or stop)."""
    pos, end = 132, len(data)
    ts: str | None = None
    ts_raw = b""
    elements: list[tuple[int, int, int, bool]] = []
    try:
        while pos + 4 <= end and dicombytes.read_tag(data, pos, True) >> 16 == 0x0002:
            nxt = dicombytes.skip_element(data, pos, end, False, True)  # file meta: explicit VR LE
            if dicombytes.read_tag(data, pos, True) == 0x00020010:
                head, _, length = dicombytes.element_header(data, pos, end, False, True)
                ts_raw = data[pos + head : pos + head + length]
                ts = ts_raw.rstrip(b"\0 ").decode("ascii", "replace")
            pos = nxt
        meta_end = pos
        if ts is None or ts == dicombytes.DEFLATED_EXPLICIT_VR_LE:
            return None
        implicit, little = dicombytes.encoding(ts)
        unpack_tag = dicombytes.TAG[little].unpack_from
        unpack_u32 = dicombytes.UINT32[little].unpack_from
        unpack_u16 = dicombytes.UINT16[little].unpack_from
        long_vrs = dicombytes.LONG_LENGTH_VRS
        undefined_length = dicombytes.UNDEFINED_LENGTH
        last = -1
        # The headers read inline (as dicombytes.skip_element reads them), once per element of every
        # file edited; an undefined length is walked by skip_element itself.
        while pos < end:
            if pos + 8 > end:
                return None
            group, elem = unpack_tag(data, pos)
            tag = group << 16 | elem
            if tag <= last or group >= 0xFFFE:
                return None
            last = tag
            if implicit:
                (length,) = unpack_u32(data, pos + 4)
                head = 8
            else:
                vr = data[pos + 4 : pos + 6]
                if vr in long_vrs:
                    if pos + 12 > end:
                        return None
                    (length,) = unpack_u32(data, pos + 8)
                    head = 12
                elif vr.isalpha() and vr.isupper():
                    (length,) = unpack_u16(data, pos + 6)
                    head = 8
                else:
                    return None
            if length == undefined_length:
                nxt = dicombytes.skip_element(data, pos, end, implicit, little)
            else:
                nxt = pos + head + length
                if nxt > end:
                    return None
            elements.append((tag, pos, nxt, length == undefined_length))
            pos = nxt
    except (dicombytes.Malformed, struct.error):
        return None
    return meta_end, ts, ts_raw, elements


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
