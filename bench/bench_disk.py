"""What the agent costs an SD card: bytes written to disk and syncs, per reading and per hour.

Measured the way the field report measured it: a real ``simkeeper run`` (simulated modem, a
local mosquitto up), ``write_bytes`` from ``/proc/PID/io`` (bytes the process dirtied in the
page cache, i.e. what will reach the disk) and the ``fsync``/``fdatasync`` calls counted by
``strace -c`` attached for the window. Three loads, for each durability mode:

- steady: one producer sends one reading every 1/RATE s and waits for its answer (no bursts,
  so no group commit helps); the readings go up as they come;
- idle: nothing sent for the window; what the agent writes on its own;
- outage: the broker is down while the same steady load arrives (the readings stay on disk).

``BENCH_DISK_SECONDS`` sets the steady and outage windows (default 60 s),
``BENCH_DISK_IDLE_SECONDS`` the idle one (default 600 s: the agent's own writes come every few
minutes; it starts 90 s after the steady load), ``BENCH_DISK_RATE`` the steady rate (default
10 readings/s). Measurements only; nothing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agent.fleet.localbroker import end_process, find_mosquitto
from bench.bench_bridge import Agent, agent_config, cloud_broker, start_simulator

SECONDS = float(os.environ.get("BENCH_DISK_SECONDS", "60"))
IDLE_SECONDS = float(os.environ.get("BENCH_DISK_IDLE_SECONDS", "600"))
# After the steady load and before the idle window: what the load itself leaves to write (the
# readings_sent count reaches the runtime row a minute later, the journal's sync) is not idle.
SETTLE = 90.0
RATE = float(os.environ.get("BENCH_DISK_RATE", "10"))
GOAL_PER_READING = 1024  # bytes written per reading at a steady 10 readings/s
GOAL_IDLE_PER_HOUR = 0.5 * 1024 * 1024
MODES = tuple(os.environ.get("BENCH_DISK_MODES", "crash-safe,power-safe").split(","))
LINE = b'{"topic":"sensors/room1","data":{"temp_c":21.5,"rh":40.2,"seq":%d}}\n'


def write_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/io").read_text()
    return int(re.search(r"^write_bytes: (\d+)", text, re.M).group(1))  # type: ignore[union-attr]


@contextlib.contextmanager
def syncs(pid: int) -> Iterator[dict[str, int]]:
    """Count the fsync/fdatasync calls of ``pid`` (all threads) while the block runs."""
    counts: dict[str, int] = {}
    if shutil.which("strace") is None:
        yield counts
        return
    out = tempfile.NamedTemporaryFile("r", suffix=".strace")  # noqa: SIM115
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-o", out.name, "-p", str(pid)],
        stderr=subprocess.PIPE,
    )
    assert tracer.stderr is not None
    tracer.stderr.readline()  # "strace: Process N attached": counting from here
    try:
        yield counts
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        for line in Path(out.name).read_text().splitlines():
            fields = line.split()
            if fields and fields[-1] in ("fsync", "fdatasync"):
                counts[fields[-1]] = int(fields[3])
        out.close()


def steady(sock: Path, rate: float, seconds: float) -> int:
    """One reading at a time, each answered before the next is due; returns how many."""
    sent = 0
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        reader = s.makefile("rb")
        start = time.monotonic()
        while (due := start + sent / rate) < start + seconds:
            time.sleep(max(0.0, due - time.monotonic()))
            s.sendall(LINE % sent)
            answer = json.loads(reader.readline())
            if not answer.get("ok"):
                raise RuntimeError(f"ingest refused a reading: {answer}")
            sent += 1
    return sent


def measure(agent: Agent, load: str) -> dict[str, float]:
    assert agent.proc is not None
    pid = agent.proc.pid
    before = write_bytes(pid)
    with syncs(pid) as counted:
        started = time.monotonic()
        window = IDLE_SECONDS if load == "idle" else SECONDS
        readings = steady(agent.socket, RATE, window) if load != "idle" else 0
        time.sleep(max(0.0, started + window - time.monotonic()))
        elapsed = time.monotonic() - started
    written = write_bytes(pid) - before
    return {"readings": readings, "written": written, "seconds": elapsed,
            "syncs": sum(counted.values()) if counted else -1}


def one_mode(binary: str, directory: Path, modem: Path, mode: str) -> dict[str, dict[str, float]]:
    work = directory / mode
    work.mkdir()
    broker = cloud_broker(binary, work / "cloud")
    broker.start(30)
    config = agent_config(work, modem, broker.port, uplink={})
    if mode != "default":  # the key goes into agent_config's [store] table
        text = config.read_text().replace("[store]\n", f'[store]\ndurability = "{mode}"\n')
        config.write_text(text)
    agent = Agent(config, work)
    agent.start()
    results = {}
    try:
        steady(agent.socket, RATE, 2.0)  # warm: the first connection, the schema, the caches
        results["steady"] = measure(agent, "steady")
        time.sleep(SETTLE)
        results["idle"] = measure(agent, "idle")
        broker.stop()
        results["outage"] = measure(agent, "outage")
    finally:
        agent.stop()
        broker.stop()
    return results


def report(mode: str, results: dict[str, dict[str, float]]) -> None:
    s, i, o = results["steady"], results["idle"], results["outage"]
    per = s["written"] / max(1, s["readings"])
    hourly = i["written"] * 3600 / i["seconds"]
    print(f"  {mode}:")
    print(f"    steady {RATE:g}/s, link up: {per:,.0f} B written per reading"
          f" (goal <= {GOAL_PER_READING:,}), {s['syncs'] / max(1, s['readings']):.2f} syncs"
          f" per reading ({s['readings']:.0f} readings)")
    print(f"    idle: {hourly / 1e6:.2f} MB an hour (goal <= {GOAL_IDLE_PER_HOUR / 1e6:.2f}),"
          f" {i['syncs'] * 3600 / i['seconds']:.0f} syncs an hour")
    print(f"    steady {RATE:g}/s, broker down: {o['written'] / max(1, o['readings']):,.0f} B"
          f" written per reading, {o['syncs'] / max(1, o['readings']):.2f} syncs per reading")


def main() -> None:
    binary = find_mosquitto()
    if binary is None:
        print("bench_disk: no mosquitto binary; skipped")
        return
    print(f"SD card: {SECONDS:g} s windows ({IDLE_SECONDS:g} s idle), /proc/PID/io write_bytes"
          " and strace -c"
          f" (fsync+fdatasync){'' if shutil.which('strace') else ' (strace missing: -1)'}")
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp:
        directory = Path(tmp)
        sim, modem = start_simulator(directory)
        try:
            for mode in MODES:
                report(mode, one_mode(binary, directory, modem, mode))
        finally:
            end_process(sim)


if __name__ == "__main__":
    main()
