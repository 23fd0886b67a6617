"""What the planner is told about the target, gathered beforehand by ``execute.facts`` (the planner
itself reads nothing). Each value is None (or empty) when its check could not run; the reason is in
``XnatFacts.skipped``, never a guess."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExistingRow:
    """A row already in ``xdat_search.prearchive`` that concerns a study being planned."""

    project: str | None
    timestamp: str
    foldername: str
    name: str | None
    tag: str | None
    status: str
    source: str | None


@dataclass(frozen=True)
class Receiver:
    """One of XNAT's DICOM receivers as ``/xapi/dicomscp`` lists it (§5, §9)."""

    ae_title: str
    port: int
    enabled: bool = True
    direct_archive: bool = False
    anonymization: bool = True
    routing_expressions: bool = False
    expressions: tuple[str, ...] = ()  # the project/subject/session routing expressions set


@dataclass(frozen=True)
class SiteFacts:
    """The XNAT site settings that change what a migration does (issue 12 §2); None: not read."""

    anonymization_enabled: bool | None = None
    prearchive_codes: Mapping[str, int] = field(default_factory=dict)  # project -> 0 | 4 | 5
    receivers: tuple[Receiver, ...] | None = None
    file_name_template: str | None = None
    # The site anonymisation script's text (GET /xapi/anonymize/site), read when a source names it.
    site_script: str | None = None
    # Projects the REST user may edit (GET /data/projects?restrict=edit, §4.3); None: not read.
    editable_projects: frozenset[str] | None = None


@dataclass(frozen=True)
class XnatFacts:
    """Facts about the target XNAT, each None when its check could not run (listed in ``skipped``).

    ``refusals`` are target-wide findings that refuse the whole plan (e.g. the table matches no
    known profile, the prearchive root is not writable).
    """

    table_profile: str | None = None
    existing_rows: tuple[ExistingRow, ...] | None = None
    archived: frozenset[tuple[str, str]] | None = None  # (project, session label)
    taken_timestamps: frozenset[str] = frozenset()
    prearchive_writable: bool | None = None
    free_bytes: int | None = None
    same_filesystem: Mapping[str, bool] | None = None  # source folder -> same fs as prearchive
    local_timezone: str | None = None  # this machine's IANA zone, the default for XNAT's
    inbox_writable: bool | None = None  # xnat.inbox is a folder this user can read and write
    inbox_same_filesystem: Mapping[str, bool] | None = None  # source folder -> same fs as the inbox
    site: SiteFacts = field(default_factory=SiteFacts)
    refusals: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
