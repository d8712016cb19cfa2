"""The fleet of ``simkeeper fleet simulate``: N complete agents on the running loop.

Each :class:`SimAgent` is a real :class:`agent.daemon.Daemon` with its own directory
(``config.toml``, SQLite store, ingest socket), device id ``gw-00001``... and its own
:class:`drivers.simulator.SimulatedModem` on its own pty (personalities rotate: quectel,
simcom, ublox; each SIM has its own ICCID and IMSI). :class:`Fleet` starts them in waves of
``wave`` and, with ``telemetry``, runs a sample app for each that writes through its ingest
socket. :class:`Options` are the command's options (agent.fleet.simulate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.fleet.mqtt import FleetError
from drivers.parsers import luhn_digit

log = logging.getLogger(__name__)

PERSONALITIES = ("quectel", "simcom", "ublox")
POLL = 0.02  # how finely waits (and reconnects) are timed


@dataclass(frozen=True)
class Options:
    n: int
    broker: tuple[str, int] | None = None  # None: a local mosquitto on a free port
    duration: float = 0.0  # 0: until Ctrl-C (or, with report, until the report is done)
    report: bool = False
    directory: Path | None = None  # None: a temporary one (on /dev/shm when there is one)
    prefix: str = "simkeeper"
    poll: float = 300.0
    telemetry: float = 60.0
    wave: int = 50
    sample: int = 100
    steady: float = 20.0
    down: float = 2.0
    reconnect_min: float = 1.0
    reconnect_max: float = 300.0
    out: TextIO = field(default=sys.stdout)


def device_id(index: int) -> str:
    return f"gw-{index:05d}"


def iccid(index: int) -> str:
    body = f"8981100{index:011d}"
    return body + luhn_digit(body)


def agent_config(index: int, directory: Path, broker: tuple[str, int], opts: Options, *,
                 operator_pub: Path) -> str:
    """One agent's ``config.toml``: long periods, its own store, socket and modem link."""
    host, port = broker
    return (
        f'device_id = "{device_id(index)}"\n'
        f'[modem]\nport = "{directory / "modem"}"\ndata_path = "agent"\n'
        f"poll_interval = {opts.poll}\n"
        f'[uplink]\nhost = "{host}"\nport = {port}\nprefix = "{opts.prefix}"\n'
        f"allow_plain = true\nreconnect_min = {opts.reconnect_min}\n"
        f"reconnect_max = {opts.reconnect_max}\n"
        f'[store]\npath = "{directory / "simkeeper.db"}"\n'
        f'[ingest]\nsocket = "{directory / "ingest.sock"}"\n'
        f"[health]\ninterval = {opts.poll}\n"
        f"[usage]\npublish_interval = {max(3600.0, opts.poll)}\n"
        f'[commands]\noperator_key = "{operator_pub}"\n'
        f"[lifecycle]\npoll_interval = {opts.poll}\n"
        f"time_sync_interval = {max(3600.0, opts.poll)}\n"
    )


@dataclass
class SimAgent:
    index: int
    device_id: str
    directory: Path
    modem: Any  # drivers.simulator.SimulatedModem
    daemon: Any  # agent.daemon.Daemon
    task: asyncio.Task[None] | None = None
    app: asyncio.Task[None] | None = None

    @property
    def online(self) -> bool:
        parts = self.daemon.parts
        return bool(parts is not None and parts.uplinks.ready)

    @property
    def modem_ready(self) -> bool:
        parts = self.daemon.parts
        return parts is not None and any(
            s.state == "ready" for s in parts.modems.sessions.values())

    @property
    def connect_attempts(self) -> int:
        parts = self.daemon.parts
        return parts.uplinks.mqtt.connect_attempts if parts is not None else 0


