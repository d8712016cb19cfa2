"""``simkeeper fleet simulate N``: N complete agents in ONE process, against one broker.

Each agent is a real :class:`agent.daemon.Daemon` with its own directory (``config.toml``,
SQLite store, ingest socket), device id ``gw-00001``... and its own
:class:`drivers.simulator.SimulatedModem` on its own pty (personalities rotate: quectel,
simcom, ublox; each SIM has its own ICCID and IMSI). All of them share one asyncio loop, as the
agent core allows: nothing in it is global. The broker is the one given (``--broker``) or a
local mosquitto on a free loopback port; an operator key pair is made in the fleet directory
and pinned by every agent, so signed commands work (``fleet send --key DIR/operator.key``).

To fit a thousand agents on two cores the per-agent periods are long (modem, keeper and health
polls every ``poll`` seconds, usage reports hourly), agents start in waves (no thundering herd
of pty opens and connects), and each agent's sample app writes one reading every
``telemetry`` seconds through the ingest socket (0: none). RLIMIT_NOFILE is raised to its hard
limit; a fleet that cannot fit (file descriptors, ptys) is refused before anything starts.

``--report`` measures, then stops (or runs on until ``--duration``):

- steady phase: broker messages per second (mosquitto's ``$SYS/broker/publish/messages/...``
  and ``$SYS/broker/messages/...``, PUBLISH and all packets, received and sent; a wildcard
  subscriber's own count by topic), and the process's CPU;
- command round trip: signed ``get-state`` commands (agent.fleet.sign), publish to
  ``cmd/result``: a sample one at a time, then one to every device at once;
- connect storm (local broker only): SIGKILL the broker, keep it down ``down`` seconds, start
  it again on the same port and record when each agent's uplink is ready again; the spread
  (percentiles and a 1 s histogram) is the uplink's full-jitter backoff at work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.fleet.mqtt import FleetError
from agent.fleet.sign import encode, make_envelope

log = logging.getLogger(__name__)

# Open files per agent: store (database, -wal, -shm), ingest listener, MQTT socket and paho's
# wake-up socket pair, the modem's pty (master, and the slave the simulator holds), the agent's
# end of the pty. Measured: 12 per agent with the sample app (N = 1000).
FDS_PER_AGENT = 10
FDS_APP = 2  # an ingest connection while the sample app writes (both ends)
FDS_BASE = 128  # the interpreter, the operator's client, the broker pipe, slack
PERSONALITIES = ("quectel", "simcom", "ublox")
_POLL = 0.02  # how finely reconnects are timed


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


# -- capacity -----------------------------------------------------------------------------------


def raise_nofile() -> int:
    """RLIMIT_NOFILE's soft limit raised to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fds_per_agent(telemetry: float) -> int:
    return FDS_PER_AGENT + (FDS_APP if telemetry > 0 else 0)


