"""Vendor profiles: the AT dialects, as data over the generic 3GPP TS 27.007 base.

A profile says which commands a vendor uses where 27.007 has none (ICCID, serving-cell
signal, byte counters, reset) and where the vendor numbers things its own way (``<AcT>``,
``+CFUN`` levels). :func:`identify` picks one from the ``+CGMI`` and ``+CGMM`` answers, never
from ``ATI``. The modem simulator (``drivers/simulator``) answers in these same dialects.

Generic 27.007 (every profile unless it says otherwise)

=================  =====================================================================
ICCID              ``AT+CCID`` -> ``+CCID: <iccid>``; fallback for all:
                   ``AT+CRSM=176,12258,0,0,10`` -> ``+CRSM: 144,0,"98..."`` (swapped nibbles)
signal             ``AT+CSQ`` -> ``+CSQ: <rssi>,<ber>``; extended ``AT+CESQ``
counters           none
clock              ``AT+CCLK?`` -> ``+CCLK: "yy/MM/dd,hh:mm:ss±zz"``
reset              ``AT+CFUN=1,1``
temperature        none (27.007 has no temperature read; ``drivers/parsers/thermal.py``)
init               ``AT+CREG=2``, ``AT+CGREG=2``, ``AT+CEREG=3`` (``=2`` when 3 is refused)
``<AcT>``          27.007: 7 LTE, 8 EC-GSM-IoT, 9 NB-IoT, 11/12 NR
=================  =====================================================================

Quectel EC2x / EG2x / EP06 / BG9x (``+CGMI: Quectel``)

=================  =====================================================================
ICCID              ``AT+QCCID`` -> ``+QCCID: <iccid>`` (may end in ``F``)
signal             ``AT+QENG="servingcell"`` -> ``+QENG: "servingcell",<state>,"LTE",
                   <is_tdd>,<mcc>,<mnc>,<cellid>,<pcid>,<earfcn>,<band>,<ul_bw>,<dl_bw>,<tac>,
                   <rsrp>,<rsrq>,<rssi>,<sinr 0..250 = -20..30 dB>,...``
counters           ``AT+QGDCNT?`` -> ``+QGDCNT: <sent>,<recv>`` (bytes)
temperature        ``AT+QTEMP`` -> ``+QTEMP: <pmic_temp>,<xo_temp>,<pa_temp>`` (EC2x) or one
                   ``+QTEMP: "<sensor>","<temp>"`` line per sensor; the hottest is reported
banner             ``RDY`` (about 11 s after a reset on EC2x)
SIM slot           ``AT+QDSIM?`` -> ``+QDSIM: <n>`` (0 slot 1, 1 slot 2); ``AT+QDSIM=<n>``
                   (dual-SIM single-standby variants; others answer ``ERROR``)
``<AcT>``          8 is LTE-M (eMTC) on BG9x, 9 NB-IoT
=================  =====================================================================

SIMCom SIM7600 / SIM7080 (``+CGMI: SIMCOM INCORPORATED``, ``+CGMM: SIMCOM_SIM7600E-H``)

=================  =====================================================================
ICCID              ``AT+CICCID`` -> ``+ICCID: <iccid>``
revision           ``AT+CGMR`` -> ``+CGMR: <rev>``
signal             ``AT+CPSI?`` -> ``+CPSI: LTE,Online,<mcc>-<mnc>,<tac>,<cell>,<pci>,<band>,
                   <earfcn>,<dlbw>,<ulbw>,<rsrq>,<rsrp>,<rssi>,<rssnr>`` (SIM7600: tenths,
                   SINR = 2*rssnr-20; SIM7080 ``LTE CAT-M1``: whole dB)
counters           none
temperature        ``AT+CPMUTEMP`` -> ``+CPMUTEMP: <temp>`` (°C)
banner             ``RDY``
``<AcT>``          SIM7080 (LTE-M/NB-IoT only): 7 is LTE-M, 9 NB-IoT
=================  =====================================================================

SIMCom SIM800 (2G): ``AT+CCID`` answers a bare ``<iccid>`` line; no extended signal; no
temperature read known.

u-blox SARA-R4 / SARA-R5 and others (``+CGMI: u-blox``)

=================  =====================================================================
ICCID              ``AT+CCID`` -> ``+CCID: <iccid>``
counters           ``AT+UGCNTRD`` -> ``+UGCNTRD: <cid>,<sent_sess>,<recv_sess>,<sent_total>,
                   <recv_total>`` (one line per context)
banner             none
``+CFUN``          0 and 19 are low-power (minimum functionality, SIM kept / deactivated)
temperature        not read: ``+UTEMP``'s answer (units, scale) is not confirmed from a manual
``<AcT>``          SARA-R4/R5 (LTE-M/NB-IoT only): 7 is LTE-M, 9 NB-IoT
=================  =====================================================================

Telit LE910 (``+CGMI: Telit``): ICCID ``AT#CCID`` -> ``#CCID: <iccid>``; counters
``AT#GDATAVOL=1`` -> ``#GDATAVOL: <cid>,<total>,<sent>,<received>``; reset ``AT#REBOOT``;
temperature ``AT#TEMPMON=1`` -> ``#TEMPMEAS: <level>,<value>`` (``<value>`` °C).

Sierra Wireless HL78xx / HL75xx (``+CGMI: Sierra Wireless``): ICCID ``AT+CCID`` ->
``+CCID: <iccid>``; HL78xx (LTE-M/NB-IoT only): ``<AcT>`` 7 is LTE-M.

Huawei (``+CGMI: Huawei``): ICCID ``AT^ICCID?`` -> ``^ICCID: <iccid>`` (EF_ICCID order);
counters ``AT^DSFLOWQRY`` -> ``^DSFLOWQRY: <last_time>,<last_tx>,<last_rx>,<total_time>,
<total_tx>,<total_rx>`` (hex); clock ``AT^NWTIME?`` -> ``^NWTIME: yy/MM/dd,hh:mm:ss±zz,<dst>``;
temperature not read (``^CHIPTEMP?``'s fields are not confirmed from a manual).

Sierra Wireless: temperature not read (no confirmed command).

Dual SIM (one radio, two holders): Quectel's ``AT+QDSIM`` only. 3GPP TS 27.007 section 8.66
has ``+CSUS`` (set card slot: refused while a SIM is active), which few modules implement; the
others have no slot command confirmed from their manuals (SIMCom SIM7600 and u-blox SARA-R4
have one SIM interface; Telit LE910Cx ``#SIMSELECT`` and Sierra ``!UIMS`` are not wired:
their parameters are not confirmed from a manual). Their profiles have one slot
(:attr:`Profile.sim_slots`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from drivers.parsers.device import CFUN_27007, NetworkTime, RadioState, parse_cclk, parse_nwtime
from drivers.parsers.network import ACT_27007, Act
from drivers.parsers.packet import (
    DataCounters,
    parse_dsflowqry,
    parse_gdatavol,
    parse_qgdcnt,
    parse_ugcntrd,
)
from drivers.parsers.signal import Signal, parse_cesq, parse_cpsi, parse_qeng_servingcell
from drivers.parsers.thermal import Temperature, parse_cpmutemp, parse_qtemp, parse_tempmeas

Lines = Sequence[str]


@dataclass(frozen=True, slots=True)
class SlotDialect:
    """A vendor's dual-SIM commands: ``query`` answers ``<prefix>: <n>``; ``select`` takes the
    vendor's number of a slot for ``{}``; ``first`` is the vendor's number of slot 1."""

    query: str
    prefix: str
    select: str
    first: int = 0
    count: int = 2


@dataclass(frozen=True, slots=True)
class Profile:
    """One dialect. ``manufacturer``/``model`` are regular expressions searched (ignoring case)
    in the ``+CGMI``/``+CGMM`` answers; ``iccid_prefix`` is the answer's prefix (None: a bare
    line). Commands set to None are not supported by the vendor (the temperature command: not
    confirmed from the vendor's manual). ``reset_command`` is what the AT channel sends to
    reset the modem (its recovery ladder, and reset orders): :meth:`drivers.modem.Modem.init`
    hands it to the channel."""

    name: str
    manufacturer: str = ""
    model: str = ""
    iccid_command: str = "AT+CCID"
    iccid_prefix: str | None = "+CCID"
    signal_command: str | None = "AT+CESQ"
    signal_parser: Callable[[Lines], Signal] = parse_cesq
    counters_command: str | None = None
    counters_parser: Callable[[Lines], tuple[DataCounters, ...]] | None = None
    clock_command: str = "AT+CCLK?"
    clock_parser: Callable[[Lines], NetworkTime] = parse_cclk
    reset_command: str = "AT+CFUN=1,1"
    temperature_command: str | None = None
    temperature_parser: Callable[[Lines], Temperature] | None = None
    temperature_prefix: str | None = None  # the answer's prefix when not the command's name
    banner: str | None = None
    slot_dialect: SlotDialect | None = None  # None: one SIM slot
    init_commands: tuple[str, ...] = ("AT+CREG=2", "AT+CGREG=2", "AT+CEREG=3")
    act_names: Mapping[int, Act] = field(default_factory=lambda: ACT_27007)
    cfun_states: Mapping[int, RadioState] = field(default_factory=lambda: CFUN_27007)

    @property
    def sim_slots(self) -> int:
        """The SIM slots the stack can switch between: 1 without a slot dialect."""
        return self.slot_dialect.count if self.slot_dialect else 1

    def matches(self, manufacturer: str, model: str) -> bool:
        return (re.search(self.manufacturer, manufacturer, re.IGNORECASE) is not None
                and re.search(self.model, model, re.IGNORECASE) is not None)


def _acts(**overrides: Act) -> Mapping[int, Act]:
    """27.007 ``<AcT>`` names with a vendor's own numbers: ``_acts(a7="lte-m")``."""
    return {**ACT_27007, **{int(key[1:]): act for key, act in overrides.items()}}


GENERIC = Profile("generic")

QUECTEL = replace(
    GENERIC, name="quectel", manufacturer="quectel",
    iccid_command="AT+QCCID", iccid_prefix="+QCCID",
    signal_command='AT+QENG="servingcell"', signal_parser=parse_qeng_servingcell,
    counters_command="AT+QGDCNT?", counters_parser=parse_qgdcnt,
    temperature_command="AT+QTEMP", temperature_parser=parse_qtemp,
    banner="RDY", act_names=_acts(a8="lte-m"),
    # Quectel AT Commands Manual, (U)SIM Related Commands, "AT+QDSIM Select (U)SIM Card"
    # (section 5.12 in the edition the quectelatcommands package follows): <n> 0 SIM1, 1 SIM2.
    # No capture in ../shared/corpus. Modem.select_sim_slot powers the SIM down around it.
    slot_dialect=SlotDialect("AT+QDSIM?", "+QDSIM", "AT+QDSIM={}", first=0),
)

SIMCOM = replace(
    GENERIC, name="simcom", manufacturer="simcom",
    iccid_command="AT+CICCID", iccid_prefix="+ICCID",
    signal_command="AT+CPSI?", signal_parser=parse_cpsi, banner="RDY",
    temperature_command="AT+CPMUTEMP", temperature_parser=parse_cpmutemp,
)
SIMCOM_LPWA = replace(SIMCOM, name="simcom-lpwa", model=r"SIM70[0-9]0", act_names=_acts(a7="lte-m"))
SIMCOM_2G = replace(
    SIMCOM, name="simcom-2g", model=r"SIM8[0-9][0-9]", iccid_command="AT+CCID",
    iccid_prefix=None, signal_command=None, temperature_command=None, temperature_parser=None,
)

_UBLOX_CFUN: Mapping[int, RadioState] = {**CFUN_27007, 0: "low-power", 19: "low-power"}
UBLOX = replace(
    GENERIC, name="u-blox", manufacturer=r"u-?blox",
    counters_command="AT+UGCNTRD", counters_parser=parse_ugcntrd, cfun_states=_UBLOX_CFUN,
)
UBLOX_LPWA = replace(UBLOX, name="u-blox-lpwa", model=r"SARA-R[45]", act_names=_acts(a7="lte-m"))

TELIT = replace(
    GENERIC, name="telit", manufacturer="telit", iccid_command="AT#CCID", iccid_prefix="#CCID",
    counters_command="AT#GDATAVOL=1", counters_parser=parse_gdatavol, reset_command="AT#REBOOT",
    temperature_command="AT#TEMPMON=1", temperature_parser=parse_tempmeas,
    temperature_prefix="#TEMPMEAS",
)

SIERRA = replace(GENERIC, name="sierra", manufacturer="sierra")
SIERRA_LPWA = replace(SIERRA, name="sierra-lpwa", model="HL78", act_names=_acts(a7="lte-m"))

HUAWEI = replace(
    GENERIC, name="huawei", manufacturer="huawei",
    iccid_command="AT^ICCID?", iccid_prefix="^ICCID",
    counters_command="AT^DSFLOWQRY", counters_parser=parse_dsflowqry,
    clock_command="AT^NWTIME?", clock_parser=parse_nwtime,
)

# Most specific first: a model-specific profile before its vendor's, GENERIC last.
PROFILES: tuple[Profile, ...] = (
    QUECTEL, SIMCOM_LPWA, SIMCOM_2G, SIMCOM, UBLOX_LPWA, UBLOX, TELIT, SIERRA_LPWA, SIERRA,
    HUAWEI,
)


def identify(manufacturer: str | None, model: str | None) -> Profile:
    """The profile for a modem's ``+CGMI`` and ``+CGMM`` answers; GENERIC when none fits."""
    for profile in PROFILES:
        if profile.matches(manufacturer or "", model or ""):
            return profile
    return GENERIC
