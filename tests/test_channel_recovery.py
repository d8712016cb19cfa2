"""Recovery of a hung modem, over a real pty: the ladder (ping, reopen, the vendor's reset
command, power cycle) runs beside the commands, not inside one; commands wait for it in order,
each at most its own timeout; one hang is reported once; the channel's own resets are told as
such; a full port is waited for, and a reopen neither blocks the loop nor fails silently."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import serial

from drivers import channel as channel_module
from drivers.at import Urc
from drivers.channel import AtChannel, Reset
from drivers.errors import CommandTimeout, ModemHung, NotConnected, PortError
from drivers.modem import Modem
from drivers.simulator import SimulatedModem
from drivers.vendors import TELIT
from tests.broker import until
from tests.ptypeer import PtyPeer

OK = b"\r\nOK\r\n"


def state(chan: AtChannel) -> str:
    """The channel's condition, without its age."""
    return chan.condition[0]


@pytest.fixture
async def peer() -> AsyncIterator[PtyPeer]:
    p = PtyPeer({"AT": OK, "ATE0": OK})
    yield p
    p.close()


def comes_back(peer: PtyPeer, banner: bytes = b"\r\nRDY\r\n") -> Callable[[str], bytes]:
    """A reset command's script: OK, then (after this reply went out) the modem boots: it
    answers ``AT`` again and prints its banner."""

    def reset(_cmd: str) -> bytes:
        def boot() -> None:
            peer.script["AT"] = OK
            if banner:
                peer.write(banner)

        asyncio.get_running_loop().call_soon(boot)
        return OK

    return reset


async def test_commands_wait_for_recovery_in_order_and_no_longer_than_their_timeout(
        peer: PtyPeer) -> None:
    peer.script.update({"AT": None, "AT+CSQ": None, "AT+CFUN=1,1": OK})  # hung; reset: OK
    for name in ("AT+C1", "AT+C2", "AT+C3"):
        peer.script[name] = f"\r\n+{name[3:]}: 1\r\n\r\nOK\r\n".encode()
    chan = await AtChannel.open(peer.path, resync_timeout=0.1)
    chan.boot_timeout = 60.0  # the reset modem stays silent until this test brings it back
    hangs: list[str] = []
    resets: list[Reset] = []
    conditions: list[str] = []
    chan.add_hang_listener(hangs.append)
    chan.add_reset_listener(resets.append)
    chan.add_condition_listener(conditions.append)

    first = asyncio.ensure_future(chan.command("AT+CSQ", timeout=0.2))
    queued = asyncio.ensure_future(chan.command("AT+B", timeout=0.5))
    with pytest.raises(CommandTimeout):
        await first  # told at once: recovery goes on without this caller
    with pytest.raises(ModemHung):
        await queued  # waited its own timeout for the recovery, then gave up, unsent
    await until(lambda: "AT+CFUN=1,1" in peer.received, "the ladder to reach the reset")
    assert peer.received[:3] == ["AT+CSQ", "AT", "AT"]  # ping; then the port was reopened
    assert state(chan) == "resetting"

    # Commands queued while the modem reboots go out after it, in the order they came.
    later = [asyncio.ensure_future(chan.command(c, timeout=60)) for c in
             ("AT+C1", "AT+C2", "AT+C3")]
    peer.write(b"\r\nRDY\r\n")
    peer.script["AT"] = OK
    assert await asyncio.gather(*later) == [["+C1: 1"], ["+C2: 1"], ["+C3: 1"]]
    sent = peer.received
    assert sent[-3:] == ["AT+C1", "AT+C2", "AT+C3"]
    assert sent[-4] == "AT"  # the ping that found the modem back came first
    assert "AT+B" not in sent  # the whole recovery ran, and the given-up command never went
    assert hangs == ["AT+CSQ: no answer within 0.2 s"]
    assert resets == ["AT+CFUN=1,1 (recovery of a hang)"]
    assert resets[0].cause == "recovery"
    assert conditions == ["hung", "resetting", "ready"]
    assert state(chan) == "ready"
    assert chan.failures == 0
    assert chan.escalation == 0
    await chan.close()


