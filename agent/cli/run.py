"""``simkeeper run --config FILE``: the daemon, in the foreground (systemd ``Type=notify``).

Exit 0 after a clean stop (SIGTERM or SIGINT), 2 for a config it refuses (the key and the
reason on one line: a key it does not know, a value out of range, a file the config names that
it cannot read), 1 when it cannot start (database, ingest socket, an operator key that is not
an Ed25519 public key PEM) or must not (a decommissioned gateway not re-provisioned since:
:mod:`agent.sim.decommission`).

``simkeeper run --preflight`` starts nothing and checks what ``run`` checks before it serves:
exit 2 with the same one line for a config it would refuse (every key; every file it names
readable by the user running it: TLS files, password file, operator key, manifest, conformance
list and signature), 1 with the daemon's one-line refusal when the gateway is decommissioned
and not re-provisioned (after finishing what an interrupted decommission left, as the refused
start would), else 0. It is the unit's ``ExecCondition=``: a unit whose condition fails is
skipped, not restarted every ``RestartSec`` as a failing start would be, and the line is in its
journal.
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
    cfg = _checked(args)
    from agent.commands.journal import OperatorKeyError
    from agent.daemon import Daemon  # the daemon's stack only when it runs, not for preflight
    from agent.telemetry.ingest import IngestError

    try:
        asyncio.run(_serve(Daemon(cfg, config_path=config.resolve_path(args.config))))
    except (StoreError, IngestError, Decommissioned, OperatorKeyError) as exc:
        raise CliError(1, str(exc)) from None
    return 0


def _checked(args: argparse.Namespace) -> config.Config:
    """The config, with every file it names readable; else exit 2 with the first problem."""
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    named = {"uplink.ca": cfg.uplink.ca, "uplink.cert": cfg.uplink.cert,
             "uplink.key": cfg.uplink.key, "uplink.password_file": cfg.uplink.password_file,
             "commands.operator_key": cfg.commands.operator_key,
             "lifecycle.manifest": cfg.lifecycle.manifest,
             "conformance.list": cfg.conformance.list,
             "conformance.signature": cfg.conformance.signature}
    for key, path in named.items():
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise CliError(2, f"{key}: cannot read {path}: {exc.strerror}") from None
    return cfg


def preflight(args: argparse.Namespace) -> int:
    cfg = _checked(args)
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

