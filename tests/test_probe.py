"""The activation's round trip through the broker: one clean MQTT session the broker logs as a
client that came and went, never as a protocol error (issue 11, item 18)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.config import UplinkConfig, parse
from agent.fleet.localbroker import LocalBroker, free_port
from agent.sim.activation import default_probe, tcp_probe
from agent.telemetry.probe import connect_packet, mqtt_probe
from tests.broker import Pki, uplink_settings, wait_until


def _broker(mosquitto: str, directory: Path, pki: Pki | None = None) -> LocalBroker:
    tls = [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
           "require_certificate true"] if pki else []
    return LocalBroker(directory, ["persistence false", "log_type all", *tls],
                       binary=mosquitto, log=directory / "mosquitto.log")


@pytest.fixture
def logged(mosquitto: str, tmp_path: Path) -> Iterator[LocalBroker]:
    with _broker(mosquitto, tmp_path) as broker:
        yield broker


@pytest.fixture
def logged_tls(mosquitto: str, tmp_path: Path, pki: Pki) -> Iterator[LocalBroker]:
    with _broker(mosquitto, tmp_path, pki) as broker:
        yield broker


def _since(broker: LocalBroker, start: int) -> str:
    """The broker's log from byte ``start`` on (its own start-up check connects, too)."""
    assert broker.log is not None
    return broker.log.read_bytes()[start:].decode(errors="replace")


async def _settled(broker: LocalBroker, settings: UplinkConfig) -> int:
    """Where the broker's log stands once a marker session has come and gone: whatever came
    before it (the start-up check's bare connection) is logged by then."""
    await mqtt_probe(dataclasses.replace(settings, client_id="marker"), timeout=5)()
    _logged(broker, 0, "Client marker-probe disconnected.")
    assert broker.log is not None
    return len(broker.log.read_bytes())


def _logged(broker: LocalBroker, start: int, line: str, times: int = 1) -> str:
    """The log from ``start`` once ``line`` is in it ``times`` times (the broker logs a
    session's end after the probe has returned)."""
    wait_until(lambda: _since(broker, start).count(line) >= times, what=line)
    return _since(broker, start)


def _tls(broker: LocalBroker, pki: Pki, **changes: object) -> UplinkConfig:
    settings = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key, **changes}
    return uplink_settings(broker.port, tls=True, allow_plain=False, **settings)


async def test_a_bare_tcp_probe_is_logged_as_an_error(logged_tls: LocalBroker, pki: Pki) -> None:
    """The defect itself, so the checks below can see it: a TCP handshake and a close on a
    TLS listener, then a session that marks the end of what the broker logged for it."""
    start = await _settled(logged_tls, _tls(logged_tls, pki))
    await tcp_probe("127.0.0.1", logged_tls.port, timeout=5)()
    await mqtt_probe(_tls(logged_tls, pki, client_id="end"), timeout=5)()
    log = _logged(logged_tls, start, "Client end-probe disconnected.")
    assert "error" in log.lower()  # mosquitto 2.0: "OpenSSL Error[0]: ... unexpected eof"


async def test_the_probe_is_a_clean_session(logged: LocalBroker) -> None:
    settings = uplink_settings(logged.port, client_id="gw-test")
    start = await _settled(logged, settings)
    probe = mqtt_probe(settings, timeout=5)
    for _ in range(3):
        await probe()
    log = _logged(logged, start, "Client gw-test-probe disconnected.", 3)  # left cleanly
    assert log.count("as gw-test-probe") == 3  # it connected, under a name of its own
    assert "error" not in log.lower() and "closed its connection" not in log


async def test_the_probe_through_mutual_tls(logged_tls: LocalBroker, pki: Pki) -> None:
    start = await _settled(logged_tls, _tls(logged_tls, pki))
    await mqtt_probe(_tls(logged_tls, pki), timeout=5)()
    log = _logged(logged_tls, start, "Client gw-test-probe disconnected.")
    assert "error" not in log.lower() and "failed" not in log


async def test_no_round_trip_raises(logged_tls: LocalBroker, pki: Pki) -> None:
    """Nothing listening, or a broker that refuses the certificate: OSError, as the activation
    expects of a probe that found no way through."""
    with pytest.raises(OSError):
        await mqtt_probe(uplink_settings(free_port()), timeout=5)()
    rogue = _tls(logged_tls, pki, cert=pki.rogue_cert, key=pki.rogue_key)
    with pytest.raises(OSError):
        await mqtt_probe(rogue, timeout=5)()


async def test_a_refused_session_is_still_a_round_trip(mosquitto: str, tmp_path: Path) -> None:
    """A broker that answers CONNACK "not authorised" carried the probe both ways."""
    (tmp_path / "none").write_text("")
    with LocalBroker(tmp_path, ["persistence false", "allow_anonymous false",
                                f"password_file {tmp_path / 'none'}"], binary=mosquitto) as b:
        await mqtt_probe(uplink_settings(b.port, username="nobody"), timeout=5)()


def test_the_config_chooses_the_probe(tmp_path: Path) -> None:
    cfg = parse('device_id = "gw-1"\n[uplink]\nhost = "broker.example"\nport = 8883\n'
                f'tls = true\nca = "{tmp_path}/ca.pem"\n')
    assert default_probe(cfg.lifecycle, cfg.uplink).__qualname__.startswith("mqtt_probe")
    tcp = dataclasses.replace(cfg.lifecycle, probe="tcp")
    assert default_probe(tcp, cfg.uplink).__qualname__.startswith("tcp_probe")


def test_connect_packet() -> None:
    """MQTT 3.1.1 (section 3.1): clean session; user name and password flags with their
    fields; the remaining length in 7-bit groups."""
    assert connect_packet("c", None, None) == (
        b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x0a\x00\x01c")
    packet = connect_packet("c" * 200, "u", "p")
    assert packet[:3] == b"\x10\xda\x01"  # 218 = 0x5a | 0x80, then 1
    assert packet[10] == 0xC2 and packet.endswith(b"\x00\x01u\x00\x01p")
