"""flux-bridge against a local HTTP server that fails and recovers: every reading posted, and a
bridge stopped mid-outage loses nothing (its unacknowledged messages come back to the next)."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.core.backoff import Backoff
from agent.fleet.flux_bridge import FluxBridge
from agent.fleet.mqtt import BrokerOptions
from agent.telemetry.batch import encode_entries
from tests.broker import Broker, wait_until
from tests.webhook import Webhook


def publish_batches(port: int, devices: int, batches: int, per_batch: int) -> set[str]:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    ids: set[str] = set()
    for d in range(devices):
        for b in range(batches):
            rids = [f"gw{d}-{b}-{i}" for i in range(per_batch)]
            entries = [json.dumps({"id": r, "ts": 1.0, "topic": "t", "data": {"v": i}})
                       for i, r in enumerate(rids)]
            batch = encode_entries(f"gw-{d}", rids, entries, compress=b % 2 == 0)
            pub.publish(f"simkeeper/gw-{d}/telemetry", batch.payload, qos=1).wait_for_publish(5)
            ids.update(rids)
    pub.publish("simkeeper/gw-0/telemetry", b"not a batch", qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    return ids


def start_bridge(port: int, url: str) -> tuple[FluxBridge, threading.Event, threading.Thread]:
    bridge = FluxBridge(BrokerOptions(port=port), url, client_id="bridge-test",
                        backoff=Backoff(0.01, 0.05))
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    assert bridge.subscribed.wait(10.0), "bridge subscribed"
    return bridge, stop, thread


def test_nothing_lost_through_an_outage_and_a_bridge_restart(broker: Broker,
                                                             webhook: Webhook) -> None:
    first, stop, thread = start_bridge(broker.port, webhook.url)
    ids = publish_batches(broker.port, devices=3, batches=10, per_batch=5)
    wait_until(lambda: webhook.refused >= 5, 10.0, "webhook failing")
    stop.set()  # stopped mid-outage: the batch in hand was never acknowledged
    thread.join(10)
    assert first.stats.posted == 0 and first.stats.failures >= 5
    second, stop2, thread2 = start_bridge(broker.port, webhook.url)
    wait_until(lambda: second.stats.failures > 0, 10.0, "redelivered to the new bridge")
    webhook.failing = False  # recovers
    wait_until(lambda: webhook.reading_ids() >= ids, 20.0, "every reading posted")
    # Published last, the payload that is no batch may still be on its way when the last
    # reading is posted.
    wait_until(lambda: second.stats.dropped >= 1, 10.0, "the payload that is no batch dropped")
    stop2.set()
    thread2.join(10)
    assert webhook.reading_ids() == ids
    assert second.stats.dropped == 1 and second.stats.readings >= len(ids)
