"""Fleet figures: N device instances in ONE process against one local mosquitto.

Each instance is what the daemon wires: its own store (journal), CommandProcessor and
MqttUplink (paho driven by the one asyncio loop), ``on_command`` -> ``processor.handle`` ->
``publish_result``. No global state is shared between instances. An operator client signs
commands and measures the round trip to the matching ``cmd/result``:

- sequential: one command in flight at a time (latency without load);
- burst: one command to every device at once (fan-out latency, broker messages per second,
  counting each command and result once in and once out).

Stores live on /dev/shm when it exists (the journal's fsync is not what is measured). Printed,
never asserted.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands import CommandProcessor, mqtt_callback
from agent.fleet.mqtt import BrokerOptions, new_client
from agent.fleet.sign import encode, make_envelope
from agent.outbox import Outbox
from agent.store import Store
from agent.trusted_time import TrustedNow
from agent.uplink import MqttUplink
from tests.broker import Broker, mosquitto_path, uplink_settings

SIZES = (100, 1000)
SEQUENTIAL = 100
BUDGET = 60.0  # seconds per size, roughly


class _Clock:
    def now(self) -> TrustedNow:
        t = time.time()
        return TrustedNow(t, "ntp", t)


class Instance:
    """One device: store, processor, uplink."""

    def __init__(self, port: int, directory: Path, device_id: str, pem: bytes) -> None:
        self.store = Store(directory / "simkeeper.db")
        self.outbox = Outbox(self.store, max_bytes=64 << 20, max_age=86400.0)
        handlers: dict[str, Any] = {"get-state": lambda _a: {"state": "active"},
                                    "resume": lambda _a: "resumed"}
        self.processor = CommandProcessor(self.store, device_id, [pem], _Clock(),
                                          handlers)
        settings = uplink_settings(port, client_id=device_id, keepalive=60)
        publish = lambda result: self.uplink.publish_result(result)  # noqa: E731, PLW0108 - late
        self.uplink = MqttUplink(settings, device_id, self.outbox,
                                 on_command=mqtt_callback(self.processor, publish))


class Operator:
    """Signs, publishes, and timestamps each result (paho's own thread)."""

    def __init__(self, port: int, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.sent: dict[str, float] = {}
        self.rtt: dict[str, float] = {}
        self.cond = threading.Condition()
        self.client = new_client(BrokerOptions(port=port))  # TCP_NODELAY, as `fleet send`
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("simkeeper/+/cmd/result", qos=1)
        subscribed.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        cid = json.loads(msg.payload).get("id")
        with self.cond:
            if cid in self.sent and cid not in self.rtt:
                self.rtt[cid] = now - self.sent[cid]
                self.cond.notify_all()

    def send(self, devices: list[str]) -> list[str]:
        envs = [make_envelope(self.key, d, "get-state") for d in devices]
        payloads = [(f"simkeeper/{e['device_id']}/cmd", encode(e), e["id"]) for e in envs]
        for topic, payload, cid in payloads:
            with self.cond:
                self.sent[cid] = time.perf_counter()
            self.client.publish(topic, payload, qos=1)
        return [cid for _t, _p, cid in payloads]

    def wait(self, ids: list[str], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.rtt for i in ids):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _pct(values: list[float]) -> str:
    if not values:
        return "no samples"
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return (f"p50 {q[49] * 1000:.1f} ms  p90 {q[89] * 1000:.1f} ms  p99 {q[98] * 1000:.1f} ms"
            f"  max {max(values) * 1000:.1f} ms")


async def _run(n: int, binary: str, root: Path) -> None:
    broker = Broker(binary, root)
    # mosquitto's default leaves Nagle on: each hop then waits for a delayed ACK (~40 ms).
    broker.config.write_text(broker.config.read_text() + "set_tcp_nodelay true\n")
    broker.start()
    key = Ed25519PrivateKey.generate()
    from provisioning.keys import public_pem

    pem = public_pem(key.public_key())
    names = [f"gw-{i:04d}" for i in range(n)]
    # before the devices: paho's own thread uses select(), which cannot watch an fd >= 1024
    operator = await asyncio.to_thread(Operator, broker.port, key)
    started = time.perf_counter()
    instances = [Instance(broker.port, root / name, name, pem) for name in names]
    await asyncio.gather(*(i.uplink.start() for i in instances))
    await asyncio.wait_for(asyncio.gather(*(i.uplink.wait_ready() for i in instances)), BUDGET)
    connected = time.perf_counter() - started
    try:
        rng = random.Random(1)
        for _ in range(SEQUENTIAL):
            ids = operator.send([rng.choice(names)])
            await asyncio.to_thread(operator.wait, ids, 10)
        seq = [operator.rtt[i] for i in list(operator.rtt)[-SEQUENTIAL:]]
        t0 = time.perf_counter()
        ids = operator.send(names)
        ok = await asyncio.to_thread(operator.wait, ids, BUDGET)
        elapsed = time.perf_counter() - t0
        burst = [operator.rtt[i] for i in ids if i in operator.rtt]
        executed = sum(i.processor.executed for i in instances)
        print(f"N={n}: {n} instances connected in {connected:.1f} s;"
              f" {executed} commands executed")
        print(f"  sequential round trip ({SEQUENTIAL}): {_pct(seq)}")
        print(f"  burst of {n}: {'all' if ok else len(burst)} answered in {elapsed:.2f} s;"
              f" {_pct(burst)}")
        print(f"  broker: {4 * len(burst) / elapsed:,.0f} msgs/s in+out during the burst"
              f" ({len(burst) / elapsed:,.0f} commands/s)", flush=True)
    finally:
        await asyncio.to_thread(operator.close)
        await asyncio.gather(*(i.uplink.stop(timeout=1.0) for i in instances),
                             return_exceptions=True)
        for i in instances:
            i.store.close()
        broker.kill()


def main() -> None:
    binary = mosquitto_path()
    if binary is None:
        print("skipped: mosquitto is not installed (make deps installs it)")
        return
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    for n in SIZES:
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            t0 = time.perf_counter()
            asyncio.run(_run(n, binary, Path(tmp)))
            print(f"  (N={n} took {time.perf_counter() - t0:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
