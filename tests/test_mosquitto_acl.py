"""The cloud-side broker config (packaging/mosquitto/) against a real mosquitto, over mTLS.

The test starts mosquitto with packaging/mosquitto/simkeeper.conf and simkeeper.acl as
shipped; only the certificate and ACL paths and the listener port are rewritten, plus what a
test run needs (no persistence, log to stderr, stay root to read the temporary keys). The PKI
is made here (with tests.broker's certificate helpers): a fleet CA, the broker's certificate,
devices gw-A and gw-B, the operator, and a "gw-A" certificate from another CA.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.localbroker import LocalBroker, free_port
from tests.broker import WAIT, certificate, new_key, wait_until, write_pem

PACKAGING = Path(__file__).resolve().parent.parent / "packaging" / "mosquitto"
OPERATOR = "simkeeper-operator"
NOT_AUTHORIZED = 0x87
QUIET = 1.0  # how long "nothing arrives" is watched after a marker that did arrive

# -- PKI ------------------------------------------------------------------------------------


def _issue(
    cn: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = new_key()
    return certificate(cn, key, issuer, ca=ca, server=server), key


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


def _save(directory: Path, name: str, cert: x509.Certificate,
          key: ec.EllipticCurvePrivateKey) -> Identity:
    cert_path = write_pem(directory / name, cert, key)
    return Identity(cert_path, cert_path.with_suffix(".key"))


@dataclass
class Fleet:
    port: int
    ca: Path
    ids: dict[str, Identity] = field(default_factory=dict)


def _config(directory: Path, port: int) -> Path:
    """packaging/mosquitto/simkeeper.conf with this run's paths and port."""
    paths = {"cafile": directory / "ca.pem", "certfile": directory / "server.pem",
             "keyfile": directory / "server.key", "acl_file": directory / "simkeeper.acl"}
    (directory / "simkeeper.acl").write_text((PACKAGING / "simkeeper.acl").read_text())
    out = []
    for line in (PACKAGING / "simkeeper.conf").read_text().splitlines():
        words = line.split()
        if words and words[0] == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif words and words[0] in paths:
            out.append(f"{words[0]} {paths[words[0]]}")
        else:
            out.append(line)
    out += ["persistence false", "log_dest stderr", "log_type error", "log_type warning"]
    if os.geteuid() == 0:
        out.append("user root")  # or mosquitto drops to a user that cannot read the test keys
    config = directory / "mosquitto.conf"
    config.write_text("\n".join(out) + "\n")
    return config


