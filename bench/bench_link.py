"""The agent and a mosquitto bridge on the same emulated cellular link: readings/s delivered,
bytes on the wire per reading, time to drain a backlog. Goal: the agent >= 5x the bridge.

A "cloud" mosquitto sits behind a :class:`bench.link.LinkEmulator`: 256 kbit/s up, 1 Mbit/s
down, 150 ms round trip with +-20 ms of jitter each way, a cut every 30 s (connections reset,
new ones refused for 3 s). Each contender talks to the cloud through it, set up afresh for each
of two rounds, once its session through the link is up:

- steady: readings offered at RATE/s for SECONDS, more than any contender carries on this link,
  so what arrives is what the link lets it carry: delivered/s = readings at the cloud by the
  end of the offer (deduplicated by id) / SECONDS;
- backlog: the link is cut while BACKLOG readings are handed over, then it comes back (cuts on
  schedule again): seconds from then to the last reading's arrival, and readings/s over them.

Bytes on the wire: TCP payload both ways through the emulator (IP and TCP headers not counted;
they would weigh most on the bridge's small packets), per reading delivered.

Contenders, started and watched with bench/bench_bridge.py's helpers (its Sink records at the
cloud, by reading id): the agent, a ``simkeeper run`` subprocess with the simulated modem, its
config at the defaults a field operator keeps but for the uplink host and port (the emulator)
and ``data_path = "external"`` (no NetworkManager here); the same agent tuned as bench_bridge
tunes it (rate limits at their maxima, reconnect backoff at most 1 s), to tell the defaults from
the design; and a mosquitto bridge with persistence, configured as in bench_bridge. Readings
(``{"seq", "temp_c", "rh"}``, values varying from one to the next) go to the agent through one
pipelining ingest connection and to the bridge as QoS 1 publishes, handed over at the ack.

Env: BENCH_LINK_SECONDS (90), BENCH_LINK_RATE (3000), BENCH_LINK_BACKLOG (20000),
BENCH_LINK_CUT_EVERY (30), BENCH_LINK_CUT_FOR (3), BENCH_LINK_UP_KBIT (256),
BENCH_LINK_DOWN_KBIT (1024), BENCH_LINK_RTT_MS (150), BENCH_LINK_JITTER_MS (20),
BENCH_LINK_DRAIN_MAX (600 s: a backlog not drained by then is reported so). A quick run:
``BENCH_LINK_SECONDS=20 BENCH_LINK_CUT_EVERY=10 BENCH_LINK_BACKLOG=5000 python -m bench
bench_link``. Measurements only; nothing is asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.localbroker import end_process, find_mosquitto
from bench.bench_bridge import (
    AGENT_UPLINK,
    TOPIC,
    WAIT,
    Agent,
    Sink,
    agent_config,
    bridge_broker,
    cloud_broker,
    start_simulator,
)
from bench.link import Faults, LinkEmulator, Shape
from tests.broker import wait_until

GOAL = 5.0  # agent / bridge, readings/s delivered
TICK = 0.1  # the steady offer goes in a burst every TICK seconds
SATURATED = 0.95  # a contender that delivers this share of the offer may carry more
DEFAULTS: dict[str, float] = {}  # the agent's own: a budget of 256 KiB a minute


@dataclass(frozen=True)
class Settings:
    seconds: float = 90.0
    rate: float = 3000.0
    backlog: int = 20_000
    cut_every: float = 30.0
    cut_for: float = 3.0
    up_kbit: float = 256.0
    down_kbit: float = 1024.0
    rtt_ms: float = 150.0
    jitter_ms: float = 20.0
    drain_max: float = 600.0

    @classmethod
    def from_env(cls) -> Settings:
        base = cls()
        return dataclasses.replace(base, **{
            f.name: type(getattr(base, f.name))(os.environ[f"BENCH_LINK_{f.name.upper()}"])
            for f in dataclasses.fields(cls) if f"BENCH_LINK_{f.name.upper()}" in os.environ})

    def link(self, cloud_port: int) -> LinkEmulator:
        one_way, jitter = self.rtt_ms / 2000, self.jitter_ms / 1000
        return LinkEmulator(("127.0.0.1", cloud_port), up=Shape(self.up_kbit, one_way, jitter),
                            down=Shape(self.down_kbit, one_way, jitter),
                            faults=Faults(self.cut_every, self.cut_for))


# Hands a running contender the readings of each TICK, paced; returns the ids it acknowledged.
Feed = Callable[[list[range]], list[str]]
Contender = Callable[[Path, int], contextlib.AbstractContextManager[Feed]]  # dir, link port


@dataclass
class Figures:
    handed: int = 0  # readings acknowledged by the contender
    arrived: int = 0  # of those, at the cloud (once each)
    seconds: float | None = None  # steady: the offer; backlog: link back -> last (None: not all)
    up: int = 0  # bytes through the emulator
    down: int = 0
    cuts: int = 0

    @property
    def rate(self) -> float | None:
        return self.arrived / self.seconds if self.seconds else None

    def per_reading(self, n: int) -> str:
        return f"{n / self.arrived:.1f}" if self.arrived else "-"


# -- paced feeders ----------------------------------------------------------------------------


def _ticks(rate: float, seconds: float) -> list[range]:
    """The seqs to send in each TICK of an offer of ``rate``/s for ``seconds``."""
    marks = [round(i * TICK * rate) for i in range(round(seconds / TICK) + 1)]
    return [range(a, b) for a, b in itertools.pairwise(marks)]


def _paced(ticks: list[range], send: Callable[[range], object]) -> None:
    started = time.monotonic()
    for i, seqs in enumerate(ticks, 1):
        send(seqs)
        time.sleep(max(0.0, started + i * TICK - time.monotonic()))


def reading(seq: int) -> bytes:
    """A reading's data; its values vary from one to the next, as a sensor's do, so that
    compression is not flattered."""
    return b'{"seq":%d,"temp_c":%.1f,"rh":%.1f}' % (
        seq, 21.5 + (seq * 7919 % 41 - 20) / 10, 40.2 + (seq * 104729 % 61 - 30) / 10)


def feed_agent(path: Path, ticks: list[range]) -> list[str]:
    """One pipelining ingest connection; a reading is handed over at its ``{"ok": true}``."""
    ids: list[str] = []
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))

        def answers() -> None:
            with s.makefile("rb") as lines:
                for _ in range(ticks[-1].stop):
                    answer = json.loads(lines.readline())
                    if not answer.get("ok"):
                        raise RuntimeError(f"ingest refused a reading: {answer}")
                    ids.append(answer["id"])

        reader = threading.Thread(target=answers)
        reader.start()
        topic = b'{"topic":"%s","data":' % TOPIC.encode()
        _paced(ticks, lambda seqs: s.sendall(b"".join(topic + reading(q) + b"}\n" for q in seqs)))
        reader.join()
    return ids


def feed_bridge(port: int, ticks: list[range]) -> list[str]:
    """QoS 1 publishes to the bridge mosquitto; handed over at the PUBACK."""
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-feeder")
    client.max_inflight_messages_set(0)  # no limit: the local broker acks at once
    client.max_queued_messages_set(0)
    client.on_publish = lambda *_: acked.release()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        _paced(ticks, lambda seqs: [client.publish(TOPIC, reading(q), qos=1) for q in seqs])
        for _ in range(ticks[-1].stop):
            if not acked.acquire(timeout=WAIT):
                raise TimeoutError("PUBACKs from the bridge mosquitto")
    finally:
        client.disconnect()
        client.loop_stop()
    return [str(q) for q in range(ticks[-1].stop)]


# -- contenders -------------------------------------------------------------------------------


def agent(modem: Path, uplink: dict[str, float]) -> Contender:
    @contextlib.contextmanager
    def running(work: Path, link_port: int) -> Iterator[Feed]:
        instance = Agent(agent_config(work, modem, link_port, uplink), work)
        instance.start()
        try:
            yield functools.partial(feed_agent, instance.socket)
        finally:
            instance.stop()
    return running


def bridge(binary: str) -> Contender:
    @contextlib.contextmanager
    def running(work: Path, link_port: int) -> Iterator[Feed]:
        broker = bridge_broker(binary, work / "bridge", link_port)
        broker.start(WAIT)
        try:
            yield functools.partial(feed_bridge, broker.port)
        finally:
            broker.stop()
    return running


# -- one round --------------------------------------------------------------------------------


@contextlib.contextmanager
def _session(s: Settings, binary: str, work: Path,
             contender: Contender) -> Iterator[tuple[LinkEmulator, Sink, Feed]]:
    """A fresh cloud, its sink, the link before it, and the contender with its session through
    the link up (a CONNACK came back)."""
    cloud = cloud_broker(binary, work / "cloud")
    cloud.start(WAIT)
    sink = Sink(cloud)
    sink.register()
    sink.attach()
    link = s.link(cloud.port).start()
    try:
        with contender(work, link.port) as feed:
            wait_until(lambda: link.down.delivered > 0, WAIT, "a session through the link")
            yield link, sink, feed
    finally:
        link.stop()
        sink.detach()
        cloud.stop()


def steady(s: Settings, binary: str, work: Path, contender: Contender) -> Figures:
    with _session(s, binary, work, contender) as (link, sink, feed):
        link.begin_faults()
        up, down, cuts, started = link.up.sent, link.down.sent, link.cuts, time.time()
        ids = set(feed(_ticks(s.rate, s.seconds)))
        arrived = [at for at in _arrivals(sink, ids) if at <= started + s.seconds]
        return Figures(len(ids), len(arrived), s.seconds, link.up.sent - up,
                       link.down.sent - down, link.cuts - cuts)


def backlog(s: Settings, binary: str, work: Path, contender: Contender) -> Figures:
    with _session(s, binary, work, contender) as (link, sink, feed):
        link.cut()
        ids = set(feed([range(s.backlog)]))
        link.restore()
        link.begin_faults()
        up, down, cuts, started = link.up.sent, link.down.sent, link.cuts, time.time()
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: sink.unique() >= len(ids), s.drain_max, "the drain")
        arrived = _arrivals(sink, ids)
        seconds = max(arrived) - started if len(arrived) == len(ids) else None
        return Figures(len(ids), len(arrived), seconds, link.up.sent - up,
                       link.down.sent - down, link.cuts - cuts)


def _arrivals(sink: Sink, ids: set[str]) -> list[float]:
    """When each of ``ids`` first reached the cloud (Unix seconds, stamped by mosquitto_sub)."""
    first: dict[str, float] = {}
    with sink.lock:
        for at, i in sink.arrivals:
            if i in ids:
                first.setdefault(i, at)
    return list(first.values())


# -- the table --------------------------------------------------------------------------------


def report(s: Settings, rows: dict[str, tuple[Figures, Figures]]) -> None:
    print(f"link: {s.up_kbit:g} kbit/s up, {s.down_kbit:g} kbit/s down, {s.rtt_ms:g} ms round"
          f" trip, +-{s.jitter_ms:g} ms jitter each way, a cut every {s.cut_every:g} s for"
          f" {s.cut_for:g} s (connections reset, new ones refused); {os.cpu_count()} cpus")
    print(f"steady: {s.rate:,.0f} readings/s offered for {s.seconds:g} s; backlog:"
          f" {s.backlog:,} readings handed over while the link is cut, then it comes back")
    print("B/r: TCP payload through the link per reading delivered, up (up+down);"
          " cuts: scheduled cuts during the measurement")
    print(f"  {'':<40}| {'steady /s':>10} {'B/r':>13} {'cuts':>4} | {'drained in':>10}"
          f" {'rate /s':>8} {'B/r':>13} {'cuts':>4}")
    for name, (offer, drain) in rows.items():
        drained = (f"{drain.seconds:.1f} s" if drain.seconds is not None
                   else f"{drain.arrived:,}/{drain.handed:,}")
        print(f"  {name:<40}| {_rate(offer):>10} {_bytes(offer):>13} {offer.cuts:>4} |"
              f" {drained:>10} {_rate(drain):>8} {_bytes(drain):>13} {drain.cuts:>4}"
              + ("  (all it was offered: raise BENCH_LINK_RATE)"
                 if offer.arrived >= SATURATED * offer.handed else ""))
    bridge_figures = rows["mosquitto bridge"]
    for name in (n for n in rows if n != "mosquitto bridge"):
        goal = f" (goal >= {GOAL:g}x)"
        ratios = [f"{a.rate / b.rate:.2f}x" if a.rate and b.rate else "-"
                  for a, b in zip(rows[name], bridge_figures, strict=True)]
        print(f"  {name} / bridge, readings/s: steady {ratios[0]}, backlog {ratios[1]}{goal}")


def _bytes(f: Figures) -> str:
    return f"{f.per_reading(f.up)} ({f.per_reading(f.up + f.down)})"


def _rate(f: Figures) -> str:
    return "-" if f.rate is None else f"{f.rate:,.0f}"


def main() -> None:
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_sub") is None:
        print("skipped: mosquitto and mosquitto_sub are needed (make deps installs them)")
        return
    s = Settings.from_env()
    rows: dict[str, tuple[Figures, Figures]] = {}
    with tempfile.TemporaryDirectory(prefix="sklk", dir=os.environ.get("BENCH_DIR")) as tmp:
        directory = Path(tmp)
        sim, modem = start_simulator(directory)
        try:
            # An operator who gives the agent the link's whole rate: the byte budget at the
            # link's, batches up to 64 KiB (one a second at the default message rate).
            budget = {"rate_bytes_per_minute": int(s.up_kbit * 1000 / 8 * 60),
                      "batch_max_bytes": 65536}
            contenders = {"agent (defaults)": agent(modem, DEFAULTS),
                          "agent (budget = the link)": agent(modem, budget),
                          "agent (bench_bridge's loopback tuning)": agent(modem, AGENT_UPLINK),
                          "mosquitto bridge": bridge(binary)}
            for name, contender in contenders.items():
                figures = []
                for measure in (steady, backlog):
                    work = directory / f"{len(rows)}-{measure.__name__}"
                    work.mkdir()
                    figures.append(measure(s, binary, work, contender))
                    print(f"  ({name}, {measure.__name__}: done)", flush=True)
                rows[name] = (figures[0], figures[1])
        finally:
            end_process(sim)
    report(s, rows)


if __name__ == "__main__":
    main()
