"""User-facing errors.

Every failure the user can fix is an ``XnatMigrateError``: the CLI prints its message as one line and
exits 1. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class XnatMigrateError(Exception):
    """Root of every error the CLI reports as one line.

    NOTE: the message must say what happened *and* what to do next.
    """


class ManifestError(XnatMigrateError):
    """A manifest is unreadable or invalid; ``problems`` lists every finding at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = problems[0].render() if problems else "invalid manifest"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{first}{more}")


class Problem:
    """One finding about a manifest: where it is and what is wrong."""

    __slots__ = ("file", "line", "message", "path", "severity")

    def __init__(self, file: str, line: int | None, path: str, message: str, severity: str = "error") -> None:
        self.file = file
        self.line = line
        self.path = path
        self.message = message
        self.severity = severity

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.path}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "path": self.path,
            "message": self.message,
            "severity": self.severity,
        }

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Problem({self.render()!r})"


class PlanError(XnatMigrateError):
    """The plan was refused (a target-wide finding) or cannot be read."""


class StalePlanError(XnatMigrateError):
    """The saved plan no longer matches the manifest, the sources or the state."""


class StateError(XnatMigrateError):
    """The state file is unreadable, of a newer format, or locked by another run."""


class LockedError(StateError):
    """Another apply holds the state directory."""


class DatabaseError(XnatMigrateError):
    """XNAT's PostgreSQL database refused or could not be reached."""


class SettingError(XnatMigrateError):
    """A setting of this run (an environment variable) has a value the tool cannot use."""


class SessionConflict(XnatMigrateError):
    """Another session of the same study stands where one planned session would go: that session
    fails, the run goes on (a shared resource is fine; this study is not)."""


class XnatRestError(XnatMigrateError):
    """XNAT's REST API answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class DicomSendError(XnatMigrateError):
    """A DICOM association or C-STORE failed."""


class ReceiverError(DicomSendError):
    """The receiver itself cannot be used (unreachable, rejects every association, or accepts
    associations but makes no progress): every later session would fail alike, so the run stops."""


class ApplyError(XnatMigrateError):
    """One or more sessions failed during apply; a rerun resumes."""


class DicomEditError(XnatMigrateError):
    """A DicomEdit script cannot be parsed, uses what xnatmigrate does not implement, or failed on a file.

    The message starts ``source:line:`` and names the construct; ``source`` and ``line`` are kept.
    """

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


class AnonymizationError(XnatMigrateError):
    """A de-identification script failed on a file, or would change what the plan named it by."""
