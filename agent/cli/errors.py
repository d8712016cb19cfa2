"""The one-line failures of ``simkeeper`` subcommands.

A subcommand raises :class:`CliError` with the reason; :func:`agent.cli.main` prints it as
``simkeeper <command> [<action>]: <reason>`` on stderr and exits with its status. The classes
live here, not in ``agent.cli``, because ``python -m agent.cli`` runs that module as
``__main__``: a subcommand importing ``agent.cli`` would get a second, different class.
"""

from __future__ import annotations


class CliError(Exception):
    """``status`` 1: the thing asked failed; 2: bad usage."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class UsageError(CliError):
    """Bad usage found after parsing (exit 2)."""

    def __init__(self, why: str) -> None:
        super().__init__(2, why)
