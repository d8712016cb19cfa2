"""Vendor personalities as data: identity strings, banner, defaults and dialect commands.

A personality adds vendor commands (``extensions``) to the 27.007 set; a command it does not
list and the standard set does not know answers ``ERROR``, as on the real module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from drivers.simulator import vendor
from drivers.simulator.syntax import Command

if TYPE_CHECKING:
    from drivers.simulator.engine import Engine

Handler = Callable[["Engine", Command], list[str]]


@dataclass(frozen=True)
class Personality:
    key: str
    manufacturer: str
    model: str
    revision: str
    imei: str
    ati: tuple[str, ...]
    cgmr_prefix: str = ""  # SIMCom answers "+CGMR: <rev>"
    # Lines printed after a (re)boot; "{cpin}" becomes the SIM status ("READY", "SIM PIN"...).
    banner: tuple[str, ...] = ()
    cmee_default: int = 0
    sim_off_at_cfun0: bool = False  # Quectel powers the SIM down at CFUN=0
    sim_slots: int = 1  # SIM holders; the second is chosen with the vendor's command
    extensions: Mapping[str, Handler] = field(default_factory=dict)


QUECTEL = Personality(
    key="quectel",
    manufacturer="Quectel",
    model="EC25",
    revision="EC25JFAR06A07M4G",
    imei="864692030541238",
    ati=("Quectel", "EC25", "Revision: EC25JFAR06A07M4G"),
    banner=("RDY",),
    cmee_default=1,
    sim_off_at_cfun0=True,
    sim_slots=2,  # EC25/EG25 dual-SIM single-standby variants: AT+QDSIM
    extensions={
        "+QCCID": vendor.qccid,
        "+QDSIM": vendor.qdsim,
        "+QENG": vendor.qeng,
        "+QGDCNT": vendor.qgdcnt,
        "+QTEMP": vendor.qtemp,
    },
)

SIMCOM = Personality(
    key="simcom",
    manufacturer="SIMCOM INCORPORATED",
    model="SIMCOM_SIM7600G-H",
    revision="LE20B04SIM7600G22",
    imei="862903040787659",
    ati=(
        "Manufacturer: SIMCOM INCORPORATED",
        "Model: SIMCOM_SIM7600G-H",
        "Revision: LE20B04SIM7600G22",
        "IMEI: 862903040787659",
        "+GCAP: +CGSM",
    ),
    cgmr_prefix="+CGMR: ",
    banner=("RDY", "+CPIN: {cpin}", "SMS DONE", "PB DONE"),
    cmee_default=0,
    extensions={
        "+CICCID": vendor.ciccid,
        "+CPSI": vendor.cpsi,
        "+CPMUTEMP": vendor.cpmutemp,
    },
)

UBLOX = Personality(
    key="ublox",
    manufacturer="u-blox",
    model="SARA-R410M-02B",
    revision="L0.0.00.00.05.08 [Apr 17 2019 19:34:02]",
    imei="352608080194438",
    ati=(
        "Manufacturer: u-blox",
        "Model: SARA-R410M-02B",
        "Revision: L0.0.00.00.05.08 [Apr 17 2019 19:34:02]",
        "SVN: 06",
        "IMEI: 352608080194438",
    ),
    cmee_default=0,
    extensions={
        "+CCID": vendor.ccid,
        "+UGCNTRD": vendor.ugcntrd,
        "+UGCNTSET": vendor.ugcntset,
    },
)

PERSONALITIES: dict[str, Personality] = {p.key: p for p in (QUECTEL, SIMCOM, UBLOX)}
