"""`simkeeper run` as a real process, with the simulated modem on a pty and a real mosquitto:
start-up, readiness and watchdog over NOTIFY_SOCKET, clean SIGTERM, config refused with exit 2,
and signed commands taking effect (or refused, saying why) end to end.

``Agent`` (also used by test_status and test_e2e_agent) writes a config, runs the daemon and
talks to it through the CLI and the ingest socket. The tests are async so that the simulator,
which runs on the test's own loop, keeps answering while they wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.sign import make_envelope
from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker, Relay, Subscriber, until

SIMKEEPER = [sys.executable, "-m", "agent.cli"]
DEVICE = "gw-test"


class Agent:
    """The daemon under test, as a subprocess (stderr in ``log``)."""

    def __init__(
        self, directory: Path, broker_port: int, modem: str | list[str], extra: str = "",
        *, rate: int = 100_000, batch_bytes: int = 16384,
    ) -> None:
        self.directory = directory
        self.config = directory / "agent.toml"
        self.socket = directory / "ingest.sock"
        self.database = directory / "state" / "simkeeper.db"
        self.log = directory / "agent.log"
        # One modem: an interface that is not there (no kernel counters). Several: each modem's
        # activation probe goes out through its interface (agent.sim.keepers.probe_interface),
        # and only loopback reaches the test broker.
        interface = (["lo"] * len(modem)) if isinstance(modem, list) else "sk-test-none"
        self.config.write_text(
            f'device_id = "{DEVICE}"\n'
            f'[modem]\nport = {json.dumps(modem)}\ninterface = {json.dumps(interface)}\n'
            f"[uplink]\nport = {broker_port}\nkeepalive = 10\nreconnect_min = 0.1\n"
            "reconnect_max = 1.0\nbatch_max_count = 20\nbatch_max_latency = 0.05\n"
            f"batch_max_bytes = {batch_bytes}\n"
            f"rate_messages_per_minute = {rate}\nrate_bytes_per_minute = 1073741824\n"
            f'[store]\npath = "{self.database}"\n'
            f'[ingest]\nsocket = "{self.socket}"\n' + extra
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *SIMKEEPER, "--log-level", "INFO", "run", "--config", str(self.config),
                stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})},
            )
        await until(self._serving, "the agent's ingest socket")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
        except OSError:
            return False
        return True

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), WAIT)
        self.proc = None
        return code

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `simkeeper` command with this agent's config, run off the loop."""
        argv = [*SIMKEEPER, args[0], "--config", str(self.config), *args[1:]]
        return await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=WAIT, check=False
        )

    async def status(self) -> dict[str, Any]:
        done = await self.cli("status", "--json")
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    async def publish(self, readings: list[dict[str, Any]]) -> list[str]:
        """Pipeline readings over one ingest connection; the ids acknowledged."""
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(b"".join(json.dumps(r).encode() + b"\n" for r in readings))
            await writer.drain()
            answers = [json.loads(await reader.readline()) for _ in readings]
        finally:
            writer.close()
        assert all(a["ok"] for a in answers), answers
        return [a["id"] for a in answers]


@asynccontextmanager
async def running(
    tmp_path: Path,
    broker: Broker | Relay,
    extra: str = "",
    env: dict[str, str] | None = None,
    *,
    rate: int = 100_000,
    batch_bytes: int = 16384,
) -> AsyncIterator[tuple[Agent, SimulatedModem]]:
    link = tmp_path / "modem"
    async with SimulatedModem("quectel", link=link, boot_seconds=0.2, sim_busy_seconds=0.1) as sim:
        agent = Agent(tmp_path, broker.port, str(link), extra, rate=rate, batch_bytes=batch_bytes)
        await agent.start(env)
        try:
            yield agent, sim
        finally:
            if agent.proc is not None:
                await agent.stop(signal.SIGKILL)


async def retained_status(port: int) -> bytes:
    """The retained ``status`` as a new subscriber gets it."""
    sub = Subscriber(port, f"simkeeper/{DEVICE}/status")
    try:
        await until(lambda: bool(sub.on("status")), "the retained status")
        return sub.on("status")[-1].payload
    finally:
        sub.close()


async def online(port: int) -> None:
    sub = Subscriber(port, f"simkeeper/{DEVICE}/status")
    try:
        await until(lambda: any(m.payload == b"online" for m in sub.on("status")), "online")
    finally:
        sub.close()


async def test_sigterm_stops_cleanly_with_retained_offline(tmp_path: Path, broker: Broker) -> None:
    async with running(tmp_path, broker) as (agent, _sim):
        await online(broker.port)
        assert await agent.stop() == 0
    assert await retained_status(broker.port) == b"offline"
    assert "Traceback" not in agent.log.read_text()


