"""The SIM: PIN state (``+CPIN``), ICCID in every vendor shape, IMSI, file reads (``+CRSM``),
PIN retry counters, hot-swap status, the active SIM slot and the subscriber number."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.at import line_prefix, unquote
from drivers.errors import (
    CmeError,
    PhSimPinRequired,
    SimNotInserted,
    SimPinRequired,
    SimPukRequired,
)
from drivers.parsers._common import ParseError, fields, is_hex, to_int, value, values

SimState = Literal["ready", "pin-required", "puk-required", "absent", "error"]


@dataclass(frozen=True, slots=True)
class PinState:
    """``state`` for the JSON contract; ``code`` the 27.007 ``<code>`` as the modem printed it
    (``READY``, ``SIM PIN``, ``PH-NET PIN``...), None when the modem answered with an error."""

    state: SimState
    code: str | None


def pin_state(code: str) -> PinState:
    """The state for a ``+CPIN`` ``<code>``. PIN2/PUK2 only guard PIN2 functions (fixed dialling
    and the like): the SIM itself is usable, so they count as ready. ``NOT READY`` (SIMCom, SIM
    still initialising) is an error state the caller retries."""
    text = unquote(code.strip()).strip().upper()
    if not text:
        raise ParseError("empty +CPIN code")
    state: SimState
    if text == "READY" or text.endswith(("PIN2", "PUK2")):
        state = "ready"
    elif text.endswith("PUK"):
        state = "puk-required"
    elif text.endswith("PIN"):
        state = "pin-required"
    elif text in ("NOT INSERTED", "SIM NOT INSERTED", "NO SIM"):
        state = "absent"
    elif text == "NOT READY":  # SIMCom while the SIM initialises: retry later
        state = "error"
    else:
        raise ParseError(f"unknown +CPIN code {code!r}")
    return PinState(state, text)


def parse_cpin(lines: Sequence[str]) -> PinState:
    """``AT+CPIN?``."""
    return pin_state(value(lines, "+CPIN"))


def pin_state_from_error(error: CmeError) -> PinState:
    """The state a ``+CME ERROR`` answer to ``AT+CPIN?`` stands for (10 absent, 11 PIN, 12 PUK,
    anything else, 13 SIM failure or 100 unknown included, error)."""
    state: SimState = "error"
    if isinstance(error, SimNotInserted):
        state = "absent"
    elif isinstance(error, SimPinRequired | PhSimPinRequired):
        state = "pin-required"
    elif isinstance(error, SimPukRequired):
        state = "puk-required"
    return PinState(state, None)


def iccid_from_field(text: str) -> str:
    """The ICCID in a field: plain (``8944...``), F-padded (``...499F``) or with swapped nibbles
    as EF_ICCID stores it (``9844...F9``). Upper-case, padding stripped, issuer digits 89."""
    raw = unquote(text.strip()).strip()
    if not (19 <= len(raw) <= 20 and is_hex(raw)):
        raise ParseError(f"not an ICCID: {text!r}")
    if raw.startswith("98") and len(raw) == 20:
        raw = "".join(raw[i + 1] + raw[i] for i in range(0, 20, 2))
    iccid = raw.upper().rstrip("F")
    if not iccid.startswith("89"):
        raise ParseError(f"ICCID does not start with 89: {text!r}")
    return iccid


def parse_iccid(lines: Sequence[str]) -> str:
    """A vendor ICCID answer: ``+QCCID:`` (Quectel), ``+ICCID:`` (SIMCom), ``+CCID:`` (u-blox,
    Sierra), ``#CCID:`` (Telit), ``^ICCID:`` (Huawei), or a bare line (SIM800/SIM868)."""
    for line in lines:
        text = line.strip()
        if line_prefix(text):
            text = text.split(":", 1)[1]
        if text.strip():
            return iccid_from_field(text)
    raise ParseError("empty ICCID answer")


@dataclass(frozen=True, slots=True)
class SimFileRead:
    """``+CRSM: <sw1>,<sw2>[,<response>]``; ``data`` is the hex response, empty when none."""

    sw1: int
    sw2: int
    data: str

    @property
    def ok(self) -> bool:
        return self.sw1 in (0x90, 0x91, 0x92)


def parse_crsm(lines: Sequence[str]) -> SimFileRead:
    items = fields(value(lines, "+CRSM"))
    if len(items) < 2:
        raise ParseError(f"short +CRSM answer: {items!r}")
    data = items[2] if len(items) > 2 else ""
    if data and not is_hex(data):
        raise ParseError(f"+CRSM response is not hex: {data!r}")
    return SimFileRead(to_int(items[0], "sw1"), to_int(items[1], "sw2"), data.upper())


