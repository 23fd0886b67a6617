"""Hand-made planned sessions for tests and benchmarks that exercise one executor without a plan."""

from __future__ import annotations

from collections.abc import Sequence

from ..model import Build, CstoreSession, PlannedScan, PrearchiveSession, Routing, Transfer


def prearchive_session(
    scans: Sequence[PlannedScan],
    *,
    project: str | None = "P1",
    timestamp: str = "20240131_101112123",
    label: str = "S1",
    action_id: str = "a1",
    study_uid: str = "1.2.3.4",
    root: str = "/nonexistent-prearchive",
) -> PrearchiveSession:
    """A prearchive session holding ``scans`` (no row content: for the file executors only)."""
    rel = f"{project}/{timestamp}/{label}" if project else f"{timestamp}/{label}"
    return PrearchiveSession(
        action_id=action_id,
        source_index=0,
        project=project,
        subject="SUBJ",
        session=label,
        study_uid=study_uid,
        timestamp=timestamp,
        build=Build.NONE,
        archive=False,
        transfer=Transfer.COPY,
        build_timeout=1.0,
        prearchive_uri=f"/prearchive/projects/{project or 'Unassigned'}/{timestamp}/{label}",
        session_dir=f"{root}/{rel}",
        url=f"{root}/{rel}",
        row={},
        scans=tuple(scans),
    )


def cstore_session(
    scans: Sequence[PlannedScan],
    *,
    action_id: str = "c1",
    project: str = "P2",
    label: str = "C1",
    study_uid: str = "1.2.9",
    build: Build = Build.REST,
    archive: bool = False,
) -> CstoreSession:
    """A C-STORE session holding ``scans``, routed by PatientComments (no contexts: for executors only)."""
    return CstoreSession(
        action_id=action_id,
        source_index=0,
        project=project,
        subject="SUBJ",
        session=label,
        study_uid=study_uid,
        build=build,
        archive=archive,
        build_timeout=1.0,
        prearchive_uri=f"/prearchive/projects/{project}",
        scans=tuple(scans),
        routing=Routing.PATIENT_COMMENTS,
    )