def check_capacity(n: int, telemetry: float) -> int:
    """Raise the open-files limit and refuse (FleetError, one line) a fleet that cannot fit."""
    limit = raise_nofile()
    per = fds_per_agent(telemetry)
    need = FDS_BASE + n * per
    if need > limit:
        fits = max(0, (limit - FDS_BASE) // per)
        raise FleetError(
            f"N={n} needs about {need} open files ({per} per agent) but RLIMIT_NOFILE allows"
            f" {limit}: at most N={fits} fits (raise the hard limit: ulimit -Hn, LimitNOFILE=)")
    try:
        pty_max = int(Path("/proc/sys/kernel/pty/max").read_text())
        pty_used = int(Path("/proc/sys/kernel/pty/nr").read_text())
    except (OSError, ValueError):
        return limit
    if pty_used + n > pty_max:
        raise FleetError(f"N={n} simulated modems need {n} ptys but only {pty_max - pty_used} of"
                         f" {pty_max} are free (kernel.pty.max)")
    return limit


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


# -- the broker ---------------------------------------------------------------------------------


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    if found is None:
        raise FleetError("mosquitto not found on PATH or in /usr/sbin: install it, or give"
                         " --broker HOST:PORT")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalBroker:
    """mosquitto on a free loopback port; killed (SIGKILL) and started again on the same port.
    It inherits our raised RLIMIT_NOFILE; ``$SYS`` is published every second."""

    def __init__(self, directory: Path) -> None:
        self.binary = mosquitto_binary()
        self.port = _free_port()
        self.config = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "persistence false", "sys_interval 1", "set_tcp_nodelay true",
                 "max_queued_messages 10000", f"log_dest file {self.log}", "log_type error"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1
        return self.proc

    async def start(self, timeout: float = 10.0) -> None:
        proc = self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FleetError(f"mosquitto exited at start ({proc.returncode}): {self._tail()}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            w.close()
            return
        raise FleetError(f"mosquitto is not listening on port {self.port} after {timeout:g} s")

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "no log"
        return "no log"

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the fleet ----------------------------------------------------------------------------------


def device_id(index: int) -> str:
    return f"gw-{index:05d}"


def _luhn(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def iccid(index: int) -> str:
    body = f"8981100{index:011d}"
    return body + _luhn(body)


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
        mqtt_uplink = getattr(self.daemon, "mqtt", None)
        return bool(mqtt_uplink is not None and mqtt_uplink.ready)

    @property
    def modem_ready(self) -> bool:
        return any(s.state == "ready" for s in self.daemon.sessions.values())

    @property
    def connect_attempts(self) -> int:
        mqtt_uplink = getattr(self.daemon, "mqtt", None)
        return int(mqtt_uplink.connect_attempts) if mqtt_uplink is not None else 0


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
        from agent import config
        from agent.daemon import Daemon
        from agent.sdnotify import Notifier
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
        return await _until(lambda: all(a.online for a in self.agents), timeout)

    async def wait_modems(self, timeout: float) -> bool:
        return await _until(lambda: all(a.modem_ready for a in self.agents), timeout)

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


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 20 ms for up to ``timeout`` seconds; whether it came true."""
    for _ in range(max(1, round(timeout / _POLL))):
        if predicate():
            return True
        await asyncio.sleep(_POLL)
    return predicate()


# -- the operator's eyes: one MQTT client on the same loop ---------------------------------------


class Observer:
    """Subscribes to ``{prefix}/#`` (and ``$SYS/broker/messages/+``): who is online, counts by
    topic, and the time each awaited ``cmd/result`` came. It is driven by the loop like the
    agents' uplinks (agent.uplink_paho): past a thousand agents its socket's number is above
    1024, which paho's own select()-based thread cannot watch."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        from agent.uplink_paho import PahoDriver

        self.host, self.port, self.prefix = host, port, prefix
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"simkeeper-simulate-{os.getpid()}",
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.driver = PahoDriver(self.client)
        self.status: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        # "$SYS/broker/" + (publish/)messages/received|sent -> [(loop time, counter)]
        self.sys: dict[str, list[tuple[float, int]]] = {}
        self.ready = asyncio.Event()
        self._lost: asyncio.Event = asyncio.Event()
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self.results: dict[str, dict[str, Any]] = {}  # awaited cmd/result payloads, by id
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._lost.clear()
            try:
                await self.driver.connect(
                    lambda: self.client.connect(self.host, self.port, 30, clean_start=True))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            await self._lost.wait()
            self.ready.clear()
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await self.driver.close()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.is_failure:
            self._lost.set()
            return
        client.subscribe([(f"{self.prefix}/#", 1), ("$SYS/broker/messages/+", 0),
                          ("$SYS/broker/publish/messages/+", 0)])

    def _on_subscribe(self, *_a: Any) -> None:
        self.ready.set()

    def _on_disconnect(self, *_a: Any) -> None:
        self._lost.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic.startswith("$SYS/broker/"):
            name = topic.removeprefix("$SYS/broker/")
            with contextlib.suppress(ValueError):
                self.sys.setdefault(name, []).append((self._loop.time(), int(msg.payload)))
            return
        parts = topic.split("/", 2)
        if len(parts) < 3:
            return
        device, name = parts[1], parts[2]
        if not msg.retain:
            self.counts[name] += 1
        if name == "status":
            self.status[device] = msg.payload.decode(errors="replace")
        elif name == "cmd/result":
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                result = json.loads(msg.payload)
                waiter = self._waiters.pop(result.get("id"), None)
                if waiter is not None and not waiter.done():
                    self.results[result["id"]] = result
                    waiter.set_result(self._loop.time())

    def online(self) -> int:
        return sum(1 for s in self.status.values() if s == "online")

    def send(self, key: Any, device: str, name: str = "get-state"
             ) -> tuple[str, float, asyncio.Future[float]]:
        """Sign and publish: the command's id, the time it went, and a future with the time its
        result came (the result itself lands in ``results`` under the id)."""
        env = make_envelope(key, device, name)
        future: asyncio.Future[float] = self._loop.create_future()
        self._waiters[env["id"]] = future
        sent = self._loop.time()
        self.client.publish(f"{self.prefix}/{device}/cmd", encode(env), qos=1)
        return env["id"], sent, future


# -- measuring ----------------------------------------------------------------------------------


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[int, float]:
    if not values:
        return {}
    ordered = sorted(values)
    if len(ordered) == 1:
        return dict.fromkeys(qs, ordered[0])
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {q: ordered[0] if q == 0 else ordered[-1] if q == 100 else cuts[q - 1] for q in qs}


def _ms(values: Sequence[float]) -> str:
    p = percentiles(values)
    if not p:
        return "no answers"
    return (f"p50 {p[50] * 1000:.1f} ms, p90 {p[90] * 1000:.1f} ms, p99 {p[99] * 1000:.1f} ms,"
            f" max {max(values) * 1000:.1f} ms")


def histogram(values: Sequence[float], width: int = 40) -> list[str]:
    """One line per 1 s bucket from 0 to the last value."""
    if not values:
        return []
    buckets = Counter(int(v) for v in values)
    top = max(buckets.values())
    lines = []
    for b in range(int(max(values)) + 1):
        count = buckets[b]
        bar = "#" * max(1 if count else 0, count * width // top)
        lines.append(f"    {b:3d}-{b + 1:<3d}s {bar:<{width}} {count}")
    return lines


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Report:
    n: int
    started_s: float = 0.0
    online: int = 0
    modems_ready: int = 0
    fds: int = 0
    fds_fleet: int = 0  # opened by the fleet itself
    threads: int = 0
    rss_mib: float = 0.0
    steady_s: float = 0.0
    settle_s: float = 0.0
    received_per_s: float | None = None  # PUBLISH packets
    sent_per_s: float | None = None
    packets_in_per_s: float | None = None  # every MQTT packet (PUBACK, PINGREQ, ...)
    packets_out_per_s: float | None = None
    observed_per_s: float = 0.0
    observed_by_topic: dict[str, float] = field(default_factory=dict)
    cpu_share: float = 0.0
    sequential: list[float] = field(default_factory=list)
    burst: list[float] = field(default_factory=list)
    burst_s: float = 0.0
    burst_sent: int = 0
    storm: list[float] = field(default_factory=list)  # reconnect time after the restart, s
    storm_missing: int = 0
    storm_attempts: int = 0
    storm_down_s: float = 0.0
    storm_skipped: str | None = None

    def lines(self) -> list[str]:
        n = self.n
        out = [
            f"fleet of {n}: started in {self.started_s:.1f} s; {self.online}/{n} online,"
            f" {self.modems_ready}/{n} modems ready; {self.fds} open files"
            f" ({self.fds_fleet / max(n, 1):.1f} per agent), {self.threads} threads,"
            f" RSS {self.rss_mib:.0f} MiB",
        ]
        sys_rates = ("" if self.received_per_s is None else
                     f" broker ($SYS) PUBLISH {self.received_per_s:.1f}/s in,"
                     f" {self.sent_per_s or 0.0:.1f}/s out (all packets"
                     f" {self.packets_in_per_s or 0.0:.1f}/s in,"
                     f" {self.packets_out_per_s or 0.0:.1f}/s out);")
        topics = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.observed_by_topic.items()))
        out.append(f"(c) steady phase {self.steady_s:.0f} s (after {self.settle_s:.0f} s for the"
                   f" start-up's state and events to go out):{sys_rates} agents published"
                   f" {self.observed_per_s:.1f} msg/s ({topics or 'none'});"
                   f" process CPU {self.cpu_share * 100:.0f}% of one core")
        out.append(f"(b) command round trip, signed get-state, {len(self.sequential)} one at a"
                   f" time: {_ms(self.sequential)}")
        if self.burst_sent:
            rate = 4 * len(self.burst) / self.burst_s if self.burst_s else 0.0
            out.append(f"    burst to all {self.burst_sent}: {len(self.burst)} answered in"
                       f" {self.burst_s:.2f} s ({rate:,.0f} msg/s through the broker):"
                       f" {_ms(self.burst)}")
        if self.storm_skipped:
            out.append(f"(a) connect storm: skipped ({self.storm_skipped})")
        else:
            out += self._storm_lines()
        return out

    def _storm_lines(self) -> list[str]:
        n = self.n
        out = []
        back = len(self.storm)
        p = percentiles(self.storm, (0, 50, 90, 100))
        spread = (f"p0 {p[0]:.2f} s, p50 {p[50]:.2f} s, p90 {p[90]:.2f} s, p100 {p[100]:.2f} s"
                  if p else "none came back")
        missing = f" ({self.storm_missing} not within the wait)" if self.storm_missing else ""
        out.append(f"(a) connect storm: broker SIGKILLed, down {self.storm_down_s:.1f} s,"
                   f" restarted on the same port: {back}/{n} reconnected{missing};"
                   f" after the restart {spread}; {self.storm_attempts} connect attempts"
                   f" ({self.storm_attempts / max(n, 1):.1f} per agent)")
        out.append("    reconnects per second after the restart:")
        out += histogram(self.storm)
        return out


async def settle(observer: Observer, n: int, timeout: float = 90.0) -> float:
    """Wait until the start-up's state and events (first modem reading, keeper transitions,
    batched and rate-limited by each uplink) have gone out: two quiet seconds in a row, with
    fewer than one such message per 200 agents a second. Returns how long it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    quiet = 0

    def noisy() -> int:
        return observer.counts["state"] + observer.counts["events"]

    last = noisy()
    while quiet < 2 and loop.time() - t0 < timeout:
        await asyncio.sleep(1.0)
        now = noisy()
        quiet = quiet + 1 if now - last <= n / 200 else 0
        last = now
    return loop.time() - t0


async def measure_steady(observer: Observer, seconds: float, report: Report) -> None:
    loop = asyncio.get_running_loop()
    before = Counter(observer.counts)
    t0, cpu0 = loop.time(), _cpu()
    await asyncio.sleep(seconds)
    t1, cpu1 = loop.time(), _cpu()
    span = t1 - t0
    delta = observer.counts - before
    report.steady_s = span
    report.observed_per_s = sum(delta.values()) / span
    report.observed_by_topic = {k: v / span for k, v in delta.items()}
    report.cpu_share = (cpu1 - cpu0) / span
    # mosquitto publishes a $SYS counter every sys_interval, and only when it changed
    for name, attr in (("messages/received", "packets_in_per_s"),
                       ("messages/sent", "packets_out_per_s"),
                       ("publish/messages/received", "received_per_s"),
                       ("publish/messages/sent", "sent_per_s")):
        samples = observer.sys.get(name, [])
        at_start = [v for t, v in samples if t <= t0]
        at_end = [v for t, v in samples if t <= t1]
        if at_start and at_end:
            setattr(report, attr, (at_end[-1] - at_start[-1]) / span)


async def measure_commands(fleet: Fleet, observer: Observer, sample: int,
                           report: Report, timeout: float = 10.0) -> None:
    rng = random.Random(1)
    devices = [a.device_id for a in fleet.agents]
    for device in rng.sample(devices, min(sample, len(devices))):
        _cid, sent, future = observer.send(fleet.operator_key, device)
        with contextlib.suppress(TimeoutError):
            report.sequential.append(await asyncio.wait_for(future, timeout) - sent)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    pending = [observer.send(fleet.operator_key, d) for d in devices]
    report.burst_sent = len(pending)
    done, _ = await asyncio.wait([f for _c, _s, f in pending],
                                 timeout=max(30.0, len(devices) / 20))
    report.burst_s = loop.time() - t0
    report.burst = [f.result() - s for _c, s, f in pending if f in done]


async def measure_storm(fleet: Fleet, broker: LocalBroker, down: float, report: Report,
                        timeout: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    agents = fleet.agents
    attempts = sum(a.connect_attempts for a in agents)
    broker.kill()
    t_kill = loop.time()
    await _until(lambda: not any(a.online for a in agents), 10.0)
    await asyncio.sleep(max(0.0, down - (loop.time() - t_kill)))
    await broker.start()
    t_up = loop.time()
    report.storm_down_s = t_up - t_kill
    back: dict[int, float] = {}
    while len(back) < len(agents) and loop.time() - t_up < timeout:
        await asyncio.sleep(_POLL)
        now = loop.time()
        for i, agent in enumerate(agents):
            if i not in back and agent.online:
                back[i] = now - t_up
    report.storm = sorted(back.values())
    report.storm_missing = len(agents) - len(back)
    report.storm_attempts = sum(a.connect_attempts for a in agents) - attempts


# -- the command --------------------------------------------------------------------------------


def _quiet_agents() -> None:
    """A thousand agents each warning that the broker went away is noise: unless more was asked
    (--log-level INFO), only their errors are shown."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("agent", "drivers"):
            logging.getLogger(name).setLevel(logging.ERROR)


def simulate(opts: Options) -> int:
    if opts.n < 1:
        raise FleetError("N must be at least 1")
    check_capacity(opts.n, opts.telemetry)
    _quiet_agents()
    base = opts.directory
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_main(opts, base))
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="simkeeper-fleet-", dir=shm) as tmp:
        return asyncio.run(_main(opts, Path(tmp)))


