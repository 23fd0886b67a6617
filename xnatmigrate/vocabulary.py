"""The domain's closed vocabularies, one StrEnum each, and ``unreachable`` for exhaustive ``match``.

NOTE: every member *is* its string (JSON, SQLite and psycopg see "prearchive": psycopg adapts a member
as the first of its classes it knows, str before Enum, whose adapter would send the name), and no
module spells these values as literals: a spelling lives here and, for manifests and plans, in the JSON schemas
(tests/unit/test_model.py holds the two equal).
"""

from __future__ import annotations

from enum import StrEnum
from typing import NoReturn


class Method(StrEnum):
    """How a session reaches XNAT (one planned-session type each)."""

    PREARCHIVE = "prearchive"
    CSTORE = "cstore"
    INBOX = "inbox"  # XNAT's own inbox importer (import-handler=inbox, DicomInboxImporter)


class Transfer(StrEnum):
    """How files are staged (into the prearchive's staging area, or into XNAT's inbox)."""

    COPY = "copy"
    HARDLINK = "hardlink"


class Build(StrEnum):
    """Who builds the prearchive session: the tool over REST, XNAT's scheduled job, or nobody."""

    REST = "rest"
    SCHEDULER = "scheduler"
    NONE = "none"


class Routing(StrEnum):
    """Where a C-STORE sender writes ``Project:/Subject:/Session:`` (xnat-reference.md §5)."""

    PATIENT_COMMENTS = "patient_comments"
    STUDY_COMMENTS = "study_comments"
    NONE = "none"


class Step(StrEnum):
    """A ledger step. Apply steps first; revert records its own three."""

    STAGE = "stage"
    PUBLISH = "publish"
    INSERT = "insert"
    BUILD = "build"
    ARCHIVE = "archive"
    SEND = "send"
    IMPORT = "import"  # the inbox import request POSTed; its /xapi/dicom/{id} recorded before polling
    LOCATE = "locate"
    REVERT_FILES = "revert-files"
    REVERT_ROW = "revert-row"
    REVERT_ARCHIVE = "revert-archive"


APPLY_STEPS: frozenset[Step] = frozenset(
    {Step.STAGE, Step.PUBLISH, Step.INSERT, Step.BUILD, Step.ARCHIVE, Step.SEND, Step.IMPORT, Step.LOCATE}
)


class Outcome(StrEnum):
    """What one recorded step did. ``reverted`` undoes an earlier done/noop of the same step."""

    DONE = "done"
    NOOP = "noop"
    FAILED = "failed"
    REVERTED = "reverted"


class SessionState(StrEnum):
    """A session's status in the ledger (not XNAT's): applying → applied | failed; reverted."""

    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"
    REVERTED = "reverted"


class Result(StrEnum):
    """What one apply run did with one session."""

    DONE = "done"
    NOOP = "noop"
    FAILED = "failed"
    SKIPPED = "skipped"


class RevertOutcome(StrEnum):
    """What revert did (or, in a dry run, would do) with one session."""

    WOULD_REMOVE = "would-remove"
    REMOVED = "removed"
    REFUSED = "refused"
    NOTHING = "nothing"


class Check(StrEnum):
    """What a verify finding is about."""

    FILES = "files"
    ROW = "row"
    ARCHIVE = "archive"
    SEND = "send"
    XNAT = "xnat"
    ERROR = "error"
    NOT_APPLIED = "not-applied"  # a planned session that failed or was never attempted


class Seen(StrEnum):
    """What refresh saw of a session in XNAT."""

    WAITING = "waiting"
    BUILDING = "building"
    BUILT = "built"
    ERROR = "error"
    CONFLICT = "conflict"
    ARCHIVED = "archived"
    MOVED = "moved"
    DELETED = "deleted"
    STUCK = "stuck"
    UNKNOWN = "unknown"
    OTHER = "other"  # a status outside the groups above (e.g. QUEUED_DELETING): ``status`` says which


def unreachable(value: NoReturn) -> NoReturn:
    """The ``case _`` of an exhaustive ``match``: mypy proves it dead; at run time it is a bug."""
    raise AssertionError(f"unhandled case {value!r}")
