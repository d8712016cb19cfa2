"""``simkeeper run --config FILE``: the daemon, in the foreground (systemd ``Type=notify``).

Exit 0 after a clean stop (SIGTERM or SIGINT), 2 for a config it refuses (the key and the
reason on one line), 1 when it cannot start (database, ingest socket, an operator key that is
not an Ed25519 public key PEM) or must not (a decommissioned gateway not re-provisioned since:
:mod:`agent.sim.decommission`).

``simkeeper run --preflight`` starts nothing: exit 1 with the daemon's one-line refusal when the
gateway is decommissioned and not re-provisioned (after finishing what an interrupted
decommission left, as the refused start would), else 0. It is the unit's ``ExecCondition=``: a
skipped unit is not restarted, where a refused start (exit 1) would be, every ``RestartSec``.
Only the decommission is its business: a config or database the daemon cannot use passes (exit
0), so that the daemon reports it and the unit fails, visibly, as before.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from agent.cli.errors import CliError
from agent.core import config
from agent.core.store import Store, StoreError
from agent.sim import decommission
from agent.sim.decommission import Decommissioned

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)
    parser.add_argument("--preflight", action="store_true",
                        help="start nothing: exit 1 (and say why) when the daemon must not start")


def run(args: argparse.Namespace) -> int:
    if args.preflight:
        return preflight(args)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    from agent.commands.journal import OperatorKeyError
    from agent.daemon import Daemon  # the daemon's stack only when it runs, not for preflight
    from agent.telemetry.ingest import IngestError

    try:
        asyncio.run(_serve(Daemon(cfg, config_path=config.resolve_path(args.config))))
    except (StoreError, IngestError, Decommissioned, OperatorKeyError) as exc:
        raise CliError(1, str(exc)) from None
    return 0


def preflight(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        log.debug("preflight: %s: the daemon reports it", exc)
        return 0
    if not cfg.store.path.exists():  # never run: nothing recorded, and nothing created here
        return 0
    try:
        store = Store(cfg.store.path)
    except StoreError as exc:
        log.debug("preflight: %s: the daemon reports it", exc)
        return 0
    try:
        decommission.preflight(store, cfg, config.resolve_path(args.config))
    except Decommissioned as exc:
        raise CliError(1, str(exc)) from None
    except StoreError as exc:
        log.debug("preflight: %s: the daemon reports it", exc)
    finally:
        store.close()
    return 0


async def _serve(daemon: Daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)

