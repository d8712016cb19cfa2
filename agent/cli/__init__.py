"""The ``simkeeper`` command line.

Each subcommand lives in its own module and is imported only when used (python-can's
registry shape), so ``simkeeper publish`` does not pay for the modem stack or ``cryptography``.
A module offers ``add_arguments(parser)`` and ``run(args) -> int``.

Exit status: 0 success, 1 the thing asked failed, 2 bad usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Protocol

from agent import __version__
from agent.cli.errors import CliError


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


DESCRIPTION = "The simkeeper command line."  # not __doc__: gone under python -OO

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "modem": ("agent.cli.modem", "talk to a modem: `modem info` probes one and prints it"),
    "simulate-modem": ("drivers.simulator.cli", "a virtual modem on a pty; prints its path"),
    "demo": ("agent.cli.demo", "everything on this machine: simulated modem and live view"),
    "publish": ("agent.cli.publish", "hand a reading to the running agent"),
    "run": ("agent.cli.run", "the daemon (systemd Type=notify)"),
    "status": ("agent.cli.status", "the running agent's state"),
    "doctor": ("agent.cli.doctor", "what is wrong with this gateway, and what to do"),
    "wipe-identity": ("agent.cli.wipe", "root: wipe a decommissioned gateway's identity keys"),
    "provision": ("agent.cli.provision", "factory: CA, device identities, bundles, batches"),
    "fleet": ("agent.cli.fleet", "operator: sign and send commands, watch devices"),
}


def _load(name: str) -> _Command:
    module: _Command = importlib.import_module(COMMANDS[name][0])
    return module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("SIMKEEPER_LOG", "WARNING"),
                        type=str.upper, choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity on stderr (TRACE shows raw serial bytes)")
    parser = argparse.ArgumentParser(prog="simkeeper", description=DESCRIPTION,
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"simkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported.
    rest = common.parse_known_args(argv)[1]
    chosen = rest[0] if rest else None
    for name, (_module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            _load(name).add_arguments(p)
    args = parser.parse_args(argv)
    logging.addLevelName(5, "TRACE")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="simkeeper %(levelname)s %(name)s: %(message)s")
    try:
        return _load(args.command).run(args)
    except CliError as exc:
        label = " ".join(filter(None, (args.command, getattr(args, "action", None))))
        print(f"simkeeper {label}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `simkeeper status | head -1`: the reader left, not an error
        # Python would complain again while flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

