"""The same end-to-end suite on each broker the agent is tried with (issue 12, part 2):
mosquitto (MQTT 5) and RabbitMQ 3.x with its MQTT plugin (MQTT 3.1.1 only: it closes an MQTT 5
CONNECT without a CONNACK; retained messages only for exact-topic subscriptions). The agent's
readings arrive, its retained state and last will work, signed commands are answered, a
command sent while it was away runs when it is back, and the fleet tools work."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.fleet.flux_bridge import GROUP, FluxBridge
from agent.fleet.mqtt import BrokerOptions
from agent.fleet.sign import make_envelope
from tests.broker import WAIT, Broker, Subscriber, until
from tests.rabbit import Rabbit, Vhost, rabbitmq_server
from tests.test_commands_away import _key_file, runs_when_back
from tests.test_daemon import (
    DEVICE,
    SIMKEEPER,
    online,
    retained_state,
    retained_status,
    running,
    send_command,
    until_async,
)
from tests.test_e2e_lifecycle import operator_key
from tests.webhook import Webhook


@pytest.fixture(scope="module")
def rabbit_node(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rabbit]:
    """One node for the module (its Erlang VM takes seconds to start), with a virtual host for
    each of the module's RabbitMQ tests: each has its own retained messages and sessions."""
    if rabbitmq_server() is None:
        pytest.skip("rabbitmq-server is not installed (make deps installs it)")
    tests = len([item for item in request.session.items
                 if isinstance(item, pytest.Function) and item.module is request.module
                 and hasattr(item, "callspec")
                 and item.callspec.params.get("any_broker") == "rabbitmq"])
    node = Rabbit(tmp_path_factory.mktemp("rabbit"), vhosts=max(tests, 1))
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def any_broker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "mosquitto":
        return request.getfixturevalue("broker")
    node: Rabbit = request.getfixturevalue("rabbit_node")
    monkeypatch.setattr(Subscriber, "protocol", mqtt.MQTTv311)
    return node.take()


async def test_readings_state_will_and_commands(tmp_path: Path, any_broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    telemetry = Subscriber(any_broker.port, f"simkeeper/{DEVICE}/telemetry")
    try:
        async with running(tmp_path, any_broker, extra=extra) as (agent, _sim):
            await online(any_broker.port)
            ids = await agent.publish([{"topic": "t", "data": n} for n in range(5)])
            await until(lambda: {r["id"] for r in telemetry.readings()} >= set(ids),
                        "the readings at the broker")
            state = await retained_state(any_broker.port)
            assert state["device_id"] == DEVICE
            answer = await send_command(any_broker.port, make_envelope(key, DEVICE, "get-state"))
            assert answer["status"] == "ok", answer
            expected = "MQTT 5" if isinstance(any_broker, Broker) else "MQTT 3.1.1 (the broker's"

            async def speaking() -> bool:  # the runtime row follows the uplink within seconds
                uplink = (await agent.status())["uplink"]
                return bool(uplink["connected"]) and uplink["protocol"].startswith(expected)

            await until_async(speaking, f"status showing the uplink connected, {expected}")
            await agent.stop(signal.SIGKILL)
            await until_async(lambda: _is(any_broker.port, b"offline"), "the last will")
    finally:
        telemetry.close()


async def _is(port: int, status: bytes) -> bool:
    return await retained_status(port) == status


async def test_a_command_sent_while_away_runs_when_back(tmp_path: Path,
                                                       any_broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    async with running(tmp_path, any_broker, extra=extra) as (agent, _sim):
        await online(any_broker.port)
        await agent.stop(signal.SIGKILL)
        await runs_when_back(agent, any_broker.port, key)


async def test_fleet_send_and_watch(tmp_path: Path, any_broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    broker = ["--broker", f"127.0.0.1:{any_broker.port}"]
    async with running(tmp_path, any_broker, extra=extra) as (_agent, _sim):
        await online(any_broker.port)
        sent = await _run(*SIMKEEPER, "fleet", "send", DEVICE, "get-state", "--key",
                          str(_key_file(key, tmp_path)), *broker)
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["status"] == "ok"
        watched = await _run(*SIMKEEPER, "fleet", "watch", "--once", "--device", DEVICE, *broker)
        assert watched.returncode == 0, watched.stderr
        line = next((x for x in watched.stdout.splitlines() if x.startswith(DEVICE)), "")
        assert " yes " in f" {line} ", watched.stdout  # online, from the retained status
        # The dashboard follows named devices the same way (its page's rows, as JSON).
        page = await asyncio.create_subprocess_exec(
            *SIMKEEPER, "fleet", "dashboard", "--listen", "127.0.0.1:0", "--device", DEVICE,
            *broker, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert page.stdout is not None
            url = (await asyncio.wait_for(page.stdout.readline(), WAIT)).decode().split()[3]
            await until(lambda: _dashboard_rows(url) == [(DEVICE, "online")],
                        "the dashboard's row for the device, online")
        finally:
            page.terminate()
            await page.wait()

def _dashboard_rows(url: str) -> list[tuple[str, str]]:
    with urllib.request.urlopen(url + "api/devices", timeout=WAIT) as answer:
        return [(r["device"], r["online"]) for r in json.load(answer)["rows"]]


async def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   timeout=WAIT, check=False)


async def test_flux_bridge(tmp_path: Path, any_broker: Broker, webhook: Webhook) -> None:
    """The agent's readings reach the webhook through the bridge: a shared subscription on
    MQTT 5; on RabbitMQ (no shared subscriptions) one bridge without a group, and a group is
    refused at once, saying what it needs."""
    rabbit = isinstance(any_broker, Vhost)
    webhook.failing = False
    if rabbit:
        refused = await _run(*SIMKEEPER, "fleet", "flux-bridge", "--webhook", webhook.url,
                             "--broker", f"127.0.0.1:{any_broker.port}")
        assert refused.returncode == 1
        assert "speaks only MQTT 3.1.1: no shared subscriptions" in refused.stderr
    bridge = FluxBridge(BrokerOptions(port=any_broker.port), webhook.url,
                        client_id="bridge-test", group="" if rabbit else GROUP)
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(bridge.subscribed.wait, WAIT), "bridge subscribed"
        async with running(tmp_path, any_broker) as (agent, _sim):
            ids = await agent.publish([{"topic": "t", "data": n} for n in range(5)])
            await until(lambda: webhook.reading_ids() >= set(ids), "the readings at Flux")
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, WAIT)
