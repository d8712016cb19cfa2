"""Vendor dialect handlers (Quectel, SIMCom, u-blox), referenced by the personality tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

from drivers.simulator.std import _value
from drivers.simulator.syntax import AtFailure, Command, Form, int_arg

if TYPE_CHECKING:
    from drivers.simulator.engine import Engine


def _iccid(engine: Engine, cmd: Command) -> str:
    if cmd.form not in (Form.EXEC, Form.READ):
        raise AtFailure(cmd.text())
    engine.require_sim(unlocked=False)
    return engine.state.sim.iccid


def qccid(engine: Engine, cmd: Command) -> list[str]:
    iccid = _iccid(engine, cmd)
    return [f"+QCCID: {iccid}{'F' if len(iccid) % 2 else ''}"]


def ciccid(engine: Engine, cmd: Command) -> list[str]:
    return [f"+ICCID: {_iccid(engine, cmd)}"]


def ccid(engine: Engine, cmd: Command) -> list[str]:
    return [f"+CCID: {_iccid(engine, cmd)}"]


def qdsim(engine: Engine, cmd: Command) -> list[str]:
    """``AT+QDSIM`` (Quectel, "Select (U)SIM card"): ``+QDSIM: <n>``, 0 the first slot, 1 the
    second; setting it switches cards (``Engine.select_slot``)."""
    lines, n = _value("+QDSIM", engine.state.active_slot - 1, cmd, range(len(engine.state.slots)))
    if cmd.form is Form.SET:
        engine.select_slot(n + 1)
    return lines


def qeng(engine: Engine, cmd: Command) -> list[str]:
    """``AT+QENG="servingcell"`` (Quectel EC25 manual, LTE serving cell)."""
    if cmd.form is Form.TEST:
        return ['+QENG: "servingcell","neighbourcell"']
    if cmd.form is not Form.SET or cmd.args[:1] != ["servingcell"]:
        raise AtFailure(cmd.text())
    st = engine.state
    stat = st.reg_stat()
    if st.radio != 1 or st.network.state in ("searching", "not-registered"):
        return ['+QENG: "servingcell","SEARCH"']
    if stat in (1, 5):
        mode = "CONNECT" if st.traffic.up_bps or st.traffic.down_bps else "NOCONN"
    else:
        mode = "LIMSRV"
    net, sig = st.network, st.signal
    fields = [
        '"servingcell"',
        f'"{mode}"',
        '"LTE"',
        '"FDD"',
        net.mcc,
        net.mnc,
        f"{net.cell_id:X}",
        str(net.pci),
        str(net.earfcn),
        str(net.band),
        str(net.bandwidth),
        str(net.bandwidth),
        f"{net.tac:X}",
        str(sig.rsrp_dbm),
        str(sig.rsrq_db),
        str(sig.rssi_dbm),
        str((sig.sinr_db + 20) * 5),  # EC25 manual: 0..250 in 1/5 dB from -20 dB
        str(max(0, sig.rsrp_dbm + 140 - 10)),
    ]
    return ["+QENG: " + ",".join(fields)]


def cpsi(engine: Engine, cmd: Command) -> list[str]:
    """``AT+CPSI?`` (SIM7600 manual); RSRQ, RSRP, RSSI in tenths of dB as the module prints."""
    if cmd.form is not Form.READ:
        raise AtFailure(cmd.text())
    st = engine.state
    if st.radio != 1:
        return ["+CPSI: NO SERVICE,Low Power Mode"]
    if st.network.state in ("searching", "not-registered"):
        return ["+CPSI: NO SERVICE,Online"]
    net, sig = st.network, st.signal
    fields = [
        "LTE",
        "Online",
        f"{net.mcc}-{net.mnc}",
        f"0x{net.tac:04X}",
        str(net.cell_id),
        str(net.pci),
        f"EUTRAN-BAND{net.band}",
        str(net.earfcn),
        str(net.bandwidth),
        str(net.bandwidth),
        str(sig.rsrq_db * 10),
        str(sig.rsrp_dbm * 10),
        str(sig.rssi_dbm * 10),
        str(round((sig.sinr_db + 20) / 2)),  # SIM7600 manual: SINR = 2 * RSSNR - 20
    ]
    return ["+CPSI: " + ",".join(fields)]


def qtemp(engine: Engine, cmd: Command) -> list[str]:
    """``AT+QTEMP`` as EC2x firmware answers: ``+QTEMP: <pmic_temp>,<xo_temp>,<pa_temp>`` (°C).
    The PA is the hottest sensor here and reads ``temperature_c``; PMIC and crystal a little
    cooler."""
    if cmd.form is not Form.EXEC:
        raise AtFailure(cmd.text())
    t = engine.state.temperature_c
    return [f"+QTEMP: {t - 2},{t - 3},{t}"]


def cpmutemp(engine: Engine, cmd: Command) -> list[str]:
    """``AT+CPMUTEMP`` (SIM7600 manual): ``+CPMUTEMP: <temp>`` (°C)."""
    if cmd.form is not Form.EXEC:
        raise AtFailure(cmd.text())
    return [f"+CPMUTEMP: {engine.state.temperature_c}"]


def qgdcnt(engine: Engine, cmd: Command) -> list[str]:
    """``AT+QGDCNT?`` -> bytes since the last ``AT+QGDCNT=0``; ``=1`` saves (a no-op here)."""
    t = engine.traffic()
    if cmd.form is Form.READ:
        sent, recv = int(t.sent_total - t.sent_mark), int(t.recv_total - t.recv_mark)
        return [f"+QGDCNT: {sent},{recv}"]
    if cmd.form is Form.SET:
        op = int_arg(cmd.args, 0)
        if op == 0:
            t.sent_mark, t.recv_mark = t.sent_total, t.recv_total
            return []
        if op == 1:
            return []
    if cmd.form is Form.TEST:
        return ["+QGDCNT: (0,1)"]
    raise AtFailure(cmd.text())


def ugcntrd(engine: Engine, cmd: Command) -> list[str]:
    """``AT+UGCNTRD`` -> one line per active context: session and total bytes."""
    if cmd.form is not Form.EXEC:
        raise AtFailure(cmd.text())
    t = engine.traffic()
    lines = []
    for cid, ctx in sorted(engine.state.pdp.items()):
        if ctx.active:
            lines.append(
                f"+UGCNTRD: {cid},{int(t.sent_session)},{int(t.recv_session)},"
                f"{int(t.sent_total - t.sent_mark)},{int(t.recv_total - t.recv_mark)}"
            )
    return lines


def ugcntset(engine: Engine, cmd: Command) -> list[str]:
    """``AT+UGCNTSET=<cid>,0,0`` resets the totals."""
    if cmd.form is not Form.SET:
        raise AtFailure(cmd.text())
    int_arg(cmd.args, 0)
    t = engine.traffic()
    t.sent_mark, t.recv_mark = t.sent_total, t.recv_total
    return []
