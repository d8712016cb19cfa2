"""`simkeeper run` as a real process, with the simulated modem on a pty and a real mosquitto:
start-up, readiness and watchdog over NOTIFY_SOCKET, clean SIGTERM, config refused with exit 2,
and commands refused while the commands module is not there.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker, Subscriber, until

SIMKEEPER = [sys.executable, "-m", "agent.cli"]
DEVICE = "gw-test"


class Agent:
    """The daemon under test, as a subprocess (stderr in ``log``)."""

    def __init__(
        self, directory: Path, broker_port: int, modem: str, extra: str = "", rate: int = 100_000
    ) -> None:
        self.directory = directory
        self.config = directory / "agent.toml"
        self.socket = directory / "ingest.sock"
        self.database = directory / "state" / "simkeeper.db"
        self.log = directory / "agent.log"
        self.config.write_text(
            f'device_id = "{DEVICE}"\n'
            f'[modem]\nport = "{modem}"\ninterface = "sk-test-none"\n'
            f"[uplink]\nport = {broker_port}\nkeepalive = 10\nreconnect_min = 0.1\n"
            "reconnect_max = 1.0\nbatch_max_count = 20\nbatch_max_latency = 0.05\n"
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
    broker: Broker,
    extra: str = "",
    env: dict[str, str] | None = None,
    rate: int = 100_000,
) -> AsyncIterator[tuple[Agent, SimulatedModem]]:
    link = tmp_path / "modem"
    async with SimulatedModem("quectel", link=link, boot_seconds=0.2, sim_busy_seconds=0.1) as sim:
        agent = Agent(tmp_path, broker.port, str(link), extra, rate)
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

        async def receive(until_message: bytes) -> None:
            while until_message not in messages:
                messages.append(await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT))

        async with running(tmp_path, broker, env=env) as (agent, _sim):
            await receive(b"WATCHDOG=1")
            await asyncio.sleep(0.5)
            while True:
                try:
                    messages.append(sock.recv(4096))
                except BlockingIOError:
                    break
            assert any(m.startswith(b"READY=1") for m in messages)
            assert messages.count(b"WATCHDOG=1") >= 3  # every 0.1 s
            assert await agent.stop() == 0
            await receive(b"STOPPING=1")


async def test_commands_are_refused_saying_why(tmp_path: Path, broker: Broker) -> None:
    async with running(tmp_path, broker) as (_agent, _sim):
        results = Subscriber(broker.port, f"simkeeper/{DEVICE}/cmd/result")
        try:
            await online(broker.port)
            client = mqtt.Client(CallbackAPIVersion.VERSION2)
            client.connect("127.0.0.1", broker.port)
            client.loop_start()
            envelope = {"id": "c-1", "device_id": DEVICE, "name": "suspend", "args": {}}
            sent = client.publish(f"simkeeper/{DEVICE}/cmd", json.dumps(envelope), qos=1)
            sent.wait_for_publish()
            await until(lambda: bool(results.on("cmd/result")), "a command result")
            client.loop_stop()
            client.disconnect()
        finally:
            results.close()
    result = json.loads(results.on("cmd/result")[0].payload)
    assert result["id"] == "c-1"
    assert result["status"] == "rejected"
    assert "not configured" in result["detail"]