async def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('device_id = "gw"\n[uplink]\nport = "x"\n')
    done = await asyncio.to_thread(
        subprocess.run, [*SIMKEEPER, "run", "--config", str(config)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert done.returncode == 2
    assert "uplink.port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_unusable_database_exits_1(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state directory goes")
    agent = Agent(tmp_path, 1, str(tmp_path / "modem"))
    done = await asyncio.to_thread(
        subprocess.run, [*SIMKEEPER, "run", "--config", str(agent.config)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("simkeeper run: ") and "Traceback" not in done.stderr


async def test_readiness_watchdog_and_stopping_over_notify_socket(
    tmp_path: Path, broker: Broker
) -> None:
    name = f"simkeeper-test-{secrets.token_hex(4)}"  # the abstract namespace, as systemd uses
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        env = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "200000"}
        messages: list[bytes] = []

        async def receive(done: Callable[[], bool]) -> None:
            """Collect messages until ``done()``; WAIT per message is only a hang guard."""
            while not done():
                messages.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT))

        async with running(tmp_path, broker, env=env) as (agent, _sim):
            # Ready, and the watchdog pinged again and again (every 0.1 s when on time).
            await receive(lambda: any(m.startswith(b"READY=1") for m in messages)
                          and messages.count(b"WATCHDOG=1") >= 3)
            assert await agent.stop() == 0
            await receive(lambda: b"STOPPING=1" in messages)


async def send_command(port: int, envelope: dict[str, Any]) -> dict[str, Any]:
    """Publish a command envelope on ``cmd`` and wait for its ``cmd/result``."""
    results = Subscriber(port, f"simkeeper/{DEVICE}/cmd/result")
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    try:
        client.connect("127.0.0.1", port)
        client.loop_start()
        sent = client.publish(f"simkeeper/{DEVICE}/cmd", json.dumps(envelope), qos=1)
        sent.wait_for_publish()

        def answered() -> list[dict[str, Any]]:
            found = (json.loads(m.payload) for m in results.on("cmd/result"))
            return [r for r in found if r["id"] == envelope["id"]]

        await until(lambda: bool(answered()), f"the result of {envelope['name']}")
        return answered()[0]
    finally:
        client.disconnect()
        client.loop_stop()
        results.close()


async def retained_state(port: int) -> dict[str, Any]:
    sub = Subscriber(port, f"simkeeper/{DEVICE}/state")
    try:
        await until(lambda: bool(sub.on("state")), "the retained state")
        state: dict[str, Any] = json.loads(sub.on("state")[-1].payload)
        return state
    finally:
        sub.close()


async def test_commands_without_an_operator_key_are_refused(tmp_path: Path,
                                                            broker: Broker) -> None:
    key = Ed25519PrivateKey.generate()
    async with running(tmp_path, broker) as (_agent, _sim):
        await online(broker.port)
        unsigned = {"id": "c-0", "device_id": DEVICE, "name": "suspend", "args": {}}
        assert (await send_command(broker.port, unsigned))["detail"].startswith("unsigned")
        signed = make_envelope(key, DEVICE, "suspend", {"scope": "radio"}, cid="c-1")
        result = await send_command(broker.port, signed)
    assert result["status"] == "rejected"
    assert result["detail"].startswith("unknown key")


async def test_signed_orders_take_effect_end_to_end(tmp_path: Path, broker: Broker) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "operator.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                  PublicFormat.SubjectPublicKeyInfo))
    extra = f'[commands]\noperator_key = "{pub}"\n'
    async with running(tmp_path, broker, extra=extra) as (agent, sim):
        await online(broker.port)
        suspend = make_envelope(key, DEVICE, "suspend", {"scope": "telemetry",
                                "reason": "unpaid", "readings": "refuse"}, cid="s-1")
        first = await send_command(broker.port, suspend)
        assert first["status"] == "ok", first
        # Readings are refused with the reason; the retained state shows the suspension.
        reader, writer = await asyncio.open_unix_connection(str(agent.socket))
        writer.write(b'{"topic": "t", "data": 1}\n')
        answer = json.loads(await reader.readline())
        writer.close()
        assert not answer["ok"] and "suspended" in answer["error"]
        await until_async(lambda: _suspended(broker.port), "the suspension in state")
        # A repeat is answered from the journal, a forged one refused.
        assert await send_command(broker.port, suspend) == first
        forged = dict(make_envelope(key, DEVICE, "resume", cid="r-9"), device_id="gw-other")
        assert (await send_command(broker.port, forged))["detail"].startswith("bad signature")
        state = await send_command(broker.port, make_envelope(key, DEVICE, "get-state"))
        assert state["detail"]["suspension"]["scope"] == "telemetry"
        resumed = await send_command(broker.port, make_envelope(key, DEVICE, "resume"))
        assert resumed["status"] == "ok", resumed
        assert await agent.publish([{"topic": "t", "data": 2}])
        iccid = sim.state.sim.iccid
        plan = make_envelope(key, DEVICE, "set-plan",
                             {"iccid": iccid, "bytes": 10_000_000, "cycle_day": 5})
        assert (await send_command(broker.port, plan))["status"] == "ok"
        usage = await send_command(broker.port, make_envelope(key, DEVICE, "report-usage"))
        assert usage["status"] == "ok" and "queued" in usage["detail"]
        reset = await send_command(broker.port, make_envelope(key, DEVICE, "reset-modem"))
        assert reset["status"] == "ok", reset
        await until(lambda: "AT+CFUN=1,1" in sim.commands, "the modem reset")
        gone = await send_command(broker.port, make_envelope(key, DEVICE, "bogus"))
        assert gone["detail"].startswith("unknown command")


async def _suspended(port: int) -> bool:
    state = await retained_state(port)
    return bool(state["suspension"]) and state["suspension"]["scope"] == "telemetry"


async def until_async(check: Any, what: str, timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.2)
