"""``build_plan``: headers + manifest + state + facts about XNAT → a frozen Plan.

PURE: this module reads no file, database or network and writes nothing. Everything it needs is
handed in (``StateReader`` is read-only; ``XnatFacts`` was gathered beforehand), so the same inputs
always give the same plan, and tests drive it without any service.

Findings about one study hold that study back (``HeldBack``); findings about the whole target
refuse the plan (``PlanError``). Nothing is dropped silently: every scanned file ends up planned,
rejected, held back or unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypedDict

from . import anonymize, dicomedit, labels, site_rules, xnat_table
from .errors import DicomEditError, PlanError
from .model import (
    Build,
    CstoreSession,
    FileHeader,
    HeldBack,
    InboxSession,
    LookupMatch,
    LookupTable,
    Manifest,
    Method,
    Plan,
    PlannedFile,
    PlannedScan,
    PlannedScript,
    PlannedSession,
    PrearchiveSession,
    PresentationContext,
    Reject,
    Routing,
    SessionState,
    SourceSpec,
    Transfer,
    UnchangedSession,
    XnatFacts,
    header_digest,
    session_shell,
    unreachable,
    with_plan_id,
)
from .state import AppliedSession

# A file's rendered (raw) label triple: project, subject, session.
_Raw = tuple[str | None, str | None, str]
# Per (source index, StudyInstanceUID) with a file kept: the paths of its files that
# `where` or a missing value rejected, the distinct label triples its files render to (one, unless
# the files disagree) and the lookup rows their labels used. NOTE: no list of files: a study's files
# are read again from the ``StudySource`` when needed (100,000s of files, a few thousand studies).
_Groups = dict[tuple[int, str], tuple[frozenset[str], set[_Raw], set[LookupMatch]]]
# Per study: the first lookup miss of its files (the study is held back, naming it).
_Misses = dict[tuple[int, str], labels.LookupMiss]


class StudySource(Protocol):
    """The scanned files, one study at a time (``scan.ScanResult``, or ``HeaderStudies`` of a list).

    Re-iterable: ``studies`` may be called more than once, ``files_of`` as often as needed.
    """

    def studies(self) -> Iterable[tuple[int, str]]:
        """(source index, StudyInstanceUID) of every study, sorted."""
        ...

    def files_of(self, source_index: int, study_uid: str) -> Sequence[FileHeader]:
        """That study's files, sorted by path."""
        ...


class HeaderStudies:
    """A ``StudySource`` over headers held in memory (tests, small callers)."""

    def __init__(self, headers: Iterable[tuple[int, FileHeader]]) -> None:
        groups: dict[tuple[int, str], list[FileHeader]] = defaultdict(list)
        for idx, h in headers:
            groups[(idx, h.study_uid)].append(h)
        self._groups = {k: sorted(v, key=lambda h: h.path) for k, v in sorted(groups.items())}

    def studies(self) -> Iterator[tuple[int, str]]:
        return iter(self._groups)

    def files_of(self, source_index: int, study_uid: str) -> Sequence[FileHeader]:
        return self._groups.get((source_index, study_uid), [])


class SessionSink(Protocol):
    """Where the planner puts each session as it is made (``model.SessionSpool``: a file, so a plan's
    sessions are never all in memory); ``sessions()`` gives them back, in order, once all are in."""

    def append(self, session: PlannedSession) -> None: ...

    def sessions(self) -> Sequence[PlannedSession]: ...

    def shells(self) -> Sequence[PlannedSession]:
        """The sessions appended, each without its files (``model.session_shell``)."""
        ...


class _ListSink:
    def __init__(self) -> None:
        self._items: list[PlannedSession] = []

    def append(self, session: PlannedSession) -> None:
        self._items.append(session)

    def sessions(self) -> tuple[PlannedSession, ...]:
        return tuple(self._items)

    def shells(self) -> list[PlannedSession]:
        return [session_shell(s) for s in self._items]


class StateReader(Protocol):
    """The read-only part of the state the planner may see."""

    @property
    def serial(self) -> int: ...

    def timestamp_for(self, project: str | None, session: str, study_uid: str) -> str | None: ...

    def all_timestamps(self) -> set[str]: ...

    def sessions(self) -> list[AppliedSession]:
        """The sessions of the ledger; their ``sources`` may be left empty (``sources_of``)."""
        ...

    def sources_of(self, action_id: str) -> tuple[str, ...]:
        """The source files of one of them."""
        ...


@dataclass(frozen=True)
class _Study:
    """One study of one source, with its labels resolved."""

    source: SourceSpec
    study_uid: str
    load: Callable[[], tuple[FileHeader, ...]]  # its files, sorted by path, read again on each call
    project: str | None
    subject: str | None
    session: str
    raw: dict[str, str]
    mapped_by: tuple[LookupMatch, ...] = ()

    @property
    def key(self) -> tuple[str | None, str, str]:
        return (self.project, self.session, self.study_uid)

    @property
    def files(self) -> tuple[FileHeader, ...]:
        """Read from the ``StudySource`` each time: hold the result only as long as it is used."""
        return self.load()

    @property
    def first(self) -> FileHeader:
        """Its first file by path (read with the others: use ``files[0]`` where those are at hand)."""
        return self.load()[0]


