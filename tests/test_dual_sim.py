"""Dual-SIM modems: the driver (``Modem.sim_slot``/``select_sim_slot``, Quectel ``AT+QDSIM``)
against the simulator's second slot on a real pty; the simulator's own slot behaviour, seen as
bytes by a host; hostile ``+QDSIM`` answers from a scripted peer; several modems side by side,
in one process and from the CLI.

``../shared/corpus`` holds no ``+QDSIM`` capture (checked: no case names it), so the answers
here follow the Quectel manual: ``+QDSIM: <n>``, 0 the first slot, 1 the second. Tests wait
for what they mean (a reply, a URC, a registration), never for time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from drivers import vendors
from drivers.channel import AtChannel
from drivers.errors import ModemError, SimBusy, SimSlotsUnsupported
from drivers.modem import Modem, NetworkRegistration
from drivers.parsers import ParseError
from drivers.parsers.sim import parse_sim_slot
from drivers.simulator import ScenarioError, SimulatedModem, load_scenario, parse_scenario
from tests.broker import until
from tests.ptypeer import PtyPeer
from tests.test_modem_e2e import probe_session
from tests.test_simulator import Clock, _cli
from tests.test_simulator import modem as on_host

EXAMPLE = Path(__file__).resolve().parent.parent / "drivers/simulator/scenarios/dual-sim.toml"
ICCID2, IMSI2 = "8981200001234567898", "440101234567890"
TWO_SIMS: dict[str, Any] = {
    "personality": "quectel",
    "network": {"state": "roaming"},
    "sim2": {"iccid": ICCID2, "imsi": IMSI2},
    "network2": {"state": "home", "mnc": "51", "operator": "KDDI"},
}


async def registration_becomes(modem: Modem, state: str) -> NetworkRegistration:
    """The registration once it reads ``state``; the deadline only guards against a hang."""
    deadline = time.monotonic() + 10
    while (reg := await modem.registration()).state != state:
        assert time.monotonic() < deadline, f"registration stayed {reg.state}, never {state}"
        await asyncio.sleep(0.02)
    return reg


# -- the driver against the simulator ----------------------------------------------------------
async def test_driver_reads_the_slot_switches_and_sees_the_other_sim() -> None:
    async with SimulatedModem(scenario=TWO_SIMS, sim_busy_seconds=0.05) as sim, \
            probe_session(sim) as modem:
        assert modem.profile is vendors.QUECTEL
        assert modem.profile.sim_slots == 2
        assert await modem.sim_slot() == 1
        first = await modem.sim()
        assert (first.iccid, first.imsi) == ("8981100005819480014", "295050912345678")
        assert (await modem.registration()).state == "roaming"
        sent = len(sim.commands)
        await modem.select_sim_slot(2)
        # the SIM powered down around the switch, the radio back to where it was
        assert sim.commands[sent:sent + 4] == ["AT+QDSIM?", "AT+CFUN?", "AT+CFUN=0", "AT+QDSIM=1"]
        assert sim.commands[sent + 4] == "AT+CFUN=1"
        assert sim.active_slot == 2
        assert await modem.sim_slot() == 2
        second = await modem.sim()
        assert (second.state, second.iccid, second.imsi) == ("ready", ICCID2, IMSI2)
        await registration_becomes(modem, "home")
        operator = await modem.operator()
        assert (operator.name, operator.mcc_mnc) == ("KDDI", "44051")
        await modem.select_sim_slot(1)
        assert (await modem.sim()).iccid == "8981100005819480014"
        await registration_becomes(modem, "roaming")
        sent = len(sim.commands)
        await modem.select_sim_slot(1)  # already there: one read, nothing switched
        assert sim.commands[sent:] == ["AT+QDSIM?"]


async def test_permanent_reject_on_slot_1_while_slot_2_registers() -> None:
    scenario = {**TWO_SIMS, "network": {"state": "denied", "reject_cause": 7}}
    async with SimulatedModem(scenario=scenario, sim_busy_seconds=0.05) as sim, \
            probe_session(sim) as modem:
        reg = await modem.registration()
        assert (reg.state, reg.reject_cause) == ("denied", 7)
        await modem.select_sim_slot(2)
        reg = await registration_becomes(modem, "home")
        assert reg.reject_cause is None
        assert sim.state.slots[0].network.reject_cause == 7  # slot 1's card still refused


async def test_scenario_steps_act_on_either_slot() -> None:
    scenario = {**TWO_SIMS, "steps": [
        {"at": 0.05, "do": "network", "slot": 2, "state": "denied", "reject_cause": 8},
        {"at": 0.05, "do": "sim", "slot": 2, "imsi": "440109999999999"},
    ]}
    async with SimulatedModem(scenario=scenario, sim_busy_seconds=0.05) as sim, \
            probe_session(sim) as modem:
        await until(lambda: sim.state.slots[1].sim.imsi == "440109999999999", "the steps")
        assert (await modem.registration()).state == "roaming"  # slot 1 untouched
        await modem.select_sim_slot(2)
        reg = await registration_becomes(modem, "denied")
        assert reg.reject_cause == 8
        assert (await modem.sim()).imsi == "440109999999999"
        sim.set_network("home", slot=2)  # the operator lifts the bar
        await registration_becomes(modem, "home")


async def test_the_slot_survives_a_reset() -> None:
    async with SimulatedModem(scenario=TWO_SIMS, boot_seconds=0.2, sim_busy_seconds=0.05) as sim, \
            probe_session(sim) as modem:
        await modem.select_sim_slot(2)
        assert isinstance(modem.channel, AtChannel)
        await modem.channel.reset_modem()  # AT+CFUN=1,1: the module reboots, NV kept
        await until(lambda: not sim.booting, "the reboot to end")
        assert await modem.sim_slot() == 2
        assert (await modem.sim()).iccid == ICCID2
        await registration_becomes(modem, "home")


async def test_a_single_slot_profile_says_so_without_asking_the_modem() -> None:
    assert (vendors.SIMCOM.sim_slots, vendors.UBLOX.sim_slots, vendors.GENERIC.sim_slots) == (
        1, 1, 1)
    async with SimulatedModem("simcom", sim_busy_seconds=0.05) as sim, \
            probe_session(sim) as modem:
        with pytest.raises(SimSlotsUnsupported, match="simcom modem: one SIM slot"):
            await modem.sim_slot()
        with pytest.raises(SimSlotsUnsupported):
            await modem.select_sim_slot(2)
        assert not any("QDSIM" in c or "CFUN=0" in c for c in sim.commands)


# -- a scripted peer: refusals and hostile answers ---------------------------------------------
@contextlib.asynccontextmanager
async def quectel_peer(script: dict[str, Any]) -> AsyncIterator[tuple[PtyPeer, Modem]]:
    peer = PtyPeer({"AT": b"\r\nOK\r\n", "AT+CFUN?": b"\r\n+CFUN: 1\r\n\r\nOK\r\n",
                    "AT+CFUN=0": b"\r\nOK\r\n", "AT+CFUN=1": b"\r\nOK\r\n", **script})
    channel = await AtChannel.open(peer.path, timeout=2.0, resync_timeout=0.3)
    try:
        yield peer, Modem(channel, vendors.QUECTEL, retry_for=0.0)
    finally:
        await channel.close()
        peer.close()


@pytest.mark.parametrize("answer", [b"\r\nERROR\r\n", b"\r\n+CME ERROR: 4\r\n"])
async def test_a_modem_that_refuses_the_command_has_one_slot(answer: bytes) -> None:
    async with quectel_peer({"AT+QDSIM?": answer}) as (_peer, modem):
        with pytest.raises(SimSlotsUnsupported, match=r"AT\+QDSIM\?: .*no SIM slot to choose"):
            await modem.sim_slot()


async def test_other_errors_stay_what_they_are() -> None:
    async with quectel_peer({"AT+QDSIM?": b"\r\n+CME ERROR: 14\r\n"}) as (_peer, modem):
        with pytest.raises(SimBusy):
            await modem.sim_slot()


@pytest.mark.parametrize("body", [
    b"+QDSIM: 2", b"+QDSIM: -1", b"+QDSIM: x", b"+QDSIM: ", b"+QDSIM: ,", b'+QDSIM: "1"x',
    b"+QDSIM: 99999999999999999999999999", "+QDSIM: ١".encode(), b"+QDSIM: 0\r\n+QDSIM: 1",
    b"+QDSIM: \xff\xfe\x00", b"QDSIM: 0", b"",
])
async def test_hostile_answers_are_a_clear_error_and_the_channel_goes_on(body: bytes) -> None:
    reply = (b"\r\n" + body + b"\r\n" if body else b"") + b"\r\nOK\r\n"
    async with quectel_peer({"AT+QDSIM?": reply}) as (_peer, modem):
        with pytest.raises(ParseError, match=r"QDSIM"):
            await modem.sim_slot()
        assert await modem.channel.command("AT") == []


async def test_a_switch_that_does_not_take_is_reported_and_the_radio_restored() -> None:
    script = {"AT+QDSIM?": b"\r\n+QDSIM: 0\r\n\r\nOK\r\n", "AT+QDSIM=1": b"\r\nOK\r\n"}
    async with quectel_peer(script) as (peer, modem):
        with pytest.raises(ModemError, match="accepted, but the modem still uses SIM slot 1"):
            await modem.select_sim_slot(2)
        assert peer.received[-3:] == ["AT+QDSIM=1", "AT+CFUN=1", "AT+QDSIM?"]
        with pytest.raises(ValueError, match="slot must be 1 to 2"):
            await modem.select_sim_slot(3)


async def test_a_refused_switch_still_restores_the_radio() -> None:
    script = {"AT+QDSIM?": b"\r\n+QDSIM: 0\r\n\r\nOK\r\n"}  # AT+QDSIM=1: ERROR
    async with quectel_peer(script) as (peer, modem):
        with pytest.raises(SimSlotsUnsupported):
            await modem.select_sim_slot(2)
        assert peer.received[-2:] == ["AT+QDSIM=1", "AT+CFUN=1"]


@given(st.lists(st.text(max_size=20), max_size=3), st.integers(0, 1))
def test_parse_sim_slot_raises_only_parse_errors(lines: list[str], first: int) -> None:
    with contextlib.suppress(ParseError):
        slot = parse_sim_slot(["+QDSIM: " + x for x in lines], "+QDSIM", first)
        assert slot in (1, 2)


# -- the simulator's slots, as bytes on the wire -----------------------------------------------
async def test_raw_switch_drops_reads_the_card_and_registers_again() -> None:
    clock = Clock()
    async with on_host(scenario=TWO_SIMS, clock=clock) as (_sim, host):
        await host.command("ATE0;+CEREG=2")
        assert await host.command("AT+QDSIM=?") == b"\r\n+QDSIM: (0-1)\r\n\r\nOK\r\n"
        assert await host.command("AT+QDSIM=2") == b"\r\nERROR\r\n"
        reply = await host.command("AT+QDSIM=1")
        if not reply.endswith(b'"01A2D0F3",7\r\n'):
            reply += await host.until(b'"01A2D0F3",7\r\n')
        assert reply == (b"\r\nOK\r\n\r\n+CEREG: 0\r\n\r\n+CPIN: READY\r\n"
                         b'\r\n+CEREG: 1,"1A2B","01A2D0F3",7\r\n')
        assert await host.command("AT+CIMI") == b"\r\n+CME ERROR: 14\r\n"  # the card is read
        clock.advance(0.3)
        assert await host.command("AT+CIMI") == f"\r\n{IMSI2}\r\n\r\nOK\r\n".encode()
        assert f"+QCCID: {ICCID2}".encode() in await host.command("AT+QCCID")
        assert await host.command("AT+QDSIM?") == b"\r\n+QDSIM: 1\r\n\r\nOK\r\n"


async def test_a_pin_locked_second_card_and_a_switch_at_cfun_0() -> None:
    scenario = {**TWO_SIMS, "sim2": {"state": "pin-required"}}
    async with on_host(scenario=scenario) as (sim, host):
        await host.command("ATE0;+CEREG=1;+CFUN=0")
        assert await host.command("AT+QDSIM=1") == b"\r\nOK\r\n"  # SIM off: no card read
        assert await host.before_reply() == b""
        assert sim.active_slot == 2
        reply = await host.command("AT+CFUN=1;+CPIN?")
        assert b"+CPIN: SIM PIN" in reply
        assert await host.command("AT+CEREG?") == b"\r\n+CEREG: 1,0\r\n\r\nOK\r\n"


async def test_a_card_put_in_the_other_slot_is_read_when_switched_to() -> None:
    clock = Clock()
    async with on_host("quectel", clock=clock) as (sim, host):
        await host.command("ATE0")
        sim.set_sim(slot=2, state="ready", iccid=ICCID2)
        assert await host.before_reply() == b""  # not the slot in use: nothing to report
        with pytest.raises(ValueError, match="SIM slots 1 to 2, not 3"):
            sim.set_sim(slot=3, state="absent")
        await host.command("AT+QDSIM=1")
        clock.advance(0.3)  # the card read
        assert f"+QCCID: {ICCID2}".encode() in await host.command("AT+QCCID")


# -- scenarios -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "message"), [
    ({"sim2": {"state": "locked"}}, "sim2.state: must be one of"),
    ({"network2": {"reject_cause": "7"}}, "network2.reject_cause: must be int"),
    ({"active_slot": 3}, "active_slot: must be one of 1, 2"),
    ({"steps": [{"at": 1, "do": "sim", "slot": 0}]}, "steps[0].slot: must be one of 1, 2"),
])
def test_scenario_slot_keys_are_checked(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert message in str(info.value)


def test_a_single_slot_personality_refuses_a_second_card() -> None:
    with pytest.raises(ScenarioError, match=r"^sim2: the simcom personality has one SIM slot$"):
        SimulatedModem("simcom", {"sim2": {}})
    steps = {"steps": [{"at": 1, "do": "network", "slot": 2, "state": "home"}]}
    with pytest.raises(ScenarioError, match=r"^steps: the ublox personality has one SIM slot$"):
        SimulatedModem("ublox", steps)


async def test_the_example_scenario_starts_on_its_active_slot() -> None:
    scenario = load_scenario(EXAMPLE)
    assert scenario.sim2 is not None
    async with on_host(scenario={**_raw(EXAMPLE), "active_slot": 2}) as (sim, host):
        assert sim.active_slot == 2
        assert f"+QCCID: {scenario.sim2['iccid']}".encode() in await host.command("AT+QCCID")


def _raw(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


# -- several modems at once ----------------------------------------------------------------------
async def test_several_modems_side_by_side_in_one_process() -> None:
    other = {"sim": {"iccid": "8981100005819480030", "imsi": "295050900000030"}}
    async with on_host("quectel", TWO_SIMS) as (one, host1), \
            on_host("quectel", other) as (two, host2):
        assert one.path != two.path
        await host1.command("ATE0")
        await host2.command("ATE0")
        host1.send("AT+QDSIM=1")
        assert b"+QCCID: 8981100005819480030" in await host2.command("AT+QCCID")
        await host1.until(b"+CPIN: READY")
        assert (one.active_slot, two.active_slot) == (2, 1)
        two.set_network("denied", reject_cause=7)
        assert await host1.before_reply() == b""  # one modem's world is not the other's
        assert one.state.network.state == "home"


def test_cli_runs_one_modem_per_scenario(tmp_path: Path) -> None:
    second = tmp_path / "second.json"
    second.write_text('{"personality": "ublox", "sim": {"iccid": "8981100005819480030"}}')
    answers = ((b"AT+QCCID", b"+QCCID: 8981100005819480014"),
               (b"AT+CCID", b"+CCID: 8981100005819480030"))
    with _cli("--scenario", str(EXAMPLE), "--scenario", str(second)) as proc:
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline().split() for _ in range(2)]
            assert [n for n, _path in lines] == ["1", "2"]
            for (_n, path), (cmd, answer) in zip(lines, answers, strict=True):
                port = serial.serial_for_url(path, timeout=3)
                port.write(cmd + b"\r")
                assert answer in port.read_until(b"OK\r\n")
                port.close()
        finally:
            proc.send_signal(signal.SIGTERM)
    assert proc.returncode == 0


@pytest.mark.parametrize(("args", "message"), [
    (("--link", "/tmp/x", "--scenario", str(EXAMPLE), "--scenario", str(EXAMPLE)),
     "--link names one port"),
    (("--personality", "simcom", "--scenario", str(EXAMPLE)),
     "dual-sim.toml: sim2: the simcom personality has one SIM slot"),
])
def test_cli_refuses_in_one_line(args: tuple[str, ...], message: str) -> None:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out, err.count("\n")) == (2, "", 1)
    assert message in err
