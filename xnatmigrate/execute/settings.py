"""Limits an operator tunes per run from the environment (waits on the database and the receiver).

NOTE: environment, not manifest: they describe this host's patience with a server, not the migration,
and must not change a plan's id. Each bad value is one line naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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

# The fleet's budget for XNAT (execute.fleet), across every host of one migration: recorded in the
# ledger by the worker that queues a round, so every host keeps the same one. Conservative defaults.
BUDGET_ASSOCIATIONS = ("XNATMIGRATE_BUDGET_ASSOCIATIONS", 4.0)  # C-STORE associations open at once
BUDGET_BUILDS = ("XNATMIGRATE_BUDGET_BUILDS", 2.0)  # REST builds and archives in flight at once
BUDGET_INSERTS = ("XNATMIGRATE_BUDGET_INSERTS_PER_S", 20.0)  # rows into xdat_search.prearchive per second
# The governor: before a unit, a worker waits while XNAT's prearchive holds this many sessions being
# built (BUILDING, QUEUED_BUILDING, _BUILDING: XNAT's own work, ours and anyone's), or while the
# prearchive's (inbox's) file system has less than this many GB free.
GOVERNOR_BUILDING = ("XNATMIGRATE_GOVERNOR_BUILDING", 10.0)
GOVERNOR_MIN_FREE_GB = ("XNATMIGRATE_GOVERNOR_MIN_FREE_GB", 5.0)
# And while builds (archives) take this many times as long as the plan's first ones of their kind and
# size, the fleet builds one session at a time (its build budget drops to 1) until they recover.
GOVERNOR_SLOW_BUILDS = ("XNATMIGRATE_GOVERNOR_SLOW_BUILDS", 3.0)


@dataclass(frozen=True)
class Budget:
    """What the whole fleet may ask of XNAT at once (``settings.BUDGET_*``, ``GOVERNOR_*``), the same on
    every host: the worker queueing a round records it in the ledger, the others read it from there."""

    associations: int
    builds: int
    building: int
    min_free_gb: float
    inserts_per_s: float = BUDGET_INSERTS[1]  # a budget recorded before this field had the default
    slow_builds: float = GOVERNOR_SLOW_BUILDS[1]  # likewise

    @classmethod
    def from_env(cls) -> Budget:
        return cls(
            associations=int(positive(BUDGET_ASSOCIATIONS)),
            builds=int(positive(BUDGET_BUILDS)),
            building=int(positive(GOVERNOR_BUILDING)),
            min_free_gb=positive(GOVERNOR_MIN_FREE_GB),
            inserts_per_s=positive(BUDGET_INSERTS),
            slow_builds=positive(GOVERNOR_SLOW_BUILDS),
        )

    def describe(self) -> str:
        return (
            f"at most {self.associations} C-STORE association(s) and {self.builds} build(s) or archive(s) at "
            f"once and {self.inserts_per_s:g} prearchive row(s) a second across all hosts; a unit waits while XNAT builds {self.building} session(s) or more, or "
            f"while under {self.min_free_gb:g} GB are free where it writes; one build at a time while builds "
            f"take {self.slow_builds:g}× as long as the plan's first ones"
        )
