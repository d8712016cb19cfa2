"""The operator's MQTT connection: broker address, TLS files, and a connected paho client.

The fleet tools run on an operator's machine, one command at a time, so they use paho's own
network thread (``loop_start``); the agent's one-loop rule is for the gateway.
"""

from __future__ import annotations

import argparse
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.telemetry.paho import tcp_no_delay

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


class FleetError(Exception):
    """What the fleet command could not do, in one line (exit 1)."""


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "simkeeper"
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    username: str | None = None
    password: str | None = None

    def topic(self, device: str, name: str) -> str:
        return f"{self.prefix}/{device}/{name}"


def parse_broker(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = text, "1883"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", type=parse_broker, default=("127.0.0.1", 1883),
                        metavar="HOST:PORT", help="MQTT broker (default 127.0.0.1:1883)")
    parser.add_argument("--prefix", default="simkeeper", help="topic prefix (default simkeeper)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca", type=Path, help="CA certificate file (PEM); implies --tls")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM); implies --tls")
    parser.add_argument("--client-key", type=Path, help="client certificate's key (PEM)")
    parser.add_argument("--username", default=os.environ.get("SIMKEEPER_MQTT_USER"),
                        help="broker user name (default: $SIMKEEPER_MQTT_USER, else none)")
    parser.add_argument("--password-file", type=Path,
                        help="file holding the broker password (never on the command line)")


def options_from(args: argparse.Namespace) -> BrokerOptions:
    if (args.cert is None) != (args.client_key is None):
        raise FleetError("--cert and --client-key go together")
    password = None
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as exc:
            raise FleetError(f"cannot read {args.password_file}: {exc.strerror}") from None
    host, port = args.broker
    return BrokerOptions(host=host, port=port, prefix=args.prefix,
                         tls=bool(args.tls or args.ca or args.cert), ca=args.ca, cert=args.cert,
                         key=args.client_key, username=args.username, password=password)


def new_client(opts: BrokerOptions, client_id: str = "", *, protocol: MQTTProtocolVersion = V5,
               persistent: bool = False) -> mqtt.Client:
    """A client set up for ``opts`` (not connected: :func:`connect` does that)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                         clean_session=not persistent if protocol == V311 else None)
    if opts.tls:
        for option, path in (("--ca", opts.ca), ("--cert", opts.cert), ("--client-key", opts.key)):
            try:
                if path is not None:
                    path.open("rb").close()
            except OSError as exc:
                raise FleetError(f"{option}: cannot read {path}: {exc.strerror}") from None
        try:
            client.tls_set(ca_certs=str(opts.ca) if opts.ca else None,
                           certfile=str(opts.cert) if opts.cert else None,
                           keyfile=str(opts.key) if opts.key else None,
                           cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise FleetError(f"TLS setup failed: {exc}") from None
    if opts.username:
        client.username_pw_set(opts.username, opts.password)
    client.on_socket_open = lambda _client, _userdata, sock: tcp_no_delay(sock)
    client.reconnect_delay_set(1, 30)
    return client


def connect(opts: BrokerOptions, setup: Callable[[mqtt.Client], None], *, client_id: str = "",
            timeout: float = 10.0, session_expiry: int = 0) -> mqtt.Client:
    """A client for ``opts``, given its callbacks by ``setup``, connected, paho's thread
    running. MQTT 5, or 3.1.1 when the broker closes an MQTT 5 CONNECT without a CONNACK
    (RabbitMQ 3.x); ``client.protocol`` says which. ``session_expiry`` > 0: a persistent
    session (3.1.1: clean session off). FleetError when no CONNACK came."""
    closed = ""
    for protocol in (V5, V311):
        client = new_client(opts, client_id, protocol=protocol, persistent=session_expiry > 0)
        setup(client)
        closed = _start(client, opts, timeout, session_expiry)
        if not closed:
            return client
    raise FleetError(f"broker {opts.host}:{opts.port} closed the connection before CONNACK,"
                     f" to MQTT 5 and to 3.1.1 ({closed})")


def _start(client: mqtt.Client, opts: BrokerOptions, timeout: float, session_expiry: int) -> str:
    """Connect and start paho's thread: "" once the CONNACK came; why, when the connection
    closed before one (the caller may try another version); FleetError otherwise."""
    done = threading.Event()
    failure: list[str] = []
    closed: list[str] = []
    previous, previous_gone = client.on_connect, client.on_disconnect

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            failure.append(str(reason))
        if previous is not None:
            previous(c, userdata, flags, reason, props)  # type: ignore[call-arg]
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not done.is_set():
            closed.append(str(reason))
            done.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    properties = None
    if client.protocol == V5 and session_expiry:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
    try:
        client.connect(opts.host, opts.port, keepalive=30,
                       clean_start=not session_expiry if client.protocol == V5
                       else mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=properties)
    except (OSError, ssl.SSLError) as exc:
        raise FleetError(f"cannot reach broker {opts.host}:{opts.port}: {exc}") from None
    client.loop_start()
    if not done.wait(timeout) or failure or closed:
        client.loop_stop()
        client.disconnect()
        if closed:
            return closed[0]
        why = failure[0] if failure else f"no CONNACK within {timeout:g} s"
        raise FleetError(f"broker {opts.host}:{opts.port} refused the connection: {why}")
    client.on_connect, client.on_disconnect = previous, previous_gone
    return ""


def stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