def iccid_from_crsm(lines: Sequence[str]) -> str:
    """``AT+CRSM=176,12258,0,0,10``: EF_ICCID read with the SIM's own nibble order."""
    read = parse_crsm(lines)
    if not read.ok:
        raise ParseError(f"EF_ICCID read failed: SW {read.sw1:02X}{read.sw2:02X}")
    return iccid_from_field(read.data)


def parse_imsi(lines: Sequence[str]) -> str:
    """``AT+CIMI``: 6 to 15 digits, bare or after ``+CIMI:``."""
    for line in lines:
        text = unquote(line.strip())
        if line_prefix(text) == "+CIMI":
            text = unquote(text.split(":", 1)[1].strip())
        if re.fullmatch(r"[0-9]{6,15}", text):
            return text
    raise ParseError(f"no IMSI in {list(lines)!r}")


_CSIM_ERRORS = {
    "6300": "SIM verification failed",
    "6983": "SIM authentication method blocked",
    "6984": "SIM reference data invalidated",
    "6A86": "incorrect parameters in SIM request",
    "6A88": "SIM reference data not found",
}


def parse_csim_pin_retries(lines: Sequence[str]) -> int:
    """PIN retries left from ``AT+CSIM=10,"0020000100"`` (VERIFY without a PIN): status word
    ``63Cx`` means x retries left; other status words raise."""
    m = re.fullmatch(r'\s*[0-9]+\s*,\s*"([0-9A-Fa-f]*)"\s*', value(lines, "+CSIM"))
    if not m or len(m.group(1)) < 4:
        raise ParseError(f"unrecognised +CSIM answer: {list(lines)!r}")
    sw = m.group(1)[-4:].upper()
    if sw.startswith("63C"):
        return int(sw[3], 16)
    raise ParseError(_CSIM_ERRORS.get(sw, f"unexpected SIM status word {sw}"))


@dataclass(frozen=True, slots=True)
class PinRetries:
    pin: int
    pin2: int
    puk: int
    puk2: int


def parse_upincnt(lines: Sequence[str]) -> PinRetries:
    """``AT+UPINCNT`` (u-blox): ``+UPINCNT: <pin>,<pin2>,<puk>,<puk2>``."""
    items = fields(value(lines, "+UPINCNT"))
    if len(items) != 4:
        raise ParseError(f"+UPINCNT needs 4 fields: {items!r}")
    pin, pin2, puk, puk2 = (to_int(i, "+UPINCNT") for i in items)
    return PinRetries(pin, pin2, puk, puk2)


SimPresence = Literal["removed", "inserted", "unlocked", "ready"]
_QSS: dict[int, SimPresence] = {0: "removed", 1: "inserted", 2: "unlocked", 3: "ready"}


def parse_qss(lines: Sequence[str]) -> SimPresence:
    """``AT#QSS?`` (Telit): ``#QSS: <mode>,<status>``."""
    items = fields(value(lines, "#QSS"))
    if len(items) != 2:
        raise ParseError(f"#QSS needs <mode>,<status>: {items!r}")
    status = to_int(items[1], "#QSS status")
    if status not in _QSS:
        raise ParseError(f"unknown #QSS status {status}")
    return _QSS[status]


def parse_sim_slot(lines: Sequence[str], prefix: str, first: int = 0, count: int = 2) -> int:
    """The active SIM slot, 1-based, from a vendor's answer ``<prefix>: <n>[,...]`` where ``n``
    numbers the first slot ``first`` (Quectel ``+QDSIM: 0`` is slot 1). Fields after ``n``
    (some firmware adds one) are ignored; a missing, repeated or out-of-range ``n`` raises."""
    found = values(lines, prefix)
    if len(found) != 1:
        raise ParseError(f"expected one {prefix} line, got {list(lines)!r}")
    n = to_int(fields(found[0])[0], prefix)
    if not first <= n < first + count:
        raise ParseError(f"{prefix}: no SIM slot {n} (slots are {first} to {first + count - 1})")
    return n - first + 1


def parse_cnum(lines: Sequence[str]) -> tuple[str, ...]:
    """``AT+CNUM``: the subscriber numbers (MSISDN) stored on the SIM."""
    numbers = []
    for text in values(lines, "+CNUM"):
        items = fields(text)
        if len(items) >= 2 and items[1]:
            numbers.append(items[1])
    return tuple(numbers)



@dataclass(frozen=True, slots=True)
class SimInit:
    """Quectel ``AT+QINISTAT``: ``+QINISTAT: <status>``, a bit mask of what the SIM
    initialisation has finished (1 CPIN ready, 2 SMS, 4 phonebook; 7 all done)."""

    cpin_ready: bool
    sms_ready: bool
    phonebook_ready: bool


def parse_qinistat(lines: Sequence[str]) -> SimInit:
    status = to_int(value(lines, "+QINISTAT"), "+QINISTAT")
    if not 0 <= status <= 7:
        raise ParseError(f"+QINISTAT out of range: {status}")
    return SimInit(bool(status & 1), bool(status & 2), bool(status & 4))
