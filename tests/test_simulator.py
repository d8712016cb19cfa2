"""The modem simulator over a real pty: every personality, the SIM and network state machines,
and every fault, read back as bytes by a host on the slave side.

No test waits for time: each waits for what it means (a reply, a banner, the simulator's own
``booting``/``silent``/``flooding``/``ignored``), with timeouts only against a hang. SIM busy
time and traffic rates run on a :class:`Clock` the test moves. "Nothing arrived" is read up to
the reply to a later ``AT``: the pty keeps order, so whatever the modem had sent comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import re
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.parsers._common import luhn_valid
from drivers.simulator import PERSONALITIES, ScenarioError, SimulatedModem, load_scenario
from drivers.simulator.engine import Engine
from drivers.simulator.state import ModemState
from drivers.simulator.syntax import Form, split_line

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "scenarios"
EXAMPLES = ROOT / "drivers" / "simulator" / "scenarios"
P = ParamSpec("P")


def async_test(fn: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


FINAL = re.compile(rb"\r\n(OK|ERROR|\+CM[ES] ERROR: [^\r\n]*)\r\n")


class PortGone(AssertionError):
    pass


class Host:
    """The host side of the pty: non-blocking fd on the running loop, no threads."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        termios.tcflush(self.fd, termios.TCIFLUSH)  # as pyserial does on open
        self.buf = bytearray()
        self.error: OSError | None = None
        self.eof = False
        self._event = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.error = exc
            asyncio.get_running_loop().remove_reader(self.fd)
        else:
            if data:
                self.buf += data
            else:
                self.eof = True
                asyncio.get_running_loop().remove_reader(self.fd)
        self._event.set()

    async def wait_for(self, pred: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not pred(bytes(self.buf)):
            if self.error or self.eof:
                raise PortGone(bytes(self.buf))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; got {bytes(self.buf)!r}")
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def until(self, marker: bytes, timeout: float = 3.0) -> bytes:
        return await self.wait_for(lambda b: marker in b, timeout)

    def send(self, cmd: str) -> None:
        os.write(self.fd, cmd.encode() + b"\r")

    async def command(self, cmd: str, timeout: float = 3.0) -> bytes:
        """Send ``cmd``; everything received up to its final result (and any URC with it)."""
        self.buf.clear()
        self.send(cmd)
        return await self.wait_for(lambda b: FINAL.search(b) is not None, timeout)

    async def before_reply(self, timeout: float = 3.0) -> bytes:
        """Send ``AT``: everything that came before its reply (echo or not). The modem answers
        in order, so this is all it sent before it read the ``AT``."""
        self.send("AT")
        out = await self.wait_for(lambda b: b.endswith(b"OK\r\n"), timeout)
        for reply in (b"AT\r\r\nOK\r\n", b"\r\nOK\r\n"):
            if out.endswith(reply):
                return out[: -len(reply)]
        raise AssertionError(f"no reply to AT in {out!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Clock:
    """The simulator engine's clock, moved by the test (SIM busy time, traffic rates)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait for ``condition()`` to hold; ``timeout`` only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def modem(personality: str | None = None, scenario: Any = None, **kw: Any) -> Any:
    kw.setdefault("boot_seconds", 0.2)
    kw.setdefault("sim_busy_seconds", 0.3)
    async with SimulatedModem(personality, scenario, **kw) as sim:
        host = Host(sim.path)
        try:
            yield sim, host
        finally:
            host.close()


def body(reply: bytes, cmd: str) -> bytes:
    """The reply without its echo."""
    echo = cmd.encode() + b"\r"
    assert reply.startswith(echo), reply
    return reply[len(echo) :]


# -- personalities -----------------------------------------------------------------------------
IDENTITY = {
    "quectel": {
        "ATI": b"\r\nQuectel\r\nEC25\r\nRevision: EC25JFAR06A07M4G\r\n\r\nOK\r\n",
        "AT+CGMI": b"\r\nQuectel\r\n\r\nOK\r\n",
        "AT+CGMM": b"\r\nEC25\r\n\r\nOK\r\n",
        "AT+CGMR": b"\r\nEC25JFAR06A07M4G\r\n\r\nOK\r\n",
        "AT+QCCID": b"\r\n+QCCID: 8981100005819480014F\r\n\r\nOK\r\n",
        "AT+CICCID": b"\r\nERROR\r\n",
    },
    "simcom": {
        "AT+CGMI": b"\r\nSIMCOM INCORPORATED\r\n\r\nOK\r\n",
        "AT+CGMM": b"\r\nSIMCOM_SIM7600G-H\r\n\r\nOK\r\n",
        "AT+CGMR": b"\r\n+CGMR: LE20B04SIM7600G22\r\n\r\nOK\r\n",
        "AT+CICCID": b"\r\n+ICCID: 8981100005819480014\r\n\r\nOK\r\n",
        "AT+QGDCNT?": b"\r\nERROR\r\n",
        "AT+UGCNTRD": b"\r\nERROR\r\n",
    },
    "ublox": {
        "AT+CGMI": b"\r\nu-blox\r\n\r\nOK\r\n",
        "AT+CGMM": b"\r\nSARA-R410M-02B\r\n\r\nOK\r\n",
        "AT+CGMR": b"\r\nL0.0.00.00.05.08 [Apr 17 2019 19:34:02]\r\n\r\nOK\r\n",
        "AT+CCID": b"\r\n+CCID: 8981100005819480014\r\n\r\nOK\r\n",
        "AT+QCCID": b"\r\nERROR\r\n",
    },
}


@pytest.mark.parametrize("personality", sorted(IDENTITY))
@async_test
async def test_identity_and_dialect(personality: str) -> None:
    async with modem(personality) as (_sim, host):
        for cmd, expected in IDENTITY[personality].items():
            assert body(await host.command(cmd), cmd) == expected, cmd
        imei = PERSONALITIES[personality].imei
        for cmd in ("AT+CGSN", "AT+GSN"):
            assert body(await host.command(cmd), cmd) == f"\r\n{imei}\r\n\r\nOK\r\n".encode()
        assert len(imei) == 15
        assert luhn_valid(imei)
        crsm = await host.command("AT+CRSM=176,12258,0,0,10")
        assert b'\r\n+CRSM: 144,0,"981801005018490810F4"\r\n\r\nOK\r\n' in crsm
        assert b"\r\n295050912345678\r\n\r\nOK\r\n" in await host.command("AT+CIMI")


@async_test
async def test_quectel_servingcell_and_simcom_cpsi() -> None:
    async with modem("quectel") as (_sim, host):
        reply = await host.command('AT+QENG="servingcell"')
        assert (
            b'\r\n+QENG: "servingcell","NOCONN","LTE","FDD",440,10,1A2D0F3,123,100,1,5,5,1A2B,'
            b"-95,-10,-67,160,35\r\n\r\nOK\r\n"
        ) in reply
    async with modem("simcom") as (_sim, host):
        reply = await host.command("AT+CPSI?")
        assert (
            b"\r\n+CPSI: LTE,Online,440-10,0x1A2B,27447539,123,EUTRAN-BAND1,100,5,5,"
            b"-100,-950,-670,16\r\n\r\nOK\r\n"
        ) in reply


@async_test
async def test_echo_on_at_power_up_and_off_after_ate0() -> None:
    async with modem() as (_sim, host):
        assert await host.command("AT") == b"AT\r\r\nOK\r\n"
        assert await host.command("ATE0") == b"ATE0\r\r\nOK\r\n"
        assert await host.command("AT") == b"\r\nOK\r\n"
        assert await host.command("AT+CMEE=2;+CSQ") == b"\r\n+CSQ: 23,99\r\n\r\nOK\r\n"
        assert await host.command("AT+NOPE") == b"\r\nERROR\r\n"
        host.send("ATV0")  # numeric results from this reply on
        assert await host.until(b"\r") == b"0\r"
        host.send("AT+CSQ;+FOO")
        assert await host.until(b"4\r") == b"+CSQ: 23,99\r\n4\r"  # partial info, then ERROR


# -- SIM -------------------------------------------------------------------------------------
@async_test
async def test_pin_flow_busy_and_error_modes() -> None:
    scenario = {"sim": {"state": "pin-required"}}
    clock = Clock()
    async with modem("quectel", scenario, clock=clock) as (sim, host):
        await host.command("ATE0")
        assert await host.command("AT+CPIN?") == b"\r\n+CPIN: SIM PIN\r\n\r\nOK\r\n"
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: 11\r\n"
        # the ICCID is readable before the PIN
        assert b"+QCCID: 8981100005819480014F" in await host.command("AT+QCCID")
        assert await host.command("AT+CMEE=2") == b"\r\nOK\r\n"
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: SIM PIN required\r\n"
        assert await host.command('AT+CPIN="0000"') == b"\r\n+CME ERROR: incorrect password\r\n"
        await host.command("AT+CMEE=1")
        reply = await host.command('AT+CPIN="1234"')
        assert reply.startswith(b"\r\nOK\r\n")
        if b"+CPIN: READY" not in reply:
            await host.until(b"+CPIN: READY\r\n")
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: 14\r\n"  # SIM busy
        clock.advance(0.29)
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: 14\r\n"
        clock.advance(0.01)
        assert await host.command("AT+CIMI") == b"\r\n295050912345678\r\n\r\nOK\r\n"
        await host.command("AT+CMEE=0")
        assert await host.command('AT+CPIN="1234"') == b"\r\nERROR\r\n"
        sim.set_sim(state="absent")
        await host.command("AT+CMEE=1")
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: 10\r\n"
        assert await host.command("AT+CPIN?") == b"\r\n+CME ERROR: 10\r\n"


@async_test
async def test_three_wrong_pins_lock_with_puk() -> None:
    async with modem("ublox", {"sim": {"state": "pin-required"}}) as (_sim, host):
        await host.command("ATE0;+CMEE=1")
        for _ in range(3):
            assert b"+CME ERROR: 16" in await host.command('AT+CPIN="9999"')
        assert b"+CPIN: SIM PUK" in await host.command("AT+CPIN?")
        assert b"+CME ERROR: 12" in await host.command("AT+CIMI")
        assert b"OK" in await host.command('AT+CPIN="12345678","4321"')
        assert b"+CPIN: READY" in await host.command("AT+CPIN?")


@async_test
async def test_sim_swap_changes_iccid_and_imsi() -> None:
    clock = Clock()
    async with modem("simcom", clock=clock) as (sim, host):
        await host.command("ATE0")
        sim.set_sim(iccid="8981100005819480022", imsi="295050900000001")
        await host.until(b"+CPIN: READY\r\n")
        assert await host.command("AT+CICCID") == b"\r\nERROR\r\n"  # SIM busy, CMEE=0
        clock.advance(0.3)
        assert b"+ICCID: 8981100005819480022" in await host.command("AT+CICCID")
        assert b"295050900000001" in await host.command("AT+CIMI")


# -- network -----------------------------------------------------------------------------------
@async_test
async def test_registration_urcs_follow_the_modes_set() -> None:
    async with modem() as (sim, host):
        await host.command("ATE0")
        assert await host.command("AT+CEREG?") == b"\r\n+CEREG: 0,5\r\n\r\nOK\r\n"
        await host.command("AT+CREG=1;+CGREG=2;+CEREG=3")
        assert await host.command("AT+CEREG?") == (
            b'\r\n+CEREG: 3,5,"1A2B","01A2D0F3",7\r\n\r\nOK\r\n'
        )
        sim.set_network("denied", reject_cause=7)
        urcs = await host.until(b",0,7\r\n")
        assert b"\r\n+CREG: 3\r\n" in urcs
        assert b'\r\n+CGREG: 3,"1A2B","01A2D0F3",7\r\n' in urcs
        assert urcs.endswith(b'\r\n+CEREG: 3,"1A2B","01A2D0F3",7,0,7\r\n')
        assert b'+CEER: "EMM cause 7: EPS services not allowed"' in await host.command("AT+CEER")
        assert await host.command("AT+COPS?") == b"\r\n+COPS: 0\r\n\r\nOK\r\n"
        assert b"+CME ERROR: 30" in await host.command("AT+CGACT=1,1")
        sim.set_network("home")
        urcs = await host.until(b"+CEREG: 1")
        assert b"\r\n+CREG: 1\r\n" in urcs
        assert await host.command("AT+COPS=3,2;+COPS?") == (
            b'\r\n+COPS: 0,2,"44010",7\r\n\r\nOK\r\n'
        )
        # no URC when nothing changed
        sim.set_network("home")
        assert await host.before_reply() == b""


@async_test
async def test_cfun_radio_off_and_reboot() -> None:
    async with modem("simcom", clock=Clock()) as (sim, host):
        await host.command("ATE0;+CEREG=1")
        reply = await host.command("AT+CFUN=4")
        assert reply.startswith(b"\r\nOK\r\n")
        if b"+CEREG: 0" not in reply:
            await host.until(b"+CEREG: 0\r\n")
        assert await host.command("AT+CFUN?") == b"\r\n+CFUN: 4\r\n\r\nOK\r\n"
        assert b"+CSQ: 99,99" in await host.command("AT+CSQ")
        reply = await host.command("AT+CFUN=1")
        if b"+CEREG: 5" not in reply:
            await host.until(b"+CEREG: 5\r\n")
        assert await host.command("AT+CFUN=1,1") == b"\r\nOK\r\n"
        assert sim.booting
        host.send("AT")  # rebooting: silent, it is not read
        await until(lambda: sim.ignored >= 3, "the modem to drop the AT")
        # Nothing but the banner came since the OK: no answer to that AT, before or after it.
        banner = await host.until(b"PB DONE\r\n")
        assert banner == b"\r\nRDY\r\n\r\n+CPIN: READY\r\n\r\nSMS DONE\r\n\r\nPB DONE\r\n"
        assert await host.command("AT") == b"AT\r\r\nOK\r\n"  # echo back on
        assert b"+CME ERROR: 14" in await host.command("AT+CMEE=1;+CIMI")  # SIM busy a moment
        assert await host.command("AT+CEREG?") == b"AT+CEREG?\r\r\n+CEREG: 0,5\r\n\r\nOK\r\n"


@async_test
async def test_pdp_clock_and_signal() -> None:
    async with modem("ublox") as (sim, host):
        await host.command("ATE0")
        assert await host.command('AT+CGDCONT=2,"IP","soracom.io"') == b"\r\nOK\r\n"
        assert await host.command("AT+CGDCONT?") == (
            b'\r\n+CGDCONT: 1,"IP","soracom.io","0.0.0.0",0,0\r\n'
            b'+CGDCONT: 2,"IP","soracom.io","0.0.0.0",0,0\r\n\r\nOK\r\n'
        )
        assert await host.command("AT+CGACT?") == b"\r\n+CGACT: 1,1\r\n+CGACT: 2,0\r\n\r\nOK\r\n"
        await host.command("AT+CGACT=1,2")
        assert await host.command("AT+CGPADDR=2") == b'\r\n+CGPADDR: 2,"10.160.23.46"\r\n\r\nOK\r\n'
        clock = await host.command("AT+CCLK?")
        assert re.fullmatch(
            rb'\r\n\+CCLK: "\d\d/\d\d/\d\d,\d\d:\d\d:\d\d\+36"\r\n\r\nOK\r\n', clock
        )
        await host.command('AT+CCLK="20/01/02,03:04:05+36"')
        assert b'+CCLK: "20/01/02,03:04:0' in await host.command("AT+CCLK?")
        assert await host.command("AT+CTZU=1;+CTZU?") == b"\r\n+CTZU: 1\r\n\r\nOK\r\n"
        sim.set_signal(rssi_dbm=-93, rsrp_dbm=-110, rsrq_db=-14)
        assert await host.command("AT+CSQ") == b"\r\n+CSQ: 10,99\r\n\r\nOK\r\n"
        assert await host.command("AT+CESQ") == b"\r\n+CESQ: 99,99,255,255,12,31\r\n\r\nOK\r\n"


# -- counters and SMS ------------------------------------------------------------------------
@async_test
async def test_counters_grow_with_traffic() -> None:
    clock = Clock()
    async with modem("quectel", clock=clock) as (sim, host):
        await host.command("ATE0")
        assert sim.add_traffic(1000, 5000)
        assert await host.command("AT+QGDCNT?") == b"\r\n+QGDCNT: 1000,5000\r\n\r\nOK\r\n"
        await host.command("AT+QGDCNT=0")
        assert await host.command("AT+QGDCNT?") == b"\r\n+QGDCNT: 0,0\r\n\r\nOK\r\n"
        sim.set_traffic_rate(up_bps=1000, down_bps=10000)
        clock.advance(0.25)
        assert await host.command("AT+QGDCNT?") == b"\r\n+QGDCNT: 250,2500\r\n\r\nOK\r\n"
        sim.set_traffic_rate()
        sim.set_radio(0)  # no context, no traffic
        assert not sim.add_traffic(1, 1)
    async with modem("ublox") as (sim, host):
        await host.command("ATE0")
        sim.add_traffic(10, 20)
        assert await host.command("AT+UGCNTRD") == b"\r\n+UGCNTRD: 1,10,20,10,20\r\n\r\nOK\r\n"


@async_test
async def test_sms_cmti_and_storage() -> None:
    async with modem("quectel") as (sim, host):
        await host.command("ATE0")
        assert sim.receive_sms("hello world", sender="+818011112222") == 1
        assert await host.until(b'+CMTI: "ME",1\r\n') == b'\r\n+CMTI: "ME",1\r\n'
        assert await host.command('AT+CPMS="ME","ME","ME"') == (
            b"\r\n+CPMS: 1,255,1,255,1,255\r\n\r\nOK\r\n"
        )
        pdu = await host.command("AT+CMGL=4")
        assert re.fullmatch(rb"\r\n\+CMGL: 1,0,,\d+\r\n0004[0-9A-F]+\r\n\r\nOK\r\n", pdu)
        await host.command("AT+CMGF=1")
        listing = await host.command('AT+CMGL="ALL"')
        assert re.fullmatch(
            rb'\r\n\+CMGL: 1,"REC READ","\+818011112222",,"\d\d/\d\d/\d\d,[\d:]{8}\+36"\r\n'
            rb"hello world\r\n\r\nOK\r\n",
            listing,
        )
        assert b"hello world" in await host.command("AT+CMGR=1")
        assert await host.command("AT+CMGD=1") == b"\r\nOK\r\n"
        assert await host.command("AT+CMGR=1") == b"\r\n+CMS ERROR: 321\r\n"
        await host.command("AT+CNMI=0,0")
        assert sim.receive_sms("quiet") == 1
        assert await host.before_reply() == b""


# -- faults ----------------------------------------------------------------------------------
@async_test
async def test_silence_for_a_while_and_for_good() -> None:
    async with modem() as (sim, host):
        await host.command("AT+CEREG=1")
        sim.silence(0.4)
        host.send("AT")
        await until(lambda: sim.ignored == 3, "the modem to drop the AT")
        await until(lambda: not sim.silent, "the silence to end")
        # One answer, to the AT sent now: the dropped one got none, before or since.
        assert await host.before_reply() == b""
        sim.silence()
        host.send("AT")
        sim.set_network("denied", reject_cause=7)  # a +CEREG URC, were it not silent
        await until(lambda: sim.ignored == 6, "the modem to drop the AT")
        assert sim.silent
        sim.silence(0)  # only to read what came meanwhile: nothing
        assert await host.before_reply() == b""


@async_test
async def test_slow_replies() -> None:
    async with modem() as (sim, host):
        sim.set_reply_delay(0.3)
        t0 = time.monotonic()
        reply = await host.command("AT+CSQ")
        assert time.monotonic() - t0 >= 0.28
        assert reply == b"AT+CSQ\r\r\n+CSQ: 23,99\r\n\r\nOK\r\n"


@async_test
async def test_garbage_between_and_inside_frames() -> None:
    async with modem(seed=1) as (sim, host):
        noise = sim.inject_garbage(40)
        assert await host.wait_for(lambda b: len(b) >= 40) == noise
        assert b"\r" not in noise
        assert b"\n" not in noise
        sim.set_noise(1.0, inside=True)
        host.send("AT+CGMM")
        # The echo, then the reply with 1 to 8 random bytes somewhere inside it.
        echo, clean = b"AT+CGMM\r", b"\r\nEC25\r\n\r\nOK\r\n"

        def noisy_reply(b: bytes) -> bool:
            rest = b.removeprefix(echo)
            n = len(rest) - len(clean)
            return (b.startswith(echo) and 1 <= n <= 8 and
                    any(rest[:i] + rest[i + n:] == clean for i in range(len(clean) + 1)))

        await host.wait_for(noisy_reply)


@async_test
async def test_urc_flood() -> None:
    async with modem() as (sim, host):
        sim.flood(200, 0.5, '+QIND: "csq",20,99')
        assert sim.flooding
        await until(lambda: not sim.flooding, "the flood to end")
        urcs = await host.before_reply()
        assert urcs == b'\r\n+QIND: "csq",20,99\r\n' * 100


@async_test
async def test_spontaneous_reboot() -> None:
    async with modem("quectel", {"sim": {"state": "pin-required"}}) as (sim, host):
        reply = await host.command('ATE0;+CPIN="1234"')
        if b"+CPIN: READY" not in reply:
            await host.until(b"+CPIN: READY\r\n")
        sim.reboot()
        host.send("AT")
        await until(lambda: sim.ignored == 3, "the rebooting modem to drop the AT")
        # The banner and nothing else: the dropped AT is not answered, before it or after.
        assert await host.until(b"RDY\r\n") == b"\r\nRDY\r\n"
        assert await host.before_reply() == b""  # echo back on: "AT\r\r\nOK\r\n"
        assert b"+CPIN: SIM PIN" in await host.command("AT+CPIN?")
        async with modem("ublox") as (sim2, host2):
            sim2.reboot()
            await until(lambda: not sim2.booting, "the reboot to end")
            assert await host2.before_reply() == b""  # u-blox prints no banner


@async_test
async def test_vanish_gives_eio_then_reappears_on_new_path(tmp_path: Path) -> None:
    paths: list[str] = []
    link = tmp_path / "modem"
    async with modem(link=link, on_path=paths.append) as (sim, host):
        assert os.readlink(link) == sim.path
        old = sim.path
        sim.vanish(reappear_after=0.3)
        with pytest.raises(PortGone):
            await host.until(b"never", timeout=10.0)
        # Linux hangs the slave up: reads give EOF (some kernels: EIO), poll gives HUP
        assert host.eof or (host.error is not None and host.error.errno == errno.EIO)
        assert not link.exists()
        with pytest.raises(OSError):
            os.close(os.open(old, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        await until(lambda: len(paths) == 2, "the port to reappear")
        assert paths[1] == sim.path != old
        assert os.readlink(link) == sim.path
        host2 = Host(sim.path)
        try:
            assert await host2.command("AT") == b"AT\r\r\nOK\r\n"
        finally:
            host2.close()


# -- pyserial, scenarios, engine ---------------------------------------------------------------
@async_test
async def test_pyserial_host() -> None:
    async with SimulatedModem("simcom") as sim:
        port = serial.serial_for_url(sim.path, baudrate=115200, timeout=2)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, port.write, b"ATE0\r")
            assert await loop.run_in_executor(None, port.read_until, b"OK\r\n") == (
                b"ATE0\r\r\nOK\r\n"
            )
            await loop.run_in_executor(None, port.write, b"AT+CPIN?\r")
            assert await loop.run_in_executor(None, port.read_until, b"OK\r\n") == (
                b"\r\n+CPIN: READY\r\n\r\nOK\r\n"
            )
        finally:
            port.close()


@async_test
async def test_scenario_steps_run_on_time() -> None:
    async with modem(scenario=FIXTURES / "sim_denied_soon.json") as (sim, host):
        assert sim.personality.key == "ublox"
        await host.command("ATE0;+CEREG=3")
        urc = await host.until(b",8\r\n", timeout=10)
        assert urc == b'\r\n+CEREG: 3,"1A2B","01A2D0F3",7,0,8\r\n'
        assert await host.until(b'+CMTI: "ME",1\r\n', timeout=10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sim": {"state": "locked"}}, "sim.state: must be one of ready, pin-required"),
        ({"personality": "nokia"}, "personality: must be one of quectel, simcom, ublox"),
        ({"network": {"mcc": 440}}, "network.mcc: must be str"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"steps": [{"do": "reboot"}]}, "steps[0].at: required"),
        ({"steps": [{"at": 1, "do": "explode"}]}, "steps[0].do: must be one of network,"),
        ({"steps": [{"at": 1, "do": "network"}]}, "steps[0].state: required"),
        ({"steps": [{"at": 1, "do": "slow", "delay": -1}]}, "steps[0].delay: must be >= 0"),
        ({"sim": {"iccid": "89811"}}, "sim.iccid: must be 18-20 digits"),
        ({"sms": [{"sender": "+81"}]}, "sms[0].text: required"),
    ],
)
def test_scenario_validation(data: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_scenario_files(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"^steps\[0\]\.reject_cause: must be int"):
        load_scenario(FIXTURES / "sim_bad_step.toml")
    (tmp_path / "broken.json").write_text('{"sim": ')
    with pytest.raises(ScenarioError, match=r"^not valid JSON: "):
        load_scenario(tmp_path / "broken.json")
    (tmp_path / "broken.toml").write_text("sim = [")
    with pytest.raises(ScenarioError, match=r"^not valid TOML: "):
        load_scenario(tmp_path / "broken.toml")
    with pytest.raises(ScenarioError, match=r"^cannot read: "):
        load_scenario(tmp_path / "missing.toml")
    for example in sorted(EXAMPLES.iterdir()):
        assert load_scenario(example).personality in PERSONALITIES, example


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='AT+=?;,"CREGPINSMQ0123E&V ', max_size=30))
def test_engine_never_raises(line: str) -> None:
    engine = Engine(PERSONALITIES["quectel"], ModemState(), on_urc=lambda _u: None)
    engine.power_on()
    with contextlib.suppress(Exception):
        split_line("AT" + line)
    reply, _urcs = engine.execute("AT" + line)
    assert FINAL.search(reply) or re.search(rb"(^|\n)[04]\r$", reply), reply


def test_split_line() -> None:
    cmds = split_line('AT+CMEE=2;+CGDCONT=1,"IP","a;b";E0V1S0?')
    assert [(c.name, c.form, c.raw_args) for c in cmds] == [
        ("+CMEE", Form.SET, "2"),
        ("+CGDCONT", Form.SET, '1,"IP","a;b"'),
        ("E", Form.SET, "0"),
        ("V", Form.SET, "1"),
        ("S0", Form.READ, ""),
    ]
    assert cmds[1].args == ["1", "IP", "a;b"]


# -- the CLI -----------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "drivers.simulator.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def test_cli_prints_a_working_path_and_stops_on_sigterm(tmp_path: Path) -> None:
    link = tmp_path / "ttyMODEM"
    proc = _cli("--personality", "ublox", "--link", str(link))
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/pts/")
        assert os.readlink(link) == path
        port = serial.serial_for_url(str(link), timeout=3)
        port.write(b"AT+CGMM\r")
        assert port.read_until(b"OK\r\n") == b"AT+CGMM\r\r\nSARA-R410M-02B\r\n\r\nOK\r\n"
        port.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not link.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_scenario_is_one_line_and_exit_2() -> None:
    proc = _cli("--scenario", str(FIXTURES / "sim_bad_state.json"))
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "sim.state: must be one of" in err


def test_main_cli_maps_simulate_modem() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "simulate-modem", "--personality", "quectel"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("/dev/pts/")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_prints_the_new_path_after_a_replug(tmp_path: Path) -> None:
    scenario = tmp_path / "replug.json"
    scenario.write_text(json.dumps({"steps": [{"at": 0.2, "do": "vanish", "reappear_after": 0.2}]}))
    proc = _cli("--scenario", str(scenario))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        second = proc.stdout.readline().strip()
        assert first.startswith("/dev/pts/")
        assert second.startswith("/dev/pts/")
        assert second != first
        port = serial.serial_for_url(second, timeout=3)
        port.write(b"AT\r")
        assert port.read_until(b"OK\r\n") == b"AT\r\r\nOK\r\n"
        port.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