class Fleet:
    """N agents on the running loop. ``start()`` in waves, ``stop()`` all of them."""

    def __init__(self, opts: Options, root: Path, host: str, port: int) -> None:
        self.opts = opts
        self.root = root
        self.host, self.port = host, port
        self.agents: list[SimAgent] = []
        self.stop_event = asyncio.Event()
        self.operator_key_path, self.operator_pub = self._operator_keys()
        from provisioning.keys import load_ed25519_private

        self.operator_key = load_ed25519_private(self.operator_key_path, "operator key")

    def _operator_keys(self) -> tuple[Path, Path]:
        private, public = self.root / "operator.key", self.root / "operator.pub"
        if private.exists() and public.exists():
            return private, public
        from provisioning.ca import ed25519_pair

        return ed25519_pair(self.root, "operator")

    async def start(self, progress: Callable[[int], None] | None = None) -> None:
        opts = self.opts
        for first in range(1, opts.n + 1, opts.wave):
            wave = [await self._start_agent(i)
                    for i in range(first, min(first + opts.wave, opts.n + 1))]
            await self._serving(wave)
            if progress is not None:
                progress(len(self.agents))

    async def _start_agent(self, index: int) -> SimAgent:
        from agent.core import config
        from agent.core.sdnotify import Notifier
        from agent.daemon import Daemon
        from drivers.simulator import SimulatedModem

        directory = self.root / device_id(index)
        directory.mkdir(parents=True, exist_ok=True)
        scenario = {"seed": index, "sim": {"iccid": iccid(index),
                                           "imsi": f"29505{index:010d}"}}
        modem = SimulatedModem(PERSONALITIES[(index - 1) % len(PERSONALITIES)], scenario,
                               link=directory / "modem", boot_seconds=0.2,
                               sim_busy_seconds=0.1)
        await modem.start()
        path = directory / "config.toml"
        path.write_text(agent_config(index, directory, (self.host, self.port), self.opts,
                                     operator_pub=self.operator_pub))
        try:
            cfg = config.load(path)
        except config.ConfigError as exc:
            await modem.close()
            raise FleetError(f"{path}: {exc}") from None
        # No NOTIFY_SOCKET: a fleet run under systemd must not send a thousand READY=1.
        daemon = Daemon(cfg, notifier=Notifier({}), heartbeat=max(60.0, self.opts.poll))
        agent = SimAgent(index, device_id(index), directory, modem, daemon)
        agent.task = asyncio.create_task(daemon.run(self.stop_event), name=agent.device_id)
        self.agents.append(agent)
        return agent

    async def _serving(self, wave: Sequence[SimAgent], timeout: float = 60.0) -> None:
        """Wait until each agent of the wave is serving; one that failed to start ends all."""
        for agent in wave:
            assert agent.task is not None
            serving = asyncio.ensure_future(agent.daemon.serving.wait())
            done, _ = await asyncio.wait([agent.task, serving], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            serving.cancel()
            if agent.task in done:
                exc = agent.task.exception()
                raise FleetError(f"{agent.device_id} did not start: {exc or 'it ended'}")
            if not done:
                raise FleetError(f"{agent.device_id} not serving after {timeout:g} s")
            if self.opts.telemetry > 0:
                agent.app = asyncio.create_task(self._app(agent))

    async def _app(self, agent: SimAgent) -> None:
        """A sensor app on the gateway: one reading every ``telemetry`` seconds (first one at a
        random moment, so the fleet's readings spread), each over a fresh ingest connection."""
        period = self.opts.telemetry
        rng = random.Random(agent.index)
        await asyncio.sleep(rng.uniform(0, period))
        n = 0
        while True:
            line = {"topic": "sim/env", "data": {"n": n, "temp_c": round(rng.gauss(21, 2), 2)}}
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(agent.daemon.cfg.ingest.socket))
                try:
                    writer.write(json.dumps(line).encode() + b"\n")
                    await reader.readline()
                finally:
                    writer.close()
            except OSError as exc:
                log.debug("%s: ingest: %s", agent.device_id, exc)
            n += 1
            await asyncio.sleep(period)

    async def wait_online(self, timeout: float) -> bool:
        return await poll_until(lambda: all(a.online for a in self.agents), timeout)

    async def wait_modems(self, timeout: float) -> bool:
        return await poll_until(lambda: all(a.modem_ready for a in self.agents), timeout)

    async def stop(self) -> None:
        self.stop_event.set()
        apps = [a.app for a in self.agents if a.app is not None]
        for app in apps:
            app.cancel()
        await asyncio.gather(*apps, return_exceptions=True)
        tasks = [a.task for a in self.agents if a.task is not None]
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError):
                log.warning("an agent ended with %s", result)
        for agent in self.agents:
            await agent.modem.close()


async def poll_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``timeout`` seconds; whether it came true."""
    for _ in range(max(1, round(timeout / POLL))):
        if predicate():
            return True
        await asyncio.sleep(POLL)
    return predicate()