@pytest.fixture(scope="module")
def fleet(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    ca_cert, ca_key = _issue("simkeeper fleet CA", None, ca=True)
    other_cert, other_key = _issue("another CA", None, ca=True)
    _save(directory, "ca", ca_cert, ca_key)
    fleet_ca = (ca_cert.subject, ca_key)
    _save(directory, "server", *_issue("localhost", fleet_ca, server=True))
    port = free_port()
    fleet = Fleet(port, directory / "ca.pem")
    for cn in ("gw-A", "gw-B", OPERATOR):
        fleet.ids[cn] = _save(directory, cn, *_issue(cn, fleet_ca))
    fleet.ids["rogue"] = _save(directory, "rogue",
                               *_issue("gw-A", (other_cert.subject, other_key)))
    broker = LocalBroker(directory, binary=mosquitto, config=_config(directory, port), port=port)
    broker.start(WAIT)
    try:
        yield fleet
    finally:
        broker.stop()


# -- clients --------------------------------------------------------------------------------


class Client:
    """A paho client (its own loop thread) that records CONNACK, SUBACKs, PUBACKs, messages."""

    def __init__(self, fleet: Fleet, identity: Identity | None, *, v5: bool = True) -> None:
        self.connack: Any = None
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.subacks: dict[int, list[int]] = {}
        self.pubacks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.tls_set(str(fleet.ca), str(identity.cert) if identity else None,
                            str(identity.key) if identity else None)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.ended.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        try:
            self.client.connect("127.0.0.1", fleet.port, keepalive=10)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            self.ended.set()
            return
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        if reason.is_failure:
            self.ended.set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._lock:
            self.subacks[mid] = [r.value for r in reasons]

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self.pubacks[mid] = reason.value

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def wait_connected(self) -> Client:
        wait_until(lambda: self.connected or self.ended.is_set(), what="CONNACK")
        assert self.connected, f"refused: {self.connack} {self.error}"
        return self

    def subscribe(self, topic: str) -> list[int]:
        _, sent = self.client.subscribe(topic, qos=1)
        assert sent is not None
        mid = sent
        wait_until(lambda: mid in self.subacks, what=f"SUBACK for {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, what=f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def got(self, topic: str | None = None) -> list[tuple[str, bytes]]:
        with self._lock:
            return [m for m in self.messages if topic is None or m[0] == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _open(clients: list[Client], fleet: Fleet, name: str | None, *, v5: bool = True) -> Client:
    c = Client(fleet, fleet.ids[name] if name else None, v5=v5)
    clients.append(c)
    return c


def _success(code: int) -> bool:
    return code < 0x80


# -- tests ----------------------------------------------------------------------------------


def test_config_is_the_packaged_one() -> None:
    conf = (PACKAGING / "simkeeper.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true",
                 "allow_anonymous false"):
        assert re.search(rf"^{line}$", conf, re.M), line
    assert re.search(r"^pattern readwrite simkeeper/%u/#$",
                     (PACKAGING / "simkeeper.acl").read_text(), re.M)


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_provisioned_device_connects_and_publishes(
    fleet: Fleet, clients: list[Client], v5: bool
) -> None:
    operator = _open(clients, fleet, OPERATOR).wait_connected()
    assert all(map(_success, operator.subscribe("simkeeper/+/telemetry")))
    device = _open(clients, fleet, "gw-A", v5=v5).wait_connected()
    assert _success(device.publish("simkeeper/gw-A/telemetry", b"{}"))
    wait_until(lambda: bool(operator.got("simkeeper/gw-A/telemetry")), what="its telemetry")


@pytest.mark.parametrize("name", ["rogue", None], ids=["other-ca", "no-cert"])
def test_certificate_from_another_ca_or_none_is_refused(
    fleet: Fleet, clients: list[Client], name: str | None
) -> None:
    c = _open(clients, fleet, name)
    assert c.ended.wait(10), "the broker neither refused nor dropped the client"
    assert not c.connected


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_device_cannot_publish_under_another_device(
    fleet: Fleet, clients: list[Client], v5: bool
) -> None:
    operator = _open(clients, fleet, OPERATOR).wait_connected()
    operator.subscribe("simkeeper/#")
    intruder = _open(clients, fleet, "gw-A", v5=v5).wait_connected()
    for suffix in ("telemetry", "state", "cmd/result"):
        code = intruder.publish(f"simkeeper/gw-B/{suffix}", b"forged")
        if v5:  # MQTT 3.1.1 has no PUBACK reason: the broker drops it silently
            assert code == NOT_AUTHORIZED
    intruder.publish("simkeeper/gw-A/telemetry", b"marker")
    wait_until(lambda: bool(operator.got("simkeeper/gw-A/telemetry")), what="the marker")
    time.sleep(QUIET)
    assert [t for t, _ in operator.got() if t.startswith("simkeeper/gw-B/")] == []


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
def test_device_cannot_subscribe_to_another_device(
    fleet: Fleet, clients: list[Client], v5: bool
) -> None:
    snoop = _open(clients, fleet, "gw-A", v5=v5).wait_connected()
    # mosquitto 2.0's acl_file may grant the SUBACK; it checks read access per message at
    # delivery, so what matters is that nothing of gw-B's arrives.
    for topic in ("simkeeper/gw-B/#", "simkeeper/+/telemetry", "simkeeper/#", "#"):
        snoop.subscribe(topic)
    victim = _open(clients, fleet, "gw-B").wait_connected()
    operator = _open(clients, fleet, OPERATOR).wait_connected()
    victim.subscribe("simkeeper/gw-B/cmd")
    assert _success(victim.publish("simkeeper/gw-B/telemetry", b"private"))
    assert _success(operator.publish("simkeeper/gw-B/cmd", b"for B"))
    wait_until(lambda: bool(victim.got("simkeeper/gw-B/cmd")), what="gw-B's own command")
    assert _success(operator.publish("simkeeper/gw-A/cmd", b"marker"))
    wait_until(lambda: bool(snoop.got("simkeeper/gw-A/cmd")), what="gw-A's own command")
    time.sleep(QUIET)
    assert {t for t, _ in snoop.got()} == {"simkeeper/gw-A/cmd"}  # MQTT 5: a copy per match


def test_operator_sends_commands_but_cannot_forge_telemetry(
    fleet: Fleet, clients: list[Client]
) -> None:
    device = _open(clients, fleet, "gw-A").wait_connected()
    device.subscribe("simkeeper/gw-A/cmd")
    watcher = _open(clients, fleet, OPERATOR).wait_connected()
    watcher.subscribe("simkeeper/gw-A/#")
    operator = _open(clients, fleet, OPERATOR).wait_connected()
    assert operator.publish("simkeeper/gw-A/telemetry", b"forged") == NOT_AUTHORIZED
    assert _success(operator.publish("simkeeper/gw-A/cmd", b"{}"))
    wait_until(lambda: bool(device.got("simkeeper/gw-A/cmd")), what="the command at the device")
    wait_until(lambda: bool(watcher.got("simkeeper/gw-A/cmd")), what="the command at the watcher")
    time.sleep(QUIET)
    assert watcher.got("simkeeper/gw-A/telemetry") == []
