"""The ingest protocol's line (DESIGN.md, "Local ingestion"): one JSON object in, an outbox
item or the reason it is refused out; and the error answer."""

from __future__ import annotations

import json
import math
from typing import Any

from agent.core.readings import PRIORITY_MAX, PRIORITY_MIN, topic_problem
from agent.telemetry.reading import TELEMETRY, Item, compact_json

FIELDS = frozenset({"topic", "data", "ts", "priority"})


def error_line(why: str) -> bytes:
    return (json.dumps({"ok": False, "error": why}) + "\n").encode()


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_line(line: bytes, now: float) -> Item | str:
    """A reading as an outbox item, or the reason it is refused."""
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return "not UTF-8 text"
    try:
        obj = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:
        return f"not JSON: {exc}"
    if not isinstance(obj, dict):
        return 'not an object: send {"topic": ..., "data": ...}'
    if unknown := sorted(obj.keys() - FIELDS):
        return f"unknown field {unknown[0]!r}"
    topic = obj.get("topic")
    if problem := topic_problem(topic):
        return f"bad topic: {problem}"
    if "data" not in obj:
        return "missing data"
    ts = obj.get("ts", round(now, 3))  # stamped to the millisecond: 5 bytes less a reading
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not 0 < ts < 1e10:
        return "bad ts: expected Unix seconds (a positive number, not milliseconds)"
    priority = obj.get("priority", 0)
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not PRIORITY_MIN <= priority <= PRIORITY_MAX):
        return f"bad priority: expected an integer {PRIORITY_MIN}..{PRIORITY_MAX}"
    try:
        data = compact_json(obj["data"])
    except (ValueError, RecursionError) as exc:
        return f"bad data: {exc}"
    return (TELEMETRY, str(topic), data, float(ts), priority)
