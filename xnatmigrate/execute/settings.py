"""Limits an operator tunes per run from the environment (waits on the database and the receiver).

NOTE: environment, not manifest: they describe this host's patience with a server, not the migration,
and must not change a plan's id. Each bad value is one line naming the variable.
"""

from __future__ import annotations

import os

from ..errors import SettingError

DB_LOCK_TIMEOUT = ("XNATMIGRATE_DB_LOCK_TIMEOUT", 30.0)
DB_STATEMENT_TIMEOUT = ("XNATMIGRATE_DB_STATEMENT_TIMEOUT", 600.0)
DICOM_ACSE_TIMEOUT = ("XNATMIGRATE_DICOM_ACSE_TIMEOUT", 30.0)
DICOM_DIMSE_TIMEOUT = ("XNATMIGRATE_DICOM_DIMSE_TIMEOUT", 60.0)
DICOM_MAX_STALLS = ("XNATMIGRATE_DICOM_MAX_STALLS", 3.0)


def positive(setting: tuple[str, float]) -> float:
    """The setting's value from the environment, or its default; refuses 0, negatives and non-numbers."""
    env, default = setting
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{env}={raw!r} is not a number; set it to e.g. {default:g}") from None
    if value <= 0:
        raise SettingError(f"{env}={raw!r} must be more than 0 (0 would mean: wait forever)")
    return value


# Group commit (apply): consecutive sessions of one route share one durability barrier, one database
# transaction and one ledger commit per phase, up to these limits (a larger session is a group alone).
# Small: a crash or a failure costs a group's records, which the rerun's checks rediscover.
GROUP_FILES = ("XNATMIGRATE_GROUP_FILES", 2000.0)
GROUP_SESSIONS = ("XNATMIGRATE_GROUP_SESSIONS", 200.0)
GROUP_MB = ("XNATMIGRATE_GROUP_MB", 1024.0)
