"""DICOM encoding facts and byte walkers shared by the scan (planner side) and the C-STORE sender.

Invariants:
- A leaf: imports only the standard library, never another module of this package, so both the pure
  planner side (``scan``, ``explain``) and the executors (``execute.dicom``) may use it.
- The walkers read, never copy or decode values: they return offsets and lengths into the caller's
  buffer, and raise ``Malformed`` (never ``struct.error``/``IndexError``) for bytes they cannot follow,
  so a caller can fall back to a full parser.
- Only the three uncompressed encodings of PS3.5 are walked; ``encoding`` maps every other syntax
  (compressed, deflated) to explicit VR little endian, which is what their data sets are (deflated
  data sets must be inflated first: the walkers refuse nothing, the caller must check).
"""

from __future__ import annotations

import struct

# Transfer syntax UIDs (PS3.5 A, PS3.6 A).
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255, so at most 128 per association.
#: Here, not in the sender, because the planner's explain counts associations with it too.
MAX_CONTEXTS = 128

UNDEFINED_LENGTH = 0xFFFFFFFF
# Sequence framing tags (PS3.5 7.5): (FFFE,E000) item, (FFFE,E00D) item end, (FFFE,E0DD) sequence end.
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

#: Explicit VRs whose header is tag, VR, 2 reserved bytes, 4-byte length (PS3.5 7.1.2); all others
#: have a 2-byte length right after the VR.
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

# Precompiled and indexed by ``little`` (False 0, True 1): they run for every element walked, on
# every file sent, so a walker picks one once and calls its ``unpack_from`` inline.
TAG = (struct.Struct(">HH"), struct.Struct("<HH"))
UINT16 = (struct.Struct(">H"), struct.Struct("<H"))
UINT32 = (struct.Struct(">I"), struct.Struct("<I"))
_TAG_LENGTH = (struct.Struct(">HHI"), struct.Struct("<HHI"))

Buffer = bytes | bytearray | memoryview


class Malformed(ValueError):
    """The bytes are not what the walker can follow (truncated, unknown VR, broken sequence)."""


def encoding(transfer_syntax: str | None) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a data set; every other syntax is explicit VR LE (PS3.5 A)."""
    return transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE


def looks_explicit(vr: bytes) -> bool:
    """pydicom's own test (``_is_implicit_vr``): two upper-case letters where an explicit VR would be."""
    return len(vr) == 2 and 0x40 < vr[0] < 0x5B and 0x40 < vr[1] < 0x5B


def read_tag(buf: Buffer, pos: int, little: bool) -> int:
    """The tag at ``pos`` as ``group << 16 | element`` (the caller checks 4 bytes are there)."""
    group, elem = TAG[little].unpack_from(buf, pos)
    return int(group << 16 | elem)


def element_header(buf: Buffer, pos: int, end: int, implicit: bool, little: bool) -> tuple[int, bytes, int]:
    """(header length, VR, value length) of the element at ``pos``; VR is ``b""`` when implicit.

    The VR is not checked (see ``looks_explicit``); the header must end by ``end``, else Malformed.
    """
    if pos + 8 > end:
        raise Malformed("truncated element")
    if implicit:
        return 8, b"", int(UINT32[little].unpack_from(buf, pos + 4)[0])
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in LONG_LENGTH_VRS:
        if pos + 12 > end:
            raise Malformed("truncated element")
        return 12, vr, int(UINT32[little].unpack_from(buf, pos + 8)[0])
    return 8, vr, int(UINT16[little].unpack_from(buf, pos + 6)[0])


def skip_element(buf: Buffer, pos: int, end: int, implicit: bool, little: bool) -> int:
    """Offset just after the element at ``pos`` (sequences of undefined length walked through)."""
    # The header is read inline, not through element_header: this runs for every element before the
    # routing tag of every file sent, and a call per element costs a third of the walk.
    if pos + 8 > end:
        raise Malformed("truncated element")
    if implicit:
        (length,) = UINT32[little].unpack_from(buf, pos + 4)
        head, vr = 8, b"SQ"  # implicit VR: only a sequence may have an undefined length (PS3.5 7.5)
    else:
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                raise Malformed("truncated element")
            (length,) = UINT32[little].unpack_from(buf, pos + 8)
            head = 12
        elif vr.isalpha() and vr.isupper():
            (length,) = UINT16[little].unpack_from(buf, pos + 6)
            head = 8
        else:
            raise Malformed(f"unknown VR {vr!r}")
    if length != UNDEFINED_LENGTH:
        nxt: int = pos + head + length
        if nxt > end:
            raise Malformed("element runs past the data read")
        return nxt
    if vr not in (b"SQ", b"UN"):
        raise Malformed("undefined length outside a sequence")
    # PS3.5 6.2.2: a UN of undefined length holds an implicit VR little endian sequence.
    inner_implicit, inner_little = (True, True) if vr == b"UN" else (implicit, little)
    return skip_sequence(buf, pos + head, end, inner_implicit, inner_little)


def skip_sequence(buf: Buffer, pos: int, end: int, implicit: bool, little: bool) -> int:
    """Offset just after the sequence delimiter of the undefined-length sequence whose items start at ``pos``."""
    tag_length = _TAG_LENGTH[little]
    while pos + 8 <= end:
        group, elem, length = tag_length.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == SEQUENCE_DELIMITER:
            return pos + 8
        if tag != ITEM:
            raise Malformed("malformed sequence")
        pos += 8
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        while True:  # item of undefined length: elements up to the item delimiter
            if pos + 8 > end:
                raise Malformed("truncated item")
            group, elem = TAG[little].unpack_from(buf, pos)
            if group << 16 | elem == ITEM_DELIMITER:
                pos += 8
                break
            pos = skip_element(buf, pos, end, implicit, little)
    raise Malformed("sequence runs past the data read")
