"""The MQTT uplink against a real mosquitto: delivery, ordering, outages, state, gates, pacing."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.telemetry.batch import ZLIB_MAGIC, decode_batch
from agent.telemetry.mqtt import MqttUplink
from agent.telemetry.outbox import Outbox, Reading
from tests.broker import (
    Broker,
    Relay,
    Subscriber,
    fill,
    open_outbox,
    until,
    uplink_settings,
)

TOPICS = "simkeeper/gw-test/#"


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return open_outbox(tmp_path)


@pytest.fixture
def sub(broker: Broker) -> Iterator[Subscriber]:
    s = Subscriber(broker.port, TOPICS)
    yield s
    s.close()


@pytest.fixture
async def running() -> AsyncIterator[list[MqttUplink]]:
    """Uplinks a test starts; stopped at the end even when the test fails."""
    started: list[MqttUplink] = []
    yield started
    for uplink in started:
        await uplink.stop()


async def start(running: list[MqttUplink], uplink: MqttUplink) -> MqttUplink:
    await uplink.start()
    running.append(uplink)
    return uplink


_flushes = itertools.count()


async def flushed(uplink: MqttUplink, sub: Subscriber) -> None:
    """Wait until all that ``uplink`` published so far has reached ``sub``: a ``state`` marker
    published after it, on the same connection, has (the broker passes one client's messages
    on in order). Then "nothing more arrived" means nothing more was sent."""
    mark = f"flush-{next(_flushes)}"
    uplink.publish_state({"flush": mark})
    await until(
        lambda: any(json.loads(m.payload).get("flush") == mark for m in sub.on("state")),
        "the flush marker",
    )


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """An MQTT variable byte integer at ``data[at:]``: (value, end), or None if cut short."""
    value, shift = 0, 0
    while at < len(data):
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
    return None


class CountingRelay(Relay):
    """A :class:`Relay` that knows which readings reached the broker: it decodes every whole
    PUBLISH on ``telemetry`` that it passes up (what ``hold_up`` drops never counts)."""

    def __init__(self, upstream: int) -> None:
        self._lock = threading.Lock()
        self._forwarded: set[str] = set()
        super().__init__(upstream)

    def forwarded(self) -> set[str]:
        with self._lock:
            return set(self._forwarded)

    def _pump(
        self, src: socket.socket, dst: socket.socket, up: bool, done: threading.Event,
        on_up: Callable[[bytes], None] | None = None,
    ) -> None:
        if not up:
            super()._pump(src, dst, up, done)
            return
        mqtt5 = self.levels[-1] == 5  # this connection's CONNECT, recorded by handle()
        buffer = b""

        def count(data: bytes) -> None:
            nonlocal buffer
            buffer = self._count(buffer + data, mqtt5)

        super()._pump(src, dst, up, done, on_up=count)

    def _count(self, buffer: bytes, mqtt5: bool) -> bytes:
        """Count the readings of each whole packet in ``buffer``; returns the unfinished rest."""
        while (header := _varint(buffer, 1)) is not None and len(buffer) >= sum(header):
            length, start = header
            end = start + length
            first, body, buffer = buffer[0], buffer[start:end], buffer[end:]
            if first >> 4 != 3:  # not a PUBLISH
                continue
            topic_end = 2 + int.from_bytes(body[:2], "big")
            at = topic_end + (2 if (first >> 1) & 3 else 0)  # the packet id of QoS 1 and 2
            if mqtt5:
                properties = _varint(body, at)
                assert properties is not None
                at = sum(properties)
            if body[2:topic_end].endswith(b"/telemetry"):
                ids = {r["id"] for r in decode_batch(body[at:])["readings"]}
                with self._lock:
                    self._forwarded |= ids
        return buffer


def per_topic_order_ok(readings: list[dict[str, Any]]) -> bool:
    last: dict[str, int] = {}
    for r in readings:
        n = r["data"]["n"]
        if n < last.get(r["topic"], -1):
            return False
        last[r["topic"]] = n
    return True


async def test_readings_arrive_once_each_in_order(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    ids = fill(outbox, 500)
    uplink = await start(running, MqttUplink(uplink_settings(broker.port), "gw-test", outbox))
    await until(lambda: outbox.depth() == (0, 0), "the outbox to drain")
    await until(lambda: len(sub.readings()) >= len(ids), "every reading at the subscriber")
    await flushed(uplink, sub)  # a duplicate sent late would be here now
    got = sub.readings()
    assert [r["id"] for r in got] == ids  # once each, and in outbox order
    assert per_topic_order_ok(got)
    assert all(isinstance(r["data"], dict) for r in got)  # embedded JSON, not a string
    assert uplink.stats.readings == len(ids)
    assert {decode_batch(m.payload)["device_id"] for m in sub.on("telemetry")} == {"gw-test"}


async def test_broker_killed_repeatedly_mid_stream_loses_nothing(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    relay = CountingRelay(broker.port)  # held closed while the subscriber resubscribes
    settings = uplink_settings(relay.port, batch_max_count=10, rate_messages_per_minute=6000)
    uplink = await start(running, MqttUplink(settings, "gw-test", outbox, window=4))
    ids: list[str] = []
    kills = 4

    def broker_has_passed_everything_on() -> bool:
        return relay.forwarded() <= {r["id"] for r in sub.readings()}

    try:
        for _ in range(kills):
            ids += fill(outbox, 300)
            await until(lambda: outbox.depth()[0] < 200, "part of the backlog to go")
            # The broker has no persistence: what it acknowledged but had not yet passed on
            # would die with it, a loss of the test's cloud, not of the agent. So cut what the
            # uplink sends, let all that the broker got reach the subscriber (not only what it
            # acknowledged so far: a PUBACK still on its way would count later) while the
            # batches in flight stay unacknowledged, then kill it.
            relay.hold_up = True
            await until(broker_has_passed_everything_on, "what the broker got, at the subscriber")
            relay.paused = True
            seen = sub.subscriptions
            broker.kill()  # SIGKILL: in-flight batches never get their PUBACK
            broker.start()

            def resubscribed(before: int = seen) -> bool:
                return sub.subscriptions > before

            await until(resubscribed, "the subscriber to come back")
            relay.paused = relay.hold_up = False
        await until(lambda: outbox.depth() == (0, 0), "the outbox to drain")
        await until(lambda: {r["id"] for r in sub.readings()} >= set(ids), "every reading")
        await flushed(uplink, sub)  # every duplicate sent is counted below
    finally:
        relay.close()
    got = [r["id"] for r in sub.readings()]
    assert set(got) == set(ids)  # nothing lost
    assert relay.forwarded() == set(ids)  # and the relay's count, waited on above, is sound
    dupes = sum(n - 1 for n in Counter(got).values())
    # Only batches in flight at a kill come twice: at most window x batch size per kill.
    assert dupes <= kills * 4 * 10
    assert uplink.connect_attempts > kills


async def test_retained_state_online_and_offline_on_stop(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    uplink = MqttUplink(uplink_settings(broker.port), "gw-test", outbox)
    uplink.publish_state({"lifecycle": "active", "n": 1})
    await start(running, uplink)
    await until(lambda: uplink.ready, "the uplink to connect")
    uplink.publish_state({"lifecycle": "active", "n": 2})
    await until(lambda: len(sub.on("state")) == 2, "both states, live")
    late = Subscriber(broker.port, TOPICS)  # joins afterwards: sees only retained messages
    try:
        await until(
            lambda: any(json.loads(m.payload)["n"] == 2 for m in late.on("state"))
            and bool(late.on("status")),
            "the retained state n=2 and status",
        )
        assert [m.payload for m in late.on("status")] == [b"online"]
        assert all(m.retain for m in late.on("state") + late.on("status"))
        await uplink.stop()
        await until(lambda: late.on("status")[-1].payload == b"offline", "offline")
    finally:
        late.close()


async def test_commands_reach_the_handler_and_results_go_up(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    commands: list[bytes] = []
    uplink = MqttUplink(uplink_settings(broker.port), "gw-test", outbox, on_command=commands.append)
    uplink.publish_result({"id": "c0", "status": "failed", "detail": "made while offline"})
    await start(running, uplink)
    await until(lambda: uplink.ready, "the uplink to connect")
    sub.client.publish("simkeeper/gw-test/cmd", b'{"id":"c1"}', qos=1)
    await until(lambda: commands == [b'{"id":"c1"}'], "the command")
    uplink.publish_result({"id": "c1", "status": "ok", "detail": ""})
    await until(lambda: len(sub.on("cmd/result")) == 2, "both results")
    assert [json.loads(m.payload)["id"] for m in sub.on("cmd/result")] == ["c0", "c1"]


async def test_telemetry_gate_holds_readings_but_not_events_state_or_commands(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    commands: list[bytes] = []
    settings = uplink_settings(broker.port, batch_max_latency=0.0)
    uplink = MqttUplink(settings, "gw-test", outbox, on_command=commands.append)
    uplink.set_telemetry_allowed(False)  # before start: applies from the first connection
    await start(running, uplink)
    uplink.set_telemetry_allowed(False)
    telemetry = fill(outbox, 30)
    events = fill(outbox, 3, ("deadline-approaching",), stream="events")
    uplink.publish_state({"suspension": "telemetry"})
    await until(lambda: len(sub.readings("events")) == 3, "the events")
    await until(lambda: len(sub.on("state")) == 1, "the state")
    sub.client.publish("simkeeper/gw-test/cmd", b"resume", qos=1)
    await until(lambda: commands == [b"resume"], "the command")
    # The drainer woke for the events (added after the telemetry) and, right after sending
    # them, looked at the telemetry again. A marker event added only now goes after anything it
    # let through then, on the same connection: once the marker is here, so would that be.
    marker = fill(outbox, 1, ("marker",), stream="events")
    await until(lambda: len(sub.readings("events")) == len(events) + 1, "the marker event")
    assert sub.readings("telemetry") == []
    assert outbox.depth("telemetry")[0] == len(telemetry)
    assert [r["id"] for r in sub.readings("events")] == events + marker
    uplink.set_telemetry_allowed(True)
    await until(lambda: len(sub.readings("telemetry")) == len(telemetry), "telemetry after resume")


async def test_allow_hook_drops_throttled_readings(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    def allow(reading: Reading) -> bool:
        return reading.topic != "noisy"

    ids = fill(outbox, 60, ("noisy", "vital"))
    uplink = await start(
        running, MqttUplink(uplink_settings(broker.port), "gw-test", outbox, allow=allow)
    )
    await until(lambda: outbox.depth() == (0, 0), "the outbox to empty")
    await until(lambda: len(sub.readings()) == 30, "the vital readings")
    await flushed(uplink, sub)  # a noisy reading sent would be here now
    assert {r["topic"] for r in sub.readings()} == {"vital"}
    assert [r["id"] for r in sub.readings()] == ids[1::2]
    assert uplink.stats.filtered == 30


async def test_compressed_batches_decode(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    ids = fill(outbox, 200)
    uplink = await start(running, MqttUplink(uplink_settings(broker.port), "gw-test", outbox))
    await until(lambda: len(sub.readings()) == 200, "the readings")
    await flushed(uplink, sub)  # nothing sent twice
    payloads = [m.payload for m in sub.on("telemetry")]
    assert all(p[0] == ZLIB_MAGIC for p in payloads)  # 20 similar readings compress well
    assert all(len(p) < len(zlib.decompress(p)) for p in payloads)
    assert [r["id"] for r in sub.readings()] == ids


async def test_rate_limit_holds_in_every_window(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 240 messages/min = 4/s with a burst of 4: over any 1 s window at most 4 + 4 go out (+1
    # for the instant between the limiter's clock reading and the publish call). Timed where
    # the uplink hands each batch to paho, on the limiter's own clock (time.monotonic): arrival
    # times at a subscriber can bunch up on a loaded machine, send times only spread out.
    sent: list[float] = []
    publish = mqtt.Client.publish

    def timed(client: mqtt.Client, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == "simkeeper/gw-test/telemetry":
            sent.append(time.monotonic())
        return publish(client, topic, *args, **kwargs)

    monkeypatch.setattr(mqtt.Client, "publish", timed)
    # Two readings to a batch, by count while the rate lets batches go and by bytes while it
    # holds them back (then batches grow up to batch_max_bytes): uncompressed, a third of these
    # readings would take a batch past 900 bytes.
    settings = uplink_settings(
        broker.port, batch_max_count=2, batch_max_bytes=900, rate_messages_per_minute=240
    )
    ids = outbox.add([("telemetry", "t", json.dumps("x" * 300), 1.0, 0)] * 40)
    await start(running, MqttUplink(settings, "gw-test", outbox, compress=False))
    await until(lambda: len(sub.readings()) == 40, "the readings")
    assert [r["id"] for r in sub.readings()] == ids
    assert len(sent) == len(sub.on("telemetry")) == 20
    worst = max(sum(1 for t in sent if start_t <= t < start_t + 1.0) for start_t in sent)
    assert worst <= 9


async def test_default_profile_speaks_mqtt5_and_falls_back(
    broker: Broker, outbox: Outbox, running: list[MqttUplink]
) -> None:
    relay = Relay(broker.port)
    old = Relay(broker.port, refuse_mqtt5=True)
    try:
        modern = MqttUplink(uplink_settings(relay.port, client_id="gw-a"), "gw-a", outbox)
        legacy = MqttUplink(uplink_settings(old.port, client_id="gw-b"), "gw-b", outbox)
        await start(running, modern)
        await start(running, legacy)
        await until(lambda: modern.ready and legacy.ready, "both uplinks to connect")
        assert relay.levels == [5]
        assert old.levels == [5, 4]  # refused as MQTT 5, then 3.1.1
    finally:
        relay.close()
        old.close()


async def test_beam_profile_speaks_mqtt311_with_clean_session(
    broker: Broker, outbox: Outbox, running: list[MqttUplink]
) -> None:
    relay = Relay(broker.port)
    try:
        settings = uplink_settings(relay.port, profile="beam", keepalive=1200)
        uplink = await start(running, MqttUplink(settings, "gw-test", outbox))
        await until(lambda: uplink.ready, "the uplink to connect")
        assert relay.levels == [4]
    finally:
        relay.close()


async def test_relay_sever_is_ridden_out(
    broker: Broker, sub: Subscriber, outbox: Outbox, running: list[MqttUplink]
) -> None:
    """A cut cellular session (the TCP path dies, the broker lives) loses nothing."""
    relay = Relay(broker.port)
    try:
        uplink = await start(running, MqttUplink(uplink_settings(relay.port), "gw-test", outbox))
        ids = []
        for _ in range(3):
            ids += fill(outbox, 200)
            await until(lambda: uplink.ready, "a connection")
            relay.sever()
        await until(lambda: outbox.depth() == (0, 0), "the outbox to drain")
        await until(lambda: {r["id"] for r in sub.readings()} >= set(ids), "every reading")
    finally:
        relay.close()


async def test_stop_is_clean_while_the_broker_is_down(
    outbox: Outbox, running: list[MqttUplink], broker: Broker
) -> None:
    broker.kill()
    uplink = await start(running, MqttUplink(uplink_settings(broker.port), "gw-test", outbox))
    await until(lambda: uplink.connect_attempts >= 2, "a few attempts")
    running.remove(uplink)
    await asyncio.wait_for(uplink.stop(), 10)
    assert not uplink.ready


async def test_a_backlog_tail_goes_at_once_a_fresh_partial_batch_waits(
    broker: Broker, sub: Subscriber, tmp_path: Path, running: list[MqttUplink]
) -> None:
    """The latency of a partial batch counts from its oldest reading's commit: after an outage
    the last partial batch of a backlog is not held back again."""
    from agent.core.store import Store

    # A latency far beyond any wait of the test: the tail arriving at all shows it was not held
    # back, and no slow machine can make the fresh batch legitimately due.
    latency = 600.0
    committed_at = [time.time() - 2 * latency]  # committed long ago, while the link was down
    outbox = Outbox(Store(tmp_path / "db"), max_bytes=1 << 20, max_age=86400.0,
                    clock=lambda: committed_at[0])
    old = fill(outbox, 3)
    settings = uplink_settings(broker.port, batch_max_latency=latency)
    await start(running, MqttUplink(settings, "gw-test", outbox))
    await until(lambda: [r["id"] for r in sub.readings()] == old, "the backlog's tail")
    committed_at[0] = time.time()
    fresh = fill(outbox, 2)  # fresh readings: a partial batch that waits for more
    # Two events (they never wait), the second added once the first arrived: the drainer
    # looked at the telemetry right after sending the first, and anything it sent then went
    # out before the second, on the same connection.
    for n in (1, 2):
        fill(outbox, 1, ("marker",), stream="events")
        await until(lambda n=n: len(sub.readings("events")) == n, f"marker event {n}")
    assert [r["id"] for r in sub.readings()] == old
    assert outbox.depth("telemetry")[0] == len(fresh)
