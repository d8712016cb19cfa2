"""The daemon's memory: steady RSS (goal <= 30 MB), its growth while the outbox fills during a
broker outage, what of it remains once the outbox has drained, and what the first command adds.

A real ``simkeeper run`` subprocess set up like a provisioned gateway (an operator key pinned),
with a simulated modem (``simkeeper simulate-modem``) and a local mosquitto with persistence, fed
readings through its ingest socket, each one answered. VmRSS (/proc/PID/status) is sampled every
second; Pss and private memory (/proc/PID/smaps_rollup) are read at the end of a phase: VmRSS
counts every page of the shared libraries it touched (libpython, libcrypto, libsqlite3), Pss
divides them among the processes that map them.

1. steady: ``BENCH_RSS_SECONDS`` (default 40) at ``BENCH_RSS_RATE`` (10) readings/s;
2. outage: the broker stopped, ``BENCH_RSS_OUTAGE_SECONDS`` (180) at ``BENCH_RSS_OUTAGE_RATE``
   (100) readings/s, which pile up in the outbox. The growth is bounded when what each 30 s
   adds falls towards 0 (the outbox's journal in memory is capped by ``[outbox] journal_bytes``,
   SQLite's page cache by ``cache_size``);
3. drain: the broker back, until every reading of the outage has reached it (a persistent
   ``mosquitto_sub`` session, :class:`bench.bench_bridge.Sink`); then the steady trickle again
   for ``BENCH_RSS_AFTER_SECONDS`` (20): how much of the outage's growth is kept (goal: none);
4. the first signed command (``simkeeper fleet send ... get-state``): checking its signature
   imports ``cryptography``, which stays.

When the steady median is over the goal (or ``BENCH_RSS_IMPORTS=1``), where it goes: the modules
the daemon loads (a second start with ``PYTHONPROFILEIMPORTTIME``) imported again in a fresh
interpreter in the same order, each one's RSS growth charged to its top-level package, and each
import the project's code asks for charged with everything it pulls in. Measurements only;
nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent.fleet.localbroker import LocalBroker, end_process, find_mosquitto
from bench.bench_bridge import (
    DEVICE,
    TOPIC,
    Agent,
    Sink,
    agent_config,
    cloud_broker,
    start_simulator,
)

GOAL_MB = 30.0
SLICE = 30.0  # seconds: the outage's growth is shown slice by slice
DRAIN_WAIT = 300.0  # seconds; a bound on the wait, not a speed requirement
SIMKEEPER = [sys.executable, "-m", "agent.cli"]
# Uplink settings of the shipped defaults, except a short reconnect (the broker is local).
UPLINK = {"batch_max_latency": 5.0, "reconnect_min": 0.1, "reconnect_max": 5.0}
OURS = ("agent", "drivers", "provisioning")


def status_kb(pid: int, field: str) -> int | None:
    """``field`` (VmRSS, VmHWM) of /proc/PID/status in kB; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def rollup_kb(pid: int) -> dict[str, int]:
    """Pss and private (clean + dirty) memory of the process in kB, from smaps_rollup."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kb = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {"pss": kb["Pss"], "private": kb["Private_Clean"] + kb["Private_Dirty"]}


@dataclass
class Phase:
    """One phase's readings (ids, as answered) and VmRSS samples (seconds in, kB)."""

    seconds: float
    rate: float
    ids: list[str] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    rollup: dict[str, int] = field(default_factory=dict)

    def mb(self) -> list[float]:
        return [kb / 1024 for _, kb in self.samples]

    def median(self) -> float:
        return statistics.median(self.mb()) if self.samples else 0.0

    def at(self, second: float) -> float:
        """VmRSS (MB) of the sample nearest ``second`` into the phase."""
        return min(self.samples, key=lambda s: abs(s[0] - second))[1] / 1024


