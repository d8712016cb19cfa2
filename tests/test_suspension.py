"""Suspension: what each scope asks (pure), the gates, NetworkManager through a runner, and end to
end on the simulator: re-applied after a modem reboot and after a keeper restart."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.core.store import Store
from agent.sim.activation import tcp_probe
from agent.sim.lifecycle import Suspension
from agent.sim.suspension import Enforcer, Want, ingest_refusal, plan, telemetry_allowed
from tests.test_keeper_harness import Wall, echo_server, rig, state_of, until

OPERATOR_RADIO = Suspension("radio", "operator", None, "order")
NETWORK_RADIO = Suspension("radio", "network", None, "emm #7")
OPERATOR_DATA = Suspension("data", "operator", 2_000_000_000.0, "order")
REFUSING = Suspension("data", "operator", 2_000_000_000.0, "order", readings="refuse")
TELEMETRY = Suspension("telemetry", "operator")


# -- pure ------------------------------------------------------------------------------------


def test_plan_per_scope_and_state() -> None:
    assert plan("active", None) == Want("on", False, "active")
    assert plan("awaiting-activation", None) == Want()  # activation decides
    assert plan("suspended", TELEMETRY) == Want()
    assert plan("suspended", OPERATOR_DATA) == Want(None, True, "suspended (operator, data)")
    assert plan("suspended", OPERATOR_RADIO).radio == "low-power"
    assert plan("suspended", NETWORK_RADIO).radio == "low-power"
    assert plan("suspended", NETWORK_RADIO, probing=True) == Want(None, False,
                                                                  "probing the network")
    assert plan("suspended", OPERATOR_RADIO, probing=True).radio == "low-power"  # orders hold
    assert plan("terminated", None).radio == "off"
    assert plan("expired", None).radio == "low-power"
    assert plan("active", None, may_emit=False, why_not="malfunction") == Want(
        "low-power", True, "malfunction")
    assert plan(None, None) == Want()


def test_nm_modes() -> None:
    assert Want().nm_mode == "on"
    assert Want(None, True).nm_mode == "data-off"
    assert Want("low-power", True).nm_mode == "radio-off"
    assert Want("off", True).nm_mode == "radio-off"


def test_gates() -> None:
    assert telemetry_allowed("active", None)
    assert not telemetry_allowed("suspended", TELEMETRY)
    assert not telemetry_allowed("suspended", NETWORK_RADIO)
    assert not telemetry_allowed("terminated", None)
    assert ingest_refusal("active", None) is None
    assert ingest_refusal("suspended", NETWORK_RADIO) is None  # kept for when the SIM is back
    assert ingest_refusal("suspended", OPERATOR_DATA) is None  # kept, by default
    assert ingest_refusal("suspended", TELEMETRY) is None
    refusal = ingest_refusal("suspended", REFUSING)  # the order said "readings": "refuse"
    assert refusal is not None and "operator" in refusal and "2000000000" in refusal
    assert "decommissioned" in (ingest_refusal("terminated", None) or "")


class FakeNmcli:
    def __init__(self, connections: str = "soracom:gsm\nWired connection 1:802-3-ethernet\n"
                 "my\\:apn:gsm\n") -> None:
        self.calls: list[list[str]] = []
        self.connections = connections

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        if list(argv[1:]) == ["-t", "-f", "NAME,TYPE", "connection", "show"]:
            return 0, self.connections
        if list(argv[1:3]) == ["connection", "down"]:
            return 10, "Error: 'soracom' is not an active connection.\n"
        return 0, ""


async def test_networkmanager_commands_per_mode() -> None:
    nm = FakeNmcli()
    enforcer = Enforcer(data_path="networkmanager", runner=nm)
    assert await enforcer.apply_nm("radio-off", None)
    issued = [c for c in nm.calls if "show" not in c]
    assert issued == [
        ["nmcli", "connection", "modify", "soracom", "connection.autoconnect", "no"],
        ["nmcli", "connection", "down", "soracom"],
        ["nmcli", "connection", "modify", "my:apn", "connection.autoconnect", "no"],
        ["nmcli", "connection", "down", "my:apn"],
        ["nmcli", "radio", "wwan", "off"],
    ]
    assert enforcer.nm_error is None  # "not an active connection" is no failure
    nm.calls.clear()
    assert await enforcer.apply_nm("on", "radio-off")
    assert ["nmcli", "radio", "wwan", "on"] in nm.calls
    assert ["nmcli", "connection", "modify", "soracom", "connection.autoconnect", "yes"] in nm.calls
    assert ["nmcli", "connection", "up", "soracom"] in nm.calls
    nm.calls.clear()
    assert await enforcer.apply_nm("on", None)  # never touched: the admin's settings stay
    assert nm.calls == []


async def test_networkmanager_named_connection_and_other_data_paths() -> None:
    nm = FakeNmcli()
    assert await Enforcer(data_path="networkmanager", runner=nm,
                          nm_connection="iot").apply_nm("data-off", "on")
    assert nm.calls == [["nmcli", "connection", "modify", "iot", "connection.autoconnect", "no"],
                        ["nmcli", "connection", "down", "iot"]]
    nm.calls.clear()
    assert await Enforcer(data_path="agent", runner=nm).apply_nm("radio-off", None)
    assert nm.calls == []


async def test_missing_nmcli_is_a_clear_error_not_a_crash(
        caplog: pytest.LogCaptureFixture) -> None:
    async def missing(argv: Sequence[str]) -> tuple[int, str]:
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    enforcer = Enforcer(data_path="networkmanager", runner=missing)
    with caplog.at_level(logging.ERROR):
        assert not await enforcer.apply_nm("radio-off", None)
    assert enforcer.nm_error is not None and "nmcli not found" in enforcer.nm_error
    assert "nmcli not found" in caplog.text


async def test_the_real_runner_without_nmcli() -> None:
    if shutil.which("nmcli") is not None:
        pytest.skip("nmcli is installed here")
    enforcer = Enforcer(data_path="networkmanager", nm_connection="x")
    assert not await enforcer.apply_nm("radio-off", None)
    assert "nmcli not found" in (enforcer.nm_error or "")


# -- end to end ------------------------------------------------------------------------------


async def test_radio_suspension_survives_a_modem_reboot_and_a_keeper_restart(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    try:
        async with echo_server() as (host, port):
            async with rig(tmp_path, store=store, probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: state_of(r.keeper) == "active")
                r.keeper.suspend("radio", reason="stop emission", readings="refuse")
                await until(lambda: r.sim.state.radio == 4, what="CFUN=4")
                assert not r.keeper.telemetry_allowed()
                assert "operator" in (r.keeper.accepting() or "")
                sent = r.count("AT+CFUN=4")
                r.sim.reboot()  # comes back with the radio on
                await until(lambda: r.count("AT+CFUN=4") > sent and r.sim.state.radio == 4,
                            what="CFUN=4 again after the reboot")
                assert r.count("AT+CFUN=1") == 0
                r.sim.set_radio(1)  # somebody else turned it on while the keeper was away
            async with rig(tmp_path, store=store, probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: r.sim.state.radio == 4, what="CFUN=4 after restart")
                assert state_of(r.keeper) == "suspended"
                assert not r.keeper.telemetry_allowed()
                r.keeper.resume()
                await until(lambda: state_of(r.keeper) == "active", what="resumed")
                assert r.sim.state.radio == 1
    finally:
        store.close()


async def test_data_suspension_keeps_contexts_down(tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    try:
        async with echo_server() as (host, port):
            async with rig(tmp_path, store=store, probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: state_of(r.keeper) == "active")
                r.keeper.suspend("data")
                await until(lambda: not r.sim.state.pdp[1].active, what="context down")
                assert r.sim.state.radio == 1  # data scope leaves the radio alone
                down = r.count("AT+CGACT=0,1")
                r.sim.reboot()  # the attach after boot brings the default bearer back
                await until(lambda: r.count("AT+CGACT=0,1") > down
                            and not r.sim.state.pdp[1].active, what="down after reboot")
            r.sim.state.pdp[1].active = True
            async with rig(tmp_path, store=store, probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: not r.sim.state.pdp[1].active, what="down after restart")
                assert state_of(r.keeper) == "suspended"
    finally:
        store.close()


async def test_a_telemetry_suspension_ends_at_its_until(tmp_path: Path) -> None:
    wall = Wall()
    async with echo_server() as (host, port), rig(
            tmp_path, wall=wall, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.keeper.suspend("telemetry", until=wall.now + 600)
        assert not r.keeper.telemetry_allowed() and r.keeper.accepting() is None  # kept
        assert r.sim.state.radio == 1 and r.sim.state.pdp[1].active  # nothing on the modem
        wall.now += 601
        await until(lambda: state_of(r.keeper) == "active", what="resumed at until")
        assert r.keeper.telemetry_allowed() and r.keeper.accepting() is None


async def test_networkmanager_carries_out_radio_suspension(tmp_path: Path) -> None:
    nm = FakeNmcli()
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), runner=nm,
            data_path="networkmanager") as r:
        await until(lambda: state_of(r.keeper) == "active")
        assert nm.calls == []  # never touched while nothing is suspended
        r.keeper.suspend("radio")
        await until(lambda: ["nmcli", "radio", "wwan", "off"] in nm.calls, what="wwan off")
        assert r.sim.state.radio == 4
        r.keeper.resume()
        await until(lambda: ["nmcli", "radio", "wwan", "on"] in nm.calls, what="wwan on")


async def test_missing_nmcli_does_not_stop_the_modem_side(tmp_path: Path) -> None:
    async def missing(argv: Sequence[str]) -> tuple[int, str]:
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), runner=missing,
            data_path="networkmanager") as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.keeper.suspend("radio")
        await until(lambda: r.sim.state.radio == 4)
        summary = r.keeper.summary()
        assert summary is not None
        await until(lambda: "nmcli not found" in str(r.keeper.summary()))
