"""Uplink figures: drain rate of a filled outbox to a local mosquitto, and bytes on the wire
per reading (MQTT and TCP payload both ways, counted by a relay) batched with and without
compression, next to one message per reading. Measurements only; nothing is asserted."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from agent.fleet.localbroker import find_mosquitto
from agent.telemetry.mqtt import MqttUplink
from tests.broker import Broker, Relay, fill, open_outbox, until, uplink_settings

READINGS = 5000
# A typical sensor reading's data, as apps send it (about 60 bytes of JSON).
TOPICS = ("sensors/room1", "sensors/room2", "power/main")


async def _drain(broker: Broker, directory: Path, *, compress: bool, count: int) -> str:
    relay = Relay(broker.port)
    outbox = open_outbox(directory)
    ids = fill(outbox, READINGS, TOPICS)
    payload = sum(r.size for r in outbox.next_batch("telemetry", READINGS, 1 << 30))
    settings = uplink_settings(
        relay.port,
        batch_max_count=count,
        batch_max_bytes=16384,
        rate_messages_per_minute=10_000_000,
        rate_bytes_per_minute=1 << 40,
    )
    uplink = MqttUplink(settings, "gw-bench", outbox, compress=compress, window=8)
    started = time.perf_counter()
    await uplink.start()
    try:
        await until(lambda: outbox.depth() == (0, 0), "the drain", timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        await uplink.stop()
        relay.close()
    stats = uplink.stats
    wire = relay.bytes_up + relay.bytes_down
    return (
        f"{'batched' if count > 1 else 'one per reading':>15} {'zlib' if compress else 'json':>4}"
        f" | {len(ids) / elapsed:9.0f} readings/s {stats.batches / elapsed:8.1f} batches/s"
        f" | payload {payload / len(ids):6.1f} B/reading, MQTT+TCP payload"
        f" {wire / len(ids):6.1f} B/reading ({wire / payload:4.2f}x)"
    )


async def _run(binary: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(binary, Path(tmp))
        broker.start()
        try:
            for i, (compress, count) in enumerate([(True, 100), (False, 100), (False, 1)]):
                directory = Path(tmp) / str(i)
                directory.mkdir()
                print(await _drain(broker, directory, compress=compress, count=count), flush=True)
        finally:
            broker.kill()


def main() -> None:
    binary = find_mosquitto()
    if binary is None:
        print("skipped: mosquitto is not installed (make deps installs it)")
        return
    print(f"{READINGS} readings, local mosquitto, rate limits off, window 8")
    asyncio.run(_run(binary))
