"""The network: registration (``+CREG``/``+CGREG``/``+CEREG``/``+C5GREG``, read answers and
URCs), the reject cause, ``+CEER``, the operator (``+COPS?``) and the operator list
(``+COPS=?``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from drivers.at import line_prefix, registration_is_solicited, split_fields, unquote
from drivers.parsers._common import ParseError, field, hex_code, is_hex, to_int, value

Act = Literal["gsm", "umts", "lte", "lte-m", "nb-iot", "nr5g"]
RegState = Literal["home", "roaming", "searching", "denied", "not-registered", "unknown"]
Domain = Literal["cs", "ps", "eps", "5gs"]
# The states in which the modem is on a network that carries data.
REGISTERED: tuple[RegState, ...] = ("home", "roaming")

# <AcT> of TS 27.007 (+CREG/+CGREG/+CEREG/+C5GREG/+COPS). Vendors that number LTE-M or
# NB-IoT differently override entries in their profile (drivers.vendors).
ACT_27007: Mapping[int, Act] = {
    0: "gsm", 1: "gsm", 2: "umts", 3: "gsm", 4: "umts", 5: "umts", 6: "umts", 7: "lte",
    8: "gsm",  # EC-GSM-IoT
    9: "nb-iot", 10: "lte", 11: "nr5g", 12: "nr5g", 13: "nr5g",
    14: "nb-iot", 15: "lte", 16: "nr5g",  # satellite E-UTRAN (NB-S1, WB-S1), NG-RAN
}

# <stat>: 6/7 and 9/10 are home/roaming with SMS-only or CSFB-not-preferred; 8 is emergency
# bearers only and 11 restricted local operator services (RLOS): neither carries data.
_STAT: Mapping[int, RegState] = {
    0: "not-registered", 1: "home", 2: "searching", 3: "denied", 4: "unknown", 5: "roaming",
    6: "home", 7: "roaming", 8: "not-registered", 9: "home", 10: "roaming",
    11: "not-registered",
}
_DOMAINS: Mapping[str, Domain] = {
    "+CREG": "cs", "+CGREG": "ps", "+CEREG": "eps", "+C5GREG": "5gs",
}
# Index of <cause_type> in the fields after <stat>: +CGREG has <rac>, +C5GREG the NSSAI pair.
_CAUSE_AT: Mapping[Domain, int] = {"cs": 3, "ps": 4, "eps": 3, "5gs": 5}


def is_registered(state: str | None) -> bool:
    """Whether a registration ``state`` (a :data:`RegState`, or its JSON string) is on a network."""
    return state in REGISTERED


def act_name(code: int | None, names: Mapping[int, Act] = ACT_27007) -> Act | None:
    return None if code is None else names.get(code)


@dataclass(frozen=True, slots=True)
class Registration:
    """One registration line. ``area`` is the LAC (cs, ps) or TAC (eps, 5gs) and ``cell_id`` the
    cell, both upper-case hex as printed; ``n`` is the ``<n>`` of a read answer (None for a
    URC); ``cause_type`` 0 means ``reject_cause`` is a 3GPP (EMM/GMM/MM/5GMM) cause, 1 a
    manufacturer-specific one."""

    domain: Domain
    stat: int
    state: RegState
    area: str | None = None
    cell_id: str | None = None
    act_code: int | None = None
    act: Act | None = None
    cause_type: int | None = None
    reject_cause: int | None = None
    n: int | None = None

    @property
    def lac(self) -> str | None:
        return self.area if self.domain in ("cs", "ps") else None

    @property
    def tac(self) -> str | None:
        return self.area if self.domain in ("eps", "5gs") else None

    @property
    def registered(self) -> bool:
        return is_registered(self.state)


def _small_int(text: str | None) -> int | None:
    """A numeric field that some modems fill with junk (Samsung prints ``B`` for AcT)."""
    return int(text) if text is not None and re.fullmatch(r"[0-9]{1,3}", text) else None


def parse_registration(line: str, act_names: Mapping[int, Act] = ACT_27007) -> Registration:
    """A ``+CREG``/``+CGREG``/``+CEREG``/``+C5GREG`` line, read answer or URC."""
    text = line.strip()
    domain = _DOMAINS.get(line_prefix(text))
    if domain is None:
        raise ParseError(f"not a registration line: {line!r}")
    raw = split_fields(text.split(":", 1)[1])
    items = [unquote(f).strip() for f in raw]
    n = None
    if registration_is_solicited(raw):
        n = to_int(items.pop(0), "<n>")
    stat = to_int(items[0], "<stat>")
    rest = items[1:]
    if (domain == "eps" and len(rest) >= 4 and len(rest[1]) <= 2 and len(rest[2]) > 2
            and is_hex(rest[1]) and is_hex(rest[2])):
        del rest[1]  # Novatel E362 / Altair print a RAC between TAC and cell id
    act_code = _small_int(field(rest, 2))
    cause = _CAUSE_AT[domain]
    return Registration(
        domain=domain, stat=stat, state=_STAT.get(stat, "unknown"),
        area=hex_code(field(rest, 0)), cell_id=hex_code(field(rest, 1)),
        act_code=act_code, act=act_name(act_code, act_names),
        cause_type=_small_int(field(rest, cause)), reject_cause=_small_int(field(rest, cause + 1)),
        n=n,
    )


# Reject cause names (TS 24.301 Annex A / TS 24.008 Annex G) as modems spell them in +CEER,
# squeezed to lower-case letters.
_CAUSE_NAMES: Mapping[str, int] = {
    "imsiunknowninhss": 2, "imsiunknowninhlr": 2, "illegalue": 3, "illegalms": 3,
    "imeinotaccepted": 5, "illegalme": 6, "epsservicesnotallowed": 7,
    "gprsservicesnotallowed": 7, "epsandnonepsservicesnotallowed": 8,
    "gprsandnongprsservicesnotallowed": 8, "implicitlydetached": 10, "plmnnotallowed": 11,
    "trackingareanotallowed": 12, "locationareanotallowed": 12,
    "roamingnotallowedinthistrackingarea": 13, "roamingnotallowedinthislocationarea": 13,
    "epsservicesnotallowedinthisplmn": 14, "gprsservicesnotallowedinthisplmn": 14,
    "nosuitablecellsintrackingarea": 15, "nosuitablecellsinlocationarea": 15,
    "networkfailure": 17, "esmfailure": 19, "congestion": 22,
}


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """``AT+CEER``. The format is the manufacturer's: ``"EMM reject",19,"ESM failure"``
    (Sierra), ``"No report available"``, or a bare cause name (Altair). ``cause`` is the number
    the modem gave, else the 3GPP cause the text names, else None."""

    text: str
    category: str | None = None
    cause: int | None = None


def parse_ceer(lines: Sequence[str]) -> ErrorReport:
    if not lines:
        return ErrorReport("")
    raw = split_fields(value(lines, "+CEER"))
    if 2 <= len(raw) <= 3 and raw[0].startswith('"') and raw[1].isdigit():
        text = unquote(raw[2]) if len(raw) == 3 else ""
        return ErrorReport(text, unquote(raw[0]), int(raw[1]))
    text = unquote(",".join(raw))
    numbered = re.search(r"cause\s*#?\s*(\d{1,3})", text, re.IGNORECASE)
    if numbered:  # "EMM cause 7: EPS services not allowed"
        return ErrorReport(text, None, int(numbered.group(1)))
    squeezed = re.sub(r"[^a-z]", "", text.lower())
    return ErrorReport(text, None, _CAUSE_NAMES.get(squeezed))


@dataclass(frozen=True, slots=True)
class Operator:
    """``AT+COPS?``: ``oper`` is the long name (format 0), short name (1) or numeric MCC-MNC
    (2) as selected beforehand with ``AT+COPS=3,<format>``."""

    mode: int
    format: int | None = None
    oper: str | None = None
    act_code: int | None = None
    act: Act | None = None

    @property
    def name(self) -> str | None:
        return self.oper if self.format in (0, 1) else None

    @property
    def mcc_mnc(self) -> str | None:
        if self.format == 2 and self.oper and re.fullmatch(r"[0-9]{5,6}", self.oper):
            return self.oper
        return None


def parse_cops(lines: Sequence[str], act_names: Mapping[int, Act] = ACT_27007) -> Operator:
    items = [unquote(f).strip() for f in split_fields(value(lines, "+COPS"))]
    act_code = _small_int(field(items, 3))
    fmt = field(items, 1)
    return Operator(
        mode=to_int(items[0], "+COPS mode"), format=None if fmt is None else to_int(fmt),
        oper=field(items, 2), act_code=act_code, act=act_name(act_code, act_names),
    )


NetworkStatus = Literal["unknown", "available", "current", "forbidden"]
_NETWORK_STATUS: tuple[NetworkStatus, ...] = ("unknown", "available", "current", "forbidden")


@dataclass(frozen=True, slots=True)
class Network:
    """One entry of the ``AT+COPS=?`` list. An entry without ``<AcT>`` comes from a modem that
    predates it: GSM."""

    status: NetworkStatus
    long_name: str | None
    short_name: str | None
    mcc_mnc: str
    act: Act | None


# (stat,"long","short","numeric"[,AcT]) with the shapes seen in the field: empty unquoted
# names (Nokia), and the AcT after a stray ')' (Ericsson: (1,"AT&T","AT&T","310410"),2)).
_NETWORK = re.compile(
    r'\(\s*([0-3])\s*,\s*(?:"([^"]*)")?\s*,\s*(?:"([^"]*)")?\s*,\s*"([^"]*)"\s*'
    r"(?:\)\s*,\s*([0-9]+)\s*\)|,\s*([0-9]+)\s*\)|\))")


def parse_cops_list(
    lines: Sequence[str], act_names: Mapping[int, Act] = ACT_27007,
) -> tuple[Network, ...]:
    """``AT+COPS=?``, one line or many; the trailing mode and format lists are skipped."""
    text = ",".join(
        line.split(":", 1)[1] if line_prefix(line.strip()) == "+COPS" else line
        for line in lines)
    return tuple(
        Network(
            status=_NETWORK_STATUS[int(m.group(1))], long_name=m.group(2) or None,
            short_name=m.group(3) or None, mcc_mnc=m.group(4),
            act=act_name(int(m.group(5) or m.group(6) or 0), act_names),
        )
        for m in _NETWORK.finditer(text))