async def _feed(path: Path, phase: Phase, pid: int) -> None:
    """One app publishing ``phase.rate`` readings a second, each answered; VmRSS every second."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    started = time.monotonic()
    next_sample = started
    try:
        while (now := time.monotonic()) - started < phase.seconds:
            if now >= next_sample:
                if (rss := status_kb(pid, "VmRSS")) is not None:
                    phase.samples.append((now - started, rss))
                next_sample += 1.0
            line = {"topic": TOPIC, "data": {"n": len(phase.ids), "temp_c": 21.5, "rh": 40.2}}
            writer.write(json.dumps(line).encode() + b"\n")
            answer = json.loads(await reader.readline())
            if not answer.get("ok"):
                raise RuntimeError(f"ingest refused a reading: {answer}")
            phase.ids.append(answer["id"])
            await asyncio.sleep(max(0.0, started + len(phase.ids) / phase.rate - time.monotonic()))
    finally:
        writer.close()
    if (rss := status_kb(pid, "VmRSS")) is not None:
        phase.samples.append((time.monotonic() - started, rss))
    phase.rollup = rollup_kb(pid)


def run_phase(agent: Agent, pid: int, seconds: float, rate: float) -> Phase:
    phase = Phase(seconds, rate)
    asyncio.run(_feed(agent.socket, phase, pid))
    return phase


def drain(sink: Sink, ids: list[str]) -> float | None:
    """Seconds until every one of ``ids`` has arrived at the sink; None if they did not within
    DRAIN_WAIT."""
    started = time.monotonic()
    wanted = set(ids)
    while time.monotonic() - started < DRAIN_WAIT:
        with sink.lock:
            if wanted <= {i for _, i in sink.arrivals}:
                return time.monotonic() - started
        time.sleep(0.2)
    return None


@dataclass
class Run:
    start: int | None = None
    steady: Phase | None = None
    outage: Phase | None = None
    drained_in: float | None = None
    after: Phase | None = None
    command: str = ""
    commanded: int | None = None


def pin(keys: Path) -> str:
    """The config lines that pin the operator key made in ``keys`` (``fleet keygen --out``)."""
    return f'[commands]\noperator_key = "{keys / "operator.pub"}"\n'


def measure(directory: Path, binary: str, env: dict[str, float], keys: Path) -> Run:
    broker = cloud_broker(binary, directory / "broker")
    sim, modem = start_simulator(directory)
    broker.start()
    agent = Agent(agent_config(directory, modem, broker.port, UPLINK, pin(keys)), directory)
    sink = Sink(broker)
    run = Run()
    try:
        agent.start()
        assert agent.proc is not None
        pid = agent.proc.pid
        run.start = status_kb(pid, "VmRSS")
        run.steady = run_phase(agent, pid, env["seconds"], env["rate"])
        sink.register()
        broker.stop()
        run.outage = run_phase(agent, pid, env["outage_seconds"], env["outage_rate"])
        broker.start()
        sink.attach()
        run.drained_in = drain(sink, run.outage.ids)
        run.after = run_phase(agent, pid, env["after_seconds"], env["rate"])
        sent = subprocess.run(
            [*SIMKEEPER, "fleet", "send", DEVICE, "get-state", "--key", str(keys / "operator.key"),
             "--broker", f"127.0.0.1:{broker.port}", "--timeout", "60"],
            check=False, capture_output=True, text=True)  # a refused command is answered too
        run.command = _answer(sent.stdout or sent.stderr)
        run.commanded = status_kb(pid, "VmRSS")
    finally:
        sink.detach()
        agent.stop()
        broker.stop()
        end_process(sim)
    return run


# -- where it goes ----------------------------------------------------------------------------


def import_tree(directory: Path, binary: str, keys: Path) -> list[tuple[int, str]]:
    """(depth, module) of every module the daemon imports, as ``-X importtime`` prints them:
    each one after what it imported, one level deeper. From a start that has connected to the
    broker (its retained ``online``) and answered readings."""
    broker = LocalBroker(directory / "broker-it", ["persistence false"], binary=binary)
    sim, modem = start_simulator(directory)
    broker.start()
    work = directory / "importtime"
    work.mkdir()
    agent = Agent(agent_config(work, modem, broker.port, UPLINK, pin(keys)), work)
    os.environ["PYTHONPROFILEIMPORTTIME"] = "1"
    try:
        agent.start()
        assert agent.proc is not None
        run_phase(agent, agent.proc.pid, 2.0, 10.0)
        subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t",
                        f"simkeeper/{DEVICE}/status", "-C", "1", "-W", "60"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        del os.environ["PYTHONPROFILEIMPORTTIME"]
        agent.stop()
        broker.stop()
        end_process(sim)
    tree = []
    for line in agent.log.read_text().splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1]
            if name.strip() not in ("", "imported package"):
                tree.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip()))
    return tree


_PROBE = """
import importlib, json, re, sys
def rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\\s+(\\d+) kB", f.read(), re.M).group(1))
base = rss()
grown = []
for name in json.loads(sys.stdin.read()):
    before = rss()
    try:
        importlib.import_module(name)
    except Exception:
        pass
    grown.append(rss() - before)
