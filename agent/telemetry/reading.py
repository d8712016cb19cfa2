"""What the outbox holds: readings, their streams and items, and the helpers every producer
shares (compact JSON, events, listeners called back on the loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core.readings import PRIORITY_MAX, PRIORITY_MIN, topic_problem

log = logging.getLogger(__name__)

TELEMETRY, EVENTS, USAGE = "telemetry", "events", "usage"
STREAMS = (TELEMETRY, EVENTS, USAGE)

# (stream, topic, data_json, ts, priority)
Item = tuple[str, str, str, float, int]
# a reading as stored, before it has a seq: stream, size, topic, ts, priority, created, data
Row = tuple[str, int, str, float, int, float, str]


@dataclass(frozen=True, slots=True)
class Reading:
    id: str
    stream: str
    topic: str
    ts: float
    data: str  # compact JSON text
    priority: int
    size: int
    created: float = 0.0  # when the agent committed it (wall clock, Unix seconds)


class OutboxError(Exception):
    """A reading the outbox cannot take (the message says why)."""


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_item(kind: str, ts: float, fields: dict[str, Any]) -> Item:
    """The outbox item of an event: topic = kind, data = ``{"kind", "ts", **fields}``."""
    return (EVENTS, kind, compact_json({"kind": kind, "ts": ts, **fields}), ts, PRIORITY_MAX)


def on_loop(callback: Callable[..., None]) -> Callable[..., None]:
    """``callback`` as called from any thread: on the event loop that was running where it was
    registered (commits run on the store's worker thread), directly when there was none. Its
    exceptions are logged: a commit has already happened and must not look failed."""

    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("listener %r failed", callback)

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return guarded
    owner = threading.get_ident()

    def call(*args: Any) -> None:
        if threading.get_ident() == owner:
            guarded(*args)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(guarded, *args)

    return call


def row_of(item: Item, now: float, max_bytes: int) -> Row:
    """The row of ``item`` committed at ``now``; :class:`OutboxError` says why it is refused."""
    stream, topic, data, ts, priority = item
    if stream not in STREAMS:
        raise OutboxError(f"unknown stream {stream!r}")
    if problem := topic_problem(topic):
        raise OutboxError(f"bad topic {topic!r}: {problem}")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise OutboxError(f"bad ts {ts!r}")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise OutboxError(f"priority {priority} outside {PRIORITY_MIN}..{PRIORITY_MAX}")
    try:
        size = len(data.encode()) + len(topic)
    except UnicodeEncodeError as exc:
        raise OutboxError(f"data is not valid UTF-8 text: {exc.reason}") from exc
    if size > max_bytes:
        raise OutboxError(f"reading of {size} bytes exceeds outbox.max_bytes")
    return (stream, size, topic, float(ts), priority, now, data)
