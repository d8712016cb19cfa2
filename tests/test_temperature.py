"""The module temperature end to end: vendor parsers, the simulator's answers, Modem.temperature(),
the session's poll and the agent's health reading.

The parser transcripts are built from the vendors' AT manuals and are not device captures:
Quectel ``AT+QTEMP`` (EC2x: ``+QTEMP: <pmic_temp>,<xo_temp>,<pa_temp>``; RG50xQ/RM5xxQ firmware:
one ``+QTEMP: "<sensor>","<temp>"`` line per sensor), SIMCom SIM7500/SIM7600 Series AT Command
Manual (``AT+CPMUTEMP`` -> ``+CPMUTEMP: <temp>``), Telit LE910 V2 Series AT Commands
80446ST10707A and UC864-E/G AT Commands Reference Guide 80304ST10041a (``AT#TEMPMON=1`` ->
``#TEMPMEAS: <level>,<value>``, ``<value>`` in Celsius degrees).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.core.store import Store
from agent.telemetry.health import HealthReporter
from agent.telemetry.outbox import Outbox
from drivers.at import AtCodec, Info, Urc
from drivers.parsers import ParseError
from drivers.parsers.thermal import Temperature, parse_cpmutemp, parse_qtemp, parse_tempmeas
from drivers.simulator import PERSONALITIES, ScenarioError, SimulatedModem, parse_scenario
from drivers.vendors import (
    GENERIC,
    HUAWEI,
    PROFILES,
    QUECTEL,
    SIERRA,
    SIMCOM,
    SIMCOM_2G,
    SIMCOM_LPWA,
    TELIT,
    UBLOX,
    UBLOX_LPWA,
)
from tests.broker import until
from tests.test_modem_e2e import probe_session
from tests.test_parsers import answer
from tests.test_session import ready, serving
from tests.test_simulator import body, modem


def answer_expecting(
    command: str, wire: bytes, expect: tuple[str, ...]
) -> tuple[list[str], list[Urc]]:
    codec = AtCodec()
    codec.send(command, expect=expect)
    codec.receive_data(wire)
    events = codec.events()
    return ([e.text for e in events if isinstance(e, Info)],
            [e for e in events if isinstance(e, Urc)])


# Where each personality's modem reports its temperature (None: the profile has no read).
TEMPERATURE_COMMAND = {"quectel": "AT+QTEMP", "simcom": "AT+CPMUTEMP", "ublox": None}


# -- parsers ---------------------------------------------------------------------------------
def test_qtemp_ec2x_positional_takes_the_hottest_and_names_it() -> None:
    lines, _, final = answer("AT+QTEMP", b"\r\n+QTEMP: 34,31,39\r\n\r\nOK\r\n")
    assert final is not None and final.ok
    reading = parse_qtemp(lines)
    assert reading == Temperature(39.0, "pa", (("pmic", 34.0), ("xo", 31.0), ("pa", 39.0)))


def test_qtemp_named_sensors_one_line_each() -> None:
    wire = (b'\r\n+QTEMP:"qfe_wtr_pa0","29"\r\n+QTEMP:"modem-lte-sub6-pa1","33"\r\n'
            b'+QTEMP:"aoss0-usr","41"\r\n+QTEMP:"mdm-core-usr","40"\r\n\r\nOK\r\n')
    lines, _, _ = answer("AT+QTEMP", wire)
    reading = parse_qtemp(lines)
    assert (reading.celsius, reading.sensor) == (41.0, "aoss0-usr")
    assert [name for name, _ in reading.sensors] == [
        "qfe_wtr_pa0", "modem-lte-sub6-pa1", "aoss0-usr", "mdm-core-usr"]


def test_qtemp_first_of_equal_sensors_and_spaces_after_the_colon() -> None:
    reading = parse_qtemp(['+QTEMP: "xo-therm-usr","35"', '+QTEMP: "pa-therm0","35"'])
    assert (reading.celsius, reading.sensor) == (35.0, "xo-therm-usr")


def test_qtemp_sentinels_are_not_temperatures() -> None:
    reading = parse_qtemp(['+QTEMP:"qfe_wtr_pa0","-273"', '+QTEMP:"mdm-core-usr","37"'])
    assert (reading.celsius, reading.sensor) == (37.0, "mdm-core-usr")
    assert reading.sensors == (("mdm-core-usr", 37.0),)
    with pytest.raises(ParseError, match="no plausible"):
        parse_qtemp(['+QTEMP:"qfe_wtr_pa0","-273"'])


def test_qtemp_negative_readings() -> None:
    assert parse_qtemp(["+QTEMP: -12,-15,-9"]).celsius == -9.0


@pytest.mark.parametrize("lines", [
    [], ["OK"], ["+QTEMP: "], ['+QTEMP: "qfe_wtr_pa0"'], ["+QTEMP: 34,hot,39"],
    ['+QTEMP: "qfe_wtr_pa0","warm"'], ["+CPMUTEMP: 34"],
])
def test_qtemp_refuses_what_is_not_an_answer(lines: list[str]) -> None:
    with pytest.raises(ParseError):
        parse_qtemp(lines)


def test_cpmutemp() -> None:
    lines, _, _ = answer("AT+CPMUTEMP", b"\r\n+CPMUTEMP: 34\r\n\r\nOK\r\n")
    assert parse_cpmutemp(lines) == Temperature(34.0)
    assert parse_cpmutemp(["+CPMUTEMP: -5"]).celsius == -5.0


@pytest.mark.parametrize("lines", [[], ["+CPMUTEMP: "], ["+CPMUTEMP: 3.4e1"], ["+CPMUTEMP: 999"]])
def test_cpmutemp_refuses(lines: list[str]) -> None:
    with pytest.raises(ParseError):
        parse_cpmutemp(lines)


def test_tempmeas() -> None:
    # #TEMPMEAS is also the URC of the temperature monitor: the profile names it as the answer.
    wire = b"\r\n#TEMPMEAS: 0,37\r\n\r\nOK\r\n"
    lines, urcs, _ = answer("AT#TEMPMON=1", wire)
    assert lines == [] and [u.text for u in urcs] == ["#TEMPMEAS: 0,37"]
    lines, urcs = answer_expecting("AT#TEMPMON=1", wire, (TELIT.temperature_prefix or "",))
    assert (lines, urcs) == (["#TEMPMEAS: 0,37"], [])
    assert parse_tempmeas(lines) == Temperature(37.0)
    assert parse_tempmeas(["#TEMPMEAS: 1,82"]).celsius == 82.0  # operating upper bound band
    assert parse_tempmeas(["#TEMPMEAS: -2,-41"]).celsius == -41.0


@pytest.mark.parametrize("lines", [[], ["#TEMPMEAS: 0"], ["#TEMPMEAS: x,37"], ["#TEMPMON: 0,0"]])
def test_tempmeas_refuses(lines: list[str]) -> None:
    with pytest.raises(ParseError):
        parse_tempmeas(lines)


def test_profiles_carry_the_temperature_command_as_data() -> None:
    assert (QUECTEL.temperature_command, QUECTEL.temperature_parser) == ("AT+QTEMP", parse_qtemp)
    for profile in (SIMCOM, SIMCOM_LPWA):
        assert profile.temperature_command == "AT+CPMUTEMP"
        assert profile.temperature_parser is parse_cpmutemp
    assert (TELIT.temperature_command, TELIT.temperature_parser) == (
        "AT#TEMPMON=1", parse_tempmeas)
    # Not confirmed from a manual: no read rather than a guessed one.
    for profile in (GENERIC, SIMCOM_2G, UBLOX, UBLOX_LPWA, SIERRA, HUAWEI):
        assert profile.temperature_command is None and profile.temperature_parser is None
    for profile in PROFILES:
        assert (profile.temperature_command is None) == (profile.temperature_parser is None)


# -- the simulator ---------------------------------------------------------------------------
async def test_quectel_answers_qtemp_in_the_ec2x_form() -> None:
    async with modem("quectel") as (sim, host):
        assert body(await host.command("AT+QTEMP"), "AT+QTEMP") == (
            b"\r\n+QTEMP: 36,35,38\r\n\r\nOK\r\n")
        sim.set_temperature(71)
        reply = body(await host.command("AT+QTEMP"), "AT+QTEMP")
        assert reply == b"\r\n+QTEMP: 69,68,71\r\n\r\nOK\r\n"
        assert b"ERROR" in await host.command("AT+QTEMP?")
        assert b"ERROR" in await host.command("AT+CPMUTEMP")


async def test_simcom_answers_cpmutemp() -> None:
    async with modem("simcom") as (sim, host):
        assert body(await host.command("AT+CPMUTEMP"), "AT+CPMUTEMP") == (
            b"\r\n+CPMUTEMP: 38\r\n\r\nOK\r\n")
        sim.set_temperature(-7)
        assert b"\r\n+CPMUTEMP: -7\r\n\r\nOK\r\n" in await host.command("AT+CPMUTEMP")
        assert b"ERROR" in await host.command("AT+QTEMP")


async def test_ublox_has_no_temperature_command() -> None:
    async with modem("ublox") as (_sim, host):
        for cmd in ("AT+QTEMP", "AT+CPMUTEMP"):
            assert b"ERROR" in await host.command(cmd)


async def test_temperature_survives_a_reboot() -> None:
    async with modem("simcom", {"temperature_c": 55}) as (sim, host):
        assert b"+CPMUTEMP: 55\r\n" in await host.command("AT+CPMUTEMP")
        sim.reboot()
        await host.until(b"PB DONE", timeout=3)
        assert b"+CPMUTEMP: 55\r\n" in await host.command("AT+CPMUTEMP")


async def test_scenario_temperature_and_step() -> None:
    scenario = {"personality": "quectel", "temperature_c": 45,
                "steps": [{"at": 0.3, "do": "temperature", "temperature_c": 90}]}
    async with modem(scenario=scenario) as (sim, host):
        assert b"+QTEMP: 43,42,45\r\n" in await host.command("AT+QTEMP")
        await until(lambda: sim.state.temperature_c == 90, "temperature step")
        assert b"+QTEMP: 88,87,90\r\n" in await host.command("AT+QTEMP")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"temperature_c": "hot"}, "temperature_c: must be int, not 'hot'"),
        ({"temperature_c": 38.5}, "temperature_c: must be int"),
        ({"temperature_c": True}, "temperature_c: must be int"),
        ({"temperature_c": 200}, "temperature_c: must be between -40 and 125, not 200"),
        ({"steps": [{"at": 1, "do": "temperature"}]}, "steps[0].temperature_c: required"),
        ({"steps": [{"at": 1, "do": "temperature", "temperature_c": -41}]},
         "steps[0].temperature_c: must be between -40 and 125"),
        ({"steps": [{"at": 1, "do": "temperature", "celsius": 40}]},
         "steps[0].celsius: unknown key (known: temperature_c)"),
    ],
)
def test_temperature_is_validated_like_the_other_keys(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert message in str(info.value)


def test_set_temperature_is_validated() -> None:
    sim = SimulatedModem("quectel")
    with pytest.raises(ScenarioError, match=r"^temperature\.temperature_c: must be between"):
        sim.set_temperature(300)
    assert sim.state.temperature_c == 38


# -- Modem.temperature() against the simulator -----------------------------------------------
@pytest.mark.parametrize("personality", sorted(PERSONALITIES))
async def test_modem_temperature_reads_the_simulator(personality: str) -> None:
    sim = SimulatedModem(personality, {"temperature_c": 47}, sim_busy_seconds=0.2)
    async with sim, probe_session(sim) as m:
        celsius = await m.temperature()
        sim.set_temperature(-3)
        later = await m.temperature()
        reading = await m.temperature_reading()
    command = TEMPERATURE_COMMAND[personality]
    assert m.profile.temperature_command == command
    if command is None:  # u-blox: no confirmed read; nothing is sent, nothing is guessed
        assert (celsius, later, reading) == (None, None, None)
        assert not any("TEMP" in c for c in sim.commands)
        return
    assert (celsius, later) == (47.0, -3.0)
    assert sim.commands.count(command) == 3
    assert reading is not None and reading.celsius == -3.0
    if personality == "quectel":
        assert reading.sensor == "pa"


async def test_modem_temperature_is_none_when_the_read_fails() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.2) as sim, probe_session(sim) as m:
        m.profile = SIMCOM  # a dialect this modem does not speak: +CPMUTEMP answers ERROR
        assert await m.temperature() is None
        assert "AT+CPMUTEMP" in sim.commands


# -- the session and the health reading ------------------------------------------------------
async def test_session_polls_the_temperature_and_health_carries_it(tmp_path: Path) -> None:
    async with serving("quectel", poll_interval=0.2) as (sim, session):
        sim.set_temperature(52)
        await until(ready(session), "first poll")
        await until(lambda: session.temperature_c == 52.0, "temperature read")
        assert session.summary()["temperature_c"] == 52.0
        sim.set_temperature(61)
        await until(lambda: session.temperature_c == 61.0, "next poll reads it again")
        store = Store(tmp_path / "db")
        try:
            reporter = HealthReporter(Outbox(store, max_bytes=1 << 20, max_age=3600),
                                      lambda: [session.summary()])
            (modem_reading,) = reporter.reading()["modems"]
        finally:
            store.close()
    assert modem_reading["temperature_c"] == 61.0
    assert modem_reading["port"] == sim.path
    polls = sim.commands.count('AT+QENG="servingcell"')
    assert sim.commands.count("AT+QTEMP") in (polls, polls - 1)  # one read per poll


async def test_health_leaves_temperature_out_where_the_modem_has_none(tmp_path: Path) -> None:
    async with serving("ublox", poll_interval=0.2) as (_sim, session):
        await until(ready(session), "first poll")
        store = Store(tmp_path / "db")
        try:
            reporter = HealthReporter(Outbox(store, max_bytes=1 << 20, max_age=3600),
                                      lambda: [session.summary()])
            (modem_reading,) = reporter.reading()["modems"]
        finally:
            store.close()
    assert session.temperature_c is None
    assert session.summary()["temperature_c"] is None
    assert "temperature_c" not in modem_reading
    assert modem_reading["registration"]["state"] == "roaming"
