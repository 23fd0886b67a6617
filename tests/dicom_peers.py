"""DICOM peers and files for tests: real receivers on 127.0.0.1, never mocks.

- ``PynetdicomStoreSCP``: pynetdicom's AE as a C-STORE SCP in this process (threads), recording every
  instance it receives, with fault injection (failure/warning statuses, delays, dropped associations).
- ``XnatRoutingSCP``: the same, plus ``route`` - how XNAT's receiver would file each instance
  (ClassicDicomObjectIdentifier, xnat-reference.md §5).
- ``DcmtkStoreSCP``: dcmtk's ``storescp`` as a subprocess, an independent peer.
- ``build_test_files`` / ``planned_files`` / ``contexts_for``: small CT, MR and Secondary Capture files
  in explicit and implicit VR little endian, as the planner would describe them.

Invariants: every receiver listens on 127.0.0.1 only and is stopped by its context manager; nothing
here writes outside the directories it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from xnatmigrate.model import PlannedFile, PresentationContext

PATIENT_COMMENTS = 0x00104000
STUDY_COMMENTS = 0x00324000
ADDITIONAL_PATIENT_HISTORY = 0x001021B0
VERIFICATION = "1.2.840.10008.1.1"
STORESCP = shutil.which("storescp") or "/usr/bin/storescp"
DCMDUMP = shutil.which("dcmdump") or "/usr/bin/dcmdump"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------
# XNAT's routing (xnat-reference.md §5, ClassicDicomObjectIdentifier)
# ----------------------------------------------------------------------------------------------

# Java's "." without DOTALL matches anything but a line terminator (\n \r \u0085 \u2028 \u2029);
# Python's "." would match \r, so spell it out. \s and \w are ASCII in Java: re.ASCII.
_ANY = "[^\n\r\u0085\u2028\u2029]"


def _assignment(key: str) -> re.Pattern[str]:
    # §5 ContainedAssignmentExtractor: (?:\A|.*[\s,;])<Key>\s*:\s*([\w\-]*)(?:[\s,;].*\Z|\Z), matches().
    return re.compile(
        rf"(?:\A|{_ANY}*[\s,;]){key}\s*:\s*([\w\-]*)(?:[\s,;]{_ANY}*\Z|\Z)", re.IGNORECASE | re.ASCII
    )


_PATTERNS = {key: _assignment(key) for key in ("Project", "Subject", "Session")}
# §5 rows 3-5: the comment fields, in the order XNAT tries them (AdditionalPatientHistory: 1.8.0+).
COMMENT_FIELDS = ("PatientComments", "StudyComments", "AdditionalPatientHistory")


def comment_value(text: str | None, key: str) -> str | None:
    """The ``<key>:`` value XNAT extracts from one comment field, or None (no match, or empty)."""
    if not text:
        return None
    m = _PATTERNS[key].fullmatch(text)
    if m is None:
        return None
    return m.group(1) or None


def label_chars(value: str) -> str:
    """§5 Sanitizing: ``Labels.toLabelChars``, every character outside ``[A-Za-z0-9_-]`` → ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


class Route(NamedTuple):
    project: str | None  # None: Unassigned
    subject: str | None
    session: str


def xnat_route(ds: Dataset, projects: Iterable[str] = ()) -> Route:
    """Where XNAT's default identifier files ``ds`` (§5 table, rows 3-7; rows 1-2 and 8 unset).

    Each value is resolved independently, first non-empty candidate wins. A project candidate that
    names no project in ``projects`` is skipped, as XNAT's project lookup skips it.
    """
    known = set(projects)

    def text(keyword: str) -> str | None:
        return _text(ds, keyword)

    project = None
    candidates = [comment_value(text(f), "Project") for f in COMMENT_FIELDS]
    candidates += [text("StudyDescription"), text("AccessionNumber")]  # rows 6-7, whole values
    for candidate in candidates:
        if candidate and candidate in known:
            project = candidate
            break
    subject = next((v for f in COMMENT_FIELDS if (v := comment_value(text(f), "Subject"))), None)
    if subject is None and text("PatientName"):
        subject = label_chars(str(text("PatientName")))
    session = next((v for f in COMMENT_FIELDS if (v := comment_value(text(f), "Session"))), None)
    if session is None and text("PatientID"):
        session = label_chars(str(text("PatientID")))
    return Route(project, subject or None, session or "dicom_upload")  # §5 Unroutable data


# ----------------------------------------------------------------------------------------------
# pynetdicom receivers
# ----------------------------------------------------------------------------------------------


