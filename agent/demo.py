"""``simkeeper demo``: the agent end to end on this machine, with a live view.

A simulated modem (``drivers.simulator``) runs a scenario on a real pty; the agent opens it like
any modem and the view refreshes what it reads, with the URCs it hears, until Ctrl-C (or
``--duration`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from agent.cmd_modem import render
from drivers.at import Urc
from drivers.channel import AtChannel
from drivers.errors import ModemError
from drivers.modem import Modem
from drivers.simulator import SimulatedModem, load_scenario

DEMO_SCENARIO = Path(__file__).resolve().parent.parent / "drivers/simulator/scenarios/demo.toml"
CLEAR = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, default=DEMO_SCENARIO,
                        help="simulator scenario (default: the demo tour)")
    parser.add_argument("--interval", type=float, default=2.0, help="refresh period, s")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (0: until Ctrl-C)")


def run(args: argparse.Namespace) -> int:
    asyncio.run(demo(args.scenario, args.interval, args.duration, sys.stdout))
    return 0


async def demo(scenario: Path, interval: float, duration: float, out: TextIO) -> None:
    heard: deque[str] = deque(maxlen=8)
    started = time.monotonic()
    async with SimulatedModem(scenario=load_scenario(scenario)) as sim:
        chan = await AtChannel.open(sim.path)
        modem = Modem(chan)
        stale = [True]  # (re)initialise at start and after every modem reset

        def on_reset(why: str) -> None:
            stale[0] = True
            heard.append(f"{_elapsed(started)}  reset: {why}")

        chan.add_urc_listener(lambda u: heard.append(_stamp(started, u)))
        chan.add_reset_listener(on_reset)
        try:
            while not duration or time.monotonic() - started < duration:
                view = await _snapshot(modem, stale)
                _draw(out, sim.path, started, view, heard)
                await asyncio.sleep(interval)
        finally:
            await chan.close()


async def _snapshot(modem: Modem, stale: list[bool]) -> str:
    try:
        if stale[0]:
            stale[0] = False
            await modem.init()
        info: dict[str, Any] = await modem.info()
    except ModemError as exc:
        stale[0] = True
        return f"(modem not answering: {exc})"
    if info["imei"] is None:
        stale[0] = True  # still booting: set the modem up again next round
    return render(info)


def _draw(out: TextIO, path: str, started: float, view: str, heard: deque[str]) -> None:
    head = f"simkeeper demo: simulated modem on {path}, t+{_elapsed(started)}  (Ctrl-C stops)"
    text = "\n".join([head, "", view, "", "unsolicited:", *heard])
    out.write((CLEAR if out.isatty() else "\n") + text + "\n")
    out.flush()


def _elapsed(started: float) -> str:
    return f"{time.monotonic() - started:5.1f}s"


def _stamp(started: float, urc: Urc) -> str:
    return f"{_elapsed(started)}  {urc.text}"
