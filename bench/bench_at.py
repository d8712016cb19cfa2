"""AT round trips per second: the channel vs raw pyserial, against the same simulator process;
and the peak RSS of ``simkeeper modem info``. Prints figures, asserts nothing."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import serial

from drivers.channel import AtChannel

ROUNDS = 2000
REPEATS = 5
SIMKEEPER = [sys.executable, "-m", "agent.cli"]


@contextmanager
def simulator(personality: str = "quectel") -> Iterator[str]:
    proc = subprocess.Popen(
        [*SIMKEEPER, "simulate-modem", "--personality", personality],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait(10)


def raw_round_trips(path: str, rounds: int) -> float:
    port = serial.Serial(path, 115200, timeout=2)
    port.write(b"ATE0\r")
    time.sleep(0.2)
    port.reset_input_buffer()
    start = time.perf_counter()
    for _ in range(rounds):
        port.write(b"AT+CSQ\r")
        buf = b""
        while not buf.endswith(b"OK\r\n"):
            buf += port.read(max(1, port.in_waiting))
    elapsed = time.perf_counter() - start
    port.close()
    return rounds / elapsed


async def channel_round_trips(path: str, rounds: int) -> float:
    chan = await AtChannel.open(path)
    await chan.command("ATE0")
    start = time.perf_counter()
    for _ in range(rounds):
        await chan.command("AT+CSQ")
    elapsed = time.perf_counter() - start
    await chan.close()
    return rounds / elapsed


def modem_info_peak_rss_kib(path: str) -> int:
    proc = subprocess.Popen(
        [*SIMKEEPER, "modem", "info", "--port", path, "--json"], stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"modem info exited with status {status}")
    return usage.ru_maxrss


def main() -> None:
    raws: list[float] = []
    chans: list[float] = []
    with simulator() as path:
        for _ in range(REPEATS):  # interleaved, so background load hits both alike
            raws.append(raw_round_trips(path, ROUNDS))
            chans.append(asyncio.run(channel_round_trips(path, ROUNDS)))
        rss = modem_info_peak_rss_kib(path)
    raw, chan = statistics.median(raws), statistics.median(chans)
    print(f"AT round trips/s (AT+CSQ, {ROUNDS} x {REPEATS}, median): raw pyserial {raw:,.0f}, "
          f"channel {chan:,.0f}, ratio {chan / raw:.2f} (goal >= 0.9)")
    print(f"peak RSS of `simkeeper modem info`: {rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
