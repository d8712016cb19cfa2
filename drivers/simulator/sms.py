"""SMS storage and the TS 27.005 commands: +CMGF, +CPMS, +CNMI, +CMGL, +CMGR, +CMGD."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from drivers.simulator.state import Sms
from drivers.simulator.syntax import AtFailure, CmeFailure, CmsFailure, Command, Form, int_arg

if TYPE_CHECKING:
    from drivers.simulator.engine import Engine
    from drivers.simulator.personalities import Handler

STORAGES = ("ME", "SM", "MT")
_PDU_STAT = {"REC UNREAD": 0, "REC READ": 1}
# GSM 03.38 default alphabet for the characters that differ from ASCII; the rest of printable
# ASCII maps to itself except the few characters that need the escape table (sent as UCS2).
_GSM_SPECIAL = {"@": 0x00, "$": 0x02, "_": 0x11}
_GSM_NEEDS_UCS2 = set("`[]{}\\^~|")


def _require_sim(engine: Engine) -> None:
    try:
        engine.require_sim()
    except CmeFailure as exc:
        raise CmsFailure({10: 310, 11: 311, 12: 316, 13: 313, 14: 314}.get(exc.code, 500)) from None


def receive(engine: Engine, sender: str, text: str, *, notify: bool = True) -> int | None:
    """Store an incoming SMS; ``+CMTI`` if the host asked for indications. None when full."""
    st = engine.state
    if len(st.sms) >= st.sms_capacity:
        return None
    index = next(i for i in range(1, st.sms_capacity + 2) if i not in st.sms)
    quarters = st.network.tz_quarters
    local = dt.datetime.fromtimestamp(engine.wall_clock(), dt.UTC) + dt.timedelta(
        minutes=15 * quarters
    )
    stamp = f"{local:%y/%m/%d,%H:%M:%S}{'-' if quarters < 0 else '+'}{abs(quarters):02d}"
    st.sms[index] = Sms(index=index, sender=sender, text=text, timestamp=stamp)
    mode, mt = st.cnmi
    if notify and mode >= 1 and mt == 1:
        engine.urc(f'+CMTI: "{st.sms_storage}",{index}')
    return index


def cmgf(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    if cmd.form is Form.READ:
        return [f"+CMGF: {st.cmgf}"]
    if cmd.form is Form.TEST:
        return ["+CMGF: (0,1)"]
    value = int_arg(cmd.args, 0, 0)
    if cmd.form is not Form.SET or value not in (0, 1):
        raise AtFailure(cmd.text())
    st.cmgf = value
    return []


def cnmi(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    if cmd.form is Form.READ:
        return [f"+CNMI: {st.cnmi[0]},{st.cnmi[1]},0,0,0"]
    if cmd.form is Form.TEST:
        return ["+CNMI: (0-2),(0-3),(0,2),(0-2),(0,1)"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    mode, mt = int_arg(cmd.args, 0, 0), int_arg(cmd.args, 1, 0)
    if mode not in range(4) or mt not in range(4):
        raise AtFailure(cmd.text())
    st.cnmi = (mode, mt)
    return []


def cpms(engine: Engine, cmd: Command) -> list[str]:
    st = engine.state
    used, total = len(st.sms), st.sms_capacity
    if cmd.form is Form.TEST:
        mems = ",".join(f'"{m}"' for m in STORAGES)
        return [f"+CPMS: ({mems}),({mems}),({mems})"]
    _require_sim(engine)
    if cmd.form is Form.READ:
        mem = st.sms_storage
        return [f'+CPMS: "{mem}",{used},{total},"{mem}",{used},{total},"{mem}",{used},{total}']
    if cmd.form is not Form.SET or not cmd.args or any(a not in STORAGES for a in cmd.args):
        raise CmsFailure(302)
    st.sms_storage = cmd.args[-1]
    return ["+CPMS: " + ",".join([f"{used},{total}"] * 3)]


def _selected(engine: Engine, cmd: Command) -> list[Sms]:
    st = engine.state
    arg = cmd.args[0] if cmd.args else ("REC UNREAD" if st.cmgf == 1 else "0")
    if st.cmgf == 1:
        wanted = {"ALL": {"REC UNREAD", "REC READ"}}.get(arg, {arg})
        if arg not in ("ALL", "REC UNREAD", "REC READ", "STO UNSENT", "STO SENT"):
            raise CmsFailure(302)
    else:
        if arg not in ("0", "1", "2", "3", "4"):
            raise CmsFailure(304)
        wanted = {"0": {"REC UNREAD"}, "1": {"REC READ"}}.get(arg, {"REC UNREAD", "REC READ"})
    return [m for _, m in sorted(st.sms.items()) if m.stat in wanted]


def cmgl(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return ['+CMGL: ("REC UNREAD","REC READ","STO UNSENT","STO SENT","ALL")']
    _require_sim(engine)
    lines: list[str] = []
    for msg in _selected(engine, cmd):
        if engine.state.cmgf == 1:
            lines += [
                f'+CMGL: {msg.index},"{msg.stat}","{msg.sender}",,"{msg.timestamp}"',
                msg.text,
            ]
        else:
            pdu = deliver_pdu(msg)
            lines += [f"+CMGL: {msg.index},{_PDU_STAT[msg.stat]},,{len(pdu) // 2 - 1}", pdu]
        msg.read = True
    return lines


def cmgr(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return []
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    _require_sim(engine)
    msg = engine.state.sms.get(int_arg(cmd.args, 0))
    if msg is None:
        raise CmsFailure(321)
    stat = msg.stat
    msg.read = True
    if engine.state.cmgf == 1:
        return [f'+CMGR: "{stat}","{msg.sender}",,"{msg.timestamp}"', msg.text]
    pdu = deliver_pdu(msg)
    return [f"+CMGR: {_PDU_STAT[stat]},,{len(pdu) // 2 - 1}", pdu]


def cmgd(engine: Engine, cmd: Command) -> list[str]:
    if cmd.form is Form.TEST:
        return ["+CMGD: (" + ",".join(str(i) for i in sorted(engine.state.sms)) + "),(0-4)"]
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    _require_sim(engine)
    store = engine.state.sms
    index, flag = int_arg(cmd.args, 0), int_arg(cmd.args, 1, 0)
    if flag == 0:
        if index not in store:
            raise CmsFailure(321)
        del store[index]
    elif flag in (1, 2, 3):
        for i in [i for i, m in store.items() if m.read]:
            del store[i]
    elif flag == 4:
        store.clear()
    else:
        raise AtFailure(cmd.text())
    return []


# -- PDU mode (TS 23.040 SMS-DELIVER) ----------------------------------------------------------
def _semi_octets(digits: str) -> str:
    if len(digits) % 2:
        digits += "F"
    return "".join(digits[i + 1] + digits[i] for i in range(0, len(digits), 2))


def _pack7(text: str) -> str:
    septets = [_GSM_SPECIAL.get(ch, ord(ch)) for ch in text]
    bits = 0
    nbits = 0
    out = bytearray()
    for s in septets:
        bits |= s << nbits
        nbits += 7
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
    if nbits:
        out.append(bits & 0xFF)
    return out.hex().upper()


def deliver_pdu(msg: Sms) -> str:
    """The SMS-DELIVER PDU (with an empty SMSC field) for a stored message."""
    sender = msg.sender.lstrip("+")
    toa = "91" if msg.sender.startswith("+") else "81"
    oa = f"{len(sender):02X}{toa}{_semi_octets(sender)}"
    ts = msg.timestamp
    digits = ts[0:2] + ts[3:5] + ts[6:8] + ts[9:11] + ts[12:14] + ts[15:17]
    quarters = int(ts[17:])
    tz = _semi_octets(f"{abs(quarters):02d}")
    if quarters < 0:
        tz = f"{int(tz, 16) | 0x08:02X}"
    scts = _semi_octets(digits) + tz
    gsm7 = all(32 <= ord(ch) < 127 and ch not in _GSM_NEEDS_UCS2 for ch in msg.text)
    if gsm7:
        dcs, udl, ud = "00", len(msg.text), _pack7(msg.text)
    else:
        raw = msg.text.encode("utf-16-be")[:140]
        dcs, udl, ud = "08", len(raw), raw.hex().upper()
    return f"0004{oa}00{dcs}{scts}{udl:02X}{ud}"


HANDLERS: dict[str, Handler] = {
    "+CMGF": cmgf,
    "+CNMI": cnmi,
    "+CPMS": cpms,
    "+CMGL": cmgl,
    "+CMGR": cmgr,
    "+CMGD": cmgd,
}
