"""``simkeeper simulate-modem``: a virtual modem on a pty; prints its path and runs until
SIGTERM/SIGINT. The first stdout line is the pty path; after a scenario's ``vanish`` with
``reappear_after``, each new path is printed on its own line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from drivers.simulator.modem import SimulatedModem
from drivers.simulator.personalities import PERSONALITIES
from drivers.simulator.scenario import Scenario, ScenarioError, load_scenario

PROG = "simkeeper simulate-modem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        help="scenario file (.toml or .json): initial state and timed steps",
    )
    parser.add_argument(
        "--personality",
        choices=sorted(PERSONALITIES),
        help="modem to imitate (default: the scenario's, else quectel)",
    )
    parser.add_argument(
        "--link", metavar="PATH", help="also make PATH a symlink to the pty, for a stable port name"
    )
    parser.add_argument(
        "--banner",
        action="store_true",
        help="print the boot banner (e.g. RDY) at start, as after power-on",
    )


def _print_path(path: str) -> None:
    print(path, flush=True)


async def _serve(args: argparse.Namespace, scenario: Scenario | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sim = SimulatedModem(
        args.personality, scenario, link=args.link, banner_on_start=args.banner, on_path=_print_path
    )
    async with sim:
        await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    scenario = None
    if args.scenario:
        try:
            scenario = load_scenario(args.scenario)
        except ScenarioError as exc:
            print(f"{PROG}: {args.scenario}: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_serve(args, scenario))
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
