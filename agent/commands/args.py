"""The argument schema of each command, as data: a command's ``args`` hold exactly the fields
listed for it, each of its type. :func:`validate` returns the arguments a handler gets, or
raises :class:`ArgError` (the processor answers "bad arguments")."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from agent.core.at_allow import MAX_COMMAND
from agent.core.signing import MAX_INT, SigningError, load_public_key
from agent.sim.lifecycle import SCOPES


class ArgError(ValueError):
    """The arguments do not fit the command's schema; the message says which and why."""


Check = Callable[[Any], Any]
_MAX_TIME = 1 << 40


class Arg:
    """One argument's type: ``check`` (a value from an envelope), ``doc`` (what it must be, for
    refusals and ``--help``) and ``parse`` (its text on the command line, ``fleet send --arg``)."""

    def __init__(self, check: Check, doc: str, parse: Callable[[str], Any] = str) -> None:
        self.check, self.doc, self.parse = check, doc, parse

    def __call__(self, value: Any) -> Any:
        return self.check(value)


def _int(lo: int, hi: int) -> Arg:
    def check(value: Any) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise ArgError(f"an integer in {lo}..{hi}")
        return value
    return Arg(check, f"an integer in {lo}..{hi}", int)


def _text(max_len: int, pattern: str | None = None, what: str = "") -> Arg:
    compiled = re.compile(pattern) if pattern else None
    doc = what or f"a string of at most {max_len} characters"

    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_len or (
                compiled is not None and not compiled.fullmatch(value)):
            raise ArgError(doc)
        return value
    return Arg(check, doc)


def _choice(*values: str) -> Arg:
    doc = f"one of {', '.join(values)}"

    def check(value: Any) -> str:
        if value not in values:
            raise ArgError(doc)
        return str(value)
    return Arg(check, doc)


def _nullable(inner: Arg) -> Arg:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    def parse(text: str) -> Any:
        return None if text.lower() in ("null", "none") else inner.parse(text)
    return Arg(check, f"{inner.doc}, or null", parse)


def _check_pem(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise ArgError("an Ed25519 public key PEM (SubjectPublicKeyInfo)")
    try:
        load_public_key(value.encode())
    except SigningError as exc:
        raise ArgError(f"an Ed25519 public key PEM ({exc})") from None
    return value


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO 8601 date and time (``2027-01-31T00:00:00Z``; UTC when no
    offset is given)."""
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither Unix seconds nor ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


_PEM = Arg(_check_pem, "an Ed25519 public key PEM (pass @FILE)")
_TIME = Arg(_int(0, _MAX_TIME), "a time: Unix seconds, or ISO 8601 on the command line",
            parse_time)
_ICCID = _text(23, r"[0-9]{18,22}[Ff]?", "an ICCID (18-22 digits)")
_SLOT = _text(7, r"modem(?:[2-9]|[1-9][0-9])?", "a modem's slot: modem, modem2, modem3, ...")
_REASON = _text(200)

# name -> field -> (required, check). A name missing here is an unknown command.
SCHEMAS: Mapping[str, Mapping[str, tuple[bool, Arg]]] = {
    "suspend": {"scope": (True, _choice(*SCOPES)), "until": (False, _TIME),
                "reason": (False, _REASON), "readings": (False, _choice("keep", "refuse")),
                "iccid": (False, _ICCID)},
    "resume": {"reason": (False, _REASON), "iccid": (False, _ICCID)},
    "set-activation-deadline": {"iccid": (False, _ICCID), "deadline": (True, _TIME)},
    "activate": {"iccid": (False, _ICCID)},
    "report-usage": {"iccid": (False, _ICCID)},
    "get-state": {},
    "set-plan": {"iccid": (True, _ICCID), "bytes": (True, _nullable(_int(1, MAX_INT))),
                 "cycle_day": (False, _int(1, 28))},
    "reset-modem": {"iccid": (False, _ICCID)},
    "update-conformance": {"list": (True, _text(1 << 20, what="the list's text (pass @FILE)")),
                           "signature": (True, _text(100, r"[A-Za-z0-9_-]+")),
                           "format": (False, _choice("toml", "json"))},
    "clear-malfunction": {},
    "decommission": {},
    "rotate-key": {"public_key": (True, _PEM)},
    "at": {"command": (True, _text(MAX_COMMAND, r"[ -~]+", f"one AT command line: 1-"
                                   f"{MAX_COMMAND} printable ASCII characters (no CR, LF or"
                                   " other control character)")),
           "modem": (False, _SLOT), "iccid": (False, _ICCID)},
    "diagnose": {},
}
NAMES = frozenset(SCHEMAS)


def validate(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` checked against ``name``'s schema (``name`` must be in :data:`SCHEMAS`)."""
    schema = SCHEMAS[name]
    unknown = sorted(set(args) - set(schema))
    if unknown:
        raise ArgError(f"unknown argument {unknown[0][:40]!r} for {name}")
    out: dict[str, Any] = {}
    for key, (required, check) in schema.items():
        if key not in args:
            if required:
                raise ArgError(f"{name} needs {key!r}")
            continue
        try:
            out[key] = check(args[key])
        except ArgError as exc:
            raise ArgError(f"{key} must be {exc}") from None
    return out


def describe() -> str:
    """Every command and its arguments, for ``fleet send --help``."""
    lines = []
    for name, schema in SCHEMAS.items():
        lines.append(f"  {name}")
        for key, (required, arg) in schema.items():
            lines.append(f"      {key}{'' if required else ' (optional)'}: {arg.doc}")
    return "\n".join(lines)
