"""`--help` everywhere: every option and argument of every subcommand says what it does, and an
option with a default names it (issue 11, item 19)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

from agent.cli import COMMANDS, _load

# Defaults a help text need not name: a flag's False, an empty list, "not given".
QUIET_DEFAULTS = (None, False, [], argparse.SUPPRESS)


def actions() -> Iterator[tuple[str, argparse.Action]]:
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                yield path, action

    for name in COMMANDS:
        parser = argparse.ArgumentParser()
        _load(name).add_arguments(parser)
        yield from walk(parser, name)


def test_every_option_says_what_it_does() -> None:
    bare = [f"{path} {a.option_strings or a.dest}" for path, a in actions()
            if not a.help or a.help == argparse.SUPPRESS]
    assert not bare, bare


def test_every_default_is_named() -> None:
    unnamed = [
        f"{path} {a.option_strings}: {a.default!r}" for path, a in actions()
        if a.option_strings and a.default not in QUIET_DEFAULTS and not a.required
        and not re.search(r"default|\(\$|%\(default\)", a.help or "")
    ]
    assert not unnamed, unnamed