async def _main(opts: Options, root: Path) -> int:
    out = opts.out
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker: LocalBroker | None = None
    observer: Observer | None = None
    fleet: Fleet | None = None
    try:
        if opts.broker is None:
            broker = LocalBroker(root)
            await broker.start()
            host, port = "127.0.0.1", broker.port
        else:
            host, port = opts.broker
        observer = Observer(host, port, opts.prefix)
        observer.start()
        fleet = Fleet(opts, root, host, port)
        print(f"simkeeper fleet simulate: {opts.n} agents in {root}, broker {host}:{port}"
              f"{' (local mosquitto)' if broker else ''}", file=out, flush=True)
        try:
            report = await _run(opts, fleet, observer, broker, stop)
        except _Stopped:
            return 0
        print("\n".join(report.lines() if opts.report else report.lines()[:1]), file=out,
              flush=True)
        if opts.duration or not opts.report:
            print(f"running (Ctrl-C stops); try: simkeeper fleet send {device_id(1)} get-state"
                  f" --key {fleet.operator_key_path} --broker {host}:{port}", file=out,
                  flush=True)
            left = opts.duration - (loop.time() - started) if opts.duration else None
            if left is None or left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
        return 1 if report.storm_missing else 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if fleet is not None:
            await fleet.stop()
        if observer is not None:
            await observer.close()
        if broker is not None:
            broker.stop()


