"""The modem itself: radio function level (``+CFUN``) and the network time (``+CCLK``,
Huawei ``^NWTIME``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from drivers.parsers._common import ParseError, fields, to_int, value

RadioState = Literal["on", "off", "low-power"]

# <fun> of TS 27.007 8.2: 0 minimum functionality, 1 full, 2/3 transmit or receive RF off,
# 4 both off (flight mode). 5..127 are the manufacturers': vendor profiles add theirs.
CFUN_27007: Mapping[int, RadioState] = {
    0: "off", 1: "on", 2: "low-power", 3: "low-power", 4: "low-power",
}


@dataclass(frozen=True, slots=True)
class Radio:
    fun: int
    state: RadioState | None  # None: a vendor level this profile does not know


def parse_cfun(lines: Sequence[str], states: Mapping[int, RadioState] = CFUN_27007) -> Radio:
    """``AT+CFUN?``: ``+CFUN: <fun>[,<rst>]``."""
    fun = to_int(fields(value(lines, "+CFUN"))[0], "+CFUN")
    return Radio(fun, states.get(fun))


@dataclass(frozen=True, slots=True)
class NetworkTime:
    """``when`` carries the zone the network sent (UTC when it sent none); ``dst_minutes`` the
    daylight-saving adjustment already included in it, when the modem reports one."""

    when: datetime
    dst_minutes: int | None = None


_TIME = re.compile(
    r'"?(\d{2}|\d{4})/(\d{2})/(\d{2}),(\d{2}):(\d{2}):(\d{2})(?:([+-])(\d{1,2}))?"?'
    r"(?:,(\d{1,2}))?")


def _network_time(text: str) -> NetworkTime:
    """``yy/MM/dd,hh:mm:ss±zz`` with ``zz`` in quarter hours, optionally quoted, optionally
    followed by ``,<dst hours>``. Two-digit years from 70 are 19xx: a modem whose clock was
    never set reports 1980 or 1970, which must not pass for a date in 2080."""
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise ParseError(f"not a network time: {text!r}")
    year = int(m.group(1))
    if year < 100:
        year += 2000 if year < 70 else 1900
    quarters = int(m.group(8) or 0) * (-1 if m.group(7) == "-" else 1)
    try:
        zone = timezone(timedelta(minutes=15 * quarters))
        when = datetime(year, int(m.group(2)), int(m.group(3)), int(m.group(4)),
                        int(m.group(5)), int(m.group(6)), tzinfo=zone)
    except ValueError as exc:
        raise ParseError(f"not a network time: {text!r} ({exc})") from None
    dst = m.group(9)
    return NetworkTime(when, None if dst is None else 60 * int(dst))


def parse_cclk(lines: Sequence[str]) -> NetworkTime:
    """``AT+CCLK?``: ``+CCLK: "yy/MM/dd,hh:mm:ss±zz"`` (some modems omit the quotes)."""
    return _network_time(value(lines, "+CCLK"))


def parse_nwtime(lines: Sequence[str]) -> NetworkTime:
    """Huawei ``AT^NWTIME?``: ``^NWTIME: yy/MM/dd,hh:mm:ss±zz,<dst hours>``."""
    return _network_time(value(lines, "^NWTIME"))
