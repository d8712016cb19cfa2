"""Packet data: PDP contexts (``+CGDCONT``, ``+CGACT``, ``+CGPADDR``, ``+CGCONTRDP``), PDP
events (``+CGEV``) and the vendors' byte counters."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.at import split_fields
from drivers.parsers._common import ParseError, field, fields, opt_int, to_int, value, values


@dataclass(frozen=True, slots=True)
class PdpContext:
    """A ``+CGDCONT?`` entry; ``pdp_type`` as printed (``IP``, ``IPV6``, ``IPV4V6``...)."""

    cid: int
    pdp_type: str
    apn: str | None


def parse_cgdcont(lines: Sequence[str]) -> tuple[PdpContext, ...]:
    contexts = []
    for text in values(lines, "+CGDCONT"):
        items = fields(text)
        if len(items) < 2:
            raise ParseError(f"short +CGDCONT entry: {text!r}")
        contexts.append(PdpContext(to_int(items[0], "cid"), items[1].upper(), field(items, 2)))
    return tuple(contexts)


@dataclass(frozen=True, slots=True)
class PdpFormat:
    """A ``+CGDCONT=?`` line: the cids usable with one PDP type."""

    min_cid: int
    max_cid: int
    pdp_type: str


def parse_cgdcont_test(lines: Sequence[str]) -> tuple[PdpFormat, ...]:
    """``+CGDCONT: (1-16),"IP",,,(0-2),(0-4)``; a line without a cid range is skipped, and
    of several ranges (``(1-17,101-116)``) the first counts."""
    formats = []
    for text in values(lines, "+CGDCONT"):
        raw = split_fields(text)
        m = re.match(r"\(\s*(\d+)\s*(?:-\s*(\d+)\s*)?[,)]", raw[0])
        if m is None or len(raw) < 2:
            continue
        low = int(m.group(1))
        formats.append(PdpFormat(low, int(m.group(2) or low), fields(raw[1])[0].upper()))
    return tuple(formats)


def parse_cgact(lines: Sequence[str], prefix: str = "+CGACT") -> dict[int, bool]:
    """``AT+CGACT?`` (or Sierra ``AT!SCACT?`` with ``prefix="!SCACT"``): cid -> active."""
    states = {}
    for text in values(lines, prefix):
        items = fields(text)
        if len(items) < 2:
            raise ParseError(f"short {prefix} entry: {text!r}")
        states[to_int(items[0], "cid")] = to_int(items[1], "state") == 1
    return states


def _address(text: str) -> tuple[str, str | None]:
    """An address (and the mask some modems glue to it) as 27.007 prints it: IPv4 dotted,
    IPv6 in 16 dotted octets (before TS 27.007 9.4.0) or in colon form; 8 or 32 octets are an
    address and its mask."""
    try:
        if ":" in text:
            return ipaddress.IPv6Address(text).compressed, None
        octets = bytes(int(o) for o in text.split("."))
    except ValueError:
        raise ParseError(f"not an address: {text!r}") from None
    if len(octets) in (4, 16):
        return str(ipaddress.ip_address(octets)), None
    if len(octets) in (8, 32):
        half = len(octets) // 2
        return (str(ipaddress.ip_address(octets[:half])),
                str(ipaddress.ip_address(octets[half:])))
    raise ParseError(f"not an address: {text!r}")


def _opt_address(text: str | None) -> str | None:
    return None if text is None else _address(text)[0]


def parse_cgpaddr(lines: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """``AT+CGPADDR``: cid -> its addresses (none while the context is inactive)."""
    found = {}
    for text in values(lines, "+CGPADDR"):
        items = fields(text)
        found[to_int(items[0], "cid")] = tuple(_address(a)[0] for a in items[1:] if a)
    return found


@dataclass(frozen=True, slots=True)
class BearerParams:
    """``AT+CGCONTRDP=<cid>``: what the network gave an active context."""

    cid: int
    bearer_id: int
    apn: str | None = None
    local_address: str | None = None
    subnet: str | None = None
    gateway: str | None = None
    dns_primary: str | None = None
    dns_secondary: str | None = None


def parse_cgcontrdp(lines: Sequence[str]) -> BearerParams:
    """``+CGCONTRDP: <cid>,<bearer>,<apn>[,<local addr and mask>[,<gw>[,<dns1>[,<dns2>...``.
    Some modems print the IPv4 mask as a field of its own after the address."""
    items = fields(value(lines, "+CGCONTRDP"))
    if len(items) < 2:
        raise ParseError(f"short +CGCONTRDP answer: {items!r}")
    local = field(items, 3)
    address, subnet = _address(local) if local else (None, None)
    shift = 0
    following = field(items, 4)
    if address and subnet is None and "." in address and following and following.count(".") == 3:
        subnet, shift = _address(following)[0], 1
    return BearerParams(
        cid=to_int(items[0], "cid"), bearer_id=to_int(items[1], "bearer id"),
        apn=field(items, 2), local_address=address, subnet=subnet,
        gateway=_opt_address(field(items, 4 + shift)),
        dns_primary=_opt_address(field(items, 5 + shift)),
        dns_secondary=_opt_address(field(items, 6 + shift)),
    )


@dataclass(frozen=True, slots=True)
class PdpEvent:
    """A ``+CGEV`` URC (TS 27.007 10.1.19). ``event``: ``reject``, ``nw-react``,
    ``nw-deact-pdp``/``me-deact-pdp`` (legacy, by type and address), ``nw-act-primary``,
    ``nw-deact-primary`` (PDN connections), ``nw-act-secondary``, ``nw-deact-secondary``
    (dedicated bearers), ``nw-modify``, ``nw-detach``, ``nw-class``, and the ``me-`` twins."""

    event: str
    cid: int | None = None
    pdp_type: str | None = None
    address: str | None = None
    parent_cid: int | None = None
    event_type: int | None = None


_CGEV = re.compile(
    r"(REJECT|(?:NW|ME) (?:PDN ACT|PDN DEACT|REACT|ACT|DEACT|MODIFY|DETACH|CLASS))\b\s*(.*)",
    re.IGNORECASE)


def parse_cgev(line: str) -> PdpEvent:
    m = _CGEV.fullmatch(value([line], "+CGEV"))
    if not m:
        raise ParseError(f"unknown +CGEV event: {line!r}")
    head = m.group(1).upper()
    args = fields(m.group(2)) if m.group(2) else []
    name = head.lower().replace(" ", "-")
    if head in ("REJECT", "NW REACT") or (
            head.endswith(" DEACT") and args and not args[0].isdigit()):
        if len(args) < 2:
            raise ParseError(f"+CGEV {head} needs <PDP_type>,<PDP_addr>: {line!r}")
        suffix = "" if head in ("REJECT", "NW REACT") else "-pdp"
        return PdpEvent(name + suffix, cid=opt_int(field(args, 2)), pdp_type=args[0].upper(),
                        address=args[1])
    if head.endswith(("PDN ACT", "PDN DEACT")):
        return PdpEvent(name.replace("pdn-", "") + "-primary", cid=to_int(args[0] if args else ""))
    if head.endswith((" ACT", " DEACT")):
        if len(args) < 3:
            raise ParseError(f"+CGEV {head} needs <p_cid>,<cid>,<event_type>: {line!r}")
        return PdpEvent(name + "-secondary", cid=to_int(args[1]), parent_cid=to_int(args[0]),
                        event_type=to_int(args[2]))
    if head.endswith("MODIFY"):
        return PdpEvent(name, cid=opt_int(field(args, 0)), event_type=opt_int(field(args, 2)))
    return PdpEvent(name)


@dataclass(frozen=True, slots=True)
class DataCounters:
    """Bytes through the modem. ``sent``/``received`` count the current (or last) session;
    ``total_*`` what the modem accumulated across sessions where it keeps that too."""

    sent: int
    received: int
    cid: int | None = None
    total_sent: int | None = None
    total_received: int | None = None


def parse_qgdcnt(lines: Sequence[str]) -> tuple[DataCounters, ...]:
    """Quectel ``AT+QGDCNT?``: ``+QGDCNT: <bytes_sent>,<bytes_recv>`` since the last reset."""
    items = fields(value(lines, "+QGDCNT"))
    if len(items) != 2:
        raise ParseError(f"+QGDCNT needs 2 fields: {items!r}")
    return (DataCounters(to_int(items[0], "sent"), to_int(items[1], "received")),)


def parse_ugcntrd(lines: Sequence[str]) -> tuple[DataCounters, ...]:
    """u-blox ``AT+UGCNTRD``: ``+UGCNTRD: <cid>,<sent_sess>,<recv_sess>,<sent_total>,
    <recv_total>``, one line per context."""
    counters = []
    for text in values(lines, "+UGCNTRD"):
        items = fields(text)
        if len(items) != 5:
            raise ParseError(f"+UGCNTRD needs 5 fields: {text!r}")
        cid, sent, received, total_sent, total_received = (to_int(i) for i in items)
        counters.append(DataCounters(sent, received, cid, total_sent, total_received))
    return tuple(counters)


def parse_gdatavol(lines: Sequence[str]) -> tuple[DataCounters, ...]:
    """Telit ``AT#GDATAVOL=1``: ``#GDATAVOL: <cid>,<total>,<sent>,<received>`` per context."""
    counters = []
    for text in values(lines, "#GDATAVOL"):
        items = fields(text)
        if len(items) != 4:
            raise ParseError(f"#GDATAVOL needs 4 fields: {text!r}")
        cid, _total, sent, received = (to_int(i) for i in items)
        counters.append(DataCounters(sent, received, cid))
    return tuple(counters)


def parse_dsflowqry(lines: Sequence[str]) -> tuple[DataCounters, ...]:
    """Huawei ``AT^DSFLOWQRY``: ``^DSFLOWQRY: <last_time>,<last_tx>,<last_rx>,<total_time>,
    <total_tx>,<total_rx>``, all hexadecimal."""
    items = fields(value(lines, "^DSFLOWQRY"))
    if len(items) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,16}", i) for i in items):
        raise ParseError(f"^DSFLOWQRY needs 6 hex fields: {items!r}")
    _, sent, received, _, total_sent, total_received = (int(i, 16) for i in items)
    return (DataCounters(sent, received, None, total_sent, total_received),)
