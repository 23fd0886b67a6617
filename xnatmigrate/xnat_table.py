"""XNAT's ``xdat_search.prearchive`` table and its statuses, as XNAT defines them.

Source: the enum ``DatabaseSession`` and ``PrearcDatabase.createTableSql()`` in xnat-web
(xnat-reference.md §1); statuses from ``PrearcUtils.PrearcStatus`` (§3). Pure data, no I/O.
"""

from __future__ import annotations

from datetime import datetime

SCHEMA = "xdat_search"
TABLE = "prearchive"

# (column as PostgreSQL spells it, information_schema data_type, nullable) in enum order (§1).
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("project", "character varying", True),
    ("timestamp", "character varying", False),
    ("lastmod", "timestamp without time zone", True),
    ("uploaded", "timestamp without time zone", True),
    ("scan_date", "timestamp without time zone", True),
    ("scan_time", "character varying", True),
    ("subject", "character varying", True),
    ("foldername", "character varying", False),
    ("name", "character varying", True),
    ("tag", "character varying", True),
    ("status", "character varying", False),
    ("url", "character varying", False),
    ("autoarchive", "character varying", True),
    ("prevent_anon", "boolean", True),
    ("prevent_auto_commit", "boolean", True),
    ("source", "character varying", True),
    ("visit", "character varying", True),
    ("protocol", "character varying", True),
    ("timezone", "character varying", True),
)
COLUMN_NAMES = tuple(c[0] for c in COLUMNS)
TIMESTAMP_COLUMNS = frozenset(c[0] for c in COLUMNS if c[1].startswith("timestamp"))

# Profiles: "1.7" (1.6, 1.7.x, 1.8.0-1.8.1) has no constraint; "1.8.2" adds prearchive_study
# UNIQUE (timestamp, project, folderName) (commit 9f344ec8e, XNAT-6717; §1).
PROFILES = ("1.7", "1.8.2")
UNIQUE_CONSTRAINT = "prearchive_study"

# PrearcUtils.PrearcStatus (§3). A value outside this set breaks XNAT's reads of the whole table.
PLAIN_STATUSES = (
    "ARCHIVING",
    "BUILDING",
    "CONFLICT",
    "DELETING",
    "ERROR",
    "MOVING",
    "READY",
    "RECEIVING",
    "RECEIVING_INTERRUPT",
    "SEPARATING",
)
QUEUED_STATUSES = tuple("QUEUED_" + s for s in ("ARCHIVING", "BUILDING", "DELETING", "MOVING", "SEPARATING"))
LOCKED_STATUSES = tuple(
    "_" + s
    for s in (
        "ARCHIVING",
        "BUILDING",
        "CONFLICT",
        "DELETING",
        "MOVING",
        "RECEIVING",
        "RECEIVING_INTERRUPT",
        "SEPARATING",
    )
)
STATUSES = PLAIN_STATUSES + QUEUED_STATUSES + LOCKED_STATUSES

# PrearchiveCode names for the autoarchive column ([FW] PrearchiveCode, §1 column 13).
AUTOARCHIVE_MANUAL = "Manual"
AUTOARCHIVE_AUTO = "AutoArchive"

# What this tool writes into the ``source`` column so its rows are recognisable. The rebuilder
# skips only ``uploader`` (1.7+) / ``applet`` (1.6) (§3), so this value does not block builds.
ROW_SOURCE = "xnatmigrate"


def is_locked(status: str) -> bool:
    """PrearcDatabase.isLocked: exactly the ``_X`` statuses (§3)."""
    return status.startswith("_")


def timestamp_folder(when: datetime) -> str:
    """PrearcUtils.makeTimestamp: ``yyyyMMdd_HHmmssSSS`` (§2)."""
    return when.strftime("%Y%m%d_%H%M%S") + f"{when.microsecond // 1000:03d}"


def parse_timestamp_folder(name: str) -> datetime:
    """PrearcUtils.parseTimestampDirectory: ``yyyyMMdd_HHmmssSSS`` or ``yyyyMMdd_HHmmss`` (§2)."""
    if len(name) == 18:
        return datetime.strptime(name[:15], "%Y%m%d_%H%M%S").replace(microsecond=int(name[15:]) * 1000)
    return datetime.strptime(name, "%Y%m%d_%H%M%S")


def is_timestamp_folder(name: str) -> bool:
    """PrearcUtils.isTimestampDirectory: ``[0-9]{8}_[0-9]{9}`` or ``[0-9]{8}_[0-9]{6}`` (§2)."""
    head, _, tail = name.partition("_")
    return len(head) == 8 and head.isdigit() and tail.isdigit() and len(tail) in (6, 9)


def sql_timestamp(when: datetime) -> str:
    """java.sql.Timestamp.toString style, millisecond precision: ``2014-08-18 14:45:24.024``."""
    return when.strftime("%Y-%m-%d %H:%M:%S") + f".{when.microsecond // 1000:03d}"
