"""``simkeeper simulate-modem``: virtual modems on ptys; prints their paths and runs until
SIGTERM/SIGINT. With one modem the first stdout line is its pty path; after a scenario's
``vanish`` with ``reappear_after``, each new path is printed on its own line. With several
(``--scenario`` repeated: one modem per file, each on its own pty) every line is
``<n> <path>``, ``n`` the modem's place on the command line (1 for the first)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

from drivers.simulator.modem import SimulatedModem
from drivers.simulator.personalities import PERSONALITIES
from drivers.simulator.scenario import ScenarioError, load_scenario

PROG = "simkeeper simulate-modem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        metavar="FILE",
        action="append",
        help="scenario file (.toml or .json): initial state and timed steps; repeat it to run "
        "one modem per file, each on its own pty",
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


def _printer(number: int | None) -> Callable[[str], None]:
    def print_path(path: str) -> None:
        print(path if number is None else f"{number} {path}", flush=True)

    return print_path


def _modems(args: argparse.Namespace) -> list[SimulatedModem]:
    """One modem per ``--scenario`` (one without); ScenarioError names the file."""
    files: list[str | None] = args.scenario or [None]
    modems = []
    for number, file in enumerate(files, 1):
        try:
            scenario = load_scenario(file) if file else None
            modems.append(SimulatedModem(
                args.personality, scenario, link=args.link, banner_on_start=args.banner,
                on_path=_printer(number if len(files) > 1 else None)))
        except ScenarioError as exc:
            raise ScenarioError(f"{file}: {exc}") from None
    return modems


async def _serve(modems: list[SimulatedModem]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        for modem in modems:
            await stack.enter_async_context(modem)
        await stop.wait()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.link and args.scenario and len(args.scenario) > 1:
        print(f"{PROG}: --link names one port: use it with one modem", file=sys.stderr)
        return 2
    try:
        modems = _modems(args)
    except ScenarioError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(modems))
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
