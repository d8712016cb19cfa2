"""Signal quality: ``+CSQ``, ``+CESQ`` (27.007) and the vendors' serving-cell reports (Quectel
``+QENG: "servingcell"`` and ``+QCSQ``, SIMCom ``+CPSI``). Not known is None, never a number."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from drivers.parsers._common import ParseError, fields, to_int, value

_DECIMAL = re.compile(r"[+-]?[0-9]{1,6}(?:\.[0-9]{1,3})?")


@dataclass(frozen=True, slots=True)
class Signal:
    rssi_dbm: int | None = None
    ber: int | None = None  # RXQUAL class 0-7
    rsrp_dbm: float | None = None
    rsrq_db: float | None = None
    sinr_db: float | None = None
    rscp_dbm: float | None = None
    ecno_db: float | None = None

    def merge(self, other: Signal) -> Signal:
        """This reading, with the gaps filled from ``other``."""
        return Signal(**{
            f.name: getattr(other, f.name) if getattr(self, f.name) is None
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        })


def _level(text: str, top: int, what: str) -> int | None:
    """A 27.007 index in 0..top, None for the not-known values (99, 255, anything else)."""
    n = to_int(text, what)
    return n if 0 <= n <= top else None


def parse_csq(lines: Sequence[str]) -> Signal:
    """``+CSQ: <rssi>,<ber>``: rssi 0..31 is -113 dBm + 2 dB steps; 99 not known."""
    items = fields(value(lines, "+CSQ"))
    if len(items) != 2:
        raise ParseError(f"+CSQ needs 2 fields: {items!r}")
    rssi = _level(items[0], 31, "+CSQ rssi")
    return Signal(rssi_dbm=None if rssi is None else -113 + 2 * rssi,
                  ber=_level(items[1], 7, "+CSQ ber"))


def parse_cesq(lines: Sequence[str]) -> Signal:
    """``+CESQ: <rxlev>,<ber>,<rscp>,<ecno>,<rsrq>,<rsrp>`` (TS 27.007 8.69)."""
    items = fields(value(lines, "+CESQ"))
    if len(items) != 6:
        raise ParseError(f"+CESQ needs 6 fields: {items!r}")
    rxlev = _level(items[0], 63, "rxlev")
    rscp = _level(items[2], 96, "rscp")
    ecno = _level(items[3], 49, "ecno")
    rsrq = _level(items[4], 34, "rsrq")
    rsrp = _level(items[5], 97, "rsrp")
    return Signal(
        rssi_dbm=None if rxlev is None else -111 + rxlev,
        ber=_level(items[1], 7, "ber"),
        rscp_dbm=None if rscp is None else -121.0 + rscp,
        ecno_db=None if ecno is None else -24.5 + ecno / 2,
        rsrq_db=None if rsrq is None else -20.0 + rsrq / 2,
        rsrp_dbm=None if rsrp is None else -141.0 + rsrp,
    )


def _number(text: str) -> float | None:
    """A decimal reading, None when the modem printed something else (``-``, ``NA``)."""
    return float(text) if _DECIMAL.fullmatch(text) else None


def _quectel_sinr(text: str) -> float | None:
    """Quectel LTE SINR: 0..250 in 1/5 dB from -20 dB."""
    raw = _number(text)
    return None if raw is None or not 0 <= raw <= 250 else raw / 5 - 20


def parse_qeng_servingcell(lines: Sequence[str]) -> Signal:
    """Quectel ``AT+QENG="servingcell"``, LTE (EC2x/EG2x/EP06) or eMTC/NB-IoT (BG9x):
    ``+QENG: "servingcell",<state>,"LTE"|"eMTC"|"NBIoT",<is_tdd>,<mcc>,<mnc>,<cellid>,<pcid>,
    <earfcn>,<band>,<ul_bw>,<dl_bw>,<tac>,<rsrp>,<rsrq>,<rssi>,<sinr>,...``. Other RATs
    and ``SEARCH``/``LIMSRV`` without a cell give an empty reading."""
    items = fields(value(lines, "+QENG"))
    if not items or items[0].lower() != "servingcell":
        raise ParseError(f"not a servingcell report: {items!r}")
    if len(items) < 17 or items[2].upper() not in ("LTE", "EMTC", "CAT-M", "NBIOT", "CAT-NB"):
        return Signal()
    rssi = _number(items[15])
    return Signal(rsrp_dbm=_number(items[13]), rsrq_db=_number(items[14]),
                  rssi_dbm=None if rssi is None else round(rssi), sinr_db=_quectel_sinr(items[16]))


def parse_qcsq(lines: Sequence[str]) -> Signal:
    """Quectel ``AT+QCSQ``: ``+QCSQ: "LTE",<rssi>,<rsrp>,<sinr>,<rsrq>``, ``"GSM",<rssi>``,
    ``"WCDMA",<rssi>,<rscp>,<ecio>``, ``"NOSERVICE"``; dBm/dB except the LTE SINR index."""
    items = fields(value(lines, "+QCSQ"))
    mode = items[0].upper()
    nums = [_number(i) for i in items[1:]]
    rssi = round(nums[0]) if nums and nums[0] is not None else None
    if mode in ("LTE", "CAT-M", "CAT-NB", "EMTC", "NBIOT") and len(nums) >= 4:
        return Signal(rssi_dbm=rssi, rsrp_dbm=nums[1], sinr_db=_quectel_sinr(items[3]),
                      rsrq_db=nums[3])
    if mode == "WCDMA" and len(nums) >= 3:
        return Signal(rssi_dbm=rssi, rscp_dbm=nums[1], ecno_db=nums[2])
    if mode in ("GSM", "WCDMA", "TDSCDMA"):
        return Signal(rssi_dbm=rssi)
    if mode == "NOSERVICE":
        return Signal()
    raise ParseError(f"unknown +QCSQ mode {items[0]!r}")


def parse_cpsi(lines: Sequence[str]) -> Signal:
    """SIMCom ``AT+CPSI?`` on LTE: ``+CPSI: LTE,Online,<mcc>-<mnc>,<tac>,<cell>,<pci>,<band>,
    <earfcn>,<dlbw>,<ulbw>,<rsrq>,<rsrp>,<rssi>,<rssnr>``. SIM7600 prints tenths of dB/dBm and
    ``<rssnr>`` with SINR = 2 * rssnr - 20; SIM7080 (``LTE CAT-M1``/``LTE NB-IOT``) prints
    whole dB/dBm and SINR in dB. RSRP beyond -200 tells the two apart."""
    items = fields(value(lines, "+CPSI"))
    if not items[0].upper().startswith("LTE") or len(items) < 14:
        return Signal()
    rsrq, rsrp, rssi, snr = (_number(i) for i in items[10:14])
    if rsrp is not None and rsrp < -200:
        return Signal(rsrq_db=None if rsrq is None else rsrq / 10, rsrp_dbm=rsrp / 10,
                      rssi_dbm=None if rssi is None else round(rssi / 10),
                      sinr_db=None if snr is None else 2 * snr - 20)
    return Signal(rsrq_db=rsrq, rsrp_dbm=rsrp, rssi_dbm=None if rssi is None else round(rssi),
                  sinr_db=snr)
