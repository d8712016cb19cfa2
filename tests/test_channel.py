"""The AT channel over a real pty: one command in flight, URCs mid-reply, echo, timeouts,
recovery, reboot banners, the port vanishing, busy and missing ports. (The recovery ladder
itself: ``test_channel_recovery.py``.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.at import Urc
from drivers.channel import AtChannel, Reset, open_serial
from drivers.errors import (
    CommandError,
    CommandTimeout,
    ModemReset,
    PortError,
    SimBusy,
    SimPinRequired,
)
from tests.broker import until
from tests.ptypeer import PtyPeer

OK = b"\r\nOK\r\n"


@pytest.fixture
async def peer() -> AsyncIterator[PtyPeer]:
    p = PtyPeer({"AT": OK, "ATE0": OK})
    yield p
    p.close()


async def test_info_lines_and_typed_errors(peer: PtyPeer) -> None:
    peer.script["AT+CSQ"] = b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n"
    peer.script["AT+CIMI"] = b"\r\n+CME ERROR: 11\r\n"
    peer.script["AT+CPIN?"] = b"\r\n+CME ERROR: SIM busy\r\n"
    peer.script["AT+FOO"] = b"\r\nERROR\r\n"
    chan = await AtChannel.open(peer.path)
    assert await chan.command("AT+CSQ") == ["+CSQ: 20,99"]
    with pytest.raises(SimPinRequired):
        await chan.command("AT+CIMI")
    with pytest.raises(SimBusy) as busy:
        await chan.command("AT+CPIN?")
    assert busy.value.code == 14
    with pytest.raises(CommandError):
        await chan.command("AT+FOO")
    await chan.close()


async def test_urc_in_the_middle_of_a_reply_goes_to_listeners(peer: PtyPeer) -> None:
    peer.script["AT+CSQ"] = (b"\r\n+CREG: 1, 5C9, 39E5\r\n+CSQ: 17,3\r\n\r\n"
                             b"+CMTI: \"SM\",3\r\nOK\r\n")
    chan = await AtChannel.open(peer.path)
    urcs: list[Urc] = []
    chan.add_urc_listener(urcs.append)
    assert await chan.command("AT+CSQ") == ["+CSQ: 17,3"]
    assert [u.text for u in urcs] == ['+CREG: 1, 5C9, 39E5', '+CMTI: "SM",3']
    await chan.close()


async def test_echo_on_at_power_up_then_off(peer: PtyPeer) -> None:
    peer.echo = True
    peer.script["AT+CGSN"] = b"\r\n866758040000008\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    assert await chan.command("AT+CGSN") == ["866758040000008"]
    await chan.command("ATE0")
    assert await chan.command("AT+CGSN") == ["866758040000008"]
    await chan.close()


async def test_commands_are_serialised(peer: PtyPeer) -> None:
    peer.script["AT+A"] = b"\r\n+A: 1\r\n\r\nOK\r\n"
    peer.script["AT+B"] = b"\r\n+B: 2\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    results = await asyncio.gather(*(chan.command(c) for c in ["AT+A", "AT+B"] * 10))
    assert results == [["+A: 1"], ["+B: 2"]] * 10
    await chan.close()


async def test_timeout_then_resync_with_at(peer: PtyPeer) -> None:
    peer.script["AT+SLOW"] = None  # never answers
    peer.script["AT+CSQ"] = b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    with pytest.raises(CommandTimeout):
        await chan.command("AT+SLOW", timeout=0.2)
    # The next command goes out after the resync, which found the modem alive.
    assert await chan.command("AT+CSQ") == ["+CSQ: 20,99"]
    assert peer.received == ["AT+SLOW", "AT", "AT+CSQ"]
    assert chan.escalation == 0
    assert chan.failures == 0
    assert chan.condition[0] == "ready"
    await chan.close()


async def test_banner_during_command_fails_it_at_once(peer: PtyPeer) -> None:
    peer.script["AT+COPS?"] = b"\r\nRDY\r\n"
    chan = await AtChannel.open(peer.path)
    resets: list[Reset] = []
    chan.add_reset_listener(resets.append)
    # At once: by the banner, not by the timer (which would raise CommandTimeout).
    with pytest.raises(ModemReset):
        await chan.command("AT+COPS?", timeout=60)
    assert resets == ["RDY"]
    assert resets[0].cause == "spontaneous"
    await chan.close()


async def test_echo_coming_back_is_seen_as_a_reset(peer: PtyPeer) -> None:
    chan = await AtChannel.open(peer.path)
    resets: list[Reset] = []
    chan.add_reset_listener(resets.append)
    await chan.command("ATE0")
    peer.echo = True  # the modem rebooted silently
    await chan.command("AT")
    assert resets == ["echo came back on"]
    assert resets[0].cause == "spontaneous"
    await chan.close()


async def test_reply_without_leading_line_break_is_the_answer_not_echo(peer: PtyPeer) -> None:
    # Seen in the field with +CSQ: echo off, and the reply's first CRLF missing.
    peer.script["AT+CSQ"] = b"+CSQ: 20,99\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    resets: list[str] = []
    chan.add_reset_listener(resets.append)
    await chan.command("ATE0")
    assert await chan.command("AT+CSQ") == ["+CSQ: 20,99"]
    assert await chan.command("AT+CSQ") == ["+CSQ: 20,99"]
    assert resets == []  # both replies were read, to their OK
    await chan.close()


async def test_line_noise_is_not_a_reset(peer: PtyPeer) -> None:
    peer.script["AT+CGMI"] = b"\x9bq#z\r\n\r\nQuectel\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    resets: list[str] = []
    chan.add_reset_listener(resets.append)
    await chan.command("ATE0")
    assert await chan.command("AT+CGMI") == ["Quectel"]  # the noise was read: it came first
    assert resets == []
    await chan.close()


async def test_sms_prompt(peer: PtyPeer) -> None:
    peer.script['AT+CMGS="+819012345678"'] = b"\r\n> "

    def after_text(_: str) -> bytes:
        return b"\r\n+CMGS: 7\r\n\r\nOK\r\n"

    chan = await AtChannel.open(peer.path)
    task = asyncio.ensure_future(chan.command('AT+CMGS="+819012345678"', data=b"hello"))
    # The peer sees the text ended by Ctrl-Z (no CR: it stays in the peer's line buffer).
    await until(lambda: peer._buf.endswith(b"hello\x1a"), "the text and Ctrl-Z")
    peer.write(after_text(""))
    assert await task == ["+CMGS: 7"]
    await chan.close()


async def test_port_vanishing_fails_command_and_notifies(peer: PtyPeer) -> None:
    peer.script["AT+CSQ"] = None
    chan = await AtChannel.open(peer.path)
    closed: list[BaseException | None] = []
    chan.add_close_listener(closed.append)
    task = asyncio.ensure_future(chan.command("AT+CSQ", timeout=60))
    await until(lambda: "AT+CSQ" in peer.received, "the command to reach the modem")
    peer.close()
    with pytest.raises(PortError):
        await task
    assert len(closed) == 1
    assert not chan.is_open
    assert chan.condition[0] == "closed"


async def test_busy_and_missing_ports(peer: PtyPeer) -> None:
    first = open_serial(peer.path)
    with pytest.raises(PortError, match="busy"):
        open_serial(peer.path)
    first.close()
    with pytest.raises(PortError, match="no such port"):
        open_serial("/dev/does-not-exist-simkeeper")


async def test_socket_transport() -> None:
    async def modem(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readuntil(b"\r"):
            if line.strip() == b"AT+CSQ":
                writer.write(b"\r\n+CSQ: 31,0\r\n\r\nOK\r\n")
                await writer.drain()

    server = await asyncio.start_server(modem, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chan = await AtChannel.open(f"socket://127.0.0.1:{port}")
    assert await chan.command("AT+CSQ") == ["+CSQ: 31,0"]
    await chan.close()
    server.close()


async def test_loop_transport_without_fd() -> None:
    # loop:// hands back what is written: the echo, then nothing, so the command times out;
    # what matters is that reading works without a file descriptor.
    chan = AtChannel("loop://", timeout=0.3, resync_timeout=0.1)
    await chan.connect()
    chan.feed(b"")
    with pytest.raises(CommandTimeout):
        await chan.command("AT+CSQ")
    await chan.close()


async def test_cancelling_the_caller_is_not_a_timeout(peer: PtyPeer) -> None:
    peer.script["AT+SLOW"] = None
    peer.script["AT+CSQ"] = b"\r\n+CSQ: 20,99\r\n\r\nOK\r\n"
    chan = await AtChannel.open(peer.path)
    hangs: list[str] = []
    chan.add_hang_listener(hangs.append)
    task = asyncio.ensure_future(chan.command("AT+SLOW", timeout=60))
    await until(lambda: "AT+SLOW" in peer.received, "the command to reach the modem")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Recovery would have started (gate shut, ping first) before the cancel returned: the
    # next command going out right after AT+SLOW proves no resync, no ladder ran.
    assert await chan.command("AT+CSQ") == ["+CSQ: 20,99"]
    assert peer.received == ["AT+SLOW", "AT+CSQ"]
    assert chan.failures == 0
    assert hangs == []
    assert chan.condition[0] == "ready"
    await chan.close()


def test_a_raw_spy_url_is_refused_in_one_line(tmp_path: Path) -> None:
    """pyserial's ``spy://...&raw`` writes bytes to its text log and fails on the first write:
    refused at open, saying so (issue 11, item 20); its hex dump still works."""
    url = f"spy:///dev/null?file={tmp_path / 'spy.log'}&raw"
    with pytest.raises(PortError, match="cannot log raw"):
        open_serial(url)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "modem", "info", "--port", url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "cannot log raw" in done.stderr and len(done.stderr.strip().splitlines()) == 1
