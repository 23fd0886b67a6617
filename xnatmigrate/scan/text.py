"""An element's value as text: which VRs are read, the Specific Character Set, pydicom's decoding.

Invariants:
- Pure and total: any bytes give a string or None, never an exception; a broken or unknown character
  set falls back to Latin-1 rather than lose the value.
- Only text VRs are decoded (binary numbers, bulk data and sequences give None); multiple values are
  ``\\``-joined, each one stripped of padding.
"""

from __future__ import annotations

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement

# Value representations whose text is read; every other VR (binary numbers, bulk data, SQ) is skipped.
_ASCII_MULTI = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_MULTI = frozenset({"SH", "LO", "UC"})
_TEXT_SINGLE = frozenset({"ST", "LT", "UT"})
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C}  # reset ISO 2022 code extensions (PS3.5 6.1.2.5.3)
_STRIP = " \t\r\n\f\v\x00"


Elements = dict[int, "RawDataElement | DataElement"]


def element_text(elem: RawDataElement | DataElement | None, encodings: list[str]) -> str | None:
    """The element's value as one string (multiple values ``\\``-joined), or None if empty/binary/SQ."""
    if elem is None:
        return None
    if isinstance(elem, DataElement):  # pydicom converts only sequences of undefined length itself
        return None
    raw = elem.value
    if not raw or not isinstance(raw, bytes):
        return None
    vr = elem.VR
    if vr is None or vr == "UN":
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    try:
        if vr in _ASCII_MULTI or vr == "UR":
            text = raw.decode("latin-1")
        elif vr == "PN":
            text = decode_bytes(raw, encodings, {0x5E, 0x3D, 0x5C})
        elif vr in _TEXT_MULTI:
            text = decode_bytes(raw, encodings, _TEXT_DELIMS | {0x5C})
        elif vr in _TEXT_SINGLE:
            text = decode_bytes(raw, encodings, _TEXT_DELIMS)
        else:
            return None
    except (LookupError, UnicodeError, ValueError):
        text = raw.decode("latin-1")  # a broken character set must not lose the value
    if vr in _TEXT_SINGLE or vr == "UR":
        text = text.strip(_STRIP)
        return text or None
    parts = [p.strip(_STRIP) for p in text.split("\\")]
    return "\\".join(parts) if any(parts) else None


def encodings_of(elems: Elements) -> list[str]:
    """Python codecs for (0008,0005) Specific Character Set (pydicom's mapping and repairs)."""
    terms = element_text(elems.get(0x00080005), ["iso8859"])
    if not terms:
        return ["iso8859"]
    try:
        # An empty first value means the default repertoire (PS3.3 C.12.1.1.2).
        return convert_encodings([t or "ISO_IR 6" for t in terms.split("\\")])
    except Exception:  # pydicom repairs or warns about most bad terms; a scan never fails on one
        return ["iso8859"]
