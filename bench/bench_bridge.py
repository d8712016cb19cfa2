"""Store-and-forward after an outage: the agent next to a mosquitto bridge with persistence.

Both contenders do the same job. A "cloud" mosquitto on a free loopback port is down while
N readings are handed over locally; then it comes up and we time the drain until every reading
has arrived there (deduplicated by reading id). Contenders:

- agent: a real ``simkeeper run`` subprocess (temporary config, a ``simkeeper simulate-modem``
  subprocess as its modem) fed through its ingest socket by pipelining clients; a reading
  counts as handed over at its ``{"ok": true}`` answer (committed to disk).
- bridge: a local mosquitto configured as a bridge to the cloud (``topic # out 1``,
  ``cleansession false``, ``persistence true``, autosave every second, unbounded queue), fed
  the same readings as QoS 1 publishes by a paho client; handed over at the PUBACK.

Then the loss test: the same, but the agent (resp. the bridge mosquitto) is SIGKILLed right
after the last ack, started again, the cloud comes up, and we count what each lost.

What arrives is recorded by ``mosquitto_sub`` (C, timestamps per message) holding a persistent
session on the cloud, so nothing sent before it reconnects is missed. The cloud broker is a
harness: unbounded queue, 1,000 in flight. Measurements only; nothing is asserted.

``BENCH_BRIDGE_N`` sets N (default 20,000); ``python -m bench.bench_bridge [N]`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.fleet.localbroker import LocalBroker, end_process, find_mosquitto
from tests.broker import wait_until

N_DEFAULT = 20_000
DEVICE = "bench-gw"
TOPIC = "bench/room1"
WAIT = 60.0  # upper bound of every wait: a failure, never a speed requirement
QUIET = 6.0  # loss test: the drain is over when nothing new arrived for this long
# The outage lasts at least this long from the first reading handed over: longer than the
# agent's batch_max_latency, as any real outage, so no partial batch is still held back.
OUTAGE = 6.0

# The agent's uplink for the bench: its rate limits at their config maxima, so they are not
# the bottleneck; batching at the defaults; reconnect backoff capped at 1 s like the bridge's
# restart_timeout.
AGENT_UPLINK = {
    "rate_messages_per_minute": 100_000,
    "rate_bytes_per_minute": 1 << 30,
    "batch_max_count": 100,
    "batch_max_bytes": 16384,
    "batch_max_latency": 5.0,
    "reconnect_min": 0.1,
    "reconnect_max": 1.0,
}
BRIDGE_AUTOSAVE = 1  # seconds; mosquitto's default is 1800
BRIDGE_INFLIGHT = 20  # mosquitto's default max_inflight_messages
FEED_CLIENTS = 4  # pipelining ingest clients; the paho feeder keeps as many in flight in total
FEED_WINDOW = 1000  # readings in flight (unanswered) for each feeder at most


def _agent_cmd() -> list[str]:
    return [sys.executable, "-m", "agent.cli"]


# -- mosquitto --------------------------------------------------------------------------------


def cloud_broker(binary: str, directory: Path) -> LocalBroker:
    return LocalBroker(directory, [
        "persistence true", f"persistence_location {directory}/",
        "max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 1000",
    ], binary=binary)


def bridge_broker(binary: str, directory: Path, cloud_port: int) -> LocalBroker:
    return LocalBroker(directory, [
        "persistence true", f"persistence_location {directory}/",
        f"autosave_interval {BRIDGE_AUTOSAVE}",
        "max_queued_messages 0", "max_queued_bytes 0",
        f"max_inflight_messages {BRIDGE_INFLIGHT}",
        "connection cloud", f"address 127.0.0.1:{cloud_port}", "topic # out 1",
        "cleansession false", f"clientid bench-bridge-{cloud_port}",
        "restart_timeout 1 1", "bridge_protocol_version mqttv311", "try_private false",
    ], binary=binary)


# -- what reaches the cloud -------------------------------------------------------------------


class Sink:
    """``mosquitto_sub`` with a persistent session on the cloud: the id of every reading that
    arrives and its arrival time (stamped by mosquitto_sub). Agent batches are decoded
    (zlib or JSON); a bridged message's id is its ``seq``."""

    def __init__(self, cloud: LocalBroker) -> None:
        self.cloud = cloud
        self.client_id = f"bench-sink-{cloud.port}"
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: threading.Thread | None = None

    def _args(self) -> list[str]:
        return ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.cloud.port), "-c", "-i",
                self.client_id, "-q", "1", "-t", "#", "-F", "%U %t %x"]

    def register(self) -> None:
        """Create the persistent session (subscribe, then leave) while the cloud is up."""
        subprocess.run([*self._args(), "-E"], check=True, timeout=WAIT,
                       stdout=subprocess.DEVNULL)

    def attach(self) -> None:
        """Connect (the cloud just came up) and record from now on."""
        self.proc = subprocess.Popen(["stdbuf", "-oL", *self._args()], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, topic, payload = line.decode().split(" ", 2)
            at, data = float(stamp), bytes.fromhex(payload.strip())
            if topic.endswith("/telemetry"):
                batch = json.loads(zlib.decompress(data) if data[:1] == b"\x78" else data)
                ids = [r["id"] for r in batch["readings"] if r["topic"] == TOPIC]
            elif topic == TOPIC:
                ids = [str(json.loads(data)["seq"])]
            else:
                continue
            with self.lock:
                self.arrivals.extend((at, i) for i in ids)

    def detach(self) -> None:
        end_process(self.proc)
        if self.reader is not None:
            self.reader.join(10)
        self.proc = self.reader = None

    def unique(self) -> int:
        with self.lock:
            return len({i for _, i in self.arrivals})

    def last_arrival(self) -> float | None:
        with self.lock:
            return self.arrivals[-1][0] if self.arrivals else None

    def reset(self) -> None:
        with self.lock:
            self.arrivals.clear()


# -- the contenders ---------------------------------------------------------------------------


def start_simulator(directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    link = directory / "modem"
    proc = subprocess.Popen([*_agent_cmd(), "simulate-modem", "--link", str(link)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.readline()  # the pty's path: it is up
    return proc, link


def agent_config(directory: Path, modem: Path, uplink_port: int,
                 uplink: dict[str, float] | None = None, extra: str = "") -> Path:
    settings = "\n".join(f"{k} = {v}" for k, v in
                         (AGENT_UPLINK if uplink is None else uplink).items())
    path = directory / "config.toml"
    path.write_text(
        f'device_id = "{DEVICE}"\n[modem]\nport = "{modem}"\ndata_path = "external"\n'
        f"[uplink]\nport = {uplink_port}\n{settings}\n"
        f'[store]\npath = "{directory / "state/simkeeper.db"}"\n'
        f'[ingest]\nsocket = "{directory / "ingest.sock"}"\n{extra}'
    )
    return path


class Agent:
    """``simkeeper run`` as a subprocess; ready once its ingest socket answers."""

    def __init__(self, config: Path, directory: Path) -> None:
        self.config, self.socket = config, directory / "ingest.sock"
        self.log = directory / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*_agent_cmd(), "run", "--config", str(self.config)],
                                         stdout=log, stderr=log)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"simkeeper run exited: see {self.log}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                return True
            return False

        wait_until(ready, WAIT, "the agent's ingest socket")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        end_process(self.proc, sig)
        self.proc = None


async def _ingest_client(path: Path, seqs: range) -> list[str]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    window = asyncio.Semaphore(FEED_WINDOW)

    async def send() -> None:
        for seq in seqs:
            await window.acquire()
            writer.write(b'{"topic":"%s","data":{"seq":%d,"temp_c":21.5,"rh":40.2}}\n'
                         % (TOPIC.encode(), seq))
            if seq % 100 == 0:
                await writer.drain()
        await writer.drain()

    sender = asyncio.create_task(send())
    ids = []
    for _ in seqs:
        answer = json.loads(await reader.readline())
        window.release()
        if not answer.get("ok"):
            raise RuntimeError(f"ingest refused a reading: {answer}")
        ids.append(answer["id"])
    await sender
    writer.close()
    return ids


def feed_agent(path: Path, n: int) -> list[str]:
    """N readings over FEED_CLIENTS pipelining connections; returns the acked reading ids."""
    async def run() -> list[list[str]]:
        return await asyncio.gather(*(_ingest_client(path, range(c, n, FEED_CLIENTS))
                                      for c in range(FEED_CLIENTS)))
    return [i for ids in asyncio.run(run()) for i in ids]


def feed_bridge(port: int, n: int) -> list[str]:
    """N QoS 1 publishes to the bridge mosquitto; returns their ids once every PUBACK came."""
    acked = threading.Semaphore(0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-feeder")
    client.max_inflight_messages_set(FEED_WINDOW * FEED_CLIENTS)
    client.max_queued_messages_set(0)
    client.on_publish = lambda *_: acked.release()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for seq in range(n):
            client.publish(TOPIC, b'{"seq":%d,"temp_c":21.5,"rh":40.2}' % seq, qos=1)
        for _ in range(n):
            if not acked.acquire(timeout=WAIT):
                raise TimeoutError("PUBACKs from the bridge mosquitto")
    finally:
        client.disconnect()
        client.loop_stop()
    return [str(seq) for seq in range(n)]


# -- one round --------------------------------------------------------------------------------


@dataclass
class Round:
    name: str
    acked: int = 0
    feed_s: float = 0.0
    arrived: int = 0  # unique acked readings that reached the cloud
    duplicates: int = 0
    first_s: float | None = None  # cloud up -> first reading
    drain_s: float | None = None  # cloud up -> last reading
    flow_s: float | None = None  # first reading -> last reading
    p99_s: float | None = None  # cloud up -> 99% of the acked readings
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.acked - self.arrived

    @property
    def rate(self) -> float | None:
        return self.arrived / self.drain_s if self.drain_s else None

    @property
    def p99_rate(self) -> float | None:
        return 0.99 * self.acked / self.p99_s if self.p99_s else None

    @property
    def flow_rate(self) -> float | None:
        """First reading to 99% of them: the throughput, without reconnect delay or tail."""
        if self.p99_s is None or self.first_s is None or self.p99_s <= self.first_s:
            return None
        return 0.99 * self.acked / (self.p99_s - self.first_s)


@dataclass
class Contender:
    name: str
    start: Callable[[], object]
    feed: Callable[[int], list[str]]
    stop: Callable[[int], None]


def one_round(contender: Contender, cloud: LocalBroker, sink: Sink, n: int, *,
              kill: bool) -> Round:
    result = Round(contender.name)
    contender.start()
    try:
        started = time.perf_counter()
        ids = set(contender.feed(n))
        result.feed_s = time.perf_counter() - started
        result.acked = len(ids)
        if kill:
            contender.stop(signal.SIGKILL)  # right after the last ack
            contender.start()
        time.sleep(max(0.0, started + OUTAGE - time.perf_counter()))
        cloud.start(WAIT)
        up = time.time()
        sink.attach()
        if kill:  # wait for all, or until nothing new arrives
            wait_until(lambda: sink.unique() >= len(ids) or _quiet(sink, up), WAIT, "the drain")
        else:
            wait_until(lambda: sink.unique() >= len(ids), 120, "the drain")
        time.sleep(0.3)  # late duplicates
    finally:
        contender.stop(signal.SIGTERM)
        sink.detach()
        cloud.stop()
    with sink.lock:
        arrivals = [(at, i) for at, i in sink.arrivals if i in ids]
    seen: dict[str, float] = {}
    for at, i in arrivals:
        seen.setdefault(i, at)
    result.arrived, result.duplicates = len(seen), len(arrivals) - len(seen)
    if seen:
        result.first_s = min(seen.values()) - up
        result.drain_s = max(seen.values()) - up
        result.flow_s = max(seen.values()) - min(seen.values())
        times = sorted(seen.values())
        if len(times) >= math.ceil(0.99 * len(ids)):
            result.p99_s = times[math.ceil(0.99 * len(ids)) - 1] - up
    sink.reset()
    return result


def _quiet(sink: Sink, up: float) -> bool:
    last = sink.last_arrival()
    now = time.time()
    return now - (last or up) > QUIET


@contextlib.contextmanager
def _cloud(binary: str, directory: Path) -> Iterator[tuple[LocalBroker, Sink]]:
    cloud = cloud_broker(binary, directory / "cloud")
    sink = Sink(cloud)
    cloud.start(WAIT)
    sink.register()
    cloud.stop()  # down: the outage begins
    try:
        yield cloud, sink
    finally:
        sink.detach()
        cloud.stop()


def run_agent(binary: str, directory: Path, n: int) -> list[Round]:
    rounds = []
    sim, modem = start_simulator(directory)
    try:
        for kill in (False, True):
            work = directory / f"agent-{'kill' if kill else 'drain'}"
            work.mkdir()
            with _cloud(binary, work) as (cloud, sink):
                agent = Agent(agent_config(work, modem, cloud.port), work)
                contender = Contender("agent", agent.start,
                                      functools.partial(feed_agent, agent.socket), agent.stop)
                rounds.append(one_round(contender, cloud, sink, n, kill=kill))
    finally:
        end_process(sim)
    return rounds


def run_bridge(binary: str, directory: Path, n: int) -> list[Round]:
    rounds = []
    for kill in (False, True):
        work = directory / f"bridge-{'kill' if kill else 'drain'}"
        work.mkdir()
        with _cloud(binary, work) as (cloud, sink):
            bridge = bridge_broker(binary, work / "bridge", cloud.port)
            contender = Contender("mosquitto bridge", functools.partial(bridge.start, WAIT),
                                  functools.partial(feed_bridge, bridge.port), bridge.stop)
            rounds.append(one_round(contender, cloud, sink, n, kill=kill))
    return rounds


# -- the table --------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def report(n: int, agent: list[Round], bridge: list[Round]) -> None:
    limits = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                       for k, v in AGENT_UPLINK.items())
    print(f"{n:,} readings handed over while the cloud mosquitto is down (outage >="
          f" {OUTAGE:.0f} s), then it comes up; {os.cpu_count()} cpus")
    print(f"  agent: simkeeper run, uplink {limits}, window 4 batches in flight;"
          f" {FEED_CLIENTS} pipelining ingest clients")
    print(f"  bridge: mosquitto {_mosquitto_version()}: topic # out 1, cleansession false,"
          f" persistence true, autosave_interval {BRIDGE_AUTOSAVE} s, max_queued_messages 0"
          f" (no limit), max_inflight_messages {BRIDGE_INFLIGHT}, restart_timeout 1 1;"
          " paho feeder, QoS 1")
    print("  hand-over: acks/s into the contender; first/99%/all: s from the cloud listening to"
          " the first reading, 99% and all of them;\n  rate: readings/s over 'all';"
          " rate99: over '99%'; flow: first reading to 99%")
    print(f"  {'':<16}|{'hand-over':>10} |{'first':>6} |{'99%':>6} |{'all':>6} |{'rate':>7}"
          f" |{'rate99':>7} |{'flow':>7} |{'dups':>5} | SIGKILL after last ack: lost")
    for drain, killed in (agent, bridge):
        feed = drain.acked / drain.feed_s if drain.feed_s else None
        lost = f"{killed.lost:,} of {killed.acked:,}"
        lost += f" (+{killed.duplicates:,} dups)" if killed.duplicates else ""
        print(f"  {drain.name:<16}|{_fmt(feed, ',.0f', '/s'):>10} |"
              f"{_fmt(drain.first_s, '.2f'):>6} |{_fmt(drain.p99_s, '.2f'):>6} |"
              f"{_fmt(drain.drain_s, '.2f'):>6} |{_fmt(drain.rate, ',.0f'):>7} |"
              f"{_fmt(drain.p99_rate, ',.0f'):>7} |{_fmt(drain.flow_rate, ',.0f'):>7} |"
              f"{drain.duplicates:>5,} | {lost}")
        if drain.lost:
            print(f"  {'':<16}  (outage without a kill: {drain.lost:,} of {drain.acked:,}"
                  " never arrived)")
    a, b = agent[0], bridge[0]
    if a.rate and b.rate and a.p99_rate and b.p99_rate:
        print(f"  agent / bridge drain rate (goal >= 1.0x): {a.rate / b.rate:.2f}x over all,"
              f" {a.p99_rate / b.p99_rate:.2f}x to 99%"
              + (f", {a.flow_rate / b.flow_rate:.2f}x flow" if a.flow_rate and b.flow_rate else ""))


def _mosquitto_version() -> str:
    binary = find_mosquitto()
    if binary is None:
        return "?"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    words = out.split()
    return words[2] if len(words) > 2 and words[:2] == ["mosquitto", "version"] else "?"


def main(n: int | None = None) -> None:
    binary = find_mosquitto()
    if binary is None or shutil.which("mosquitto_sub") is None:
        print("skipped: mosquitto and mosquitto_sub are needed (make deps installs them)")
        return
    n = n or int(os.environ.get("BENCH_BRIDGE_N", N_DEFAULT))
    with tempfile.TemporaryDirectory(prefix="skbr", dir=os.environ.get("BENCH_DIR")) as tmp:
        directory = Path(tmp)
        agent = run_agent(binary, directory, n)
        bridge = run_bridge(binary, directory, n)
        report(n, agent, bridge)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
