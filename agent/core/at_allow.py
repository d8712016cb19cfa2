"""Which AT commands the remote console (``fleet at``, the ``at`` command) may send: the
``[commands] at_allow`` patterns and the one rule that matches a command against them.

A pattern is one AT command line, in one of two forms:

- exact, ``AT+CGDCONT?``: the command must be that line, character for character, but for the
  case of letters outside double quotes (``at+cgdcont?`` matches; ``AT+CGDCONT=1,"IP"`` does
  not, nor does ``AT+CGDCONT? `` with a space: a modem ignores spaces, the match does not);
- arguments, ``AT+QENG=*``: the line up to ``=`` as in the exact form, then any run of
  arguments made of digits, commas and double-quoted strings of letters, digits, space and
  ``_ . : / -`` (``AT+QENG="servingcell"``, ``AT+CGPADDR=1,2``; never ``?``, ``;``, ``+`` or a
  letter outside quotes). List it only for a command whose every such form only reads.

Before any pattern is tried, a command is refused when it is not one line of printable ASCII
(CR, LF, Ctrl-Z and other control characters would end or split it on the wire), does not
start with ``AT`` (``A/`` repeats the last command), joins commands with ``;`` outside quotes,
or leaves a string unterminated. Patterns obey the same rules, checked at load.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from agent.core.checks import bad

MAX_COMMAND = 256  # characters in one AT command line
_PRINTABLE = re.compile(r"[ -~]+")
_ARGUMENTS = re.compile(r'(?:[0-9,]|"[A-Za-z0-9 _.:/-]*")*')

# Read-only queries: identity, signal, registration, operator, cell, counters.
DEFAULT_ALLOW: tuple[str, ...] = (
    "ATI", "AT+CGMI", "AT+CGMM", "AT+CGMR", "AT+CGSN", "AT+GSN", "AT+CIMI", "AT+CCID",
    "AT+QCCID", "AT+ICCID",
    "AT+CSQ", "AT+CESQ", "AT+QCSQ",
    "AT+CREG?", "AT+CGREG?", "AT+CEREG?", "AT+C5GREG?",
    "AT+COPS?",
    'AT+QENG="servingcell"', 'AT+QENG="neighbourcell"', "AT+QNWINFO", "AT+CPSI?",
    "AT+QGDCNT?", "AT+CGPADDR", "AT+CGDCONT?", "AT+CGACT?",
)


def fold(line: str) -> str:
    """``line`` with the letters outside double quotes in upper case."""
    parts = line.split('"')
    parts[::2] = [p.upper() for p in parts[::2]]
    return '"'.join(parts)


def _outside_quotes(line: str) -> str:
    return "".join(line.split('"')[::2])


def line_problem(line: str) -> str | None:
    """Why ``line`` cannot be one AT command at all, or None."""
    if not 1 <= len(line) <= MAX_COMMAND or not _PRINTABLE.fullmatch(line):
        return (f"not one line of 1-{MAX_COMMAND} printable ASCII characters"
                " (CR, LF and other control characters are never sent)")
    if line[:2].upper() == "A/":
        return "A/ repeats the previous command: never sent"
    if line[:2].upper() != "AT":
        return "not an AT command (it must start with AT)"
    if line.count('"') % 2:
        return "a string is not terminated"
    if ";" in _outside_quotes(line):
        return "one command at a time: ';' joins commands"
    return None


def check_pattern(value: Any, key: str) -> str:
    """A config check (:mod:`agent.core.checks`): one ``at_allow`` pattern."""
    stem = value.removesuffix("*") if isinstance(value, str) and value.endswith("=*") else value
    if (not isinstance(stem, str) or line_problem(stem) is not None or "*" in stem
            or " " in _outside_quotes(stem)):
        raise bad(key, "one AT command, exact or ending in =* (no ';', no space outside"
                  " quotes, * only after a final =)", value)
    return str(value)


def refusal(command: str, patterns: Sequence[str]) -> str | None:
    """Why ``command`` may not be sent under ``patterns`` (one line), or None when it may."""
    problem = line_problem(command)
    if problem is not None:
        return problem
    folded = fold(command)
    for pattern in patterns:
        if pattern.endswith("=*"):
            stem = fold(pattern[:-1])
            if folded.startswith(stem) and _ARGUMENTS.fullmatch(command[len(stem):]):
                return None
        elif folded == fold(pattern):
            return None
    if not patterns:
        return "no command is allowed ([commands] at_allow is empty)"
    return "not in [commands] at_allow"