@dataclass
class Received:
    """One C-STORE as the receiver saw it."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    patient_comments: str | None
    study_comments: str | None
    association: int  # serial number of the association that carried it (1, 2, ...)
    calling_aet: str
    raw: bytes  # the dataset exactly as received, without file meta
    path: Path | None = None
    route: Route | None = None

    def dataset(self) -> Dataset:
        return pydicom.dcmread(self.path) if self.path else decode_raw(self.raw, self.transfer_syntax)


def decode_raw(raw: bytes, transfer_syntax: str) -> Dataset:
    """A dataset as encoded on the wire (no file meta) → Dataset; deflated ones are inflated first."""
    from pydicom.filereader import read_dataset
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    if ts.is_deflated:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian)


_S = TypeVar("_S", bound="PynetdicomStoreSCP")


class PynetdicomStoreSCP:
    """pynetdicom's AE as XNAT's stand-in C-STORE SCP on 127.0.0.1:<port> (threads, this process).

    Accepts every storage SOP class in ``transfer_syntaxes`` (default: all) plus Verification, and
    rejects an unknown called AE title with reason 7 as XNAT does (§5 Association rules).

    Args:
        ae_title: the called AE title it answers to.
        store_dir: when given, each instance is also written there as ``<SOPInstanceUID>.dcm``.
        fail_sop_classes / fail_status: answer this status for these SOP classes (nothing recorded).
        warn_sop_classes / warn_status: store, but answer this Warning status.
        delay: seconds to sleep before answering each C-STORE (DIMSE timeout tests).
        drop_after: abort each association when the request after its n-th store arrives.
        max_pdu: the maximum PDU length it announces (small values force many fragments).

    ``received`` maps SOPInstanceUID → the last ``Received``; ``attempts`` counts every C-STORE
    request per SOPInstanceUID, failed ones included; ``associations`` and ``aborted`` count.
    ``stop()`` aborts open associations and closes the port; ``start()`` listens again on it.
    """

    def __init__(
        self,
        ae_title: str = "XNAT",
        store_dir: Path | None = None,
        fail_sop_classes: Iterable[str] = (),
        fail_status: int = 0xC000,
        delay: float = 0.0,
        drop_after: int | None = None,
        *,
        warn_sop_classes: Iterable[str] = (),
        warn_status: int = 0xB000,
        transfer_syntaxes: Sequence[str] = tuple(ALL_TRANSFER_SYNTAXES),
        max_pdu: int = 16382,
    ) -> None:
        self.ae_title = ae_title
        self.store_dir = Path(store_dir) if store_dir else None
        self.fail_sop_classes = set(fail_sop_classes)
        self.fail_status = fail_status
        self.warn_sop_classes = set(warn_sop_classes)
        self.warn_status = warn_status
        self.delay = delay
        self.drop_after = drop_after
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.max_pdu = max_pdu
        self.port = 0
        self.received: dict[str, Received] = {}
        self.attempts: dict[str, int] = {}
        self.associations = 0
        self.aborted = 0
        self.open = 0  # associations established and not yet released or aborted
        self.most_open = 0  # the most that were open at once
        self._per_assoc: dict[int, tuple[int, int]] = {}  # id(assoc) -> (serial, stores)
        self._lock = threading.Lock()
        self._ae: AE | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self: _S) -> _S:
        """Listen (again) on 127.0.0.1; the first start picks a free port, later ones reuse it."""
        if self._ae is not None:
            return self
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.maximum_pdu_size = self.max_pdu
        ae.network_timeout = 30
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), self.transfer_syntaxes)
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, _nodelay),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
        ]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.port = int(server.server_address[1])
        self._ae = ae
        return self

    def stop(self) -> None:
        """Abort every open association and stop listening (the port is kept for ``start``)."""
        ae, self._ae = self._ae, None
        if ae is None:
            return
        # pynetdicom raises in its reactor thread when told to abort an association that is only
        # waiting for its connection to close (rejected/released, Sta13): let those finish first.
        deadline = time.monotonic() + 2
        while any(not a.is_established for a in ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.01)
        ae.shutdown()

    @property
    def running(self) -> bool:
        return self._ae is not None

    # -- handlers ---------------------------------------------------------------------------

    def _on_established(self, event: Any) -> None:
        with self._lock:
            self.associations += 1
            self._per_assoc[id(event.assoc)] = (self.associations, 0)
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def _on_aborted(self, event: Any) -> None:
        with self._lock:
            self.aborted += 1
            self.open -= 1

    def _on_released(self, event: Any) -> None:
        with self._lock:
            self.open -= 1

    def route(self, ds: Dataset) -> Route | None:
        """Overridden by ``XnatRoutingSCP``."""
        return None

    def _on_store(self, event: Any) -> int:
        raw = event.request.DataSet.getvalue()
        ts = str(event.context.transfer_syntax)
        sop_class = str(event.request.AffectedSOPClassUID)
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            serial, stores = self._per_assoc.get(id(event.assoc), (0, 0))
            self._per_assoc[id(event.assoc)] = (serial, stores + 1)
            self.attempts[uid] = self.attempts.get(uid, 0) + 1
        if self.drop_after is not None and stores >= self.drop_after:
            event.assoc.abort()
            return 0xA700
        if self.delay:
            time.sleep(self.delay)
        if sop_class in self.fail_sop_classes:
            return self.fail_status
        ds = event.dataset
        path = None
        if self.store_dir is not None:
            ds.file_meta = event.file_meta
            path = self.store_dir / f"{uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
        record = Received(
            sop_instance_uid=uid,
            sop_class_uid=sop_class,
            transfer_syntax=ts,
            patient_comments=_text(ds, "PatientComments"),
            study_comments=_text(ds, "StudyComments"),
            association=serial,
            calling_aet=str(event.assoc.requestor.ae_title),
            raw=raw,
            path=path,
            route=self.route(ds),
        )
        with self._lock:
            self.received[uid] = record
        return self.warn_status if sop_class in self.warn_sop_classes else 0x0000


class XnatRoutingSCP(PynetdicomStoreSCP):
    """``PynetdicomStoreSCP`` that also records where XNAT would file each instance (§5).

    ``projects``: the project IDs/aliases that exist; other project candidates are skipped.
    ``routes`` maps SOPInstanceUID → ``Route``.
    """

    def __init__(self, *args: Any, projects: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.projects = frozenset(projects)

    def route(self, ds: Dataset) -> Route:
        return xnat_route(ds, self.projects)

    @property
    def routes(self) -> dict[str, Route]:
        return {uid: r.route for uid, r in self.received.items() if r.route is not None}


def _nodelay(event: Any) -> None:
    # XNAT's receiver sets TCP_NODELAY on its side (the lead's measurements); mirror it.
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)  # by keyword: the value itself (PersonName, str, ...)
    return None if value is None or str(value) == "" else str(value)


# ----------------------------------------------------------------------------------------------
# dcmtk storescp
# ----------------------------------------------------------------------------------------------


class DcmtkStoreSCP:
    """dcmtk's ``storescp`` on 127.0.0.1:<free port>, writing what it receives to ``out_dir``.

    ``fork=True`` serves associations in parallel (``--fork``); the default serves one at a time.
    Skips the calling test when dcmtk is not installed (``.ci/run`` installs it). Stopped by its
    pid in ``__exit__``; its log is ``out_dir/../storescp-<port>.log``.
    """

    def __init__(self, out_dir: Path, ae_title: str = "XNAT", fork: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.ae_title = ae_title
        self.fork = fork
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def __enter__(self) -> DcmtkStoreSCP:
        if not os.access(STORESCP, os.X_OK):
            pytest.skip("dcmtk storescp not installed; .ci/run installs it")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.out_dir.parent / f"storescp-{self.port}.log"
        cmd = [STORESCP, "--aetitle", self.ae_title, "-od", str(self.out_dir), "+xa", "-ta", "10"]
        if self.fork:
            cmd.append("--fork")
        cmd.append(str(self.port))
        # TCP_NODELAY=1: dcmtk's runtime switch to disable Nagle, as XNAT's receiver does.
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                # A bare probe is not an association: storescp only logs it.
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("storescp did not start listening within 10 s") from None
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def received(self) -> dict[str, Path]:
        """SOPInstanceUID → file, from storescp's ``<modality>.<SOPInstanceUID>`` names."""
        return {p.name.split(".", 1)[1]: p for p in self.out_dir.iterdir() if "." in p.name}