async def _run(opts: Options, fleet: Fleet, observer: Observer, broker: LocalBroker | None,
               stop: asyncio.Event) -> Report:
    loop = asyncio.get_running_loop()
    out = opts.out
    t0 = loop.time()
    report = Report(opts.n)
    fds_before = open_files()

    def progress(count: int) -> None:
        if count % 250 == 0 or count == opts.n:
            print(f"  {count}/{opts.n} agents started ({loop.time() - t0:.1f} s)", file=out,
                  flush=True)

    await _stoppable(fleet.start(progress), stop)
    await _stoppable(fleet.wait_online(max(60.0, opts.n / 10)), stop)
    await _stoppable(fleet.wait_modems(max(60.0, opts.n / 10)), stop)
    report.started_s = loop.time() - t0
    report.online = sum(a.online for a in fleet.agents)
    report.modems_ready = sum(a.modem_ready for a in fleet.agents)
    report.fds = open_files()
    report.fds_fleet = report.fds - fds_before
    report.threads = threading.active_count()
    report.rss_mib = _rss_mib()
    if not opts.report:
        return report
    await _stoppable(observer.ready.wait(), stop)
    report.settle_s = await _stoppable(settle(observer, opts.n), stop)
    await _stoppable(measure_steady(observer, opts.steady, report), stop)
    await _stoppable(measure_commands(fleet, observer, opts.sample, report), stop)
    if broker is None:
        report.storm_skipped = "the broker was given with --broker: not ours to kill"
    else:
        await _stoppable(measure_storm(fleet, broker, opts.down, report), stop)
    return report


class _Stopped(Exception):
    pass


async def _stoppable(work: Any, stop: asyncio.Event) -> Any:
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Stopped
    return task.result()
