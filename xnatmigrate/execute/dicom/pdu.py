"""Upper Layer PDUs (PS3.8 9.3) as bytes: named types, the fixed-form PDUs, P-DATA-TF framing.

Invariants:
- No socket and no state: ``association.py`` does the I/O, this module only says what the bytes are.
- A-ASSOCIATE-RQ/AC/RJ and A-ABORT decoding go through pynetdicom's PDU classes (their variable
  items, presentation contexts and user information, are pynetdicom's well-tested code); the PDUs
  on the hot path (P-DATA-TF) and the fixed 10-byte ones are packed here, without objects.
- Every P-DATA-TF this sender writes carries exactly one PDV, so a PDU header and a PDV header
  are written together (``pdv_header``) and the PDU length is always the PDV length + 4.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE


class PduType(IntEnum):
    """The first byte of every PDU (PS3.8 Table 9-1 ... 9-26)."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


# Message Control Header of a PDV (PS3.8 E.2): bit 0 command (else dataset), bit 1 last fragment.
PDV_COMMAND = 0x01
PDV_LAST = 0x02
PDV_DATASET = 0x00

#: PDU type, reserved byte, 4-byte length (big endian, like every Upper Layer field).
HEADER_SIZE = 6
#: What the maximum PDU length a peer announces counts besides the PDV's data: the PDV item length
#: (4), presentation context ID (1) and message control header (1).
PDV_OVERHEAD = 6
#: No PDU we read is bigger: a peer announcing more sends nothing but small responses anyway.
MAX_READ_LENGTH = 64 * 1024 * 1024

_HEADER = struct.Struct(">BxI")
_PDV = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, PDV length, context ID, control
_PDV_LENGTH = struct.Struct(">I")

# A-ABORT source 0: the service user (us) initiated it; reason 0: no reason given (PS3.8 9.3.8).
_ABORT_SOURCE_USER = 0
_FIXED = struct.Struct(">BxIBBBB")  # type, reserved, length 4, then 4 bytes (reserved or source/reason)

RELEASE_RQ = _FIXED.pack(PduType.A_RELEASE_RQ, 4, 0, 0, 0, 0)
RELEASE_RP = _FIXED.pack(PduType.A_RELEASE_RP, 4, 0, 0, 0, 0)
ABORT = _FIXED.pack(PduType.A_ABORT, 4, 0, 0, _ABORT_SOURCE_USER, 0)


def read_header(head: bytes) -> tuple[int, int]:
    """(PDU type, length of what follows the 6-byte header)."""
    pdu_type, length = _HEADER.unpack_from(head)
    return int(pdu_type), int(length)


_P_DATA_TF = int(PduType.P_DATA_TF)  # a plain int: enum member lookup costs, and this runs per PDU


def pdv_header(size: int, context_id: int, control: int) -> bytes:
    """PDU and PDV headers of a P-DATA-TF whose one PDV carries ``size`` bytes."""
    return _PDV.pack(_P_DATA_TF, 0, size + PDV_OVERHEAD, size + 2, context_id, control)


def pdvs(pdu: bytes) -> Iterator[tuple[int, bytes]]:
    """(message control header, data) of each PDV in a whole P-DATA-TF PDU (header included)."""
    pos = HEADER_SIZE
    while pos + 6 <= len(pdu):
        (item_len,) = _PDV_LENGTH.unpack_from(pdu, pos)
        yield pdu[pos + 5], pdu[pos + 6 : pos + 4 + item_len]
        pos += 4 + item_len


def encode_associate_rq(primitive: A_ASSOCIATE) -> bytes:
    """The A-ASSOCIATE-RQ PDU of ``primitive`` (pynetdicom's encoder)."""
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def decode_associate_ac(pdu: bytes) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of a whole A-ASSOCIATE-AC PDU (pynetdicom's decoder)."""
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu)
    return ac.to_primitive()


def decode_associate_rj(pdu: bytes) -> A_ASSOCIATE_RJ:
    """A whole A-ASSOCIATE-RJ PDU, decoded (``result``, ``source``, ``reason_diagnostic``, ``reason_str``)."""
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdu)
    return rj


def decode_abort(pdu: bytes) -> tuple[int | None, int | None]:
    """(source, reason/diagnostic) of a whole A-ABORT PDU."""
    ab = A_ABORT_RQ()
    ab.decode(pdu)
    return ab.source, ab.reason_diagnostic
