"""``fleet flux-bridge``: the fleet's telemetry, from MQTT to a SORACOM Flux incoming webhook.

- Subscribes ``$share/<group>/<prefix>/+/telemetry`` (an MQTT 5 shared subscription: several
  bridges in the same group split the load) at QoS 1, with a persistent session
  (``clean_start`` off, a session expiry), so a restarted bridge gets back what it had not
  acknowledged. With an empty group, one bridge subscribes to the plain topic: the way on a
  broker that speaks only MQTT 3.1.1 (RabbitMQ 3.x, whose MQTT plugin keeps the persistent
  session in a durable queue); a group there is refused at once, saying so.
- Decodes each batch with agent.telemetry.batch (zlib or JSON) and POSTs it as JSON, one batch per
  request, one at a time in arrival order.
- Acknowledges the MQTT message (paho manual ack) only after a 2xx; anything else is retried
  with exponential backoff and full jitter, for as long as it takes. An undecodable payload
  is logged and acknowledged (it would otherwise block the stream for ever).

The broker must keep enough messages for a long webhook outage (mosquitto:
``max_queued_messages``, ``max_inflight_messages``); beyond that the broker, not the bridge,
drops them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from agent.core.backoff import Backoff
from agent.fleet import mqtt as fleet_mqtt
from agent.fleet.mqtt import BrokerOptions, FleetError
from agent.telemetry.batch import BatchError, decode_batch

log = logging.getLogger(__name__)

GROUP = "simkeeper-bridge"
SESSION_EXPIRY = 7 * 86400


@dataclass
class BridgeStats:
    posted: int = 0  # batches acknowledged after a 2xx
    readings: int = 0
    failures: int = 0  # POST attempts that failed
    dropped: int = 0  # payloads that were not batches
    last_error: str | None = None


@dataclass(frozen=True)
class _Item:
    mid: int
    qos: int
    topic: str
    payload: bytes


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST ``body``; the HTTP status (0 when no answer came)."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return 0


@dataclass
class FluxBridge:
    opts: BrokerOptions
    webhook: str
    client_id: str = "simkeeper-flux-bridge"
    group: str = GROUP
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 60.0))
    post: Callable[[str, bytes, Mapping[str, str], float], int] = post_json
    stats: BridgeStats = field(default_factory=BridgeStats)

    def __post_init__(self) -> None:
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._stop = threading.Event()
        self.subscribed = threading.Event()  # set on each SUBACK

    def _attach(self, client: mqtt.Client) -> None:
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a: self.subscribed.set()

    @property
    def topic(self) -> str:
        telemetry = f"{self.opts.prefix}/+/telemetry"
        return f"$share/{self.group}/{telemetry}" if self.group else telemetry

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(self.topic, qos=1)  # again on every connection

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Item(msg.mid, msg.qos, msg.topic, bytes(msg.payload)))

    def run(self, until: threading.Event | None = None) -> None:
        """Bridge until ``until`` is set (or KeyboardInterrupt)."""
        self._stop = until or self._stop
        client = fleet_mqtt.connect(self.opts, self._attach, client_id=self.client_id,
                                    session_expiry=SESSION_EXPIRY)
        if client.protocol == mqtt.MQTTv311 and self.group:
            fleet_mqtt.stop(client)
            raise FleetError(
                f"broker {self.opts.host}:{self.opts.port} speaks only MQTT 3.1.1: no shared"
                f" subscriptions, which --group {self.group} needs to share the telemetry among"
                " bridges; run one bridge with --group '' (its persistent session keeps the"
                " telemetry while it is away)")
        self._client = client
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if self._deliver(item):
                    self._client.ack(item.mid, item.qos)
        finally:
            fleet_mqtt.stop(self._client)

    def _deliver(self, item: _Item) -> bool:
        """POST until a 2xx; False when stopped first (the message stays unacknowledged)."""
        try:
            batch = decode_batch(item.payload)
        except BatchError as exc:
            log.error("%s: not a batch, dropped: %s", item.topic, exc)
            self.stats.dropped += 1
            return True
        body = json.dumps(batch, separators=(",", ":"), ensure_ascii=False).encode()
        while not self._stop.is_set():
            status = self.post(self.webhook, body, self.headers, self.timeout)
            if 200 <= status < 300:
                self.backoff.reset()
                self.stats.posted += 1
                self.stats.readings += len(batch["readings"])
                return True
            self.stats.failures += 1
            self.stats.last_error = f"HTTP {status}" if status else "no answer"
            delay = self.backoff.next_delay()
            log.warning("webhook %s for batch %s; retrying in %.1f s", self.stats.last_error,
                        batch["batch_id"], delay)
            self._stop.wait(delay)
        return False
