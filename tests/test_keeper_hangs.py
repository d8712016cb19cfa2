"""A hung or restarting modem never costs the gateway its radio: a hang is recovered by the
channel and counted once, however many commands time out in it; resets the agent asked for and
line noise are not malfunctions; and a radio held off by a stop-emission order still comes on,
rarely, to hear the order that ends it."""

from __future__ import annotations

from pathlib import Path

from agent.core.config import ConformanceConfig
from agent.sim.activation import tcp_probe
from drivers.channel import Reset
from tests.test_keeper_harness import (
    after,
    echo_server,
    rig,
    state_of,
    until,
    with_lifecycle,
)

ONE_HOUR = ConformanceConfig(malfunction_resets=2, malfunction_window=3600.0)


async def test_one_hang_counts_once_and_the_radio_stays_on(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), conformance=ONE_HOUR,
            command_timeout=0.5) as r:
        await until(lambda: state_of(r.keeper) == "active")
        conditions: list[str] = []
        hangs: list[str] = []
        r.channel.add_condition_listener(conditions.append)
        r.channel.add_hang_listener(hangs.append)
        r.sim.silence(2.5)  # several of the keeper's commands time out, recovery climbs
        await until(lambda: "hung" in conditions, what="hung")
        await until(lambda: conditions[-1] == "ready" and not r.sim.silent, timeout=15,
                    what="recovered")
        rounds = r.count("AT+CFUN?")
        await until(lambda: r.count("AT+CFUN?") >= rounds + 2, what="two rounds after it")
        assert len(hangs) == 1
        assert r.events.of("malfunction") == []
        assert r.sim.state.radio == 1 and r.count("AT+CFUN=4") == 0
        summary = r.keeper.summary()
        assert summary["state"] == "active"
        assert summary["terminal"]["malfunction"] is None
        assert summary["terminal"]["malfunction_signals"] == 1


async def test_resets_the_agent_asked_for_and_line_noise_are_not_malfunctions(
        tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), conformance=ONE_HOUR) as r:
        await until(lambda: state_of(r.keeper) == "active")
        resets: list[Reset] = []
        r.channel.add_reset_listener(resets.append)
        await r.channel.reset_modem()  # what the reset-modem order does
        await until(lambda: resets, what="requested reset seen")
        assert resets[0].cause == "requested"
        await until(lambda: r.count("AT+CTZU=1") >= 2, what="set up again after it")
        r.sim.set_noise(0.5)
        rounds = r.count("AT+CFUN?")
        await until(lambda: r.count("AT+CFUN?") >= rounds + 5, what="rounds through noise")
        r.sim.set_noise(0.0)
        assert len(resets) == 1  # noise is no reset
        r.sim.reboot()  # nobody asked for this one
        await until(lambda: len(resets) == 2, what="spontaneous reset seen")
        await until(lambda: r.count("AT+CTZU=1") >= 3, what="set up again after it")
        assert resets[1].cause == "spontaneous"
        assert r.events.of("malfunction") == []  # one signal of two: the requested one is none
        assert r.sim.state.radio == 1
        assert r.keeper.summary()["terminal"]["malfunction_signals"] == 1


async def test_a_stop_emission_order_keeps_a_way_back(tmp_path: Path) -> None:
    lifecycle = with_lifecycle(probation_interval=0.5, probation_window=1.0)
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), lifecycle=lifecycle) as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.keeper.suspend("radio", reason="stop emission")
        await until(lambda: r.sim.state.radio == 4, what="radio off")
        mark = len(r.sim.commands)
        # a listening window: the radio on and the context up (the SIM was activated), then off
        await until(lambda: after(r.sim.commands, mark, "AT+CFUN=1", "AT+CGPADDR=1",
                                  "AT+CFUN=4"), what="one listening window")
        listening = r.events.of("listening")
        assert listening and listening[0]["reason"] == "stop-emission order"
        assert not r.keeper.telemetry_allowed()  # orders only: readings wait
        mark = len(r.sim.commands)
        await until(lambda: after(r.sim.commands, mark, "AT+CFUN=1"), what="the next window")
        r.keeper.resume()  # the order, heard during the window
        await until(lambda: state_of(r.keeper) == "active", what="resumed")
        enforced = r.keeper.summary()["enforced"]
        assert enforced["listen_at"] is None and enforced["listen_until"] is None
        mark = len(r.sim.commands)
        await until(lambda: after(r.sim.commands, mark, "AT+CFUN?", "AT+CFUN?", "AT+CFUN?"),
                    what="rounds after the resume")
        assert "AT+CFUN=4" not in r.sim.commands[mark:]
        assert r.sim.state.radio == 1 and r.keeper.telemetry_allowed()
