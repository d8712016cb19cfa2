"""The uplink's paho client: which MQTT version the broker speaks, and the client for it.

``default`` starts with MQTT 5 and learns when the broker does not speak it. Brokers say so in
two ways: a CONNACK "unsupported protocol version" (mosquitto with a 3.1-only listener), or by
closing the connection without a CONNACK (RabbitMQ 3.x's MQTT plugin). A close can also be a
network's doing, so after one the next attempt tries 3.1.1, and only a CONNACK to that 3.1.1
attempt settles it: the broker speaks 3.1.1, and the uplink stays with it (logged, and shown
in ``status``). A 3.1.1 attempt closed in turn goes back to MQTT 5. A close with a TLS reason
(agent.telemetry.tls) is about the certificate, never the version. ``beam`` speaks 3.1.1.

A persistent session: MQTT 5 with ``clean_start`` off and a session expiry; 3.1.1 with clean
session off under the same client id.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.telemetry.drain import UplinkSettings
from agent.telemetry.tls import client_context, credentials, explain

log = logging.getLogger("agent.telemetry.mqtt")

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
CONNECT_TIMEOUT = 30.0  # TCP + TLS on a slow cellular link
# "Unsupported Protocol Version": 0x84 in MQTT 5, 1 in a 3.1.1 CONNACK.
_BAD_PROTOCOL = (0x84, 1)


class Dialect:
    """The MQTT version to speak next, and what the broker is known to speak."""

    def __init__(self, profile: str) -> None:
        self.version = V311 if profile == "beam" else V5
        self.settled = profile == "beam"  # True once a CONNACK came to a fallback
        self._trying = False  # this attempt is a 3.1.1 try after a close

    @property
    def name(self) -> str:
        return "3.1.1" if self.version is V311 else "5"

    def connected(self) -> None:
        if self._trying:
            self._trying, self.settled = False, True
            log.warning("MQTT: the broker speaks 3.1.1 only (it closed an MQTT 5 CONNECT "
                        "without an answer); the uplink stays with 3.1.1")

    def refused(self, reason: ReasonCode) -> bool:
        """A CONNACK refusal; True when the next attempt speaks another version."""
        if reason.value in _BAD_PROTOCOL and self.version is V5:
            log.info("broker refuses MQTT 5; falling back to 3.1.1")
            self.version, self.settled = V311, True
            return True
        return False

    def closed(self, why: str) -> bool:
        """Closed before any CONNACK; True when the next attempt speaks another version."""
        if self.settled or explain(why) is not None:
            return False
        self._trying = self.version is V5
        self.version = V311 if self._trying else V5
        return True


def new_client(settings: UplinkSettings, client_id: str, version: MQTTProtocolVersion, *,
               persistent: bool, will: str, errors: logging.Logger) -> mqtt.Client:
    """A client for one protocol version (not connected); paho's errors go to ``errors``."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent if version is V311 else None,
        protocol=version,
        reconnect_on_failure=False,  # no blocking reconnect inside paho; the uplink backs off
    )
    client.connect_timeout = CONNECT_TIMEOUT
    client.will_set(will, b"offline", qos=1, retain=True)
    client.enable_logger(errors)
    if settings.tls:
        client.tls_set_context(client_context(settings))
    return client


def connect(client: mqtt.Client, settings: UplinkSettings, *, persistent: bool) -> None:
    """paho's blocking connect (TCP, TLS, CONNECT sent): for the connect thread."""
    username, password = credentials(settings)
    if username:
        client.username_pw_set(username, password)
    if client.protocol == V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if persistent:
            properties.SessionExpiryInterval = settings.session_expiry
        client.connect(settings.host, settings.port, settings.keepalive,
                       clean_start=not persistent, properties=properties)
    else:
        client.connect(settings.host, settings.port, settings.keepalive)


class LastError(logging.Handler):
    """Keeps the last error paho logs, on a logger of its own (paho formats nothing below
    ERROR for it, and nothing of it reaches the agent's log): a TLS alert's reason is there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None
        self.logger = logging.Logger("paho", logging.ERROR)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()
