"""One activation attempt on the simulator (real pty), step by step, and the probes against
loopback echo servers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from agent.sim.activation import Activator, AttemptFailed, reject_of, tcp_probe, udp_probe
from drivers.channel import AtChannel
from drivers.modem import Modem
from drivers.simulator import SimulatedModem
from tests.test_keeper_harness import echo_server, refused_probe, udp_echo_server


async def _go() -> None:
    return None


@asynccontextmanager
async def modem_on(sim: SimulatedModem) -> AsyncIterator[Modem]:
    channel = await AtChannel.open(sim.path, timeout=2.0, resync_timeout=0.3)
    modem = Modem(channel, retry_for=2.0, retry_wait=0.05)
    await modem.init()
    try:
        yield modem
    finally:
        await channel.close()


async def test_tcp_probe() -> None:
    async with echo_server() as (host, port):
        await tcp_probe(host, port, timeout=2)()
    with pytest.raises(OSError):
        await refused_probe()()


async def test_udp_probe() -> None:
    async with udp_echo_server() as (host, port):
        await udp_probe(host, port, timeout=2)()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # a port that swallows datagrams and never answers
    try:
        with pytest.raises((OSError, TimeoutError)):
            await udp_probe("127.0.0.1", sock.getsockname()[1], timeout=0.2)()
    finally:
        sock.close()


async def test_attempt_replaces_a_stale_apn_and_proves_a_round_trip() -> None:
    async with SimulatedModem("simcom", {"apn": "old.apn"}, sim_busy_seconds=0.05) as sim, \
            echo_server() as (host, port), modem_on(sim) as modem:
        sim.set_radio(4)
        done = await Activator(tcp_probe(host, port, timeout=2), register_poll=0.05).attempt(
            modem, "soracom.io", _go)
        assert done.apn_replaced == "old.apn"
        assert done.addresses == ("10.160.23.45",)
        assert done.registration.state == "roaming"
        assert sim.state.radio == 1
        assert sim.state.pdp[1].apn == "soracom.io" and sim.state.pdp[1].active
        assert 'AT+CGDCONT=1,"IP","soracom.io"' in sim.commands
        again = await Activator(tcp_probe(host, port, timeout=2)).attempt(
            modem, "SORACOM.IO", _go)
        assert again.apn_replaced is None  # APNs compare without case


async def test_attempt_on_another_cid_creates_the_context() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.05) as sim, \
            echo_server() as (host, port), modem_on(sim) as modem:
        done = await Activator(tcp_probe(host, port, timeout=2), cid=3).attempt(
            modem, "soracom.io", _go)
        assert done.apn_replaced == ""
        assert sim.state.pdp[3].active and "AT+CGACT=1,3" in sim.commands


async def test_denied_registration_carries_its_reject() -> None:
    async with SimulatedModem("ublox", sim_busy_seconds=0.05) as sim, modem_on(sim) as modem:
        sim.set_network("denied", reject_cause=7)
        with pytest.raises(AttemptFailed) as info:
            await Activator(refused_probe()).attempt(modem, "soracom.io", _go)
        reject = info.value.reject
        assert reject is not None and reject.kind == "permanent" and reject.code == 7
        assert reject_of(await modem.registration()) == reject


async def test_no_registration_within_the_timeout() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.05) as sim, modem_on(sim) as modem:
        sim.set_network("searching")
        activator = Activator(refused_probe(), register_timeout=0.2, register_poll=0.05)
        with pytest.raises(AttemptFailed, match=r"not registered within 0.2 s \(searching\)"):
            await activator.attempt(modem, "soracom.io", _go)


async def test_probe_failure_and_checkpoint() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.05) as sim, modem_on(sim) as modem:
        with pytest.raises(AttemptFailed, match="no round trip"):
            await Activator(refused_probe()).attempt(modem, "soracom.io", _go)

        class Stop(Exception):
            pass

        async def stop() -> None:
            raise Stop

        with pytest.raises(Stop):
            await Activator(refused_probe()).attempt(modem, "soracom.io", stop)


async def test_pin_locked_sim_is_not_activated() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.05) as sim, modem_on(sim) as modem:
        sim.set_sim(state="pin-required")
        with pytest.raises(AttemptFailed, match="pin-required"):
            await Activator(refused_probe()).attempt(modem, "soracom.io", _go)
