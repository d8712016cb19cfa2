"""Commands sent while the gateway was away (issue 12, part 1): the agent keeps a session at the
broker, so a command published while it is stopped runs once when it is back, an expired one is
refused as such, and a broker restarted with persistence keeps the session."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.localbroker import LocalBroker
from agent.fleet.sign import encode, make_envelope
from tests.broker import WAIT, Broker, Subscriber, until
from tests.test_daemon import (
    DEVICE,
    SIMKEEPER,
    Agent,
    _suspended,
    online,
    retained_status,
    running,
    until_async,
)
from tests.test_e2e_lifecycle import operator_key


def publish(port: int, envelope: dict[str, Any]) -> None:
    """A plain MQTT client publishes ``envelope`` on the device's ``cmd`` and leaves once the
    broker has it (PUBACK)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(f"simkeeper/{DEVICE}/cmd", encode(envelope), qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def results(sub: Subscriber, cid: str) -> list[dict[str, Any]]:
    found = (json.loads(m.payload) for m in sub.on("cmd/result"))
    return [r for r in found if r["id"] == cid]


async def runs_when_back(agent: Agent, port: int, key: Ed25519PrivateKey) -> None:
    """With ``agent`` stopped: a get-state published, the agent started, its answer awaited."""
    sub = Subscriber(port, f"simkeeper/{DEVICE}/cmd/result")
    try:
        order = make_envelope(key, DEVICE, "get-state")
        publish(port, order)
        await agent.start()
        await until(lambda: bool(results(sub, order["id"])), "the result, once back")
        assert results(sub, order["id"])[0]["status"] == "ok"
    finally:
        sub.close()


async def test_a_command_sent_while_away_runs_once_when_back(tmp_path: Path,
                                                            broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/cmd/result")
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, _sim):
            await online(broker.port)  # its session, with the cmd subscription, exists
            await agent.stop(signal.SIGKILL)
            suspend = make_envelope(key, DEVICE, "suspend", {"scope": "telemetry"})
            stale = make_envelope(key, DEVICE, "resume", now=time.time() - 3600)  # expired
            publish(broker.port, suspend)
            publish(broker.port, stale)
            await agent.start()
            await until(lambda: bool(results(sub, suspend["id"])), "the suspend's result")
            await until(lambda: bool(results(sub, stale["id"])), "the expired one's answer")
            assert results(sub, suspend["id"])[0]["status"] == "ok", results(sub, suspend["id"])
            refused = results(sub, stale["id"])[0]
            assert refused["status"] == "rejected" and refused["detail"].startswith("expired")
            await until_async(lambda: _suspended(broker.port), "the suspension in state")
            # Once: a get-state after both proves the queue is drained; no second answer.
            probe = make_envelope(key, DEVICE, "get-state")
            publish(broker.port, probe)
            await until(lambda: bool(results(sub, probe["id"])), "a later command's result")
            assert len(results(sub, suspend["id"])) == 1
    finally:
        sub.close()


async def test_the_session_outlives_a_broker_restart(mosquitto: str, tmp_path: Path) -> None:
    """mosquitto with persistence: the agent's session (its subscription) survives the broker's
    restart, so a command published after it, while the agent is away, still reaches it."""
    key, extra = operator_key(tmp_path)
    store = tmp_path / "broker"
    store.mkdir()
    broker = LocalBroker(tmp_path, ["persistence true", f"persistence_location {store}/",
                                    "autosave_interval 1"], binary=mosquitto)
    broker.start()
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, _sim):  # type: ignore[arg-type]
            await online(broker.port)
            await agent.stop(signal.SIGKILL)
            broker.stop()  # SIGTERM: mosquitto saves its database on the way out
            broker.start()
            await runs_when_back(agent, broker.port, key)
    finally:
        broker.stop()


def _fleet(port: int, key_file: Path, *args: str) -> list[str]:
    return [*SIMKEEPER, "fleet", "send", "--broker", f"127.0.0.1:{port}", "--key", str(key_file),
            *args]


def _key_file(key: Ed25519PrivateKey, directory: Path) -> Path:
    path = directory / "operator.key"
    path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return path


async def test_fleet_send_says_at_once_that_the_device_is_offline(tmp_path: Path,
                                                                 broker: Broker) -> None:
    """Issue 11, item 11: no waiting out the timeout; the command waits at the broker and runs
    when the device is back."""
    key, extra = operator_key(tmp_path)
    async with running(tmp_path, broker, extra=extra) as (agent, _sim):
        await online(broker.port)
        await agent.stop(signal.SIGKILL)
        await until_async(lambda: _offline(broker.port), "the last will")
        done = await asyncio.to_thread(
            subprocess.run, _fleet(broker.port, _key_file(key, tmp_path), DEVICE, "suspend",
                                   "--arg", "scope=telemetry", "--timeout", "600"),
            capture_output=True, text=True, timeout=WAIT, check=False)
        assert done.returncode == 3, done.stderr
        assert done.stderr.startswith(f"{DEVICE}: offline (its retained status); the broker "
                                      "keeps the command in the device's session")
        outcome = json.loads(done.stdout)
        assert outcome["status"] == "queued"
        await agent.start()
        await until_async(lambda: _suspended(broker.port), "the suspension, once back")


async def test_beam_profile_fleet_send_publishes_again_until_answered(
        tmp_path: Path, broker: Broker) -> None:
    """No session at the broker (SORACOM Beam): a command published while the device is away is
    lost, so fleet send --profile beam publishes it again until the device, back, answers; the
    device runs it once however many copies reach it."""
    key, extra = operator_key(tmp_path)
    events = Subscriber(broker.port, f"simkeeper/{DEVICE}/events")
    beam = 'profile = "beam"\n'
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, _sim):
            agent.config.write_text(agent.config.read_text().replace("[uplink]\n",
                                                                     "[uplink]\n" + beam))
            await agent.stop(signal.SIGKILL)  # started once without beam: restart with it
            await agent.start()
            await online(broker.port)
            await agent.stop(signal.SIGKILL)
            await until_async(lambda: _offline(broker.port), "the last will")
            sender = await asyncio.create_subprocess_exec(
                *_fleet(broker.port, _key_file(key, tmp_path), DEVICE, "suspend", "--arg",
                        "scope=telemetry", "--profile", "beam", "--timeout", "120"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert sender.stderr is not None and sender.stdout is not None
            said = (await asyncio.wait_for(sender.stderr.readline(), WAIT)).decode()
            assert said.startswith(f"{DEVICE}: offline (its retained status); fleet send "
                                   "publishes it again")
            await agent.start()
            out = await asyncio.wait_for(sender.stdout.read(), 150)
            assert await sender.wait() == 0, out
            assert json.loads(out)["status"] == "ok"
            # Once: a later command's result proves every copy before it was answered.
            later = make_envelope(key, DEVICE, "get-state")
            sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/cmd/result")
            try:
                publish(broker.port, later)
                await until(lambda: bool(results(sub, later["id"])), "a later result")
            finally:
                sub.close()
            await until(lambda: _suspensions(events) >= 1, "the suspension's event")
            assert _suspensions(events) == 1
    finally:
        events.close()


def _suspensions(sub: Subscriber) -> int:
    return sum(1 for r in sub.readings("events") if r["data"].get("to") == "suspended")


async def _offline(port: int) -> bool:
    return await retained_status(port) == b"offline"
