"""``simkeeper run --config FILE``: the daemon, in the foreground (systemd ``Type=notify``).

Exit 0 after a clean stop (SIGTERM or SIGINT), 2 for a config it refuses (the key and the
reason on one line), 1 when it cannot start (database, ingest socket) or must not (a
decommissioned gateway not re-provisioned since: :mod:`agent.decommission`).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from agent import config
from agent.daemon import Daemon
from agent.decommission import Decommissioned
from agent.ingest import IngestError
from agent.store import StoreError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        return _fail(2, str(exc))
    try:
        asyncio.run(_serve(Daemon(cfg, config_path=config.resolve_path(args.config))))
    except (StoreError, IngestError, Decommissioned) as exc:
        return _fail(1, str(exc))
    return 0


async def _serve(daemon: Daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)


def _fail(status: int, why: str) -> int:
    print(f"simkeeper run: {why}", file=sys.stderr)
    return status