def build_plan(
    manifest: Manifest,
    headers: Sequence[tuple[int, FileHeader]] | StudySource,
    scan_rejects: Sequence[Reject],
    state: StateReader,
    facts: XnatFacts,
    now: datetime,
    scan_keywords: Iterable[str] = (),
    scan_warnings: Iterable[str] = (),
    secret: str | None = None,
) -> Plan:
    """Plan the migration. PURE (see module docstring); raises PlanError when refused.

    ``scan_keywords`` are the keywords the scan read; the plan keeps them so apply can read each
    file's header again and compare it with the one planned (``PlannedFile.header_digest``).
    """
    return with_plan_id(
        draft_plan(manifest, headers, scan_rejects, state, facts, now, scan_keywords, scan_warnings, secret)
    )


def draft_plan(
    manifest: Manifest,
    headers: Sequence[tuple[int, FileHeader]] | StudySource,
    scan_rejects: Sequence[Reject],
    state: StateReader,
    facts: XnatFacts,
    now: datetime,
    scan_keywords: Iterable[str] = (),
    scan_warnings: Iterable[str] = (),
    secret: str | None = None,
    *,
    anonymise: bool = True,
    sink: SessionSink | None = None,
    grouping: Grouping | None = None,
) -> Plan:
    """``build_plan`` without its ``plan_id`` (""): for a caller that computes the id while it
    writes the plan (``model.write_plan_json``), which is one pass over the plan instead of two.
    ``secret`` is the anonymisation secret (``XNATMIGRATE_ANON_SECRET``) the preview of keyed DicomEdit
    functions needs; the planner reads no environment. ``anonymise=False`` leaves sessions without
    their scripts (a draft made before XNAT's site script is known).

    Streams: ``headers`` is read a study at a time when it is a ``StudySource``, and each session goes
    to ``sink`` as soon as it is made (default: a tuple in memory); what is held across studies is one
    summary per study and per session without its files. ``grouping``: ``group_studies`` of the same
    manifest and headers, when the caller made it already (for ``planned_projects``).
    """
    source = _study_source(headers)
    grouped = grouping if grouping is not None else group_studies(manifest, source)
    groups, misses = grouped.groups, grouped.misses
    rejects = list(scan_rejects) + list(grouped.rejects)
    warnings = list(manifest.warnings) + list(scan_warnings)
    refusals = list(facts.refusals)
    held: list[HeldBack] = []

    studies = _resolve_labels(manifest, source, groups, misses, held)
    refusals += _fixed_label_refusals(manifest, groups, studies)
    del groups, grouped
    studies = _drop_incomplete(studies, scan_rejects, held)
    studies = _drop_collisions(studies, held)
    studies = _drop_merged_subjects(studies, held)

    applied = {(s.project, s.session, s.study_uid): s for s in state.sessions()}
    unchanged: list[UnchangedSession] = []
    todo: list[_Study] = []
    for st in studies:
        prior = applied.get(st.key)
        if prior is not None and prior.status is SessionState.APPLIED:
            if set(state.sources_of(prior.action_id)) == {f.path for f in st.files}:
                unchanged.append(
                    UnchangedSession(st.project, st.session, st.study_uid, f"applied ({prior.action_id})")
                )
            else:
                held.append(
                    _held(
                        st,
                        "already migrated by an earlier apply with other files; "
                        "`xnatmigrate revert` it first to migrate it again",
                    )
                )
            continue
        # An inbox session an earlier apply started (XNAT may hold its row, or have archived it, already):
        # what XNAT holds is that apply's own work, which the next apply resumes from the ledger.
        ours = prior is not None and prior.method is Method.INBOX and st.source.method is Method.INBOX
        reason = None if ours else _conflict_with_xnat(st, facts, state)
        if reason:
            held.append(_held(st, reason))
            continue
        todo.append(st)

    template, template_refusal = site_rules.file_name_template(facts.site, frozenset(scan_keywords))
    out = sink if sink is not None else _ListSink()
    anon = _Anonymiser(manifest, facts, secret, refusals) if anonymise else None
    copy_bytes = 0
    for st, first, s in _make_sessions(manifest, todo, state, facts, now, template):
        if anon is not None:
            edited = anon.apply(s, st, first, held)
            if edited is None:
                continue
            s = edited
        out.append(s)
        if isinstance(s, PrearchiveSession) and s.transfer is Transfer.COPY:
            copy_bytes += s.bytes
    scripts = anon.finish() if anon is not None else ()
    # Each session without its files, for the checks over all sessions (none of them reads files).
    shells = out.shells()
    warnings += _routing_warnings(todo)
    refusals += _target_refusals(manifest, shells, facts, copy_bytes)
    site_refusals, site_warnings = site_rules.findings(manifest, shells, facts.site)
    refusals += site_refusals
    warnings += site_warnings
    if template_refusal and any(isinstance(s, PrearchiveSession) for s in shells):
        refusals.append(template_refusal)
    if refusals:
        raise PlanError("plan refused: " + "; ".join(refusals))

    skipped = list(facts.skipped)
    for h in held:
        rejects.extend(Reject(p, f"held back: {h.reason}") for p in h.files)
    plan = Plan(
        plan_id="",
        created=now.isoformat(timespec="seconds"),
        manifest_path=manifest.path,
        manifest_digest=manifest.digest,
        state_serial=state.serial,
        table_profile=facts.table_profile,
        xnat=manifest.xnat,
        sessions=out.sessions(),
        unchanged=tuple(sorted(unchanged, key=lambda u: (u.project or "", u.session, u.study_uid))),
        held_back=tuple(held),
        rejected=tuple(sorted(rejects, key=lambda r: r.path)),
        warnings=tuple(dict.fromkeys(warnings)),
        skipped_checks=tuple(dict.fromkeys(skipped)),
        scan_keywords=tuple(sorted(scan_keywords)),
        lookups=tuple(t.digest for t in manifest.lookups),
        scripts=scripts,
    )
    return plan