print(json.dumps({"base": base, "total": rss(), "grown": grown}))
"""


def importers(directory: Path, binary: str, keys: Path) -> None:
    tree = import_tree(directory, binary, keys)
    done = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps([n for _, n in tree]),
                          capture_output=True, text=True, check=True, cwd=Path.cwd())
    probe = json.loads(done.stdout)
    grown: list[int] = probe["grown"]
    own = Counter[str]()
    pulled = []  # (kB with all it imported, module, importer)
    for i, (depth, name) in enumerate(tree):
        own[name.split(".")[0]] += grown[i]
        j = i - 1  # what it imported: the lines just above, deeper
        total = grown[i]
        while j >= 0 and tree[j][0] > depth:
            total += grown[j]
            j -= 1
        parent = next((n for d, n in tree[i + 1:] if d < depth), "top level")
        if name.split(".")[0] not in OURS and (depth == 0 or parent.split(".")[0] in OURS):
            pulled.append((total, name, parent))
    print(f"  where it goes: {len(tree)} modules imported by the daemon, re-imported in a fresh"
          f" interpreter in the same order: {probe['base'] / 1024:.1f} MB bare interpreter,"
          f" {probe['total'] / 1024:.1f} MB after (first-time allocator growth makes single"
          " figures noisy)")
    print("  RSS growth by top-level package (its own modules; dependencies charged to theirs):")
    print("    " + ", ".join(f"{top} {kb / 1024:.1f}" for top, kb in own.most_common(14)) + " MB")
    print("  imports the project asks for, each with all it pulls in (asked by):")
    for kb, name, parent in sorted(pulled, reverse=True)[:12]:
        print(f"    {name:<24} {kb / 1024:5.1f} MB  ({parent})")


# -- the report -------------------------------------------------------------------------------


def _mb(kb: object) -> str:
    return f"{kb / 1024:.1f} MB" if isinstance(kb, int) else "-"


def _answer(text: str) -> str:
    """The status of the result ``fleet send`` printed, else its first line."""
    line = (text.strip().splitlines() or ["no output"])[0]
    try:
        return str(json.loads(line)["status"])
    except (ValueError, KeyError, TypeError):
        return line[:60]


def report(run: Run) -> float:
    """Print the figures; returns the steady median (MB)."""
    steady, outage, after = run.steady, run.outage, run.after
    assert steady is not None and outage is not None and after is not None
    median = steady.median()
    mb = steady.mb()
    verdict = "met" if median <= GOAL_MB else f"MISSED by {median - GOAL_MB:.1f} MB"
    print(f"  steady, {steady.seconds:.0f} s at {steady.rate:g} readings/s: VmRSS median"
          f" {median:.1f} MB (min {min(mb):.1f}, max {max(mb):.1f}; right after start"
          f" {_mb(run.start)}); goal <= {GOAL_MB:.0f} MB: {verdict}")
    _rollup(steady)
    top = outage.at(outage.seconds)
    ends = [min(t + SLICE, outage.seconds) for t in range(0, int(outage.seconds), int(SLICE))]
    added = [outage.at(end) - outage.at(end - SLICE) for end in ends]
    print(f"  outage, {outage.seconds:.0f} s at {outage.rate:g} readings/s ({len(outage.ids)}"
          f" readings held): VmRSS {median:.1f} -> {top:.1f} MB, {top - median:+.1f} MB; added"
          f" each {SLICE:.0f} s: {', '.join(f'{a:+.1f}' for a in added)} MB; goal: bounded"
          " (what a slice adds falls towards 0)")
    _rollup(outage)
    if run.drained_in is None:
        print(f"  drain: not every outage reading arrived within {DRAIN_WAIT:.0f} s")
    else:
        print(f"  drain: every outage reading arrived {run.drained_in:.0f} s after the broker"
              " came back")
    print(f"  after the drain, {after.seconds:.0f} s at {after.rate:g} readings/s: VmRSS median"
          f" {after.median():.1f} MB: kept {after.median() - median:+.1f} of the outage's"
          f" {top - median:+.1f} MB; goal: none kept")
    _rollup(after)
    print(f"  first signed command (fleet send get-state, {run.command}): VmRSS"
          f" {_mb(run.commanded)} (cryptography, imported for the signature, stays)")
    return median


def _rollup(phase: Phase) -> None:
    print(f"    at its end: Pss {_mb(phase.rollup['pss'])}, private"
          f" {_mb(phase.rollup['private'])}")


def main() -> None:
    binary = find_mosquitto()
    if binary is None:
        print("skipped: mosquitto is not installed (make deps installs it)")
        return
    env = {
        "seconds": float(os.environ.get("BENCH_RSS_SECONDS", "40")),
        "rate": float(os.environ.get("BENCH_RSS_RATE", "10")),
        "outage_seconds": float(os.environ.get("BENCH_RSS_OUTAGE_SECONDS", "180")),
        "outage_rate": float(os.environ.get("BENCH_RSS_OUTAGE_RATE", "100")),
        "after_seconds": float(os.environ.get("BENCH_RSS_AFTER_SECONDS", "20")),
    }
    with tempfile.TemporaryDirectory(prefix="skrss", dir=os.environ.get("BENCH_DIR")) as tmp:
        print("daemon memory: simkeeper run with an operator key pinned, a simulated modem,"
              " a local mosquitto; readings through the ingest socket")
        keys = Path(tmp) / "keys"
        subprocess.run([*SIMKEEPER, "fleet", "keygen", "--out", str(keys)], check=True,
                       stdout=subprocess.DEVNULL)
        median = report(measure(Path(tmp), binary, env, keys))
        if median > GOAL_MB or os.environ.get("BENCH_RSS_IMPORTS") == "1":
            importers(Path(tmp), binary, keys)


if __name__ == "__main__":
    main()