async def test_one_hang_is_reported_once_however_many_commands_time_out(
        peer: PtyPeer) -> None:
    peer.script.update({"AT": None, "AT+CSQ": None, "AT+CFUN=1,1": None})
    chan = await AtChannel.open(peer.path, resync_timeout=0.05)
    chan.boot_timeout = 0.2  # the reset rung gives up quickly: the ladder ends, still hung
    hangs: list[str] = []
    chan.add_hang_listener(hangs.append)
    for _ in range(2):
        with pytest.raises(CommandTimeout) as timeout:
            await chan.command("AT+CSQ", timeout=0.1)
        assert not isinstance(timeout.value, ModemHung)  # sent, and timed out
        await until(lambda: not chan.recovering, "the recovery ladder to end")
    assert peer.received.count("AT+CSQ") == 2
    assert "AT+CFUN=1,1" in peer.received  # the whole ladder ran, twice
    assert chan.failures == 2
    assert state(chan) == "hung"
    assert hangs == ["AT+CSQ: no answer within 0.1 s"]

    # The modem answers: the hang is over; the next timeout is a new one.
    peer.script["AT+CSQ"] = b"\r\n+CSQ: 9,99\r\n\r\nOK\r\n"
    assert await chan.command("AT+CSQ") == ["+CSQ: 9,99"]
    assert state(chan) == "ready"
    peer.script["AT+CSQ"] = None
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ", timeout=0.1)
    assert hangs == ["AT+CSQ: no answer within 0.1 s"] * 2
    await chan.close()


async def test_recovery_reset_is_not_a_spontaneous_one(peer: PtyPeer) -> None:
    peer.script.update({"AT": None, "AT+CSQ": None})
    peer.script["AT+CFUN=1,1"] = comes_back(peer)
    chan = await AtChannel.open(peer.path, resync_timeout=0.1)
    resets: list[Reset] = []
    urcs: list[Urc] = []
    chan.add_reset_listener(resets.append)
    chan.add_urc_listener(urcs.append)
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ", timeout=0.2)
    await until(lambda: resets, "the modem to come back")
    assert resets == ["AT+CFUN=1,1 (recovery of a hang)"]
    assert resets[0].cause == "recovery"
    assert not resets[0].spontaneous
    assert [u.text for u in urcs] == ["RDY"]  # the banner came, and was not a second reset
    assert state(chan) == "ready"
    await chan.close()


async def test_reset_rung_sends_the_vendor_reset_command(peer: PtyPeer) -> None:
    peer.script.update({
        "AT+CMEE=1": OK,
        "AT+CGMI": b"\r\nTelit\r\n\r\nOK\r\n",
        "AT+CGMM": b"\r\nLE910C1-EU\r\n\r\nOK\r\n",
    })
    chan = await AtChannel.open(peer.path, resync_timeout=0.1)
    modem = Modem(chan, retry_for=0.5, retry_wait=0.1)
    assert await modem.init() is TELIT
    peer.script.update({"AT": None, "AT+CSQ": None, "AT+CFUN=1,1": None})
    peer.script["AT#REBOOT"] = comes_back(peer, banner=b"")  # Telit prints no banner
    resets: list[str] = []
    chan.add_reset_listener(resets.append)
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ", timeout=0.2)
    await until(lambda: resets, "the modem to come back")
    assert resets == ["AT#REBOOT (recovery of a hang)"]
    assert "AT#REBOOT" in peer.received
    assert "AT+CFUN=1,1" not in peer.received  # the reset ran, and it was Telit's
    await chan.close()


async def test_power_cycle_is_the_last_rung(peer: PtyPeer) -> None:
    peer.script.update({"AT": None, "AT+CSQ": None, "AT+CFUN=1,1": None})  # ignores a reset
    rungs: list[int] = []

    async def power_cycle() -> None:
        rungs.append(chan.escalation)
        assert state(chan) == "resetting"
        comes_back(peer)("")

    chan = await AtChannel.open(peer.path, resync_timeout=0.05, power_cycle=power_cycle)
    chan.boot_timeout = 0.3
    resets: list[Reset] = []
    chan.add_reset_listener(resets.append)
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ", timeout=0.1)
    await until(lambda: resets, "the modem to come back")
    assert rungs == [3]  # reopen, reset, power cycle
    assert "AT+CFUN=1,1" in peer.received
    assert resets == ["power cycle (recovery of a hang)"]
    assert resets[0].cause == "recovery"
    await chan.close()


