"""3GPP TS 27.007 / V.250 commands every personality answers."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from drivers.simulator.state import Pdp
from drivers.simulator.syntax import AtFailure, CmeFailure, Command, Form, int_arg

if TYPE_CHECKING:
    from drivers.simulator.engine import Engine
    from drivers.simulator.personalities import Handler

# EMM causes, TS 24.301 annex A (what +CEER reports for a rejected registration).
EMM_CAUSES: dict[int, str] = {
    2: "IMSI unknown in HSS",
    3: "Illegal UE",
    5: "IMEI not accepted",
    6: "Illegal ME",
    7: "EPS services not allowed",
    8: "EPS services and non-EPS services not allowed",
    9: "UE identity cannot be derived by the network",
    10: "Implicitly detached",
    11: "PLMN not allowed",
    12: "Tracking area not allowed",
    13: "Roaming not allowed in this tracking area",
    14: "EPS services not allowed in this PLMN",
    15: "No suitable cells in tracking area",
    17: "Network failure",
    22: "Congestion",
    111: "Protocol error, unspecified",
}


def _value(read_prefix: str, get: int, cmd: Command, allowed: range) -> tuple[list[str], int]:
    """Shared shape of a numeric setting: READ -> ``<prefix>: n``; SET validates."""
    if cmd.form is Form.READ:
        return [f"{read_prefix}: {get}"], get
    if cmd.form is Form.TEST:
        return [f"{read_prefix}: ({allowed.start}-{allowed.stop - 1})"], get
    if cmd.form is Form.SET:
        value = int_arg(cmd.args, 0, 0)
        if value not in allowed:
            raise AtFailure(cmd.text())
        return [], value
    raise AtFailure(cmd.text())


# -- V.250 basics ----------------------------------------------------------------------------
def echo(engine: Engine, cmd: Command) -> list[str]:
    value = int_arg(cmd.args if cmd.raw_args else ["0"], 0)
    if value not in (0, 1):
        raise AtFailure(cmd.text())
    engine.state.echo = value == 1
    return []


def verbose(engine: Engine, cmd: Command) -> list[str]:
    value = int_arg(cmd.args if cmd.raw_args else ["0"], 0)
    if value not in (0, 1):
        raise AtFailure(cmd.text())
    engine.state.verbose = value == 1
    return []


def ati(engine: Engine, cmd: Command) -> list[str]:
    if cmd.raw_args not in ("", "0"):
        raise AtFailure(cmd.text())
    return list(engine.personality.ati)


def reset_profile(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    st.echo, st.verbose, st.cmee = True, True, engine.personality.cmee_default
    return []


def accept(engine: Engine, cmd: Command) -> list[str]:
    return []


def s_register(engine: Engine, cmd: Command) -> list[str]:
    defaults = {"S0": 0, "S3": 13, "S4": 10, "S5": 8, "S7": 0, "S10": 15}
    if cmd.name not in defaults:
        raise AtFailure(cmd.text())
    return [f"{defaults[cmd.name]:03d}"] if cmd.form is Form.READ else []


# -- identity --------------------------------------------------------------------------------
def _identity(attr: str) -> Handler:
    def handler(engine: Engine, cmd: Command) -> list[str]:
        if cmd.form is Form.TEST:
            return []
        if cmd.form is not Form.EXEC:
            raise AtFailure(cmd.text())
        value: str = getattr(engine.personality, attr)
        prefix = engine.personality.cgmr_prefix if attr == "revision" else ""
        return [prefix + value]

    return handler


def cgsn(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return []
    if cmd.form is Form.SET and cmd.args[:1] == ["1"]:
        return [f'+CGSN: "{engine.personality.imei}"']
    if cmd.form is not Form.EXEC and cmd.args[:1] != ["0"]:
        raise AtFailure(cmd.text())
    return [engine.personality.imei]


# -- SIM -------------------------------------------------------------------------------------
def cpin(engine: Engine, cmd: Command) -> list[str]:
    sim = engine.state.sim
    if cmd.form is Form.TEST:
        return []
    if cmd.form is Form.READ:
        engine.require_sim(unlocked=False, busy_ok=True)
        return [f"+CPIN: {engine.cpin_text()}"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    engine.require_sim(unlocked=False, busy_ok=True)
    args = cmd.args
    if sim.lock == "none":
        raise CmeFailure(3)
    if sim.lock == "pin":
        if args[:1] != [sim.pin]:
            sim.pin_attempts -= 1
            if sim.pin_attempts <= 0:
                sim.lock = "puk"
                engine.urc("+CPIN: SIM PUK")
            raise CmeFailure(16)
    else:
        if len(args) < 2 or args[0] != sim.puk:
            raise CmeFailure(16)
        sim.pin = args[1]
    sim.lock = "none"
    sim.pin_attempts = 3
    engine.sim_busy_for_a_while()
    engine.urc("+CPIN: READY")
    return []


def cimi(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return []
    engine.require_sim()
    return [engine.state.sim.imsi]


def crsm(engine: Engine, cmd: Command) -> list[str]:
    """``AT+CRSM=176,12258,0,0,10``: READ BINARY of EF_ICCID, nibbles swapped as stored."""
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    args = cmd.args
    command, fileid = int_arg(args, 0), int_arg(args, 1, 0)
    engine.require_sim(unlocked=False, busy_ok=True)
    if command != 176 or fileid != 12258:
        return ["+CRSM: 106,130"]  # SW 6A82: file not found
    digits = engine.state.sim.iccid
    digits += "F" * (20 - len(digits))
    swapped = "".join(digits[i + 1] + digits[i] for i in range(0, 20, 2))
    length = int_arg(args, 4, 10)
    return [f'+CRSM: 144,0,"{swapped[: 2 * min(length, 10)]}"']


# -- errors ----------------------------------------------------------------------------------
def cmee(engine: Engine, cmd: Command) -> list[str]:
    lines, engine.state.cmee = _value("+CMEE", engine.state.cmee, cmd, range(3))
    return lines


def ceer(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return []
    net = engine.state.network
    if engine.state.reg_stat() == 3 and net.reject_cause is not None:
        text = EMM_CAUSES.get(net.reject_cause, "Unknown cause")
        return [f'+CEER: "EMM cause {net.reject_cause}: {text}"']
    return ['+CEER: "No cause information available"']


# -- radio and network -----------------------------------------------------------------------
def cfun(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    if cmd.form is Form.READ:
        return [f"+CFUN: {st.radio}"]
    if cmd.form is Form.TEST:
        return ["+CFUN: (0,1,4),(0,1)"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    fun, rst = int_arg(cmd.args, 0), int_arg(cmd.args, 1, 0)
    if fun not in (0, 1, 4) or rst not in (0, 1):
        raise AtFailure(cmd.text())
    if rst == 1:
        engine.reboot_requested = True
        return []
    st.radio = fun
    return []


def registration(engine: Engine, cmd: Command) -> list[str]:
    modes = engine.state.reg_modes
    if cmd.form is Form.READ:
        return [engine.reg_line(cmd.name, modes.get(cmd.name, 0), solicited=True)]
    lines, modes[cmd.name] = _value(cmd.name, modes.get(cmd.name, 0), cmd, range(4))
    return lines


def cops(engine: Engine, cmd: Command) -> list[str]:
    st, net = engine.state, engine.state.network
    names = {0: net.operator, 1: net.short_name, 2: net.mcc + net.mnc}
    mode = 2 if st.cops_deregistered else 0
    if cmd.form is Form.READ:
        if not st.attached:
            return [f"+COPS: {mode}"]
        return [f'+COPS: {mode},{st.cops_format},"{names[st.cops_format]}",{net.act}']
    if cmd.form is Form.TEST:
        found = (
            f'(2,"{net.operator}","{net.short_name}","{net.mcc}{net.mnc}",{net.act}),'
            if st.radio == 1
            else ""
        )
        return [f"+COPS: {found},(0,1,2,3,4),(0,1,2)"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    args = cmd.args
    new_mode = int_arg(args, 0)
    if new_mode == 3:
        fmt = int_arg(args, 1)
        if fmt not in names:
            raise AtFailure(cmd.text())
        st.cops_format = fmt
    elif new_mode in (0, 4):
        st.cops_deregistered = False
    elif new_mode == 1:
        if len(args) < 3 or args[2] not in names.values():
            raise CmeFailure(30)
        st.cops_deregistered = False
    elif new_mode == 2:
        st.cops_deregistered = True
    else:
        raise AtFailure(cmd.text())
    return []


def _has_signal(engine: Engine) -> bool:
    st = engine.state
    return st.radio == 1 and st.network.state not in ("searching", "not-registered")


def csq(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return ["+CSQ: (0-31,99),(0-7,99)"]
    if cmd.form is not Form.EXEC:
        raise AtFailure(cmd.text())
    if not _has_signal(engine):
        return ["+CSQ: 99,99"]
    rssi = min(31, max(0, (engine.state.signal.rssi_dbm + 113) // 2))
    return [f"+CSQ: {rssi},99"]


def cesq(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is not Form.EXEC:
        raise AtFailure(cmd.text())
    if not _has_signal(engine):
        return ["+CESQ: 99,99,255,255,255,255"]
    sig = engine.state.signal
    rsrq = min(34, max(0, int((sig.rsrq_db + 20) * 2)))
    rsrp = min(97, max(0, sig.rsrp_dbm + 141))
    return [f"+CESQ: 99,99,255,255,{rsrq},{rsrp}"]


# -- packet data -----------------------------------------------------------------------------
def cgdcont(engine: Engine, cmd: Command) -> list[str]:
    pdp = engine.state.pdp
    if cmd.form is Form.READ:
        return [
            f'+CGDCONT: {c.cid},"{c.pdp_type}","{c.apn}","0.0.0.0",0,0'
            for c in sorted(pdp.values(), key=lambda c: c.cid)
        ]
    if cmd.form is Form.TEST:
        return ['+CGDCONT: (1-15),"IP",,,(0-2),(0-4)', '+CGDCONT: (1-15),"IPV4V6",,,(0-2),(0-4)']
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    args = cmd.args
    cid = int_arg(args, 0)
    if not 1 <= cid <= 15:
        raise AtFailure(cmd.text())
    if len(args) == 1:
        pdp.pop(cid, None)
        return []
    pdp_type = args[1] or "IP"
    if pdp_type not in ("IP", "IPV6", "IPV4V6", "Non-IP"):
        raise AtFailure(cmd.text())
    old = pdp.get(cid)
    pdp[cid] = Pdp(
        cid=cid,
        pdp_type=pdp_type,
        apn=args[2] if len(args) > 2 else "",
        active=old.active if old else False,
        address=f"10.160.23.{44 + cid}",
    )
    return []


def cgact(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    if cmd.form is Form.READ:
        return [
            f"+CGACT: {c.cid},{int(c.active)}" for c in sorted(st.pdp.values(), key=lambda c: c.cid)
        ]
    if cmd.form is Form.TEST:
        return ["+CGACT: (0,1)"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    args = cmd.args
    state = int_arg(args, 0)
    cids = [int_arg(args, i) for i in range(1, len(args))] or list(st.pdp)
    if state not in (0, 1) or any(c not in st.pdp for c in cids):
        raise AtFailure(cmd.text())
    if state == 1 and not st.attached:
        raise CmeFailure(30)
    engine.traffic()
    for cid in cids:
        if state == 1 and not st.pdp[cid].active:
            st.traffic.sent_session = st.traffic.recv_session = 0.0
        st.pdp[cid].active = state == 1
    return []


def cgpaddr(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    if cmd.form is Form.TEST:
        return ["+CGPADDR: (" + ",".join(str(c) for c in sorted(st.pdp)) + ")"]
    if cmd.form not in (Form.EXEC, Form.SET):
        raise AtFailure(cmd.text())
    cids = [int_arg(cmd.args, i) for i in range(len(cmd.args))] or sorted(st.pdp)
    if any(c not in st.pdp for c in cids):
        raise AtFailure(cmd.text())
    return [f'+CGPADDR: {c},"{st.pdp[c].address if st.pdp[c].active else "0.0.0.0"}"' for c in cids]


def cgatt(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    lines, value = _value("+CGATT", int(st.attached), cmd, range(2))
    if cmd.form is Form.SET:
        st.cops_deregistered = value == 0
    return lines


# -- time ------------------------------------------------------------------------------------
def cclk(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    quarters = st.network.tz_quarters
    if cmd.form is Form.TEST:
        return []
    if cmd.form is Form.READ:
        utc = dt.datetime.fromtimestamp(engine.wall_clock() + st.clock_offset, dt.UTC)
        local = utc + dt.timedelta(minutes=15 * quarters)
        sign = "-" if quarters < 0 else "+"
        return [f'+CCLK: "{local:%y/%m/%d,%H:%M:%S}{sign}{abs(quarters):02d}"']
    if cmd.form is not Form.SET or not cmd.args:
        raise AtFailure(cmd.text())
    text = cmd.args[0]
    try:
        local = dt.datetime.strptime(text[:17], "%y/%m/%d,%H:%M:%S").replace(tzinfo=dt.UTC)
        tz = int(text[17:]) if len(text) > 17 else quarters
    except ValueError:
        raise AtFailure(cmd.text()) from None
    utc = local - dt.timedelta(minutes=15 * tz)
    st.clock_offset = utc.timestamp() - engine.wall_clock()
    return []


def ctzu(engine: Engine, cmd: Command) -> list[str]:
    lines, engine.state.ctzu = _value("+CTZU", engine.state.ctzu, cmd, range(4))
    return lines


def ctzr(engine: Engine, cmd: Command) -> list[str]:
    return _value("+CTZR", 0, cmd, range(4))[0]


HANDLERS: dict[str, Handler] = {
    "E": echo,
    "V": verbose,
    "I": ati,
    "Z": reset_profile,
    "&F": reset_profile,
    "&W": accept,
    "Q": accept,
    "H": accept,
    "S0": s_register,
    "S3": s_register,
    "S4": s_register,
    "S5": s_register,
    "S7": s_register,
    "S10": s_register,
    "+CGMI": _identity("manufacturer"),
    "+GMI": _identity("manufacturer"),
    "+CGMM": _identity("model"),
    "+GMM": _identity("model"),
    "+CGMR": _identity("revision"),
    "+GMR": _identity("revision"),
    "+CGSN": cgsn,
    "+GSN": cgsn,
    "+CPIN": cpin,
    "+CIMI": cimi,
    "+CRSM": crsm,
    "+CMEE": cmee,
    "+CEER": ceer,
    "+CFUN": cfun,
    "+CREG": registration,
    "+CGREG": registration,
    "+CEREG": registration,
    "+COPS": cops,
    "+CSQ": csq,
    "+CESQ": cesq,
    "+CGDCONT": cgdcont,
    "+CGACT": cgact,
    "+CGPADDR": cgpaddr,
    "+CGATT": cgatt,
    "+CCLK": cclk,
    "+CTZU": ctzu,
    "+CTZR": ctzr,
}
