"""The ``simkeeper`` command line.

Each subcommand lives in its own module and is imported only when used (python-can's
registry shape), so ``simkeeper publish`` does not pay for the modem stack or ``cryptography``.
A module offers ``add_arguments(parser)`` and ``run(args) -> int``.

Exit status: 0 success, 1 the thing asked failed, 2 bad usage. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol

from agent import __version__


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...
    def run(self, args: argparse.Namespace) -> int: ...


# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "modem": ("agent.cmd_modem", "talk to a modem: `modem info` probes one and prints it"),
    "simulate-modem": ("drivers.simulator.cli", "a virtual modem on a pty; prints its path"),
}


class UsageError(Exception):
    """Bad usage discovered after parsing (exit 2)."""


def _load(name: str) -> _Command:
    module: _Command = importlib.import_module(COMMANDS[name][0])
    return module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="simkeeper", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"simkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            _load(name).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return _load(args.command).run(args)
    except UsageError as exc:
        print(f"simkeeper {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
