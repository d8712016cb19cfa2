"""How a config key is declared and checked: a field's ``spec(check)`` says how to turn its raw
TOML value into the value the agent uses, or raise :class:`ConfigError` naming the dotted key
and the reason (``uplink.port: expected an integer 1-65535, got "x"``). :func:`build` makes a
frozen dataclass of a TOML table, refusing unknown and missing keys. :mod:`agent.core.config`
declares the keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import urllib.parse
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.core.readings import topic_problem

T = TypeVar("T")
Check = Callable[[Any, str], Any]  # (raw value, dotted key) -> value, or raise ConfigError


class ConfigError(Exception):
    """A config the agent refuses: the message names the key and the reason."""


def show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def bad(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {show(value)}")


def int_between(lo: int, hi: int) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise bad(key, f"an integer {lo}-{hi}", value)
        return value

    return check


def number_between(lo: float, hi: float) -> Check:
    def check(value: Any, key: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            raise bad(key, f"a number {num_text(lo)}-{num_text(hi)}", value)
        return float(value)

    return check


def num_text(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise bad(key, "true or false", value)
    return value


def one_of(*choices: str) -> Check:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            raise bad(key, " or ".join(f'"{c}"' for c in choices), value)
        return str(value)

    return check


def matches(pattern: str, what: str) -> Check:
    regex = re.compile(pattern)

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise bad(key, what, value)
        return value

    return check


def file_path(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise bad(key, "a file path", value)
    return Path(value)


def topic_name(value: Any, key: str) -> str:
    if problem := topic_problem(value):
        raise bad(key, f"a topic ({problem})", value)
    return str(value)


def time_zone(value: Any, key: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise bad(key, 'an IANA time zone name such as "Asia/Tokyo"', value) from None
    return str(value)


def url_value(value: Any, key: str) -> str:
    parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad(key, "an http:// or https:// URL", value)
    return str(value)


def canonical_iccid(text: str) -> str:
    """An ICCID as the agent keys it: trimmed, upper case, padding ``F`` removed."""
    return text.strip().upper().rstrip("F")


def iccid_value(value: Any, key: str) -> str:
    iccid = canonical_iccid(value) if isinstance(value, str) else ""
    if not re.fullmatch(r"\d{18,22}", iccid):
        raise bad(key, "an ICCID of 18-22 digits", value)
    return iccid


def list_of(check: Check, *, max_len: int = 64) -> Check:
    def check_list(value: Any, key: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) > max_len:
            raise bad(key, f"a list of at most {max_len} entries", value)
        return tuple(check(item, f"{key}[{i}]") for i, item in enumerate(value))

    return check_list


def table(cls: type[Any]) -> Check:
    return lambda value, key: build(cls, value, key)


def spec(check: Check) -> dict[str, Check]:
    """A field's metadata: how to check its raw value."""
    return {"check": check}


def build(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise bad(where or "config", "a table", raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in raw:
        if name not in fields:
            raise ConfigError(f"{dotted(where, name)}: unknown key")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = spec.metadata["check"](raw[name], dotted(where, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted(where, name)}: missing (required)")
    return cls(**values)


def dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
