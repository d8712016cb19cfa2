"""The whole AT stack (channel, codec, vendor profiles, typed reads) against the simulator on a
real pty, in each personality and under each fault; and `simkeeper modem info` as a process."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from drivers.channel import AtChannel, Reset
from drivers.errors import PortError
from drivers.modem import Modem
from drivers.parsers.identity import imei_valid
from drivers.simulator import PERSONALITIES, SimulatedModem
from tests.broker import until

SIMKEEPER = [sys.executable, "-m", "agent.cli"]


@asynccontextmanager
async def probe_session(sim: SimulatedModem) -> AsyncIterator[Modem]:
    chan = await AtChannel.open(sim.path, timeout=2.0, resync_timeout=0.3)
    modem = Modem(chan, retry_for=3.0, retry_wait=0.2)
    try:
        await modem.init()
        yield modem
    finally:
        await chan.close()


async def info_of(sim: SimulatedModem) -> dict[str, Any]:
    async with probe_session(sim) as modem:
        return await modem.info()


@pytest.mark.parametrize("personality", sorted(PERSONALITIES))
async def test_info_in_each_personality(personality: str) -> None:
    async with SimulatedModem(personality=personality, sim_busy_seconds=0.2) as sim:
        sim.set_signal(rssi_dbm=-71, rsrp_dbm=-101, rsrq_db=-12)
        info = await info_of(sim)
    p = sim.personality
    assert info["manufacturer"] == p.manufacturer
    assert info["model"] == p.model
    assert info["revision"] == p.revision
    assert imei_valid(info["imei"])
    assert info["sim"] == {"state": "ready", "iccid": sim.state.sim.iccid,
                           "imsi": sim.state.sim.imsi}
    reg = info["registration"]
    assert reg["state"] == "roaming"
    assert reg["act"] in ("lte", "lte-m")
    assert reg["tac"] == f"{sim.state.network.tac:X}"
    assert reg["reject_cause"] is None
    assert info["operator"] == {"name": "NTT DOCOMO", "mcc_mnc": "44010"}
    assert info["signal"]["rssi_dbm"] == -71
    assert info["signal"]["rsrp_dbm"] == -101
    assert info["signal"]["rsrq_db"] == -12
    assert info["radio"] == "on"


@pytest.mark.parametrize("personality", sorted(PERSONALITIES))
async def test_pin_locked_sim_still_gives_its_iccid(personality: str) -> None:
    async with SimulatedModem(personality=personality) as sim:
        sim.set_sim(state="pin-required")
        info = await info_of(sim)
    assert info["sim"]["state"] == "pin-required"
    assert info["sim"]["iccid"] == sim.state.sim.iccid
    assert info["sim"]["imsi"] is None


async def test_absent_sim() -> None:
    async with SimulatedModem(personality="quectel") as sim:
        sim.set_sim(state="absent")
        info = await info_of(sim)
    assert info["sim"] == {"state": "absent", "iccid": None, "imsi": None}


@pytest.mark.parametrize("personality", sorted(PERSONALITIES))
async def test_denied_with_reject_cause(personality: str) -> None:
    async with SimulatedModem(personality=personality) as sim:
        sim.set_network("denied", reject_cause=7)
        info = await info_of(sim)
    assert info["registration"]["state"] == "denied"
    assert info["registration"]["reject_cause"] == 7


async def test_radio_off_reads_as_off() -> None:
    async with SimulatedModem(personality="ublox") as sim:
        sim.set_radio(4)
        info = await info_of(sim)
    assert info["radio"] == "low-power"
    assert info["registration"]["state"] in ("not-registered", "searching")


async def test_data_counters_grow_with_traffic() -> None:
    for personality in ("quectel", "ublox"):
        async with SimulatedModem(personality=personality) as sim, probe_session(sim) as modem:
            (before,) = await modem.data_counters()
            assert sim.add_traffic(1000, 5000)
            (after,) = await modem.data_counters()
        assert (after.sent - before.sent, after.received - before.received) == (1000, 5000)
    async with SimulatedModem(personality="simcom") as sim, probe_session(sim) as modem:
        assert await modem.data_counters() == ()  # SIM7600 has no byte counter


async def test_slow_modem() -> None:
    async with SimulatedModem(personality="simcom") as sim:
        sim.set_reply_delay(0.15)
        info = await info_of(sim)
    assert info["model"] == sim.personality.model


async def test_garbage_between_frames(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="drivers.channel")
    resets: list[str] = []
    async with SimulatedModem(personality="quectel", seed=7) as sim:
        sim.set_noise(0.5)
        async with probe_session(sim) as modem:
            modem.channel.add_reset_listener(resets.append)
            info = await modem.info()
    assert info["imei"] == sim.personality.imei
    assert info["sim"]["iccid"] == sim.state.sim.iccid
    assert info["manufacturer"] == sim.personality.manufacturer
    assert "line noise" in caplog.text  # noise came first in some replies, with echo off...
    assert resets == []  # ...and was never taken for the echo of a rebooted modem


async def test_urc_flood_during_probe() -> None:
    async with SimulatedModem(personality="quectel") as sim:
        sim.flood(rate=200, duration=3.0)
        info = await info_of(sim)
    assert info["operator"]["mcc_mnc"] == "44010"
    assert info["signal"]["rssi_dbm"] is not None


async def test_reboot_mid_probe_loses_fields_not_the_probe() -> None:
    async with SimulatedModem(personality="quectel", boot_seconds=0.3) as sim, \
            probe_session(sim) as modem:
        resets: list[Reset] = []
        modem.channel.add_reset_listener(resets.append)
        sim.reboot()
        info = await modem.info()
        await until(lambda: resets, "the banner (or the echo coming back)")
        again = await modem.info()
    assert resets[0].cause == "spontaneous"
    assert set(info) == set(again)
    assert again["imei"] == sim.personality.imei


async def test_silent_modem_gives_nulls_then_recovers_after_reboot() -> None:
    async with SimulatedModem(personality="quectel", boot_seconds=0.2) as sim:
        chan = await AtChannel.open(sim.path, timeout=0.3, resync_timeout=0.1,
                                    boot_timeout=120)
        modem = Modem(chan, retry_for=0.5, retry_wait=0.1)
        await modem.init()
        hangs: list[str] = []
        resets: list[Reset] = []
        chan.add_hang_listener(hangs.append)
        chan.add_reset_listener(resets.append)
        sim.silence()  # for good, until the modem reboots
        info = await modem.info()  # every field fails; none aborts the probe
        assert info["imei"] is None and info["sim"]["iccid"] is None
        assert chan.failures > 0
        assert len(hangs) == 1  # one hang, however many reads it cost
        # Recovery sent the reset (the silent modem did not hear it) and waits for it.
        await until(lambda: chan.condition[0] == "resetting", "recovery to reach the reset")
        sim.reboot()  # the power-on that cures it
        await until(lambda: chan.condition[0] == "ready", "the modem to answer again")
        assert (await modem.identity()).imei == sim.personality.imei
        assert chan.failures == 0
        assert resets == ["AT+CFUN=1,1 (recovery of a hang)"]
        assert resets[0].cause == "recovery"
        assert len(hangs) == 1
        await chan.close()


async def test_brief_silence_is_ridden_out_by_retries() -> None:
    async with SimulatedModem(personality="quectel") as sim, probe_session(sim) as modem:
        sim.silence(1.0)
        info = await modem.info()
    assert info["imei"] == sim.personality.imei


async def test_port_vanishing_is_a_port_error() -> None:
    async with SimulatedModem(personality="simcom") as sim, probe_session(sim) as modem:
        sim.vanish()
        with pytest.raises(PortError):
            await modem.info()


# -- the command line ------------------------------------------------------------------------
def modem_info(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIMKEEPER, "modem", "info", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def simulator_process(request: pytest.FixtureRequest) -> Any:
    proc = subprocess.Popen([*SIMKEEPER, "simulate-modem", "--personality", request.param],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    path = proc.stdout.readline().strip()
    yield path
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.mark.parametrize("simulator_process", sorted(PERSONALITIES), indirect=True)
def test_cli_json_and_table(simulator_process: str) -> None:
    done = modem_info("--port", simulator_process, "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert set(info) == {"manufacturer", "model", "revision", "imei", "sim", "registration",
                         "operator", "signal", "radio"}
    assert set(info["signal"]) == {"rssi_dbm", "ber", "rsrp_dbm", "rsrq_db", "sinr_db"}
    table = modem_info("--port", simulator_process)
    assert table.returncode == 0
    assert "imei" in table.stdout and info["imei"] in table.stdout


def test_cli_missing_port_fails_fast() -> None:
    done = modem_info("--port", "/dev/ttyNOPE-simkeeper", timeout=60)  # a guard against a hang
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no such port" in done.stderr


def test_cli_no_modem_behind_the_port() -> None:
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        done = modem_info("--port", path, timeout=10)
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 1
    assert done.stderr == f"simkeeper modem info: no modem answers on {path}\n"


@pytest.mark.parametrize("simulator_process", ["quectel"], indirect=True)
def test_cli_busy_port(simulator_process: str) -> None:
    from drivers.channel import open_serial

    holder = open_serial(simulator_process)
    try:
        done = modem_info("--port", simulator_process, timeout=10)
    finally:
        holder.close()
    assert done.returncode == 1
    assert "busy" in done.stderr


def test_cli_bad_usage_is_exit_2() -> None:
    done = subprocess.run([*SIMKEEPER, "modem", "info"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2
