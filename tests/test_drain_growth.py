"""Batches grow past batch_max_count while the message rate holds them back, and only then."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.telemetry.batch import decode_batch
from agent.telemetry.mqtt import MqttUplink
from tests.broker import Broker, Subscriber, fill, open_outbox, until, uplink_settings

MAX_COUNT = 20
MAX_BYTES = 4096


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, "simkeeper/gw-test/telemetry")
    yield s
    s.close()


@pytest.mark.parametrize("messages_per_minute", [60, 100_000])
async def test_batch_count_binds_only_while_the_message_rate_does_not(
    broker: Broker, sub: Subscriber, tmp_path: Path, messages_per_minute: int
) -> None:
    """60 a minute: after the one-message burst every batch waits about a second for its turn,
    so it is filled to the bytes (up to batch_max_bytes), far past the count. 100,000 a minute:
    a burst of 1,666 messages, never waited for here, so the count caps every batch."""
    outbox = open_outbox(tmp_path)
    ids = fill(outbox, 600)  # a backlog: all there before the uplink starts
    settings = uplink_settings(
        broker.port,
        batch_max_count=MAX_COUNT,
        batch_max_bytes=MAX_BYTES,
        rate_messages_per_minute=messages_per_minute,
    )
    uplink = MqttUplink(settings, "gw-test", outbox)
    await uplink.start()
    try:
        await until(lambda: len(sub.readings()) >= len(ids), "the backlog at the subscriber")
    finally:
        await uplink.stop()
    assert [r["id"] for r in sub.readings()] == ids  # once each, in order
    payloads = [m.payload for m in sub.on("telemetry")]
    sizes = [len(decode_batch(p)["readings"]) for p in payloads]
    assert all(len(p) <= MAX_BYTES for p in payloads)
    if messages_per_minute == 60:
        assert max(sizes) > MAX_COUNT
        assert len(payloads) < len(ids) / MAX_COUNT
    else:
        assert sizes == [MAX_COUNT] * (len(ids) // MAX_COUNT)
