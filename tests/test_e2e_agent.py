"""The whole path with real parts: apps -> ingest -> outbox -> MQTT uplink -> mosquitto, with
the daemon as a process, the simulated modem on a pty, and the agent SIGKILLed mid-stream."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from tests.broker import Broker, Relay, Subscriber, decode_batch, until
from tests.test_daemon import DEVICE, running
from tests.test_status import until_async

TOPICS = ("sensors/a", "sensors/b", "sensors/c")
WINDOW = 4  # batches the uplink has in flight at most


def readings(start: int, count: int) -> list[dict[str, Any]]:
    return [
        {"topic": TOPICS[i % len(TOPICS)], "data": {"n": i}} for i in range(start, start + count)
    ]


def first_arrivals(sub: Subscriber) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in sub.readings():
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


def assert_in_order_per_topic(arrived: list[dict[str, Any]]) -> None:
    for topic in TOPICS:
        ns = [r["data"]["n"] for r in arrived if r["topic"] == topic]
        assert ns == sorted(ns), f"{topic} out of order"


async def test_published_readings_arrive_once_each_in_order(
    tmp_path: Path, broker: Broker
) -> None:
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/#")
    try:
        async with running(tmp_path, broker) as (agent, _sim):
            done = await agent.cli("publish", "sensors/cli", '{"via": "simkeeper publish"}')
            assert done.returncode == 0, done.stderr
            cli_id = done.stdout.strip()
            ids = [cli_id]
            for start in range(0, 300, 50):
                ids += await agent.publish(readings(start, 50))
            await until(lambda: set(ids) <= {r["id"] for r in sub.readings()}, "every reading")
            assert await agent.stop() == 0
    finally:
        sub.close()
    apps = [r for r in sub.readings() if r["topic"] != "agent/health"]
    assert Counter(r["id"] for r in apps) == Counter(ids)  # once each, nothing else
    assert_in_order_per_topic(apps)
    assert next(r for r in apps if r["id"] == cli_id)["data"] == {"via": "simkeeper publish"}


async def test_sigkill_mid_stream_loses_no_acknowledged_reading(
    tmp_path: Path, broker: Broker
) -> None:
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    relay = Relay(broker.port)
    relay.paused = True  # the link down: readings pile up in the outbox
    acked: list[str] = []
    try:
        # 300 batches a minute, each held back so it fills to batch_max_bytes (512 B, compressed:
        # some 50 readings): the backlog of 1000 takes seconds to drain, so the kill lands in it.
        async with running(tmp_path, relay, rate=300, batch_bytes=512) as (agent, _sim):
            acked += await agent.publish(readings(0, 1000))
            assert not sub.readings(), "the link was down"
            relay.paused = False
            await until(lambda: len(sub.readings()) > 100, "the drain under way")
            await agent.stop(signal.SIGKILL)
            assert len(sub.readings()) < len(acked), "killed too late: the drain was over"
            await agent.start()  # same database, same socket
            acked += await agent.publish(readings(1000, 100))
            await until(lambda: set(acked) <= {r["id"] for r in sub.readings()}, "every reading")
            assert await agent.stop() == 0
    finally:
        sub.close()
        relay.close()
    apps = [r for r in sub.readings() if r["topic"] != "agent/health"]
    counts = Counter(r["id"] for r in apps)
    assert set(acked) <= set(counts)  # 0 acknowledged readings lost
    duplicates = sum(n - 1 for n in counts.values())
    # Held back by the message rate, batches grow past batch_max_count: the window's readings
    # are what the largest batches seen carried.
    largest = max(len(decode_batch(m.payload)["readings"]) for m in sub.on("telemetry"))
    assert duplicates <= WINDOW * largest, f"{duplicates} duplicates: more than a window"
    assert_in_order_per_topic(first_arrivals(sub))


async def test_health_readings_arrive_with_the_modem(tmp_path: Path, broker: Broker) -> None:
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    try:
        async with running(tmp_path, broker) as (_agent, sim):

            def modem_health() -> list[dict[str, Any]]:
                return [
                    r["data"] for r in sub.readings()
                    if r["topic"] == "agent/health" and r["data"]["modems"][0]["state"] == "ready"
                ]

            await until(lambda: bool(modem_health()), "a health reading with the modem up")
    finally:
        sub.close()
    health = modem_health()[0]
    modem = health["modems"][0]
    assert modem["registration"]["state"] == "roaming"
    assert modem["registration"]["cell_id"] is not None
    assert modem["operator"]["mcc_mnc"] == "44010"
    assert modem["signal"]["rssi_dbm"] == sim.state.signal.rssi_dbm
    assert set(health["outbox"]) == {"count", "bytes"}
    assert isinstance(health["drops"], dict)


async def test_modem_port_vanishing_and_coming_back(tmp_path: Path, broker: Broker) -> None:
    async with running(tmp_path, broker) as (agent, sim):

        async def modem(state: str, reopens: int) -> bool:
            m = (await agent.status())["modems"][0]
            return bool(m["state"] == state and m["reopens"] >= reopens)

        await until_async(lambda: modem("ready", 0), "modem ready")
        sim.vanish(reappear_after=1.0)
        await until_async(lambda: modem("lost", 1), "modem lost")
        await until_async(lambda: modem("ready", 1), "modem back")
        status = await agent.status()
        assert status["modems"][0]["modem"]["imei"] == sim.personality.imei
        assert status["running"] is True
        assert "Traceback" not in agent.log.read_text()
        json.dumps(status)  # still one JSON object