@dataclass(frozen=True)
class Grouping:
    """The files of a ``StudySource`` filtered by ``where``, their labels rendered and summarised per
    study (``group_studies``): one pass over every file, shared by ``planned_projects`` and
    ``draft_plan``. ``rejects``: the files ``where`` or a missing value leaves out."""

    groups: _Groups
    misses: _Misses
    rejects: tuple[Reject, ...]


def group_studies(manifest: Manifest, headers: Sequence[tuple[int, FileHeader]] | StudySource) -> Grouping:
    """``Grouping`` of these files. PURE."""
    rejects: list[Reject] = []
    groups, misses = _group(manifest, _study_source(headers), rejects)
    return Grouping(groups, misses, tuple(rejects))


def planned_projects(
    manifest: Manifest,
    headers: Sequence[tuple[int, FileHeader]] | StudySource,
    grouping: Grouping | None = None,
) -> list[str]:
    """The projects a plan of these files could write into, sorted: each study's project label (for
    C-STORE without routing, the one XNAT's receiver would pick, ``labels.predict_route``). PURE.

    What the facts that depend on projects (archived labels, site settings) are gathered for before
    the plan is made; a superset of the plan's own (studies held back later count too), one pass of
    reading the files (``grouping``, when given, is that pass), never a plan.
    """
    source = _study_source(headers)
    grouped = grouping if grouping is not None else group_studies(manifest, source)
    out: set[str] = set()
    for st in _resolve_labels(manifest, source, grouped.groups, grouped.misses, []):
        project = st.project
        if st.source.method is Method.CSTORE and st.source.routing is Routing.NONE:
            project = labels.predict_route(st.first.values)[0]
        if project:
            out.add(project)
    return sorted(out)


def _study_source(headers: Sequence[tuple[int, FileHeader]] | StudySource) -> StudySource:
    return HeaderStudies(headers) if isinstance(headers, Sequence) else headers


class _Anonymiser:
    """Each prearchive and C-STORE session of a source with ``anonymization:`` scripts names them and
    shows what they do to its first file; a script XNAT's site would need but did not give, one that
    does not parse, or one that changes what the route relies on as planned (``anonymize.PREARCHIVE_KEPT``,
    ``anonymize.cstore_kept``) refuses the plan; one that fails on a study's first file holds that study
    back (XNAT would fail its files), so no session that asked for anonymisation goes without it.

    One session at a time (``apply``), then ``finish`` for the refusals that need them all and the
    scripts the plan pins."""

    def __init__(self, manifest: Manifest, facts: XnatFacts, secret: str | None, refusals: list[str]) -> None:
        self.refusals, self.secret = refusals, secret
        self.wanted = {src.index: src.scripts for src in manifest.sources if src.scripts}
        self.known = {sc.name: sc for sc in manifest.scripts}
        self.chains: dict[int, dicomedit.ScriptChain] = {}
        self.renaming: dict[int, tuple[list[str], PrearchiveSession | CstoreSession]] = {}
        self.used: set[str] = set()
        self.active = self._prepare(facts)

    def _prepare(self, facts: XnatFacts) -> bool:
        if not self.wanted:
            return False
        site_text = facts.site.site_script if facts.site is not None else None
        if any(anonymize.SITE_SCRIPT_NAME in names for names in self.wanted.values()):
            if site_text is None:
                self.refusals.append(
                    "anonymization: site needs XNAT's site anonymisation script (GET /xapi/anonymize/site), "
                    "which plan could not read (offline, no xnat.url, or not allowed): plan online, or save "
                    "the script to a file and name that file instead"
                )
                return False
            self.known[anonymize.SITE_SCRIPT_NAME] = PlannedScript(
                anonymize.SITE_SCRIPT_NAME, hashlib.sha256(site_text.encode("utf-8")).hexdigest(), site_text
            )
        for idx, names in sorted(self.wanted.items()):
            try:
                self.chains[idx] = anonymize.chain_of(names, self.known)
            except DicomEditError as exc:
                self.refusals.append(f"sources[{idx}].anonymization: {exc}")
        return len(self.chains) == len(self.wanted)

    def apply(
        self, s: PlannedSession, st: _Study, first: FileHeader, held: list[HeldBack]
    ) -> PlannedSession | None:
        """``s`` with its scripts named and previewed; None when held back (the script fails)."""
        chain = self.chains.get(s.source_index) if self.active else None
        if chain is None or isinstance(s, InboxSession):  # inbox: refused by the manifest
            return s
        kept = anonymize.cstore_kept(s.routing) if isinstance(s, CstoreSession) else anonymize.PREARCHIVE_KEPT
        try:
            edits, renamed = anonymize.preview(
                chain,
                first.values,
                anonymize.variables(s.project, s.subject, s.session),
                self.secret,
                kept,
            )
        except DicomEditError as exc:
            held.append(_held(st, f"the anonymisation script fails on {first.path}: {exc}"))
            return None
        if renamed:
            self.renaming.setdefault(s.source_index, (renamed, s))
        names = self.wanted[s.source_index]
        self.used.update(names)
        return replace(s, anonymize=names, anonymized=edits)

    def finish(self) -> tuple[PlannedScript, ...]:
        for idx, (renamed, s) in sorted(self.renaming.items(), key=lambda kv: kv[0]):
            self.refusals.append(_renaming_refusal(idx, renamed, s))
        return tuple(self.known[n] for n in sorted(self.used))


