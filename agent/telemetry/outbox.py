"""The durable outbox: readings wait here, committed, until the uplink has them acknowledged.

Streams: ``telemetry`` (apps' and the agent's health readings), ``events`` (alarms,
transitions, drops) and ``usage``. A reading's id is the database's random prefix and its
AUTOINCREMENT sequence (``"3f9a0c1e-1234"``): never reused, not even after the database is
recreated, so consumers can drop duplicates of at-least-once delivery.

Bounds (``[outbox] max_bytes``, ``max_age``) and the drop policy ``oldest-lowest-priority``:
when new readings push the outbox over ``max_bytes``, older readings are dropped lowest priority
first, oldest first within a priority; readings older than ``max_age`` are dropped too (by the
agent's clock at enqueue; readings taken while the clock was before 2020, a gateway without RTC
before NTP, never expire by age, only by bytes). Every drop is counted in the database, passed
to ``on_drop`` and reported as an ``outbox-drop`` event (at most one a minute, carrying the
counts since the last one). A full disk refuses new readings and never touches committed ones.

A reading's ``size`` is the UTF-8 bytes of its data and topic.

Threads: the event loop never commits. :meth:`Outbox.add` and :meth:`Outbox.ack` commit on the
calling thread (the store's writer thread, or a blocking tool); the loop uses
:meth:`Outbox.add_async`, :meth:`Outbox.fetch` and :meth:`Outbox.ack_soon` (and
:meth:`agent.telemetry.events.Events.emit`), which run on the store's writer thread in the order
they were called.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.core.readings import PRIORITY_MAX, PRIORITY_MIN, topic_problem
from agent.core.store import Store

log = logging.getLogger(__name__)

TELEMETRY, EVENTS, USAGE = "telemetry", "events", "usage"
STREAMS = (TELEMETRY, EVENTS, USAGE)
AGE_FLOOR = 1_577_836_800.0  # 2020-01-01T00:00Z: an earlier clock is not trusted for ages
DROP_EVENT_INTERVAL = 60.0
_EXPIRE_INTERVAL = 60.0

# (stream, topic, data_json, ts, priority)
Item = tuple[str, str, str, float, int]
DropCallback = Callable[[int, int, str], None]
# an outbox row as inserted: stream, size, topic, ts, priority, created, data
_Row = tuple[str, int, str, float, int, float, str]


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


# ``[outbox] drop_policy`` -> the order in which readings go when the outbox is over its bound
DROP_ORDER = {"oldest-lowest-priority": "priority, seq"}


class Outbox:
    def __init__(
        self,
        store: Store,
        *,
        max_bytes: int,
        max_age: float,
        drop_policy: str = "oldest-lowest-priority",
        on_drop: DropCallback | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._drop_order = DROP_ORDER[drop_policy]
        self._on_drop = on_loop(on_drop) if on_drop else None
        self._clock = clock
        self._listeners: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()
        self._last_expire = -math.inf
        self._last_drop_event = -math.inf
        self._depth: dict[str, tuple[int, int]] = {}
        with store.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('outbox.id_prefix', ?)",
                (secrets.token_hex(4),),
            )
            (self._prefix,) = db.execute(
                "SELECT value FROM meta WHERE key = 'outbox.id_prefix'"
            ).fetchone()
            self._expire(db, self._clock())
            for stream, count, size in db.execute(
                "SELECT stream, COUNT(*), TOTAL(size) FROM outbox GROUP BY stream"
            ):
                self._depth[stream] = (count, int(size))

    # -- writing ---------------------------------------------------------------------------

    def add(self, items: Sequence[Item]) -> list[str]:
        """Commit readings in one transaction and return their ids.

        Raises :class:`OutboxError` for an invalid item (nothing is added) and
        :class:`~agent.core.store.StoreFull` when the disk is full."""
        now = self._clock()
        rows = [self._row(item, now) for item in items]
        if not rows:
            return []
        with self._store.transaction() as db:
            first, last = self._insert(db, rows)
            change = _Tally(rows)
            change.remove(self._expire(db, now))
            change.remove(self._bound(db, first, change.bytes))
            change.extend(self._report_drops(db, now))
            self._store.after_commit(lambda: self._commit(change))
        return [f"{self._prefix}-{seq}" for seq in range(first, last + 1)]

    async def add_async(self, items: Sequence[Item]) -> list[str]:
        """:meth:`add` on the store's writer thread, so the event loop never waits on fsync."""
        return await self._store.run(self.add, items)


    def check(self, items: Sequence[Item]) -> None:
        """Raise :class:`OutboxError` for the first item :meth:`add` would refuse."""
        now = self._clock()
        for item in items:
            self._row(item, now)

    @property
    def store(self) -> Store:
        return self._store

    def _row(self, item: Item, now: float) -> _Row:
        stream, topic, data, ts, priority = item
        if stream not in STREAMS:
            raise OutboxError(f"unknown stream {stream!r}")
        if problem := topic_problem(topic):
            raise OutboxError(f"bad topic {topic!r}: {problem}")
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise OutboxError(f"bad ts {ts!r}")
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise OutboxError(f"priority {priority} outside {PRIORITY_MIN}..{PRIORITY_MAX}")
        size = len(data.encode()) + len(topic)
        if size > self._max_bytes:
            raise OutboxError(f"reading of {size} bytes exceeds outbox.max_bytes")
        return (stream, size, topic, float(ts), priority, now, data)

    @staticmethod
    def _insert(db: sqlite3.Connection, rows: Sequence[_Row]) -> tuple[int, int]:
        db.executemany(
            "INSERT INTO outbox (stream, size, topic, ts, priority, created, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        (last,) = db.execute("SELECT last_insert_rowid()").fetchone()
        return last - len(rows) + 1, last

    def _expire(self, db: sqlite3.Connection, now: float) -> list[tuple[str, int]]:
        if now < AGE_FLOOR or now - self._last_expire < _EXPIRE_INTERVAL:
            return []
        self._store.after_commit(lambda: self._stamp(expired=now))
        gone = db.execute(
            "DELETE FROM outbox WHERE created >= ? AND created < ? RETURNING stream, size",
            (AGE_FLOOR, now - self._max_age),
        ).fetchall()
        return self._dropped(db, gone, "max_age")

    def _bound(self, db: sqlite3.Connection, first_new: int, change: int) -> list[tuple[str, int]]:
        """Drop older readings, lowest priority first, until the outbox fits ``max_bytes``.
        Readings added by this transaction are never dropped by it."""
        excess = self.depth()[1] + change - self._max_bytes
        dropped: list[tuple[str, int]] = []
        while excess > 0:
            candidates = db.execute(
                f"SELECT seq, size FROM outbox WHERE seq < ? ORDER BY {self._drop_order} LIMIT 256",
                (first_new,),
            ).fetchall()
            if not candidates:
                break
            victims = []
            for seq, size in candidates:
                victims.append(seq)
                excess -= size
                if excess <= 0:
                    break
            dropped += db.execute(
                f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(victims))})"
                " RETURNING stream, size",
                victims,
            ).fetchall()
        return self._dropped(db, dropped, "max_bytes")

    def _dropped(
        self, db: sqlite3.Connection, gone: list[tuple[str, int]], reason: str
    ) -> list[tuple[str, int]]:
        if gone:
            count, size = len(gone), sum(s for _, s in gone)
            db.execute(
                "INSERT INTO outbox_drops (reason, count, bytes) VALUES (?, ?, ?)"
                " ON CONFLICT (reason) DO UPDATE"
                " SET count = count + excluded.count, bytes = bytes + excluded.bytes",
                (reason, count, size),
            )
            if self._on_drop is not None:
                on_drop = self._on_drop
                self._store.after_commit(lambda: on_drop(count, size, reason))
        return gone

    def _report_drops(self, db: sqlite3.Connection, now: float) -> list[_Row]:
        """One ``outbox-drop`` event per reason with the drops not yet reported, at most once
        per :data:`DROP_EVENT_INTERVAL`."""
        if now - self._last_drop_event < DROP_EVENT_INTERVAL:
            return []
        unreported = db.execute(
            "SELECT reason, count - reported_count, bytes - reported_bytes, count"
            " FROM outbox_drops WHERE count > reported_count"
        ).fetchall()
        if not unreported:
            return []
        self._store.after_commit(lambda: self._stamp(reported=now))
        rows = [
            self._row(
                event_item("outbox-drop", now, {"reason": r, "count": c, "bytes": b, "total": t}),
                now,
            )
            for r, c, b, t in unreported
        ]
        self._insert(db, rows)
        db.execute("UPDATE outbox_drops SET reported_count = count, reported_bytes = bytes")
        return rows

    def _stamp(self, *, expired: float | None = None, reported: float | None = None) -> None:
        """After a commit only: a rolled-back expiry or drop report is done again next time."""
        if expired is not None:
            self._last_expire = expired
        if reported is not None:
            self._last_drop_event = reported

    def _commit(self, change: _Tally) -> None:
        for stream, (count, size) in change.streams.items():
            old = self._depth.get(stream, (0, 0))
            self._depth[stream] = (old[0] + count, old[1] + size)
        if change.added:
            for listener in list(self._listeners.values()):
                listener()

    # -- delivering --------------------------------------------------------------------------

    def next_batch(self, stream: str, max_count: int, max_bytes: int) -> list[Reading]:
        """The oldest readings of ``stream`` (order kept per topic), at most ``max_count`` and
        ``max_bytes`` in total, but always the first one even when it alone is larger."""
        rows = self._store.query(
            "SELECT seq, topic, ts, data, priority, size, created FROM outbox WHERE stream = ?"
            " ORDER BY seq LIMIT ?",
            (stream, max_count),
        )
        batch: list[Reading] = []
        total = 0
        for seq, topic, ts, data, priority, size, created in rows:
            total += size
            if batch and total > max_bytes:
                break
            batch.append(
                Reading(f"{self._prefix}-{seq}", stream, topic, ts, data, priority, size, created)
            )
        return batch

    async def fetch(self, stream: str, max_count: int, max_bytes: int) -> list[Reading]:
        """:meth:`next_batch` on the store's writer thread: off the loop, and after every write
        handed over before it (an :meth:`ack_soon` included)."""
        return await self._store.run(self.next_batch, stream, max_count, max_bytes)

    def ack_soon(self, ids: Sequence[str]) -> None:
        """:meth:`ack` without waiting (``Store.write``: queued when called on the event loop);
        a later :meth:`fetch` never returns these readings."""
        ids = list(ids)
        self._store.write(lambda: self.ack(ids), what=f"acknowledgement of {len(ids)} readings")

    def ack(self, ids: Sequence[str]) -> None:
        """Remove delivered readings (committed on the calling thread); unknown or already
        removed ids are ignored."""
        prefix = f"{self._prefix}-"
        tails = (i[len(prefix) :] for i in ids if i.startswith(prefix))
        seqs = [int(tail) for tail in tails if tail.isdigit()]
        if not seqs:
            return
        with self._store.transaction() as db:
            change = _Tally([])
            for start in range(0, len(seqs), 500):
                chunk = seqs[start : start + 500]
                change.remove(
                    db.execute(
                        f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})"
                        " RETURNING stream, size",
                        chunk,
                    ).fetchall()
                )
            self._store.after_commit(lambda: self._commit(change))

    # -- watching ----------------------------------------------------------------------------

    def depth(self, stream: str | None = None) -> tuple[int, int]:
        """(count, bytes) waiting, of one stream or all."""
        if stream is not None:
            return self._depth.get(stream, (0, 0))
        values = list(self._depth.values())
        return sum(c for c, _ in values), sum(b for _, b in values)

    def drops(self) -> dict[str, tuple[int, int]]:
        """Readings dropped since the database was created: reason -> (count, bytes)."""
        rows = self._store.query("SELECT reason, count, bytes FROM outbox_drops")
        return {reason: (count, size) for reason, count, size in rows}

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop it was registered from) after new readings commit.
        Returns a function that removes it."""
        key = next(self._keys)
        self._listeners[key] = on_loop(callback)

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove


class _Tally:
    """Per-stream (count, bytes) changes of one transaction, applied to depth after commit."""

    def __init__(self, rows: Sequence[_Row]) -> None:
        self.streams: dict[str, list[int]] = {}
        self.added = bool(rows)
        self.bytes = 0
        self.extend(rows)

    def extend(self, rows: Sequence[_Row]) -> None:
        self._apply(((r[0], r[1]) for r in rows), +1)
        self.added = self.added or bool(rows)

    def remove(self, gone: Sequence[tuple[str, int]]) -> None:
        self._apply(gone, -1)

    def _apply(self, pairs: Any, sign: int) -> None:
        for stream, size in pairs:
            change = self.streams.setdefault(stream, [0, 0])
            change[0] += sign
            change[1] += sign * size
            self.bytes += sign * size
