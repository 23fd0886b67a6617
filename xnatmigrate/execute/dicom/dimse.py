"""DIMSE messages of the sender: C-STORE-RQ and C-ECHO-RQ command sets, responses, statuses.

Invariants:
- Pure encoding and decoding: no socket, no state. The association (``association.py``) frames
  these command sets in P-DATA PDUs and owns the message ID counter.
- Command sets are implicit VR little endian with their group length first (PS3.7 6.3.1, E).
- A response counts only when it answers the request sent (same command field and message ID) and
  carries a status; anything else is ``BadResponse`` and the association cannot go on.
- Stored means Success (``SUCCESS``) or one of ``WARNING_STATUSES``; every other status, and no
  status at all, is not (architecture.md convention 10).
"""

from __future__ import annotations

import struct

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP class, the one C-ECHO is for

SUCCESS = 0x0000
#: C-STORE statuses that mean "stored, with a remark" (PS3.4 B.2.3, PS3.7 C): counted by the caller.
WARNING_STATUSES = frozenset({0xB000, 0xB007, 0xB006, 0x0107, 0x0116})

# Command Field values (PS3.7 E.1-1).
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030

# Command set elements (group 0000), by element number.
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_PRIORITY = 0x0700
_DATASET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000

_PRIORITY_MEDIUM = 0x0000
_DATASET_PRESENT, _NO_DATASET = 0x0000, 0x0101  # any value but 0x0101 means a dataset follows

_U16 = struct.Struct("<H")


class BadResponse(Exception):
    """A response that does not answer the request sent, or has no status."""


def stored(status: int) -> bool:
    """Whether the receiver took the dataset (Success or a Warning)."""
    return status == SUCCESS or status in WARNING_STATUSES


def status_meaning(status: int) -> str:
    """``Failure: Cannot Understand`` style text for a C-STORE status (PS3.4 B.2.3, PS3.7 C)."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", ""))
    if category == "Unknown":
        # Statuses the standard leaves to the implementation; 0xA7xx/0xA9xx/0xCxxx are ranges.
        category = "Failure" if not stored(status) else category
        text = text or "not a C-STORE status"
    return f"{category}: {text}" if text else category


def status_reason(status: int, comment: str | None) -> str:
    """The failure reason recorded for a file answered with ``status`` (and the receiver's comment)."""
    extra = f"; receiver said: {comment}" if comment else ""
    return f"C-STORE status 0x{status:04X} ({status_meaning(status)}){extra}"


_ELEMENT = struct.Struct("<HHI")
_GROUP_LENGTH = struct.Struct("<HHII")


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in implicit VR little endian with its group length (PS3.7 6.3.1, E)."""
    body = b"".join(_ELEMENT.pack(0, el, len(v)) + v for el, v in elements)
    return _GROUP_LENGTH.pack(0, 0, 4, len(body)) + body


def uid(value: str) -> bytes:
    """A UI value, NUL-padded to even length (PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


# Packed once: built for every file sent.
_STORE_FIELD, _MEDIUM, _WITH_DATASET = (
    _U16.pack(C_STORE_RQ),
    _U16.pack(_PRIORITY_MEDIUM),
    _U16.pack(_DATASET_PRESENT),
)


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The C-STORE-RQ command set; the dataset follows in its own P-DATA fragments."""
    return command(
        [
            (_AFFECTED_SOP_CLASS, uid(sop_class)),
            (_COMMAND_FIELD, _STORE_FIELD),
            (_MESSAGE_ID, _U16.pack(msg_id)),
            (_PRIORITY, _MEDIUM),
            (_DATASET_TYPE, _WITH_DATASET),
            (_AFFECTED_SOP_INSTANCE, uid(sop_instance)),
        ]
    )


def c_echo_rq(msg_id: int) -> bytes:
    """The C-ECHO-RQ command set (no dataset)."""
    return command(
        [
            (_AFFECTED_SOP_CLASS, uid(VERIFICATION)),
            (_COMMAND_FIELD, _U16.pack(C_ECHO_RQ)),
            (_MESSAGE_ID, _U16.pack(msg_id)),
            (_DATASET_TYPE, _U16.pack(_NO_DATASET)),
        ]
    )


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number → raw value of a command set (implicit VR LE, group 0000)."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        out[group << 16 | elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def response_status(data: bytes, command_field: int, msg_id: int) -> tuple[int, str | None]:
    """(status, error comment) of the response command set ``data`` to request ``msg_id``.

    Raises:
        BadResponse: it answers another message or command, or carries no status.
    """
    cmd = parse_command(data)
    field = _U16.unpack(cmd.get(_COMMAND_FIELD, b"\0\0")[:2])[0]
    answered = _U16.unpack(cmd.get(_MESSAGE_ID_RESPONDED, b"\0\0")[:2])[0]
    if field != command_field or answered != msg_id:
        raise BadResponse(
            f"the receiver answered message {answered} (command 0x{field:04X}) instead of message {msg_id}"
        )
    raw_status = cmd.get(_STATUS)
    if raw_status is None or len(raw_status) < 2:
        raise BadResponse("the response carries no status")
    status = int(_U16.unpack(raw_status[:2])[0])
    comment = cmd.get(_ERROR_COMMENT)
    text = comment.rstrip(b"\0 ").decode("ascii", "replace") if comment else None
    return status, text or None