def _renaming_refusal(idx: int, renamed: list[str], s: PrearchiveSession | CstoreSession) -> str:
    """One line: the source's scripts change what its route relies on as planned."""
    changes = f"sources[{idx}].anonymization changes {', '.join(renamed)}"
    if isinstance(s, PrearchiveSession):
        return (
            f"{changes}, which the prearchive route names files, scan folders and the row by (xnat-reference.md "
            "§2); renaming by anonymised values is not implemented: keep these attributes in the script, or "
            "use method: cstore and let XNAT's site script anonymise on receipt"
        )
    routed = [k for k in renamed if k not in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID")]
    fix = "keep these attributes in the script"
    if routed:
        fix += ", or set routing: patient_comments (the tool then routes by the planned labels)"
    return (
        f"{changes}, which the C-STORE route sends each file and finds its session by"
        + (
            f" (and XNAT's receiver routes by {', '.join(routed)} with routing: {s.routing}, §5)"
            if routed
            else ""
        )
        + f"; sending under anonymised UIDs is not implemented: {fix}"
    )


# --------------------------------------------------------------------------------------------
# Files → studies
# --------------------------------------------------------------------------------------------


def _group(manifest: Manifest, source: StudySource, rejects: list[Reject]) -> tuple[_Groups, _Misses]:
    """Filter by ``where``, render labels per file, summarise each (source, StudyInstanceUID)."""
    groups: _Groups = {}
    misses: _Misses = {}
    tables = manifest.lookup_tables
    # Per source: the label templates that pick from lookup tables (their rows are recorded).
    mapping = {
        src.index: tuple(
            t for t in (src.project, src.subject, src.session) if t and labels.template_lookups(t)
        )
        for src in manifest.sources
    }
    # Per source: the keywords its labels and `where` read. A file's outcome depends on those values
    # alone, and the files of a study mostly share them: each distinct tuple is worked out once.
    reads = {
        src.index: tuple(
            sorted(
                src.where_keywords.union(
                    *(
                        labels.template_keywords(t)
                        for t in (src.project, src.subject, src.session)
                        if t and labels.is_template(t)
                    )
                )
            )
        )
        for src in manifest.sources
    }
    for idx, uid, files in _each_study(source):
        src = manifest.sources[idx]
        kept = False
        dropped: set[str] = set()
        raws: set[_Raw] = set()
        found: set[LookupMatch] = set()
        seen: dict[tuple[str | None, ...], _Outcome] = {}
        for h in files:
            key = tuple(map(h.values.get, reads[idx]))
            outcome = seen.get(key)
            if outcome is None:
                outcome = seen[key] = _outcome(src, h, tables, mapping[idx])
            kind, detail = outcome
            if kind == "rejected":
                rejects.append(Reject(h.path, detail))
                dropped.add(h.path)
                continue
            if kind == "miss":
                misses.setdefault((idx, uid), detail)
            kept = True
            if kind == "labels":
                raw, matches = detail
                raws.add(raw)
                found.update(matches)
        if kept:
            groups[(idx, uid)] = (frozenset(dropped), raws, found)
    return groups, misses


# What ``_group`` makes of one file: ("labels", (raw labels, lookup matches)), ("miss", the
# LookupMiss: the study is held back) or ("rejected", the reason).
_Outcome = tuple[str, Any]


def _outcome(
    src: SourceSpec, h: FileHeader, tables: dict[str, LookupTable], mapping: tuple[str, ...]
) -> _Outcome:
    why = _where_mismatch(src, h, tables)
    if why:
        return "rejected", f"filtered out by where: {why}"
    matches: tuple[LookupMatch, ...] = ()
    try:
        raw: _Raw = (
            labels.render(src.project, h.values, tables) if src.project is not None else None,
            labels.render(src.subject, h.values, tables) if src.subject is not None else None,
            labels.render(src.session, h.values, tables),
        )
        for template in mapping:
            matches += labels.lookup_matches(template, h.values, tables)
    except labels.LookupMiss as exc:
        return "miss", exc
    except labels.MissingValue as exc:
        return "rejected", str(exc)
    return "labels", (raw, matches)


def _each_study(source: StudySource) -> Iterator[tuple[int, str, Sequence[FileHeader]]]:
    """(source index, StudyInstanceUID, its files) of every study: in one sequential read when the
    source offers it (``each_study``), else a study at a time."""
    each = getattr(source, "each_study", None)
    if each is not None:
        yield from each()
        return
    for idx, uid in source.studies():
        yield idx, uid, source.files_of(idx, uid)


def _loader(
    source: StudySource, idx: int, uid: str, dropped: frozenset[str]
) -> Callable[[], tuple[FileHeader, ...]]:
    """The files of one study that ``_group`` kept, read again from ``source`` on each call."""
    if not dropped:
        return lambda: tuple(source.files_of(idx, uid))
    return lambda: tuple(h for h in source.files_of(idx, uid) if h.path not in dropped)


def _where_mismatch(src: SourceSpec, h: FileHeader, tables: dict[str, LookupTable]) -> str | None:
    for keyword, allowed in src.where:
        value = h.get(keyword)
        if value is None:
            return f"{keyword} is missing (allowed: {', '.join(allowed)})"
        if value not in allowed:
            return f"{keyword}={value} not in {', '.join(allowed)}"
    for keyword, name in src.where_lookups:
        table = tables[name]
        value = h.get(keyword)
        if value is None:
            return f"{keyword} is missing (allowed: the keys of lookup table {name}, {table.file})"
        if value not in table.rows:
            return f"{keyword}={value} not in lookup table {name} ({table.file}, key column {table.key})"
    return None


def _resolve_labels(
    manifest: Manifest,
    source: StudySource,
    groups: _Groups,
    misses: _Misses,
    held: list[HeldBack],
) -> list[_Study]:
    """One label triple per study, sanitised as XNAT does (Labels.toLabelChars, §6)."""
    studies = []
    for (idx, uid), (dropped, raws, matches) in sorted(groups.items()):
        load = _loader(source, idx, uid, dropped)
        miss = misses.get((idx, uid))
        if miss is not None:
            held.append(HeldBack(None, None, uid, str(miss), tuple(h.path for h in load())))
            continue
        distinct = sorted(raws, key=str)
        if len(distinct) > 1:
            shown = ", ".join("/".join(p or "Unassigned" for p in d) for d in distinct[:3])
            held.append(
                HeldBack(
                    None,
                    None,
                    uid,
                    f"files of study {uid} disagree on the values its labels use "
                    f"({shown}{', …' if len(distinct) > 3 else ''})",
                    tuple(h.path for h in load()),
                )
            )
            continue
        raw_p, raw_s, raw_e = distinct[0]
        project = labels.sanitize(raw_p) if raw_p is not None else None
        subject = labels.sanitize(raw_s) if raw_s is not None else None
        session = labels.sanitize(raw_e)
        raw: dict[str, str] = {}
        for name, r, clean in (
            ("project", raw_p, project),
            ("subject", raw_s, subject),
            ("session", raw_e, session),
        ):
            if r is not None and r != clean:
                raw[name] = r
        if not session or session.strip("_") == "" or project == "" or subject == "":
            held.append(
                HeldBack(
                    project,
                    session or None,
                    uid,
                    f"a label of study {uid} renders empty ({'/'.join(x or '∅' for x in distinct[0])})",
                    tuple(h.path for h in load()),
                )
            )
            continue
        studies.append(
            _Study(
                manifest.sources[idx],
                uid,
                load,
                project,
                subject or None,
                session,
                raw,
                tuple(sorted(matches)),
            )
        )
    return studies


def _fixed_label_refusals(
    manifest: Manifest,
    groups: _Groups,
    studies: list[_Study],
) -> list[str]:
    out = []
    per_source: dict[int, set[str]] = defaultdict(set)
    for idx, uid in groups:
        per_source[idx].add(uid)
    for src in manifest.sources:
        if labels.is_template(src.session):
            continue
        uids = sorted(per_source.get(src.index, ()))
        if len(uids) > 1:
            out.append(
                f"sources[{src.index}] ({src.source}) holds {len(uids)} studies but maps them all to "
                f"the fixed session {src.session}: {', '.join(uids[:5])}{' …' if len(uids) > 5 else ''}; "
                'give each study its own session (e.g. session: "{{ PatientID }}_{{ StudyDate }}") '
                "or narrow the source with include/where"
            )
    return out


def _drop_collisions(studies: list[_Study], held: list[HeldBack]) -> list[_Study]:
    """Two studies rendering to the same (project, session): hold both back (XNAT would merge)."""
    by_label: dict[tuple[str | None, str], list[_Study]] = defaultdict(list)
    for st in studies:
        by_label[(st.project, st.session)].append(st)
    keep = []
    for (project, session), group in by_label.items():
        if len(group) == 1:
            keep.extend(group)
            continue
        uids = sorted({g.study_uid for g in group})
        raws = sorted({g.raw.get("session", g.session) for g in group})
        from_values = f" from the values {' and '.join(repr(r) for r in raws[:3])}" if len(raws) > 1 else ""
        for st in group:
            held.append(
                _held(
                    st,
                    f"{len(group)} studies render to project {project or 'Unassigned'} session "
                    f"{session}{from_values} ({', '.join(uids[:4])}); make the session template tell them apart",
                )
            )
    return sorted(keep, key=lambda s: (s.project or "", s.session, s.study_uid))


# Scan rejects of files that were meant to be images of a study but cannot be migrated: a study
# sharing a folder with one of them would reach XNAT incomplete (not DICOM, DICOMDIR, duplicates
# and `where` filters are not part of any study and hold nothing back).
_BROKEN_PREFIXES = ("unreadable", "truncated", "no ")


def _drop_incomplete(
    studies: list[_Study], scan_rejects: Sequence[Reject], held: list[HeldBack]
) -> list[_Study]:
    """Hold back a study with a broken file in one of its folders, unless its source allows partial studies."""
    broken: dict[str, Reject] = {}
    for r in scan_rejects:
        if r.reason.startswith(_BROKEN_PREFIXES):
            broken.setdefault(os.path.dirname(r.path), r)
    if not broken:
        return studies
    keep = []
    for st in studies:
        hit = None if st.source.allow_partial_studies else _first_broken(st, broken)
        if hit is None:
            keep.append(st)
            continue
        held.append(
            _held(
                st,
                f"study {st.study_uid} may be incomplete: {hit.path} in its folder is {hit.reason}; fix or "
                "remove that file and re-plan, or set allow_partial_studies: true on the source",
            )
        )
    return keep


def _first_broken(st: _Study, broken: dict[str, Reject]) -> Reject | None:
    for folder in sorted({os.path.dirname(h.path) for h in st.files}):
        if folder in broken:
            return broken[folder]
    return None


def _drop_merged_subjects(studies: list[_Study], held: list[HeldBack]) -> list[_Study]:
    """Distinct raw subject values sanitising to one subject label would merge two patients (§6:
    Labels.toLabelChars maps every character outside [A-Za-z0-9_-] to '_'): hold those studies back,
    naming the values, unless the source says they are one person (``merge_subjects: true``)."""
    raws: dict[tuple[str | None, str], dict[str, list[_Study]]] = defaultdict(lambda: defaultdict(list))
    for st in studies:
        if st.subject is not None:
            raws[(st.project, st.subject)][st.raw.get("subject", st.subject)].append(st)
    bad: dict[str, str] = {}
    for (project, subject), by_raw in raws.items():
        if len(by_raw) < 2:
            continue
        values = sorted(by_raw)
        shown = " and ".join(repr(v) for v in values[:3]) + (" …" if len(values) > 3 else "")
        for group in by_raw.values():
            for st in group:
                if not st.source.merge_subjects:
                    bad[st.study_uid] = (
                        f"the distinct subject values {shown} all become subject {subject} in project "
                        f"{project or 'Unassigned'}: two patients would merge; make the subject template "
                        "tell them apart, or set merge_subjects: true if they are the same person"
                    )
    if not bad:
        return studies
    keep = []
    for st in studies:
        if st.study_uid in bad:
            held.append(_held(st, bad[st.study_uid]))
        else:
            keep.append(st)
    return keep


def _held(st: _Study, reason: str) -> HeldBack:
    return HeldBack(st.project, st.session, st.study_uid, reason, tuple(h.path for h in st.files))


def _conflict_with_xnat(st: _Study, facts: XnatFacts, state: StateReader) -> str | None:
    ours = state.timestamp_for(st.project, st.session, st.study_uid)
    for row in facts.existing_rows or ():
        if row.project == st.project and row.tag == st.study_uid and row.name == st.session:
            if ours and row.timestamp == ours and row.foldername == st.session:
                continue  # our own row from an interrupted apply: resume
            return (
                f"XNAT's prearchive already holds this study as {row.project or 'Unassigned'}/"
                f"{row.timestamp}/{row.foldername} (status {row.status}); XNAT would merge into it "
                "(PrearcDatabase.eitherGetOrCreateSession): archive or delete that session first"
            )
    if st.project is not None and facts.archived is not None and (st.project, st.session) in facts.archived:
        if st.source.method is Method.INBOX:
            return (
                f"project {st.project} already has an archived session labelled {st.session}: XNAT's inbox "
                "importer would answer 409 'Experiment with that label already exists in that project' "
                "(DicomInboxImporter); choose another session label or delete the archived one"
            )
        return (
            f"project {st.project} already has an archived session labelled {st.session}; "
            "choose another session label or delete the archived one"
        )
    return None


# --------------------------------------------------------------------------------------------
# Studies → sessions
# --------------------------------------------------------------------------------------------


def _make_sessions(
    manifest: Manifest,
    studies: list[_Study],
    state: StateReader,
    facts: XnatFacts,
    now: datetime,
    template: str = labels.XNAT_FILE_NAME_TEMPLATE,
) -> Iterator[tuple[_Study, FileHeader, PlannedSession]]:
    """Each study's session, with the study's first file, in the order of ``studies``, made one at a
    time (the study's files read once for it)."""
    taken = set(facts.taken_timestamps) | state.all_timestamps()
    zone = manifest.xnat.timezone or facts.local_timezone or ""
    clock = now.replace(microsecond=(now.microsecond // 1000) * 1000)
    for st in studies:
        files = st.files
        method = st.source.method
        match method:
            case Method.CSTORE:
                yield (
                    st,
                    files[0],
                    _cstore_session(st, files, template, site_rules.direct_archive(manifest, facts.site)),
                )
            case Method.PREARCHIVE:
                ts = state.timestamp_for(st.project, st.session, st.study_uid)
                if ts is None:
                    while xnat_table.timestamp_folder(clock) in taken:
                        clock += timedelta(milliseconds=1)
                    ts = xnat_table.timestamp_folder(clock)
                    taken.add(ts)
                yield st, files[0], _prearchive_session(manifest, st, files, ts, zone, template)
            case Method.INBOX:
                yield st, files[0], _inbox_session(manifest, st, files, template)
            case _:
                unreachable(method)


def _scans(study_files: Sequence[FileHeader], template: str) -> tuple[PlannedScan, ...]:
    by_series: dict[str, list[FileHeader]] = defaultdict(list)
    for h in study_files:
        by_series[h.series_uid].append(h)
    scans = []
    name_of = labels.file_namer(template)
    for series_uid, files in by_series.items():
        first = files[0]
        number = first.get("SeriesNumber")
        scan_id = labels.scan_folder(number, series_uid)
        planned = tuple(
            PlannedFile(
                source=h.path,
                size=h.size,
                mtime_ns=h.mtime_ns,
                sop_instance_uid=h.sop_instance_uid,
                sop_class_uid=h.sop_class_uid,
                transfer_syntax=h.transfer_syntax,
                dest=f"SCANS/{scan_id}/DICOM/{name_of(h.values)}",
                ctime_ns=h.ctime_ns,
                ino=h.ino,
                header_digest=h.digest or header_digest(h.values),
                head_digest=h.head_digest,
            )
            for h in sorted(files, key=lambda h: h.path)
        )
        scans.append(PlannedScan(scan_id, series_uid, number, first.get("Modality"), planned))
    return tuple(sorted(scans, key=lambda s: (_natural(s.scan_id), s.series_uid)))


def _natural(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (1 << 30, text)


def _action_id(*parts: object) -> str:
    return hashlib.sha256("|".join("" if p is None else str(p) for p in parts).encode()).hexdigest()[:16]


def _prearchive_session(
    manifest: Manifest, st: _Study, files: Sequence[FileHeader], ts: str, zone: str, template: str
) -> PrearchiveSession:
    src = st.source
    root = manifest.xnat.prearchive or ""
    url_root = (manifest.xnat.url_root or root).rstrip("/")
    rel = f"{st.project}/{ts}/{st.session}" if st.project else f"{ts}/{st.session}"
    first = files[0]
    scan_date, scan_time = _scan_date(first.get("StudyDate"), first.get("StudyTime"))
    url = f"{url_root}/{rel}"
    row: dict[str, Any] = {
        "project": st.project,
        "timestamp": ts,
        "lastmod": None,  # LOCALTIMESTAMP at insert (sql/prearchive_insert.sql.j2)
        "uploaded": xnat_table.sql_timestamp(xnat_table.parse_timestamp_folder(ts)),
        "scan_date": scan_date,
        "scan_time": scan_time,
        "subject": st.subject,
        "foldername": st.session,
        "name": st.session,
        "tag": st.study_uid,
        "status": "RECEIVING",
        "url": url,
        # A scheduled build archives by itself only if autoarchive says so (§3, isAutoArchive);
        # REST builds never auto-archive, the tool archives explicitly then.
        "autoarchive": xnat_table.AUTOARCHIVE_AUTO
        if (src.build is Build.SCHEDULER and src.archive)
        else xnat_table.AUTOARCHIVE_MANUAL,
        "prevent_anon": False,
        # Only `build: scheduler` lets XNAT's SessionXMLRebuilder job pick the row up (§3).
        "prevent_auto_commit": src.build is not Build.SCHEDULER,
        "source": xnat_table.ROW_SOURCE,
        "visit": None,
        "protocol": None,
        "timezone": None,
    }
    return PrearchiveSession(
        **_study_fields(st, files, template),
        action_id=_action_id(Method.PREARCHIVE, st.project, st.session, st.study_uid, ts),
        project=st.project,
        subject=st.subject,
        session=st.session,
        timestamp=ts,
        transfer=src.transfer,
        prearchive_uri=f"/prearchive/projects/{st.project or 'Unassigned'}/{ts}/{st.session}",
        session_dir=f"{root.rstrip('/')}/{rel}",
        url=url,
        row=row,
        lastmod_zone=zone,
    )


class _StudyFields(TypedDict):
    """What every route's session takes from its study and source alike (model._SessionBase)."""

    source_index: int
    study_uid: str
    build: Build
    archive: bool
    build_timeout: float
    scans: tuple[PlannedScan, ...]
    raw_labels: Mapping[str, str]
    mapped_by: tuple[LookupMatch, ...]


def _study_fields(st: _Study, files: Sequence[FileHeader], template: str) -> _StudyFields:
    src = st.source
    return _StudyFields(
        source_index=src.index,
        study_uid=st.study_uid,
        build=src.build,
        archive=src.archive,
        build_timeout=src.build_timeout,
        scans=_scans(files, template),
        raw_labels=st.raw,
        mapped_by=st.mapped_by,
    )


def _cstore_session(st: _Study, files: Sequence[FileHeader], template: str, direct: bool) -> CstoreSession:
    src = st.source
    project, subject, session = st.project, st.subject, st.session
    line = None
    if src.routing is not Routing.NONE:
        line = labels.routing_line(project, subject, session)
    else:
        project, subject, session = labels.predict_route(files[0].values)
    fields = _study_fields(st, files, template)
    contexts: dict[str, set[str]] = defaultdict(set)
    for scan in fields["scans"]:  # the study's files, read once for its scans
        for f in scan.files:
            contexts[f.sop_class_uid].add(f.transfer_syntax)
    return CstoreSession(
        **fields,
        action_id=_action_id(Method.CSTORE, project, session, st.study_uid),
        project=project,
        subject=subject,
        session=session,
        routing=src.routing,
        prearchive_uri=f"/prearchive/projects/{project or 'Unassigned'}",
        routing_line=line,
        contexts=tuple(PresentationContext(sop, tuple(sorted(ts))) for sop, ts in sorted(contexts.items())),
        direct_archive=direct,
    )


def _inbox_session(
    manifest: Manifest, st: _Study, files: Sequence[FileHeader], template: str
) -> InboxSession:
    """Staged below ``<inbox>/<project>/`` (DicomInboxImporter: a first-level subfolder named after a
    project the user can edit), imported into that project under the planned labels."""
    src = st.source
    project = st.project or ""  # manifest validation requires a project; _inbox_refusals says so too
    root = (manifest.xnat.inbox or "").rstrip("/")
    url_root = (manifest.xnat.inbox_root_for_xnat or root).rstrip("/")
    return InboxSession(
        **_study_fields(st, files, template),
        action_id=_action_id(Method.INBOX, st.project, st.session, st.study_uid),
        project=st.project,
        subject=st.subject,
        session=st.session,
        prearchive_uri=f"/prearchive/projects/{st.project or 'Unassigned'}",
        transfer=src.transfer,
        inbox_parent=f"{root}/{project}",
        inbox_url_parent=f"{url_root}/{project}",
    )


def _routing_warnings(studies: list[_Study]) -> list[str]:
    """``routing: study_comments`` loses to assignments already in PatientComments, which XNAT's
    identifier reads first (§5 rows 3-4): say so per study, as the route would silently differ."""
    out = []
    for st in studies:
        if st.source.method is not Method.CSTORE or st.source.routing is not Routing.STUDY_COMMENTS:
            continue
        found: dict[str, str] = {}
        for h in st.files:
            found.update(labels.comment_assignments(h.get("PatientComments")))
        if found:
            said = " ".join(f"{k}: {v}" for k, v in sorted(found.items()))
            out.append(
                f"study {st.study_uid}: PatientComments already says {said!r}, which XNAT reads before "
                "StudyComments (§5): use routing: patient_comments to route it as planned"
            )
    return out


def _scan_date(study_date: str | None, study_time: str | None) -> tuple[str | None, str | None]:
    """StudyDate + the time part of StudyTime, as XNAT's receiver writes scan_date (§1 column 5)."""
    if not study_date or len(study_date) < 8 or not study_date[:8].isdigit():
        return None, None
    try:
        day = datetime.strptime(study_date[:8], "%Y%m%d")
    except ValueError:
        return None, None
    hms = "00:00:00"
    scan_time = None
    digits = (study_time or "").split(".")[0].replace(":", "")
    if len(digits) >= 2 and digits.isdigit():
        digits = (digits + "0000")[:6]
        h, m, s = int(digits[:2]), int(digits[2:4]), int(digits[4:6])
        if h < 24 and m < 60 and s < 61:
            hms = f"{h:02d}:{m:02d}:{min(s, 59):02d}"
            scan_time = hms
    return f"{day:%Y-%m-%d} {hms}", scan_time


# --------------------------------------------------------------------------------------------
# Target-wide checks
# --------------------------------------------------------------------------------------------


# The folder name below <inbox>/<project>/ is "xnatmigrate-" + 12 hex digits + "-" + the label: 255 bytes at most.
_INBOX_LABEL_MAX = 255 - len("xnatmigrate-") - 12 - 1


def _inbox_refusals(manifest: Manifest, sessions: Sequence[PlannedSession], facts: XnatFacts) -> list[str]:
    """What XNAT's inbox importer would refuse (DicomInboxImporter.call), refused before anything is staged."""
    inbox = [s for s in sessions if isinstance(s, InboxSession)]
    if not inbox:
        return []
    out: list[str] = []
    root = manifest.xnat.inbox
    seen_root = (manifest.xnat.inbox_root_for_xnat or "").rstrip("/")
    if facts.inbox_writable is False:
        out.append(f"the inbox {root} is missing or not readable and writable by this user; fix xnat.inbox")
    if not seen_root.startswith("/"):
        out.append(f"xnat.inbox_url_root {seen_root!r} is not absolute: XNAT's inboxPath is an absolute path")
    editable = facts.site.editable_projects
    for s in inbox:
        if s.project is None:
            out.append(
                f"{s.label}: XNAT's inbox importer needs a project (a path below <inbox>/<project>/ and "
                "an editable PROJECT_ID), it never files into Unassigned; give the source a project"
            )
            continue
        # XNAT normalises the path and requires it to start with inboxPath, its first component naming a
        # project the user can edit (DicomInboxImporter.call: Paths.normalize, startsWith, the subdirectory).
        seen = os.path.normpath(s.inbox_url_parent + "/" + s.folder_name("0" * 12))
        rel = seen[len(seen_root) :].lstrip("/") if seen.startswith(seen_root + "/") else None
        if rel is None or rel.split("/")[0] != s.project or len(rel.split("/")) != 2:
            out.append(
                f"{s.label}: its staging folder {seen} is not below {seen_root}/{s.project}/ as XNAT's inbox "
                "importer requires (it would answer 400); fix xnat.inbox_url_root"
            )
        if len(s.session.encode()) > _INBOX_LABEL_MAX:
            out.append(
                f"{s.label}: the session label is too long for an inbox folder name (max {_INBOX_LABEL_MAX})"
            )
        if editable is not None and s.project not in editable:
            out.append(
                f"the XNAT user cannot edit project {s.project} (GET /data/projects?restrict=edit): XNAT's inbox "
                "importer refuses its inbox folder and PROJECT_ID (400 'You do not have permission to edit the "
                "specified destination project'); ask a project owner for edit rights"
            )
        if s.transfer is Transfer.HARDLINK and facts.inbox_same_filesystem is not None:
            src = manifest.sources[s.source_index].source
            if facts.inbox_same_filesystem.get(src) is False:
                out.append(
                    f"transfer: hardlink needs {src} on the inbox's filesystem ({root}); use transfer: copy "
                    "for that source"
                )
    return list(dict.fromkeys(out))


def _target_refusals(
    manifest: Manifest, sessions: Sequence[PlannedSession], facts: XnatFacts, copy_bytes: int
) -> list[str]:
    """``copy_bytes``: what the prearchive sessions with ``transfer: copy`` copy (``sessions`` may
    come without their files)."""
    out: list[str] = _inbox_refusals(manifest, sessions, facts)
    pre = [s for s in sessions if isinstance(s, PrearchiveSession)]
    if not pre:
        return out
    root = manifest.xnat.prearchive
    if facts.prearchive_writable is False:
        out.append(f"the prearchive {root} is missing or not writable by this user; fix xnat.prearchive")
    if facts.free_bytes is not None and copy_bytes > facts.free_bytes:
        out.append(
            f"not enough free space in {root}: {copy_bytes / 1e9:.2f} GB to copy, "
            f"{facts.free_bytes / 1e9:.2f} GB free; free space or use transfer: hardlink"
        )
    if facts.same_filesystem is not None:
        for s in pre:
            if s.transfer is not Transfer.HARDLINK:
                continue
            src = manifest.sources[s.source_index].source
            if facts.same_filesystem.get(src) is False:
                out.append(
                    f"transfer: hardlink needs {src} on the prearchive's filesystem ({root}); "
                    "use transfer: copy for that source"
                )
    return list(dict.fromkeys(out))
