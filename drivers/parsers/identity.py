"""Who the modem is: manufacturer, model, revision, serial numbers (IMEI, ESN, MEID), ``ATI``.

The identity answers are free text. Text fields are kept as the modem printed them, minus
surrounding blanks and an echoed ``+CGMx:`` prefix (SIMCom answers ``+CGMR: <rev>``); a
revision printed over several lines (Nokia) is joined with single spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.at import line_prefix, unquote
from drivers.parsers._common import ParseError, is_hex, luhn_valid

_IDENTITY_PREFIXES = frozenset({
    "+CGMI", "+GMI", "+CGMM", "+GMM", "+CGMR", "+GMR", "+CGSN", "+GSN",
})


def _text(lines: Sequence[str], what: str) -> str:
    parts = []
    for line in lines:
        text = line.strip()
        if line_prefix(text) in _IDENTITY_PREFIXES:
            text = text.split(":", 1)[1].strip()
        if text:
            parts.append(text)
    if not parts:
        raise ParseError(f"empty {what} answer")
    return " ".join(parts)


def parse_manufacturer(lines: Sequence[str]) -> str:
    """``AT+CGMI`` / ``AT+GMI``."""
    return _text(lines, "manufacturer")


def parse_model(lines: Sequence[str]) -> str:
    """``AT+CGMM`` / ``AT+GMM``."""
    return _text(lines, "model")


def parse_revision(lines: Sequence[str]) -> str:
    """``AT+CGMR`` / ``AT+GMR``."""
    return _text(lines, "revision")


@dataclass(frozen=True, slots=True)
class DeviceSerial:
    """The answer to ``AT+CGSN`` / ``AT+GSN``: an IMEI (3GPP), or a CDMA ESN / MEID, and the
    vendor serial some modems print after the IMEI (``<imei>,<serial>``)."""

    imei: str | None = None
    esn: str | None = None
    meid: str | None = None
    serial: str | None = None


def parse_serial(lines: Sequence[str]) -> DeviceSerial:
    """``AT+CGSN`` / ``AT+GSN``. ESN is 8 upper hex digits, MEID 14, both without ``0x``."""
    imei = esn = meid = serial = None
    for part in re.split(r"[\s:,]+", _text(lines, "serial number")):
        token = unquote(part)
        if token.lower() in ("+cgsn", "+gsn", ""):
            continue
        if re.fullmatch(r"[0-9]{15}", token) and imei is None:
            imei = token
        elif token[:2].lower() == "0x" and is_hex(token[2:]):
            digits = token[2:].upper()
            if len(digits) <= 8:
                esn = digits.zfill(8)
            elif len(digits.lstrip("0")) <= 14:
                meid = digits.lstrip("0").zfill(14)
        elif len(token) == 8 and is_hex(token):
            esn = token.upper()
        elif imei is not None and serial is None:
            serial = token
    if imei is None and esn is None and meid is None:
        raise ParseError(f"no IMEI, ESN or MEID in {list(lines)!r}")
    return DeviceSerial(imei=imei, esn=esn, meid=meid, serial=serial)


def imei_valid(imei: str) -> bool:
    """15 ASCII digits whose Luhn checksum holds (3GPP TS 23.003 Annex B)."""
    return bool(re.fullmatch(r"[0-9]{15}", imei)) and luhn_valid(imei)


@dataclass(frozen=True, slots=True)
class AtiInfo:
    """An ``ATI`` block. ``fields`` holds every ``Key: value`` line, keys lower-cased with
    ``_`` for blanks (``imei_sv``, ``gcap``, ``esn``); ``lines`` the block as received.
    Bare lines are not guessed at: use ``AT+CGMI`` / ``AT+CGMM`` to identify a modem."""

    lines: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def manufacturer(self) -> str | None:
        return self.fields.get("manufacturer")

    @property
    def model(self) -> str | None:
        return self.fields.get("model")

    @property
    def revision(self) -> str | None:
        return self.fields.get("revision")

    @property
    def imei(self) -> str | None:
        return self.fields.get("imei")


def parse_ati(lines: Sequence[str]) -> AtiInfo:
    found: dict[str, str] = {}
    for line in lines:
        m = re.match(r"\s*\+?([A-Za-z][A-Za-z ]*?)\s*:\s*(.*?)\s*$", line)
        if m:
            found.setdefault(m.group(1).lower().replace(" ", "_"), m.group(2))
    return AtiInfo(lines=tuple(lines), fields=found)


@dataclass(frozen=True, slots=True)
class QuectelRevision:
    """``R<release>A<minor>`` in a Quectel firmware name (``EC25EFAR06A06M4G``)."""

    release: int
    minor: int


def parse_quectel_revision(revision: str) -> QuectelRevision:
    m = re.search(r"R([0-9]{2})A([0-9]{2})", revision)
    if not m:
        raise ParseError(f"not a Quectel revision: {revision!r}")
    return QuectelRevision(int(m.group(1)), int(m.group(2)))


def parse_telit_package(lines: Sequence[str]) -> str:
    """``AT#SWPKGV`` (Telit): the first line is the software package version; the lines after
    it name the modem, production and application parts."""
    return _text(lines[:1], "software package version")
