"""Steady RSS of the daemon (goal <= 30 MB).

A real ``simkeeper run`` subprocess against a simulated modem (``simkeeper simulate-modem``)
and a local mosquitto, fed a steady trickle of readings through its ingest socket; VmRSS from
/proc/PID/status is sampled every second. Prints RSS right after start (ingest socket ready),
min / median / max over the run, and VmHWM. When the median is over the goal (or
``BENCH_RSS_IMPORTS=1``), it also prints which imports the memory goes to: the modules the
daemon loads (recorded by a second start under ``python -X importtime``) imported again in a
fresh interpreter in the same order, each one's RSS growth charged to its top-level package.

``BENCH_RSS_SECONDS`` (default 40) and ``BENCH_RSS_RATE`` (readings/s, default 10) change the
run. Measurements only; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from agent.fleet.localbroker import LocalBroker, end_process, find_mosquitto
from bench.bench_bridge import Agent, agent_config, start_simulator

GOAL_MB = 30.0
TOPIC = "bench/rss"
# Uplink settings of the shipped defaults, except a short reconnect (the broker is local).
UPLINK = {"batch_max_latency": 5.0, "reconnect_min": 0.1, "reconnect_max": 5.0}


def status_kb(pid: int, field: str) -> int | None:
    """``field`` (VmRSS, VmHWM) of /proc/PID/status in kB; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


async def _trickle(path: Path, rate: float, seconds: float, samples: list[int],
                   pid: int) -> int:
    """One app publishing ``rate`` readings a second, each answered; VmRSS every second."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    sent, started = 0, time.monotonic()
    next_sample = started + 1.0
    try:
        while (now := time.monotonic()) - started < seconds:
            if now >= next_sample:
                if (rss := status_kb(pid, "VmRSS")) is not None:
                    samples.append(rss)
                next_sample += 1.0
            line = {"topic": TOPIC, "data": {"n": sent, "temp_c": 21.5, "rh": 40.2}}
            writer.write(json.dumps(line).encode() + b"\n")
            answer = json.loads(await reader.readline())
            if not answer.get("ok"):
                raise RuntimeError(f"ingest refused a reading: {answer}")
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    finally:
        writer.close()
    return sent


def measure(directory: Path, binary: str, seconds: float, rate: float) -> dict[str, object]:
    broker = LocalBroker(directory / "broker", ["persistence false"], binary=binary)
    sim, modem = start_simulator(directory)
    broker.start()
    agent = Agent(agent_config(directory, modem, broker.port, UPLINK), directory)
    try:
        agent.start()
        assert agent.proc is not None
        pid = agent.proc.pid
        at_start = status_kb(pid, "VmRSS")
        samples: list[int] = []
        sent = asyncio.run(_trickle(agent.socket, rate, seconds, samples, pid))
        hwm = status_kb(pid, "VmHWM")
    finally:
        agent.stop(signal.SIGTERM)
        broker.stop()
        end_process(sim)
    return {"start": at_start, "samples": samples, "hwm": hwm, "sent": sent}


def loaded_modules(directory: Path, binary: str) -> list[str]:
    """Every module the daemon imports, in the order each finished importing (dependencies
    before their importers), from a start under ``-X importtime`` that runs a few seconds."""
    broker = LocalBroker(directory / "broker-it", ["persistence false"], binary=binary)
    sim, modem = start_simulator(directory)
    broker.start()
    work = directory / "importtime"
    work.mkdir()
    config = agent_config(work, modem, broker.port, UPLINK)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "agent.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(8)  # started, connected, the modem session up
    finally:
        end_process(proc)
        broker.stop()
        end_process(sim)
    assert proc.stderr is not None
    names = []
    for line in proc.stderr.read().splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.append(name)
    return names


_PROBE = """
import importlib, json, re, sys
def rss():
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\\s+(\\d+) kB", f.read(), re.M).group(1))
base = rss()
grown = {}
single = []
for name in json.loads(sys.stdin.read()):
    before = rss()
    try:
        importlib.import_module(name)
    except Exception:
        continue
    top = name.split(".")[0]
    grown[top] = grown.get(top, 0) + rss() - before
    single.append((rss() - before, name))
single.sort(reverse=True)
print(json.dumps({"base": base, "total": rss(), "grown": grown, "single": single[:12]}))
"""


def importers(directory: Path, binary: str) -> None:
    names = loaded_modules(directory, binary)
    done = subprocess.run([sys.executable, "-c", _PROBE], input=json.dumps(names),
                          capture_output=True, text=True, check=True, cwd=Path.cwd())
    probe = json.loads(done.stdout)
    grown = Counter(probe["grown"])
    print(f"  where it goes: {len(names)} modules imported by the daemon, re-imported in a fresh"
          f" interpreter in the same order: {probe['base'] / 1024:.1f} MB bare interpreter,"
          f" {probe['total'] / 1024:.1f} MB after")
    print("  RSS growth by top-level package (its own modules; dependencies charged to theirs):")
    for top, kb in grown.most_common(12):
        print(f"    {top:<24} {kb / 1024:6.1f} MB")
    print("  heaviest single imports (first-time allocator growth makes these noisy):")
    print("    " + ", ".join(f"{name} {kb / 1024:.1f}" for kb, name in probe["single"]) + " MB")


def main() -> None:
    binary = find_mosquitto()
    if binary is None:
        print("skipped: mosquitto is not installed (make deps installs it)")
        return
    seconds = float(os.environ.get("BENCH_RSS_SECONDS", "40"))
    rate = float(os.environ.get("BENCH_RSS_RATE", "10"))
    with tempfile.TemporaryDirectory(prefix="skrss", dir=os.environ.get("BENCH_DIR")) as tmp:
        got = measure(Path(tmp), binary, seconds, rate)
        samples = got["samples"]
        assert isinstance(samples, list)
        mb = [kb / 1024 for kb in samples]
        start, hwm = got["start"], got["hwm"]
        median = statistics.median(mb) if mb else None
        print(f"daemon RSS, {seconds:.0f} s at {rate:g} readings/s ({got['sent']} sent) through"
              " the ingest socket, simulated modem, local mosquitto:")
        print(f"  right after start {_mb(start)}; steady min {min(mb, default=0):.1f} /"
              f" median {median or 0:.1f} / max {max(mb, default=0):.1f} MB"
              f" ({len(mb)} samples); VmHWM {_mb(hwm)}; goal <= {GOAL_MB:.0f} MB")
        if (median or 0) > GOAL_MB or os.environ.get("BENCH_RSS_IMPORTS") == "1":
            importers(Path(tmp), binary)


def _mb(kb: object) -> str:
    return f"{kb / 1024:.1f} MB" if isinstance(kb, int) else "-"


if __name__ == "__main__":
    main()