async def test_requested_reset_is_told_as_requested_and_commands_wait_for_it() -> None:
    async with SimulatedModem("quectel", boot_seconds=0.2, sim_busy_seconds=0) as sim:
        chan = await AtChannel.open(sim.path, timeout=2.0, resync_timeout=0.1)
        modem = Modem(chan, retry_for=1.0, retry_wait=0.1)
        await modem.init()
        resets: list[Reset] = []
        hangs: list[str] = []
        chan.add_reset_listener(resets.append)
        chan.add_hang_listener(hangs.append)
        await chan.command("AT+CFUN=1,1")
        assert state(chan) == "resetting"
        # Sent while the modem reboots, this would be lost to it (or cut by its banner).
        imei = await chan.command("AT+CGSN", timeout=60)
        assert imei == [sim.personality.imei]
        assert resets == ["AT+CFUN=1,1 (requested)"]
        assert resets[0].cause == "requested"
        assert sim.commands.count("AT+CFUN=1,1") == 1
        assert sim.commands[-1] == "AT+CGSN"  # after the reboot: it went out once, answered
        assert hangs == []
        assert state(chan) == "ready"
        await chan.close()


async def test_write_waits_for_a_full_port(peer: PtyPeer, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    caplog.set_level(channel_module.TRACE, logger="drivers.channel")
    chan = await AtChannel.open(peer.path)
    loop = asyncio.get_running_loop()
    loop.remove_reader(peer.master)  # the modem stops reading: this test reads for it
    filler = os.open(peer.path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)

    def fill() -> int:  # CRs: empty lines to the modem
        written = 0
        for chunk in (4096, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    written += os.write(filler, b"\r" * chunk)
        return written

    def unread() -> int:
        return struct.unpack("i", fcntl.ioctl(peer.master, termios.FIONREAD, b"\0" * 4))[0]

    try:  # full: the kernel moved what it could to the modem's side (4095 bytes), no room left
        await until(lambda: fill() == 0 and unread() >= 4095, "the port's buffer to be full")
    finally:
        os.close(filler)
    task = asyncio.ensure_future(chan.command("AT+CSQ", timeout=60))
    await until(lambda: "b'AT+CSQ\\r'" in caplog.text, "the channel to write the command")
    assert not task.done()  # waiting for the port, not failed
    assert chan.is_open
    received = await read_until(peer.master, b"AT+CSQ\r")
    assert received.strip(b"\r") == b"AT+CSQ"  # every byte of it, after the filler
    peer.write(b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n")
    assert await task == ["+CSQ: 20,99"]
    await chan.close()


async def read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        async with asyncio.timeout(timeout):
            while marker not in data:
                await readable.wait()
                readable.clear()
                with contextlib.suppress(BlockingIOError):
                    data += os.read(fd, 65536)
    finally:
        loop.remove_reader(fd)
    return bytes(data)


async def test_reopen_lets_the_loop_run(peer: PtyPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    chan = await AtChannel.open(peer.path, resync_timeout=0.1)
    loop = asyncio.get_running_loop()
    real_open = channel_module.open_serial
    alive = threading.Event()
    loop_ran: list[bool] = []

    def slow_open(url: str, baudrate: int = 115200, **kw: Any) -> serial.SerialBase:
        loop.call_soon_threadsafe(alive.set)  # runs only if the loop is free meanwhile
        loop_ran.append(alive.wait(10))
        return real_open(url, baudrate, **kw)

    monkeypatch.setattr(channel_module, "open_serial", slow_open)
    peer.script.update({"AT": None, "AT+CSQ": None})
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ", timeout=0.2)
    await until(lambda: loop_ran, "the reopen")
    assert loop_ran == [True]
    await chan.close()


async def test_failed_reopen_tells_close_listeners(peer: PtyPeer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    chan = await AtChannel.open(peer.path, resync_timeout=0.1)
    real_open = channel_module.open_serial
    holders: list[serial.SerialBase] = []

    def contended_open(url: str, baudrate: int = 115200, **kw: Any) -> serial.SerialBase:
        holders.append(real_open(url))  # another program takes the port as we let it go
        return real_open(url, baudrate, **kw)

    monkeypatch.setattr(channel_module, "open_serial", contended_open)
    closed: list[BaseException | None] = []
    chan.add_close_listener(closed.append)
    peer.script.update({"AT": None, "AT+CSQ": None})
    try:
        with pytest.raises(CommandTimeout):
            await chan.command("AT+CSQ", timeout=0.2)
        await until(lambda: closed, "the close listeners to hear of it")
        assert len(closed) == 1
        assert isinstance(closed[0], PortError)
        assert "busy" in str(closed[0])
        assert not chan.is_open
        assert state(chan) == "closed"
        with pytest.raises(NotConnected):
            await chan.command("AT")
    finally:
        for holder in holders:
            holder.close()
    await chan.close()
