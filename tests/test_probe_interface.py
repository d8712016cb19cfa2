"""The activation probe bound to its modem's interface (SO_BINDTODEVICE): with several modems,
a SIM's activation is proven over its own modem's link, never over whatever the default route
picks. Bound to ``lo``, each probe reaches a loopback listener or the test broker; bound to an
interface that is not there, it fails with a reason that says so, and the keeper carries on.

Binding a fresh socket needs no privilege since Linux 5.7; these tests run as root anyway."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import parse
from agent.core.store import Store
from agent.sim import keeper
from agent.sim.activation import Activator, AttemptFailed, default_probe, tcp_probe, udp_probe
from agent.sim.keepers import keeper_from_config, probe_interface
from agent.telemetry.probe import BindError, mqtt_probe
from drivers.simulator import SimulatedModem
from tests.broker import Broker, Pki, uplink_settings
from tests.test_activation import modem_on
from tests.test_keeper_harness import echo_server, rig, udp_echo_server, until

NONE = "sk-nope0"  # no such interface
WHY = f"the probe cannot go out through interface '{NONE}': No such device"


async def _go() -> None:
    return None


async def test_tcp_probe_through_an_interface() -> None:
    async with echo_server() as (host, port):
        await tcp_probe(host, port, timeout=5, interface="lo")()
        with pytest.raises(BindError, match=WHY):
            await tcp_probe(host, port, timeout=5, interface=NONE)()


async def test_udp_probe_through_an_interface() -> None:
    async with udp_echo_server() as (host, port):
        await udp_probe(host, port, timeout=5, interface="lo")()
        with pytest.raises(BindError, match=WHY):
            await udp_probe(host, port, timeout=5, interface=NONE)()


async def test_mqtt_probe_through_an_interface(broker: Broker) -> None:
    settings = uplink_settings(broker.port)
    await mqtt_probe(settings, timeout=5, interface="lo")()
    with pytest.raises(BindError, match=WHY):
        await mqtt_probe(settings, timeout=5, interface=NONE)()


async def test_mqtt_probe_through_an_interface_with_tls(tls_broker: Broker, pki: Pki) -> None:
    settings = uplink_settings(tls_broker.port, tls=True, allow_plain=False, ca=pki.ca,
                               cert=pki.client_cert, key=pki.client_key)
    await mqtt_probe(settings, timeout=5, interface="lo")()
    rogue = dataclasses.replace(settings, cert=pki.rogue_cert, key=pki.rogue_key)
    with pytest.raises(OSError):  # the handshake fails on the bound socket as on any other
        await mqtt_probe(rogue, timeout=5, interface="lo")()


async def test_a_probe_that_cannot_bind_fails_the_attempt_saying_why() -> None:
    async with SimulatedModem("quectel", sim_busy_seconds=0.05) as sim, \
            echo_server() as (host, port), modem_on(sim) as modem:
        probe = tcp_probe(host, port, timeout=5, interface=NONE)
        with pytest.raises(AttemptFailed) as failed:
            await Activator(probe, register_poll=0.05).attempt(modem, "soracom.io", _go)
        assert failed.value.reason == WHY + " (SO_BINDTODEVICE)"
        assert failed.value.reject is None
        done = await Activator(tcp_probe(host, port, timeout=5, interface="lo")).attempt(
            modem, "soracom.io", _go)
        assert done.addresses


async def test_the_keeper_logs_the_bind_failure_and_carries_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "agent.sim.keeper")
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=5, interface=NONE), start=False) as r:
        task = r.keeper.start()
        await until(lambda: len(r.events.of("activation-failed")) >= 2, what="two failures")
        assert WHY in r.events.of("activation-failed")[0]["detail"]["reason"]
        failures = [rec for rec in caplog.records if "activation attempt failed" in
                    rec.getMessage()]
        assert failures and all(WHY in rec.getMessage() and rec.exc_info is None
                                for rec in failures)
        assert not task.done()  # the keeper goes on trying, with back-off


def _modem(text: str) -> Any:
    return parse(f'device_id = "x"\n[modem]\n{text}').modem


@pytest.mark.parametrize(("text", "want"), [
    ('port = "/dev/a"', [None]),  # one modem: the default route, as ever
    ('port = "/dev/a"\ndata_path = "agent"\ninterface = "wwan0"', [None]),
    ('port = ["/dev/a", "/dev/b"]\ninterface = ["wwan0", "wwan1"]\n'
     'nm_connection = ["one", "two"]', ["wwan0", "wwan1"]),
    ('port = ["/dev/a", "/dev/b"]\ndata_path = "agent"\ninterface = ["wwan0", "wwan1"]',
     ["wwan0", "wwan1"]),
    ('port = ["/dev/a", "/dev/b"]\ndata_path = "external"\ninterface = ["wwan0", "wwan1"]',
     [None, None]),
    ('port = ["/dev/a", "/dev/b"]\ndata_path = "agent"\ninterface = "wwan0"',
     ["wwan0", None]),
    ('port = "auto"', [None, None]),  # the default config: one interface named for all
    ('port = "auto"\ninterface = ["wwan0", "wwan1"]', ["wwan0", "wwan1"]),
])
def test_which_interface_a_probe_is_bound_to(text: str, want: list[str | None]) -> None:
    modem = _modem(text)
    assert [probe_interface(modem, i) for i in range(len(want))] == want


def test_keeper_from_config_binds_each_slots_probe(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, str | None]] = []

    def recording(*args: Any, interface: str | None = None) -> Any:
        made.append((args[2], interface))
        return default_probe(*args, interface=interface)

    monkeypatch.setattr(keeper, "default_probe", recording)  # the keeper makes its probe
    cfg = parse(f'device_id = "x"\n[modem]\nport = ["/dev/a", "/dev/b"]\n'
                'interface = ["wwan0", "wwan1"]\nnm_connection = ["one", "two"]\n'
                f'[store]\npath = "{tmp_path}/db"')
    store = Store(cfg.store.path)
    try:
        for index in (0, 1):
            keeper_from_config(cfg, store, lambda *_a, **_k: "", index=index)
    finally:
        store.close()
    assert made == [("modem", "wwan0"), ("modem2", "wwan1")]
