"""Uplink figures: drain rate of a filled outbox to a local mosquitto, and bytes on the wire
per reading (MQTT and TCP payload both ways, counted by a relay) batched with and without
compression, next to one message per reading; then the share of the byte budget a backlog uses
at the default pacing (rate limits and batch settings of agent.core.config). Measurements only;
nothing is asserted.

``BENCH_BUDGET_SECONDS`` sets how long the budget is watched (default 30 s).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import paho.mqtt.client as mqtt

from agent.core.config import UplinkConfig
from agent.fleet.localbroker import find_mosquitto
from agent.telemetry.mqtt import MqttUplink
from tests.broker import Broker, Relay, fill, open_outbox, until, uplink_settings

READINGS = 5000
# A typical sensor reading's data, as apps send it (about 60 bytes of JSON).
TOPICS = ("sensors/room1", "sensors/room2", "power/main")
PACING = ("batch_max_count", "batch_max_bytes", "batch_max_latency", "rate_messages_per_minute",
          "rate_bytes_per_minute")
BUDGET_GOAL = 0.9
BACKLOG = 60_000  # more than the default budget drains in the time watched


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


async def _budget(broker: Broker, directory: Path, seconds: float) -> str:
    """A backlog drained at the default pacing for ``seconds``: the bytes handed to paho (every
    publish, as the byte limiter charges them) against the most the limiter lets through over
    the same time, its burst (a full bucket) included."""
    defaults = UplinkConfig()
    outbox = open_outbox(directory)
    fill(outbox, BACKLOG, TOPICS)
    settings = uplink_settings(broker.port, **{k: getattr(defaults, k) for k in PACING})
    sent: list[tuple[float, int]] = []
    publish = mqtt.Client.publish

    def timed(client: mqtt.Client, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> Any:
        sent.append((time.monotonic(), len(payload)))
        return publish(client, topic, payload, *args, **kwargs)

    uplink = MqttUplink(settings, "gw-bench", outbox)
    with mock.patch.object(mqtt.Client, "publish", timed):
        await uplink.start()
        try:
            await until(lambda: bool(sent), "the first publish")
            await asyncio.sleep(seconds)  # the time watched: a measurement, nothing waits on it
            watched = len(sent)  # not the "offline" of stop()
        finally:
            await uplink.stop()
    del sent[watched:]
    elapsed = sent[-1][0] - sent[0][0]
    per_second = defaults.rate_bytes_per_minute / 60
    allowed = max(defaults.batch_max_bytes, per_second) + per_second * elapsed
    share = sum(n for _, n in sent) / allowed
    stats = uplink.stats
    left = "" if outbox.depth()[0] else " (the backlog ran out: watch for less time)"
    pacing = ", ".join(f"{k} {getattr(defaults, k):,}" for k in PACING)
    return (
        f"backlog at the default pacing ({pacing}):"
        f"\n  {share:.0%} of the byte budget used over {elapsed:.0f} s (goal >= {BUDGET_GOAL:.0%}),"
        f" {stats.readings / elapsed:,.0f} readings/s in {stats.batches} batches"
        f" of {stats.readings / max(1, stats.batches):,.0f} readings on average{left}"
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
            directory = Path(tmp) / "budget"
            directory.mkdir()
            seconds = float(os.environ.get("BENCH_BUDGET_SECONDS", "30"))
            print(await _budget(broker, directory, seconds), flush=True)
        finally:
            broker.kill()


def main() -> None:
    binary = find_mosquitto()
    if binary is None:
        print("skipped: mosquitto is not installed (make deps installs it)")
        return
    print(f"{READINGS} readings, local mosquitto, rate limits off, window 8")
    asyncio.run(_run(binary))