def dcmdump(path: Path, *tags: str) -> str:
    """``dcmdump +P tag ...`` output for ``path`` (dcmtk's own reading of the file)."""
    args = [DCMDUMP]
    for tag in tags:
        args += ["+P", tag]
    return subprocess.run([*args, str(path)], check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------------------------
# Test files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySpec:
    """One small study: SOP class, transfer syntax and the comment fields it starts with."""

    sop_class: str
    transfer_syntax: str
    modality: str
    patient_name: str
    patient_id: str
    study_description: str = "TEST STUDY"
    patient_comments: str | None = None
    study_comments: str | None = None
    additional_patient_history: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_STUDIES: tuple[StudySpec, ...] = (
    # An existing PatientComments the sender must replace, and a sequence of undefined length
    # before group 0010 that the splicer must walk through.
    StudySpec(
        MRImageStorage,
        ExplicitVRLittleEndian,
        "MR",
        "DOE^JOHN",
        "PAT-001",
        patient_comments="Project: WRONG Subject: WRONG Session: WRONG",
    ),
    StudySpec(CTImageStorage, ImplicitVRLittleEndian, "CT", "ROE^JANE", "PAT 002", study_comments="old note"),
    StudySpec(
        SecondaryCaptureImageStorage,
        ExplicitVRLittleEndian,
        "OT",
        "POE^EDGAR",
        "PAT003",
        additional_patient_history="seen before",
    ),
    StudySpec(MRImageStorage, ImplicitVRLittleEndian, "MR", "DOE^JOHN", "PAT-001"),
)


def build_test_files(
    root: Path,
    studies: Sequence[StudySpec] = DEFAULT_STUDIES,
    *,
    images: int = 2,
    rows: int = 16,
    seed: str = "xnatmigrate-tests",
) -> list[list[Path]]:
    """Write ``images`` files per study under ``root/<n>/``; returns the paths, one list per study.

    UIDs are derived from ``seed`` (deterministic); pixels are 16-bit, ``rows`` x ``rows``.
    """
    out: list[list[Path]] = []
    for n, spec in enumerate(studies):
        folder = Path(root) / f"study{n + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid(entropy_srcs=[seed, "study", str(n)])
        series_uid = generate_uid(entropy_srcs=[seed, "series", str(n)])
        paths = []
        for i in range(images):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.SOPClassUID = spec.sop_class
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "instance", str(n), str(i)])
            ds.StudyDate = "20240131"
            ds.StudyTime = "101112"
            ds.AccessionNumber = f"ACC{n + 1:04d}"
            ds.Modality = spec.modality
            ds.StudyDescription = spec.study_description
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            ref.ReferencedSOPInstanceUID = generate_uid(entropy_srcs=[seed, "ref", str(n)])
            ref.is_undefined_length_sequence_item = True
            ds.ReferencedStudySequence = DicomSequence([ref])
            ds["ReferencedStudySequence"].is_undefined_length = True
            ds.PatientName = spec.patient_name
            ds.PatientID = spec.patient_id
            ds.PatientBirthDate = "19700101"
            ds.PatientSex = "O"
            if spec.additional_patient_history is not None:
                ds.AdditionalPatientHistory = spec.additional_patient_history
            if spec.patient_comments is not None:
                ds.PatientComments = spec.patient_comments
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = str(n + 1)
            ds.SeriesNumber = 1
            ds.InstanceNumber = i + 1
            if spec.study_comments is not None:
                ds.StudyComments = spec.study_comments
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = rows
            ds.Columns = rows
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            for keyword, value in spec.extra.items():
                setattr(ds, keyword, value)
            ds.PixelData = bytes((i + k) % 251 for k in range(rows * rows * 2))
            ds["PixelData"].VR = "OW"
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = UID(spec.sop_class)
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = UID(spec.transfer_syntax)
            path = folder / f"IMG{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        out.append(paths)
    return out


def planned_files(paths: Iterable[Path]) -> list[PlannedFile]:
    """``PlannedFile``s for ``paths`` as the planner makes them (headers only)."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        st = path.stat()
        out.append(
            PlannedFile(
                source=str(path),
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                dest=path.name,
            )
        )
    return out


def contexts_for(files: Iterable[PlannedFile]) -> tuple[PresentationContext, ...]:
    """One ``PresentationContext`` per SOP class with the transfer syntaxes its files use."""
    by_class: dict[str, set[str]] = {}
    for f in files:
        by_class.setdefault(f.sop_class_uid, set()).add(f.transfer_syntax)
    return tuple(PresentationContext(k, tuple(sorted(v))) for k, v in sorted(by_class.items()))


def sha256_of(paths: Iterable[Path | str]) -> dict[str, str]:
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def without(ds: Dataset, *tags: int) -> Dataset:
    """A copy of ``ds`` without ``tags`` (top level), for element-wise comparison."""
    copy = Dataset(ds)
    for tag in tags:
        if tag in copy:
            del copy[tag]
    return copy
