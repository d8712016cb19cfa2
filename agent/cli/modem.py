"""``simkeeper modem info --port PATH [--baud N] [--json]``: probe one modem and print it."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from agent.cli.errors import CliError
from drivers.channel import AtChannel
from drivers.errors import CommandTimeout, ModemError
from drivers.modem import Modem

PING_TIMEOUT = 2.0  # per attempt; two attempts keep "no modem here" well inside 10 s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="probe one modem and print what it reports")
    info.add_argument("--port", required=True, help="tty path or pyserial URL")
    info.add_argument("--baud", type=int, default=115200,
                      help="serial speed, for a tty (default 115200)")
    info.add_argument("--json", action="store_true", help="one JSON object (DESIGN.md)")


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(probe(args.port, args.baud))
    except ModemError as exc:
        raise CliError(1, str(exc)) from None
    print(json.dumps(result) if args.json else render(result))
    return 0


async def probe(port: str, baud: int) -> dict[str, Any]:
    chan = await AtChannel.open(port, baudrate=baud, recover=False)
    try:
        for attempt in range(2):
            try:
                await chan.command("AT", timeout=PING_TIMEOUT)
                break
            except CommandTimeout:
                if attempt:
                    raise CommandTimeout(f"no modem answers on {port}") from None
            except ModemError:
                break  # it answered, if oddly: a modem is there
        modem = Modem(chan)
        await modem.init()
        return await modem.info()
    finally:
        await chan.close()


def render(info: dict[str, Any]) -> str:
    """A readable table of the probe's result."""
    rows: list[tuple[str, Any]] = [
        ("manufacturer", info["manufacturer"]),
        ("model", info["model"]),
        ("revision", info["revision"]),
        ("imei", info["imei"]),
        ("radio", info["radio"]),
    ]
    for section in ("sim", "registration", "operator", "signal"):
        rows += [(f"{section}.{k}", v) for k, v in info[section].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in rows)
