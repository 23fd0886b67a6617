"""Pure algorithms behind DicomEdit 6's functions, each written from the Java it reproduces.

Sources (danielmarcus/xnat-monorepo, libs/dicom-edit6/src/main/java/org/nrg/dicom/…, and the mizer
library it calls):

- ``hash_uid``: dicomedit/functions/HashUIDScriptFunction.apply → mizer values/UIDValue.getHashedUID:
  ``toUID(toUUID(value))`` where ``toUUID`` is ``Generators.nameBasedGenerator().generate(value.getBytes())``
  (java-uuid-generator: SHA-1 over the bytes with *no* namespace, first 16 bytes, version nibble 5,
  variant 10; NameBasedGenerator.generate / UUIDUtil.constructUUID) and ``toUID`` is
  ``"2.25." + new BigInteger(17 bytes: 0x00 + msb + lsb)``.
- ``shift_datetime``: dicomedit/datetime/DefaultDicomDateTimeShifter.shiftDateTimeBySeconds with
  MidPointDateTimeFactory.dateTime (missing fields filled with the middle of their range) and
  DicomDateTime.toDicomDateTimeString (output keeps the input's precision; fraction and zone offset are
  carried through unchanged); units from DicomDateTimeShifter.toSeconds (a year is 365 days).
- ``message_format``: FormatScriptFunction.apply → ``java.text.MessageFormat.format(pattern, strings)``.
- ``derived_uid``: not DicomEdit. NewUIDScriptFunction and MapReferencedUIDsMethod call dcm4che's
  random ``UIDUtils.createUID``; xnatmigrate derives the UID from the input and a secret instead, so that
  re-applying a script gives the same bytes (see ``interpret.py``).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

UUID_ROOT = "2.25"


def hash_uid(value: str) -> str:
    """XNAT's ``hashUID``: the value's name-based (SHA-1, no namespace) UUID written under ``2.25``.

    NOTE: Java's ``String.getBytes()`` uses the JVM's default charset; UTF-8 is assumed (the default
    since Java 18 and XNAT's documented ``-Dfile.encoding``). For ASCII input, which every UID is, the
    charset makes no difference.
    """
    digest = bytearray(hashlib.sha1(value.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5 (name-based, SHA-1)
    digest[8] = (digest[8] & 0x3F) | 0x80  # IETF variant
    return f"{UUID_ROOT}.{int.from_bytes(digest, 'big')}"


def derived_uid(secret: bytes, *parts: str, prefix: str = UUID_ROOT) -> str:
    """A UID under ``prefix`` from HMAC-SHA256(secret, parts): stable for the same input and secret.

    The 128 bits are shaped as an RFC 9562 version-8 ("custom") UUID so that, under ``2.25``, the UID is
    a well-formed UUID-derived UID. Raises ``ValueError`` when the prefix leaves no room in 64 characters.
    """
    mac = hmac.new(secret, "\x00".join(parts).encode("utf-8"), hashlib.sha256).digest()
    raw = bytearray(mac[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    root = prefix[:-1] if prefix.endswith(".") else prefix
    uid = f"{root}.{int.from_bytes(raw, 'big')}"
    if len(uid) > 64:
        raise ValueError(f"UID prefix {prefix!r} is too long: {uid!r} exceeds the 64 characters of a UID")
    return uid


# --- dates and times -------------------------------------------------------------------------------

# DICOM DT (PS3.5 6.2): YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]. DicomDateTimeFactory.fromDateTimeString
# was not available to read; this is the DT grammar its callers (DicomDateTime's fields) imply.
_DT = re.compile(
    r"(?P<year>\d{4})(?:(?P<month>\d{2})(?:(?P<day>\d{2})(?:(?P<hour>\d{2})(?:(?P<minute>\d{2})"
    r"(?:(?P<second>\d{2})(?P<fraction>\.\d{1,6})?)?)?)?)?)?(?P<tz>[+-]\d{4})?"
)

_UNIT_SECONDS = {
    "years": 365 * 24 * 60 * 60,
    "days": 24 * 60 * 60,
    "hours": 60 * 60,
    "minutes": 60,
    "seconds": 1,
}


def to_seconds(increment: int, units: str) -> int:
    """DicomDateTimeShifter.toSeconds: units are case-insensitive; anything else is refused."""
    try:
        return increment * _UNIT_SECONDS[units.lower()]
    except KeyError:
        raise ValueError(f"unsupported time-shift units: {units}") from None


def shift_datetime(value: str, increment: int, units: str) -> str:
    """Shift a DICOM DA or DT string; the result has the input's precision (DefaultDicomDateTimeShifter).

    Raises ``ValueError`` when the value is not a DICOM date/date-time or the result leaves years 1-9999.
    """
    m = _DT.fullmatch(value)
    if m is None:
        raise ValueError(f"failed to parse DICOM date-time string {value!r}")
    f = m.groupdict()
    year = int(f["year"])
    month = int(f["month"]) if f["month"] else 7
    if f["day"]:
        day = int(f["day"])
    elif f["month"]:
        day = calendar.monthrange(year, month)[1] // 2 + 1
    else:
        day = 1
    if f["hour"]:
        hour = int(f["hour"])
    elif f["day"]:
        hour = 12
    elif f["month"]:
        hour = 0 if calendar.monthrange(year, month)[1] % 2 == 0 else 12
    else:
        hour = 0
    minute = int(f["minute"]) if f["minute"] else (30 if f["hour"] else 0)
    second = int(f["second"]) if f["second"] else (30 if f["minute"] else 0)
    try:
        # A zone offset is constant over the shift (OffsetDateTime.plusSeconds), so naive arithmetic is exact.
        shifted = datetime(year, month, day, hour, minute, second) + timedelta(
            seconds=to_seconds(increment, units)
        )
    except (ValueError, OverflowError) as e:
        raise ValueError(f"cannot shift {value!r}: {e}") from None
    out = f"{shifted.year:04d}"
    if f["month"]:
        out += f"{shifted.month:02d}"
        if f["day"]:
            out += f"{shifted.day:02d}"
            if f["hour"]:
                out += f"{shifted.hour:02d}"
                if f["minute"]:
                    out += f"{shifted.minute:02d}"
                    if f["second"]:
                        out += f"{shifted.second:02d}" + (f["fraction"] or "")
    return out + (f["tz"] or "")


# --- java.text.MessageFormat -----------------------------------------------------------------------


def message_format(pattern: str, args: Sequence[str | None]) -> str:
    """``java.text.MessageFormat.format(pattern, args)`` for string arguments and plain ``{n}`` elements.

    Quoting follows MessageFormat: ``''`` is a quote, text between single quotes is literal; a ``{n}``
    beyond the arguments stays as written; a null argument prints ``null``. Raises ``ValueError`` for
    what MessageFormat would format differently (``{0,number}``, ``{0,date}``, choice formats) or refuses
    (an unbalanced brace, a non-numeric index).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    in_quote = False
    while i < n:
        c = pattern[i]
        if c == "'":
            if i + 1 < n and pattern[i + 1] == "'":
                out.append("'")
                i += 2
                continue
            in_quote = not in_quote
            i += 1
            continue
        if in_quote:
            out.append(c)
            i += 1
            continue
        if c == "{":
            close = pattern.find("}", i + 1)
            if close < 0:
                raise ValueError(f"unmatched braces in the pattern {pattern!r}")
            body = pattern[i + 1 : close]
            if any(ch in body for ch in ",{'"):
                raise ValueError(
                    f"format element {{{body}}} has a format type or nested quoting, which xnatmigrate does not implement"
                )
            # MessageFormat.makeFormat: Integer.parseInt of the index as written (a space is not stripped).
            if not re.fullmatch(r"\+?[0-9]+", body):
                raise ValueError(f"can't parse argument number {body!r} in {pattern!r}")
            index = int(body)
            if index < len(args):
                arg = args[index]
                out.append("null" if arg is None else arg)
            else:
                out.append("{" + body + "}")
            i = close + 1
            continue
        out.append(c)  # a lone "}" outside an element is literal text (MessageFormat.applyPattern)
        i += 1
    # An unterminated quote is accepted: the rest of the pattern is literal.
    return "".join(out)
