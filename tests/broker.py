"""A real mosquitto for the tests, a test PKI, a collecting subscriber, and TCP helpers.

``Broker`` runs mosquitto on a free loopback port with a temporary config (no persistence)
and can be stopped, SIGKILLed and restarted on the same port (an
agent.fleet.localbroker.LocalBroker).
``make_pki`` builds a CA, a server and a client certificate, and a client certificate from
another CA (``certificate`` and ``write_pem`` make more). ``Subscriber`` is
a paho client on its own thread that records every message. ``Relay`` sits between the
uplink and the broker (pause, sever, sniff CONNECT, count bytes); ``Kicker`` accepts MQTT
connections and drops them right after CONNACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.config import UplinkConfig
from agent.core.store import Store
from agent.fleet.localbroker import LocalBroker
from agent.telemetry.batch import decode_batch
from agent.telemetry.outbox import Outbox

WAIT = 30.0  # upper bound of every wait: a failure, never a speed requirement


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what or predicate}")
        time.sleep(0.01)


# -- PKI --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    """``subject``'s certificate for ``key``, signed by ``issuer`` (its name and key) or by
    itself: a CA's, a server's (for localhost and 127.0.0.1) or a client's."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    """``path``.pem and ``path``.key (mode 0600); returns the certificate's path."""
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return path.with_suffix(".pem")


def make_pki(directory: Path) -> Pki:
    ca_key, rogue_ca_key = new_key(), new_key()
    ca = certificate("simkeeper test CA", ca_key, None, ca=True)
    rogue_ca = certificate("someone else's CA", rogue_ca_key, None, ca=True)
    ca_path = write_pem(directory / "ca", ca, ca_key)
    server_key, client_key, rogue_key = new_key(), new_key(), new_key()
    write_pem(
        directory / "server",
        certificate("localhost", server_key, (ca.subject, ca_key), server=True),
        server_key,
    )
    write_pem(
        directory / "client", certificate("gw-test", client_key, (ca.subject, ca_key)), client_key
    )
    write_pem(
        directory / "rogue",
        certificate("gw-test", rogue_key, (rogue_ca.subject, rogue_ca_key)),
        rogue_key,
    )
    return Pki(
        ca=ca_path,
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        rogue_cert=directory / "rogue.pem",
        rogue_key=directory / "rogue.key",
    )


# -- the broker -------------------------------------------------------------------------------


class Broker(LocalBroker):
    """mosquitto on 127.0.0.1:``port``; with ``pki``, TLS with required client certificates."""

    def __init__(self, binary: str, directory: Path, pki: Pki | None = None) -> None:
        self.tls = pki is not None
        tls = [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
               "require_certificate true"] if pki else []
        super().__init__(directory, ["persistence false", *tls], binary=binary)

    def start(self, timeout: float = WAIT) -> None:
        super().start(timeout)


# -- a collecting subscriber ------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float  # monotonic arrival time


class Subscriber:
    """Subscribes to ``topic`` (QoS 1) on every (re)connection and records what arrives.
    ``protocol``: MQTT 5 unless a test's broker speaks only 3.1.1 (tests/rabbit.py)."""

    protocol = mqtt.MQTTv5

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        tls: tuple[Path, Path, Path] | None = None,  # ca, cert, key
    ) -> None:
        self.messages: list[Message] = []
        self.subscriptions = 0  # how many times SUBACK came back: one per (re)connection
        self._lock = threading.Lock()
        self._topic = topic
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=self.protocol)
        if tls:
            ca, cert, key = tls
            self.client.tls_set(str(ca), str(cert), str(key))
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(lambda: self.subscriptions > 0, what=f"subscription to {topic}")

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_subscribe(self, *_: Any) -> None:
        with self._lock:
            self.subscriptions += 1

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
            )

    def on(self, suffix: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith("/" + suffix)]

    def readings(self, suffix: str = "telemetry") -> list[dict[str, Any]]:
        """Every reading of every batch on ``suffix``, in arrival order, duplicates kept."""
        return [r for m in self.on(suffix) for r in decode_batch(m.payload)["readings"]]

    def close(self) -> None:
        self.client.disconnect()  # first: it ends paho's loop at once, loop_stop then joins it
        self.client.loop_stop()


# -- TCP helpers ------------------------------------------------------------------------------


