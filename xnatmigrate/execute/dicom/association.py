"""The DICOM Upper Layer association, requestor side: synchronous, one operation at a time.

Invariants:
- Every association is a context manager: leaving the ``with`` block normally releases it; leaving
  it by any exception (KeyboardInterrupt too) aborts it. The socket is closed either way.
- One outstanding DIMSE operation: a request is written whole, then its one response is read
  before the next request (no asynchronous operations window), so a response that answers
  anything else is a protocol error and aborts the association.
- Datasets go out as views of the bytes read (``socket.sendmsg``, no copies of the pixel data),
  each P-DATA-TF at most the peer's maximum PDU length.
- Errors are three kinds: ``Unreachable`` (no association: refused, timed out, transiently
  rejected), ``Rejected`` (permanently rejected: configuration to fix, a ``DicomSendError``) and
  ``Lost`` (the association broke while waiting for a response: an empty status, never success).

NOTE: no TLS, no extended negotiation or user identity; C-STORE and C-ECHO only (``dimse.py``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType

from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext as _NetContext
from pynetdicom.presentation import negotiate_as_requestor

from ... import __version__
from ...dicombytes import IMPLICIT_VR_LE
from ...errors import DicomSendError, ReceiverError
from ...model import ScpTarget
from . import dimse, part10, pdu
from .pdu import PduType

LOGGER = logging.getLogger(__name__)

_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# Our own implementation identity: a UUID-derived UID under 2.25 (PS3.5 B.2), no registered root needed.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://xnatmigrate/dicom-sender').int}"
IMPLEMENTATION_VERSION = f"XNATMIGRATE_{__version__.replace('.', '')}"[:16]

# What we tell the peer we accept: only small C-STORE responses ever come back.
_RECEIVE_MAX_PDU = 16384
# When the peer announces "no limit" (0), still cut the dataset: fewer, larger PDVs cost nothing.
_UNLIMITED_FRAGMENT = 4 * 1024 * 1024
_FLUSH_BYTES = 4 * 1024 * 1024  # hand the kernel this much per sendmsg
_MAX_IOV = 960  # below IOV_MAX (1024)
_ACCEPTANCE = 0x00  # presentation context result "acceptance" (PS3.8 9.3.3.2)
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 2 is "rejected-transient"; from source 1 (service user),
# reason 3 is "calling AE title not recognized" and 7 "called AE title not recognized".
_RJ_TRANSIENT = 2
_RJ_SERVICE_USER = 1
_RJ_CALLING_AE, _RJ_CALLED_AE = 3, 7

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID): one presentation context


class Lost(Exception):
    """The association ended or broke while waiting for a response: an empty status."""


class Unreachable(Exception):
    """No association could be made (refused, unreachable, timed out, transient rejection)."""


class Rejected(ReceiverError):
    """The receiver permanently rejected the association: fix the configuration."""


class Association:
    """One association to ``scp`` proposing ``pairs``; a context manager that always ends it.

    ``accepted`` maps each accepted (SOP class, transfer syntax) pair to its context ID;
    ``rejected`` maps the others to the reason.
    """

    def __init__(
        self, scp: ScpTarget, pairs: Sequence[Pair], acse_timeout: float, dimse_timeout: float
    ) -> None:
        self.scp = scp
        self.pairs = list(pairs)
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.sock: socket.socket | None = None
        self.accepted: dict[Pair, int] = {}
        self.rejected: dict[Pair, str] = {}
        self.fragment = 16378
        self._msg_id = 0

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Association:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()

    @property
    def where(self) -> str:
        return f"{self.scp.host}:{self.scp.port}"

    def open(self) -> None:
        scp = self.scp
        try:
            sock = socket.create_connection((scp.host, scp.port), timeout=self.acse_timeout)
        except ConnectionRefusedError:
            raise Unreachable(
                f"connection refused by {self.where}: is XNAT's DICOM receiver running there? "
                "Check xnat.scp.host and xnat.scp.port"
            ) from None
        except TimeoutError:
            raise Unreachable(
                f"no answer from {self.where} within {self.acse_timeout:g} s; check xnat.scp.host, "
                "xnat.scp.port and any firewall"
            ) from None
        except OSError as exc:
            raise Unreachable(
                f"cannot reach {self.where}: {exc.strerror or exc}; check xnat.scp.host and xnat.scp.port"
            ) from None
        self.sock = sock
        try:
            # Nagle + delayed ACK stall every C-STORE request by up to 40 ms; XNAT sets it on its side.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._negotiate()
        except BaseException:
            self._close()
            raise

    def _negotiate(self) -> None:
        scp = self.scp
        rq_contexts = []
        for n, (sop_class, ts) in enumerate(self.pairs):
            cx = _NetContext()
            cx.context_id = 2 * n + 1  # odd IDs (PS3.8 9.3.2.2)
            cx.abstract_syntax = sop_class
            cx.transfer_syntax = [ts]  # one syntax per context: no file is ever transcoded
            rq_contexts.append(cx)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = _APPLICATION_CONTEXT
        try:
            primitive.calling_ae_title = scp.calling_aet
            primitive.called_ae_title = scp.called_aet
        except ValueError as exc:
            raise Rejected(f"invalid AE title in xnat.scp: {exc}") from None
        primitive.presentation_context_definition_list = rq_contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = _RECEIVE_MAX_PDU
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION
        primitive.user_information = [max_length, impl_uid, impl_name]
        sock = self._socket()
        sock.settimeout(self.acse_timeout)
        try:
            sock.sendall(pdu.encode_associate_rq(primitive))
            pdu_type, data = self._read_pdu()
        except (Lost, OSError) as exc:
            raise Unreachable(f"{self.where} did not complete association negotiation: {exc}") from None
        if pdu_type == PduType.A_ASSOCIATE_RJ:
            self._rejected(pdu.decode_associate_rj(data))
        if pdu_type == PduType.A_ABORT:
            raise Unreachable(f"{self.where} aborted the association request")
        if pdu_type != PduType.A_ASSOCIATE_AC:
            raise Unreachable(f"{self.where} answered the association request with PDU type {pdu_type}")
        accepted = pdu.decode_associate_ac(data)
        for item in accepted.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
                self.fragment = peer_max - pdu.PDV_OVERHEAD if peer_max else _UNLIMITED_FRAGMENT
        results = negotiate_as_requestor(rq_contexts, accepted.presentation_context_definition_results_list)
        proposed = {cx.context_id: (sop, ts) for cx, (sop, ts) in zip(rq_contexts, self.pairs)}
        for cx in results:
            cid = cx.context_id or 0
            pair = proposed.get(cid, (str(cx.abstract_syntax), ""))
            if cx.result == _ACCEPTANCE and cx.transfer_syntax and str(cx.transfer_syntax[0]) == pair[1]:
                self.accepted[pair] = cid
            else:
                self.rejected[pair] = str(cx.status)
        if self.fragment < 1:
            raise Unreachable(f"{self.where} announced an unusable maximum PDU length")
        LOGGER.debug("association to %s: %d context(s) accepted", self.where, len(self.accepted))

    def _rejected(self, rj: A_ASSOCIATE_RJ) -> None:
        """Raise what an A-ASSOCIATE-RJ means: Rejected (fix the configuration) or Unreachable (retry)."""
        scp = self.scp
        source, reason = rj.source, rj.reason_diagnostic
        try:
            why = rj.reason_str
        except ValueError:
            why = f"reason {reason}"
        if source == _RJ_SERVICE_USER and reason == _RJ_CALLED_AE:
            # §5: dcm4che2 rejects an unknown called AE with reason 7.
            raise Rejected(
                f"{self.where} rejected the association: called AE title '{scp.called_aet}' not recognised; "
                "set xnat.scp.called_aet to the AE title of XNAT's receiver on that port "
                "(GET /xapi/dicomscp lists them; the default is XNAT)"
            )
        if source == _RJ_SERVICE_USER and reason == _RJ_CALLING_AE:
            # §5: XNAT 1.8.5+ whitelist miss.
            raise Rejected(
                f"{self.where} rejected the association: calling AE title '{scp.calling_aet}' not "
                "recognised; add it to the receiver's whitelist or change xnat.scp.calling_aet"
            )
        if rj.result == _RJ_TRANSIENT:
            raise Unreachable(
                f"{self.where} rejected the association for now ({why}); if it limits associations, "
                "send with fewer parallel jobs"
            )
        raise Rejected(f"{self.where} rejected the association ({why}); check xnat.scp")

    def release(self) -> None:
        """A-RELEASE; falls back to an abort when the peer does not answer in time."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.acse_timeout)
            self.sock.sendall(pdu.RELEASE_RQ)
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type == PduType.A_RELEASE_RP:
                    break
                if pdu_type == PduType.A_RELEASE_RQ:  # release collision (PS3.8 7.2.2): the requestor answers
                    self.sock.sendall(pdu.RELEASE_RP)
                    break
                if pdu_type == PduType.A_ABORT:
                    break
        except (OSError, Lost):
            self.abort()
            return
        self._close()

    def abort(self) -> None:
        """A-ABORT (best effort) and close; safe to call at any time."""
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.sendall(pdu.ABORT)
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def _socket(self) -> socket.socket:
        if self.sock is None:
            raise Lost("the association is closed")
        return self.sock

    # -- PDUs -------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        sock = self._socket()
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if not k:
                raise Lost("the receiver closed the connection")
            got += k
        return bytes(buf)

    def _read_pdu(self) -> tuple[int, bytes]:
        """(PDU type, the whole PDU, header included)."""
        head = self._recv_exact(pdu.HEADER_SIZE)
        pdu_type, length = pdu.read_header(head)
        if length > pdu.MAX_READ_LENGTH:
            raise Lost(f"the receiver sent an implausible PDU ({length} bytes)")
        return pdu_type, head + self._recv_exact(length)

    def _sendv(self, bufs: list[part10.Piece]) -> None:
        sock = self._socket()
        i = 0
        while i < len(bufs):
            sent = sock.sendmsg(bufs[i : i + _MAX_IOV])
            while sent:
                size = len(bufs[i])
                if sent >= size:
                    sent -= size
                    i += 1
                else:
                    bufs[i] = memoryview(bufs[i])[sent:]
                    sent = 0

    def _send_message(self, context_id: int, command: bytes, payload: part10.Payload | None) -> None:
        """A command set in one PDV, then the payload in PDVs of at most ``fragment`` bytes."""
        bufs: list[part10.Piece] = [
            pdu.pdv_header(len(command), context_id, pdu.PDV_COMMAND | pdu.PDV_LAST),
            command,
        ]
        if payload is not None:
            frag, total, done = self.fragment, payload.length, 0
            header, last, more = pdu.pdv_header, pdu.PDV_LAST, pdu.PDV_DATASET  # locals: a PDU per loop
            parts: list[part10.Piece] = []
            size = pending = 0
            # Looked up on the module, not imported: the tests replace it to change a file mid-send.
            for segment in part10.segments(payload):
                seg = memoryview(segment)
                off, n = 0, len(seg)
                while off < n:
                    take = min(frag - size, n - off)
                    parts.append(seg[off : off + take])
                    size += take
                    off += take
                    done += take
                    if size == frag or done == total:
                        bufs.append(header(size, context_id, last if done == total else more))
                        bufs.extend(parts)
                        pending += size
                        parts, size = [], 0
                        if pending >= _FLUSH_BYTES or len(bufs) >= _MAX_IOV:
                            self._sendv(bufs)
                            bufs, pending = [], 0
            if done != total:
                raise part10.SourceChanged("the file changed size while it was being sent")
        self._sendv(bufs)

    def _receive_command(self) -> bytes:
        """The next command set the receiver sends; Lost when it sends none."""
        sock = self._socket()
        sock.settimeout(self.dimse_timeout)
        fragments: list[bytes] = []
        while True:
            try:
                pdu_type, data = self._read_pdu()
            except TimeoutError:
                self.abort()
                raise Lost(
                    f"no response within {self.dimse_timeout:g} s (DIMSE timeout); association aborted"
                ) from None
            except OSError as exc:
                self._close()
                raise Lost(f"connection lost: {exc.strerror or exc}") from None
            match pdu_type:
                case PduType.P_DATA_TF:
                    pass
                case PduType.A_ABORT:
                    source, reason = pdu.decode_abort(data)
                    self._close()
                    raise Lost(f"the receiver aborted the association (source {source}, reason {reason})")
                case PduType.A_RELEASE_RQ:
                    with contextlib.suppress(OSError):
                        sock.sendall(pdu.RELEASE_RP)
                    self._close()
                    raise Lost("the receiver released the association")
                case _:
                    self.abort()
                    raise Lost(f"unexpected PDU type {pdu_type} from the receiver; association aborted")
            for control, value in pdu.pdvs(data):
                if not control & pdu.PDV_COMMAND:
                    continue  # a dataset fragment; C-STORE/C-ECHO responses carry none
                fragments.append(value)
                if control & pdu.PDV_LAST:
                    return b"".join(fragments)

    def _response(self, msg_id: int, command_field: int) -> tuple[int, str | None]:
        """Status and error comment of the response to ``msg_id``; Lost when none comes."""
        try:
            return dimse.response_status(self._receive_command(), command_field, msg_id)
        except dimse.BadResponse as exc:
            self.abort()
            raise Lost(f"{exc}; association aborted") from None

    # -- DIMSE operations -------------------------------------------------------------------

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1
        return self._msg_id

    def store(
        self,
        sop_class: str,
        sop_instance: str,
        payload: part10.Payload,
        meanwhile: Callable[[], object] | None = None,
    ) -> tuple[int, str | None]:
        """C-STORE one dataset; (status, error comment), or Lost for an empty status. ``meanwhile`` is
        called once the request is sent, before its response is read: the caller's work for the next
        request (reading and editing the next file) done while the receiver stores this one."""
        context_id = self.accepted[(sop_class, payload.transfer_syntax)]
        msg_id = self._next_id()
        command = dimse.c_store_rq(msg_id, sop_class, sop_instance)
        try:
            self._send_message(context_id, command, payload)
        except part10.SourceChanged as exc:
            self.abort()  # half a message is on the wire: this association cannot go on
            raise Lost(f"{exc}; association aborted") from None
        except TimeoutError:
            self.abort()
            raise Lost(
                f"the receiver took no data for {self.dimse_timeout:g} s (DIMSE timeout); association aborted"
            ) from None
        except OSError as exc:
            self._close()
            raise Lost(f"connection lost while sending: {exc.strerror or exc}") from None
        if meanwhile is not None:
            meanwhile()
        return self._response(msg_id, dimse.C_STORE_RSP)

    def echo(self) -> tuple[int, str | None]:
        """C-ECHO; (status, error comment), or Lost for an empty status."""
        context_id = self.accepted[(dimse.VERIFICATION, IMPLICIT_VR_LE)]
        msg_id = self._next_id()
        try:
            self._send_message(context_id, dimse.c_echo_rq(msg_id), None)
        except OSError as exc:
            self._close()
            raise Lost(f"connection lost while sending: {exc.strerror or exc}") from None
        return self._response(msg_id, dimse.C_ECHO_RSP)


def echo(scp: ScpTarget, timeout: float = 10) -> None:
    """C-ECHO ``scp``; returns quietly when it answers Success.

    Raises:
        DicomSendError: unreachable, association rejected (the message names the AE title or
            host:port to fix), no answer within ``timeout`` or a non-Success status.
    """
    pair = (dimse.VERIFICATION, IMPLICIT_VR_LE)
    try:
        with Association(scp, [pair], timeout, timeout) as assoc:
            if pair not in assoc.accepted:
                raise DicomSendError(
                    f"{scp.host}:{scp.port} (AE {scp.called_aet}) does not accept C-ECHO (Verification)"
                )
            status, comment = assoc.echo()
    except Lost as exc:
        raise DicomSendError(f"C-ECHO to {scp.host}:{scp.port} failed: {exc}") from None
    except Unreachable as exc:
        raise DicomSendError(str(exc)) from None
    if status != dimse.SUCCESS:
        raise DicomSendError(
            f"C-ECHO to {scp.host}:{scp.port} answered status 0x{status:04X}{f': {comment}' if comment else ''}"
        )
