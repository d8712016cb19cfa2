"""What ``simkeeper fleet simulate --report`` measures, and the report it prints.

:class:`Observer` is the operator's eyes: one MQTT client on the fleet's loop that sees who is
online, counts messages by topic, reads mosquitto's ``$SYS`` counters and times signed
commands. The measurements (the start-up's settling, the steady phase, command round trips,
the connect storm after a broker SIGKILL) fill a :class:`Report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.fleet.localbroker import LocalBroker
from agent.fleet.sign import encode, make_envelope
from agent.fleet.simulate_fleet import POLL, Fleet, poll_until

# -- the operator's eyes: one MQTT client on the same loop ---------------------------------------


class Observer:
    """Subscribes to ``{prefix}/#`` (and ``$SYS/broker/messages/+``): who is online, counts by
    topic, and the time each awaited ``cmd/result`` came. It is driven by the loop like the
    agents' uplinks (agent.telemetry.paho): past a thousand agents its socket's number is above
    1024, which paho's own select()-based thread cannot watch."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        from agent.telemetry.paho import PahoDriver

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


def rss_mib() -> float:
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
    await poll_until(lambda: not any(a.online for a in agents), 10.0)
    await asyncio.sleep(max(0.0, down - (loop.time() - t_kill)))
    await broker.start_async()
    t_up = loop.time()
    report.storm_down_s = t_up - t_kill
    back: dict[int, float] = {}
    while len(back) < len(agents) and loop.time() - t_up < timeout:
        await asyncio.sleep(POLL)
        now = loop.time()
        for i, agent in enumerate(agents):
            if i not in back and agent.online:
                back[i] = now - t_up
    report.storm = sorted(back.values())
    report.storm_missing = len(agents) - len(back)
    report.storm_attempts = sum(a.connect_attempts for a in agents) - attempts