def _connect_level(first: bytes) -> int | None:
    """The protocol level of an MQTT CONNECT at the start of ``first`` (4: 3.1.1, 5: MQTT 5)."""
    if not first or first[0] != 0x10:
        return None
    i = 1
    while i < len(first) and first[i] & 0x80:
        i += 1
    at = i + 1 + 2 + 4  # past remaining length, name length and "MQTT"
    return first[at] if len(first) > at else None


class _Server:
    """A loopback TCP server running ``handle(conn)`` per connection on threads."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def sever(self) -> None:
        """Drop every open connection (a cut cellular session)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.sever()


class Relay(_Server):
    """Forwards to ``127.0.0.1:upstream``. ``paused``: new connections are closed at once.
    ``hold_up``: what clients send is dropped on the way up (packets lost in the network), so
    the broker acknowledges nothing more while what it already has can still reach others.
    ``refuse_mqtt5``: an MQTT 5 CONNECT gets the 3.1.1 "unacceptable protocol" CONNACK, as
    from a 3.1.1-only broker. Records each CONNECT's protocol level and counts bytes."""

    def __init__(self, upstream: int, *, refuse_mqtt5: bool = False) -> None:
        self.upstream = upstream
        self.paused = False
        self.hold_up = False
        self.refuse_mqtt5 = refuse_mqtt5
        self.levels: list[int | None] = []
        self.bytes_up = 0
        self.bytes_down = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        if self.paused:
            return
        first = conn.recv(65536)
        level = _connect_level(first)
        self.levels.append(level)
        if self.refuse_mqtt5 and level == 5:
            conn.sendall(b"\x20\x02\x00\x01")
            return
        with socket.create_connection(("127.0.0.1", self.upstream)) as up:
            with self._lock:
                self._conns.append(up)
            up.sendall(first)
            self.bytes_up += len(first)
            done = threading.Event()
            threading.Thread(target=self._pump, args=(up, conn, False, done), daemon=True).start()
            self._pump(conn, up, True, done)
            done.wait(WAIT)

    def _pump(
        self, src: socket.socket, dst: socket.socket, up: bool, done: threading.Event,
        on_up: Callable[[bytes], None] | None = None,
    ) -> None:
        """Forward ``src`` to ``dst``; ``on_up`` sees each chunk passed up to the broker."""
        try:
            while data := src.recv(65536):
                if up and self.hold_up:
                    continue
                dst.sendall(data)
                if up:
                    self.bytes_up += len(data)
                    if on_up is not None:
                        on_up(data)
                else:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            done.set()


class Kicker(_Server):
    """Accepts an MQTT connection, answers CONNACK (success) and hangs up at once."""

    def handle(self, conn: socket.socket) -> None:
        level = _connect_level(conn.recv(65536))
        conn.sendall(b"\x20\x03\x00\x00\x00" if level == 5 else b"\x20\x02\x00\x00")


# -- for the uplink tests ---------------------------------------------------------------------


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Await ``predicate`` on the test's event loop (the uplink under test runs there too)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def uplink_settings(port: int, **changes: Any) -> UplinkConfig:
    """Fast test settings: plain MQTT on loopback, short backoff, no rate limit to speak of."""
    base = UplinkConfig(
        host="127.0.0.1",
        port=port,
        allow_plain=True,
        keepalive=10,
        client_id="gw-test",
        batch_max_count=20,
        batch_max_bytes=4096,
        batch_max_latency=0.05,
        rate_messages_per_minute=100_000,
        rate_bytes_per_minute=1 << 30,
        reconnect_min=0.05,
        reconnect_max=0.5,
    )
    return dataclasses.replace(base, **changes)


def open_outbox(directory: Path) -> Outbox:
    return Outbox(Store(directory / "simkeeper.db"), max_bytes=64 << 20, max_age=86400.0)


def fill(
    outbox: Outbox, count: int, topics: tuple[str, ...] = ("a", "b", "c"), stream: str = "telemetry"
) -> list[str]:
    """``count`` readings spread over ``topics``; data carries the per-topic sequence number."""
    items = [
        (
            stream,
            topics[i % len(topics)],
            f'{{"n":{i // len(topics)},"v":{i * 0.5}}}',
            1_700_000_000.0 + i,
            0,
        )
        for i in range(count)
    ]
    return outbox.add(items)
