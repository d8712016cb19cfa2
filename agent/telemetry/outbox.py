"""The durable outbox: readings wait here, on disk, until the uplink has them acknowledged.

Streams: ``telemetry`` (apps' and the agent's health readings), ``events`` (alarms,
transitions, drops) and ``usage``. A reading's id is the database's random prefix and its
sequence number (``"3f9a0c1e-1234"``): never reused, not even after the database is recreated,
so consumers can drop duplicates of at-least-once delivery.

Two tiers, so an SD card lasts (figures: ``bench/bench_disk.py``). A reading added on its own
(the ingest socket, health) goes to the journal (:mod:`agent.telemetry.spool`: a file appended
to, the same readings in memory); a gateway whose link is up delivers it from there and never
writes it to SQLite. The journal's readings move into the ``outbox`` table
(:mod:`agent.telemetry.table`) in one transaction once they pass ``[outbox] journal_bytes``
(the link is down) or a bound needs them; a reading added inside another transaction goes
there directly (an event committed with the state change it reports). Either way it is on
disk (SIGKILL-safe; power-safe per ``[store] durability``) before :meth:`Outbox.add` returns.

Bounds (``[outbox] max_bytes``, ``max_age``, ``min_free_bytes``), drop policy
``oldest-lowest-priority``: when new readings push the outbox over ``max_bytes``, or the disk's
free space under ``min_free_bytes``, older readings go lowest priority first, oldest first
within a priority; readings older than ``max_age`` go too (by the agent's clock at enqueue;
readings taken while the clock was before 2020, a gateway without RTC before NTP, never expire
by age). Every drop is counted in the database, passed to ``on_drop`` and reported as an
``outbox-drop`` event (at most one a minute, with the counts since the last). A full disk
refuses new readings and never touches committed ones.

A delivered reading is forgotten at once (never fetched again); its removal from disk follows,
retried with backoff when a full disk refuses it (:class:`agent.telemetry.table.Remover`). A
reading's ``size`` is the UTF-8 bytes of its data and topic.

Threads: the event loop never commits nor syncs. :meth:`Outbox.add` and :meth:`Outbox.ack`
write on the calling thread (the store's writer thread, or a blocking tool); the loop uses
:meth:`Outbox.add_async`, :meth:`Outbox.fetch` and :meth:`Outbox.ack_soon`, which run on the
writer thread in the order they were called, or on the loop from memory where no disk is needed
(a delivery's line in the journal is one short write, made at once).
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence

from agent.core.disk import free_bytes
from agent.core.store import Store, StoreError, StoreFull
from agent.telemetry import spool, table
from agent.telemetry.reading import (
    EVENTS,
    STREAMS,
    TELEMETRY,
    USAGE,
    Item,
    OutboxError,
    Reading,
    Row,
    compact_json,
    event_item,
    on_loop,
    row_of,
)
from agent.telemetry.spool import Journal, SpoolRow
from agent.telemetry.table import AGE_FLOOR, DROP_ORDER, Gone, Tally

__all__ = [
    "AGE_FLOOR", "DROP_ORDER", "EVENTS", "STREAMS", "TELEMETRY", "USAGE", "Item", "Outbox",
    "OutboxError", "Reading", "compact_json", "event_item", "on_loop",
]

log = logging.getLogger(__name__)

DROP_EVENT_INTERVAL = 60.0
JOURNAL_BYTES = 256 * 1024  # [outbox] journal_bytes: readings in the journal before they move
DURABILITY = ("crash-safe", "power-safe")  # [store] durability
_EXPIRE_INTERVAL = 60.0
DropCallback = Callable[[int, int, str], None]


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
        durability: str = "crash-safe",
        sync_interval: float = 5.0,
        journal_bytes: int = JOURNAL_BYTES,
        min_free_bytes: int = 0,
    ) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability: expected one of {DURABILITY}")
        self._store = store
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._drop_order = DROP_ORDER[drop_policy]
        self._on_drop = on_loop(on_drop) if on_drop else None
        self._clock = clock
        self._journal_bytes = journal_bytes
        self._min_free = min_free_bytes
        self._listeners: dict[int, Callable[[], None]] = {}
        self._keys = itertools.count()
        self._last_expire = -math.inf
        self._last_drop_event = -math.inf
        self._unreported = True  # drops not reported yet, maybe: the first look tells
        self._mem = threading.Lock()  # the three below: read on the loop, written elsewhere
        self._table: dict[str, tuple[int, int]] = {}  # (count, bytes) per stream in the table
        self._acking: set[int] = set()  # delivered, in the table until their delete commits
        self._remover = table.Remover(store, done=self._deleted, pending=self._pending,
                                      min_free=min_free_bytes)
        path = spool.journal_of(store.path)
        kept = spool.read(path)
        with store.transaction() as db:
            self._prefix, last, rows, self._table = table.open_table(db, kept.rows)
        if kept.skipped:
            log.warning("outbox journal %s: %d damaged records skipped (a power cut?)", path,
                        kept.skipped)
        self._next_seq: int = max(last + 1, kept.next_seq)
        self._journal = Journal(path, power_safe=durability == "power-safe",
                                sync_interval=sync_interval, rows=rows, next_seq=self._next_seq)
        self._maintain(self._clock(), report=False)  # what expired while the agent was down
        self._remover.reserve.keep()

    def close(self) -> None:
        """Sync and close the journal; the outbox is not used after."""
        self._remover.close()
        self._journal.file.close()

    @property
    def store(self) -> Store:
        return self._store

    # -- writing ---------------------------------------------------------------------------

    def add(self, items: Sequence[Item]) -> list[str]:
        """Put readings on disk, all or none, and return their ids: in the journal when added on
        their own, in the table inside a transaction or when a bound needs it.

        Raises :class:`OutboxError` for an invalid item (nothing is added) and
        :class:`~agent.core.store.StoreFull` when the disk is full."""
        now = self._clock()
        rows = [self._row(item, now) for item in items]
        if not rows:
            return []
        size = sum(r[1] for r in rows)
        move = self._journal.bytes + size > self._journal_bytes or (
            self.depth()[1] + size > self._limit()
        )
        first = self._take_seqs(len(rows))
        numbered = [(first + i, *row) for i, row in enumerate(rows)]
        if move or self._store.in_transaction():
            self._add_to_table(numbered, now, move=move)
        else:
            try:
                self._journal.add(numbered)
            except OSError as exc:
                raise _disk_error(exc, "adding readings") from exc
            if self._journal.file.size > 4 * self._journal_bytes:  # mostly delivered ones
                self._restart_journal()
            self._added()
            self._maintain(now)
        return [f"{self._prefix}-{seq}" for seq in range(first, first + len(rows))]

    async def add_async(self, items: Sequence[Item]) -> list[str]:
        """:meth:`add` on the store's writer thread, so the event loop never waits on the disk."""
        return await self._store.run(self.add, items)

    def check(self, items: Sequence[Item]) -> None:
        """Raise :class:`OutboxError` for the first item :meth:`add` would refuse."""
        now = self._clock()
        for item in items:
            self._row(item, now)

    def _row(self, item: Item, now: float) -> Row:
        return row_of(item, now, self._max_bytes)

    def _limit(self) -> int:
        """``max_bytes``, lowered so that the disk keeps ``min_free_bytes`` free: with less
        free, the outbox grows no more (a dropped reading's pages take the next ones); with
        more, by half the room (a reading takes about twice its size on disk)."""
        if not self._min_free:
            return self._max_bytes
        try:
            room = free_bytes(self._store.path.parent) - self._min_free
        except OSError:
            return self._max_bytes
        return min(self._max_bytes, self.depth()[1] + max(0, room) // 2)

    def _take_seqs(self, n: int) -> int:
        with self._mem:
            first, self._next_seq = self._next_seq, self._next_seq + n
        return first

    def _restart_journal(self) -> None:
        try:
            self._journal.restart(self._next_seq)
        except OSError as exc:  # the old journal stays, still right; tried again later
            log.warning("outbox journal: could not start it again: %s", exc)

    def _add_to_table(self, rows: Sequence[SpoolRow], now: float, *, move: bool) -> None:
        with self._store.transaction() as db:
            moved = self._journal.rows() if move else []
            table.insert(db, moved, again=True)
            table.insert(db, rows)
            change = Tally(r[1:] for r in [*moved, *rows])
            moved += self._expire(db, now, change)
            excess = self.depth()[1] + change.bytes - sum(r[2] for r in moved) - self._limit()
            change.remove(self._dropped(db, table.bound(db, self._drop_order, rows[0][0],
                                                         excess), "max_bytes"))
            change.extend(self._report_drops(db, now))
            self._store.after_commit(lambda: self._committed(change, moved))
            self._store.after_commit(self._added)

    def _committed(self, change: Tally, moved: Sequence[SpoolRow]) -> None:
        """After a commit: the table's depth follows ``change``; readings ``moved`` into the
        table leave memory and journal (one delivered meanwhile is in the table now too: its
        delete follows)."""
        seqs = [r[0] for r in moved]
        delivered = set(seqs) - set(self._journal.forget(seqs))
        with self._mem:
            change.apply_to(self._table)
            self._acking.update(delivered)
        if moved:
            self._restart_journal()
        if delivered:
            self._remover.delete(sorted(delivered))

    def _maintain(self, now: float, *, report: bool = True) -> None:
        """Expiry and the drop report, when due, in a transaction of their own."""
        due = now >= AGE_FLOOR and now - self._last_expire >= _EXPIRE_INTERVAL
        if not due and not (report and now - self._last_drop_event >= DROP_EVENT_INTERVAL):
            return
        if not any(c for c, _ in self._table.values()) and not self._unreported and (
            not self._journal.older_than(AGE_FLOOR, now - self._max_age)
        ):
            self._last_expire = now  # nothing in the table, nothing expired: no transaction
            return
        with self._store.transaction() as db:
            change = Tally()
            moved = self._expire(db, now, change)
            if report:
                change.extend(self._report_drops(db, now))
            self._store.after_commit(lambda: self._committed(change, moved))

    def _expire(self, db: sqlite3.Connection, now: float, change: Tally) -> list[SpoolRow]:
        """Drop readings older than ``max_age`` (``change`` counts it); the journal's readings
        move into the table first when one of them is that old. Returns those moved."""
        if now < AGE_FLOOR or now - self._last_expire < _EXPIRE_INTERVAL:
            return []
        self._store.after_commit(lambda: self._stamp(expired=now))
        cutoff = now - self._max_age
        moved = self._journal.rows() if self._journal.older_than(AGE_FLOOR, cutoff) else []
        table.insert(db, moved, again=True)
        change.extend(r[1:] for r in moved)
        change.remove(self._dropped(db, table.expire(db, cutoff), "max_age"))
        return moved

    def _dropped(self, db: sqlite3.Connection, gone: Gone, reason: str) -> Gone:
        if gone:
            table.count_drops(db, gone, reason)
            self._store.after_commit(lambda: setattr(self, "_unreported", True))
            if self._on_drop is not None:
                on_drop, count, size = self._on_drop, len(gone), sum(s for _, s in gone)
                self._store.after_commit(lambda: on_drop(count, size, reason))
        return gone

    def _report_drops(self, db: sqlite3.Connection, now: float) -> list[Row]:
        """One ``outbox-drop`` event per reason with the drops not yet reported, at most once
        per :data:`DROP_EVENT_INTERVAL`."""
        if now - self._last_drop_event < DROP_EVENT_INTERVAL:
            return []
        unreported = table.unreported_drops(db)
        self._store.after_commit(lambda: self._stamp(reported=now if unreported else None))
        rows = [
            self._row(
                event_item("outbox-drop", now, {"reason": r, "count": c, "bytes": b, "total": t}),
                now,
            )
            for r, c, b, t in unreported
        ]
        first = self._take_seqs(len(rows))
        table.insert(db, [(first + i, *row) for i, row in enumerate(rows)])
        if rows:
            self._store.after_commit(self._added)
        return rows

    def _stamp(self, *, expired: float | None = None, reported: float | None = None) -> None:
        """After a commit only: a rolled-back expiry or drop report is done again next time."""
        if expired is not None:
            self._last_expire = expired
        if reported is not None:
            self._last_drop_event = reported
        self._unreported = self._unreported and expired is not None

    def _added(self) -> None:
        for listener in list(self._listeners.values()):
            listener()

    # -- delivering --------------------------------------------------------------------------

    def next_batch(self, stream: str, max_count: int, max_bytes: int) -> list[Reading]:
        """The oldest readings of ``stream`` not yet delivered (order kept per topic), at most
        ``max_count`` and ``max_bytes`` in total, but always the first one even when it alone
        is larger."""
        with self._mem:
            skip = len(self._acking)
        rows: list[SpoolRow] = []
        in_table = self._in_table(stream) or self._store.in_transaction()
        if in_table:
            rows = table.oldest(self._store.query, stream, max_count + skip)
            with self._mem:
                rows = [r for r in rows if r[0] not in self._acking]
        rows += self._journal.first(stream, max_count)
        if in_table:  # a reading moved by the open transaction shows twice on its thread
            rows = sorted({r[0]: r for r in rows}.values())
        batch: list[Reading] = []
        total = 0
        for seq, _, size, topic, ts, priority, created, data in rows[:max_count]:
            total += size
            if batch and total > max_bytes:
                break
            batch.append(
                Reading(f"{self._prefix}-{seq}", stream, topic, ts, data, priority, size, created)
            )
        return batch

    def _in_table(self, stream: str) -> bool:
        with self._mem:
            return self._table.get(stream, (0, 0))[0] > 0

    async def fetch(self, stream: str, max_count: int, max_bytes: int) -> list[Reading]:
        """:meth:`next_batch`: from memory when the stream has nothing in the table, else on the
        store's writer thread (off the loop, after every write handed over before it)."""
        if not self._in_table(stream):
            return self.next_batch(stream, max_count, max_bytes)
        return await self._store.run(self.next_batch, stream, max_count, max_bytes)

    def ack_soon(self, ids: Sequence[str]) -> None:
        """:meth:`ack` without waiting: forgotten at once (a later :meth:`fetch` never returns
        these readings), recorded in the journal at once (one short write, no sync: a kill
        right after resends none of them), deleted from the table by a write queued when
        called on the event loop."""
        journal, rows = self._forget(ids)
        if journal:
            self._journal.gone(journal)
        if rows:
            self._store.write(lambda: self._remover.delete(rows),
                              what=f"acknowledgement of {len(rows)} readings")

    def ack(self, ids: Sequence[str]) -> None:
        """Remove delivered readings (written on the calling thread); unknown or already
        removed ids are ignored."""
        self._erase(*self._forget(ids))

    def _forget(self, ids: Sequence[str]) -> tuple[list[int], list[int]]:
        """Take delivered readings out of memory: (seqs of the journal, seqs of the table)."""
        prefix = f"{self._prefix}-"
        tails = (i[len(prefix) :] for i in ids if i.startswith(prefix))
        seqs = [int(tail) for tail in tails if tail.isdigit()]
        journal = self._journal.forget(seqs)
        rows = sorted(set(seqs) - set(journal))
        with self._mem:
            self._acking.update(rows)
        return journal, rows

    def _erase(self, journal: Sequence[int], rows: Sequence[int]) -> None:
        if journal:
            self._journal.gone(journal)
        if rows:
            self._remover.delete(rows)

    def _deleted(self, change: Tally, seqs: Sequence[int]) -> None:
        with self._mem:
            change.apply_to(self._table)
            self._acking.difference_update(seqs)

    def _pending(self) -> list[int]:
        with self._mem:
            return sorted(self._acking)

    # -- watching ----------------------------------------------------------------------------

    def depth(self, stream: str | None = None) -> tuple[int, int]:
        """(count, bytes) waiting, of one stream or all."""
        count = size = 0
        for name in STREAMS if stream is None else (stream,):
            with self._mem:
                in_table = self._table.get(name, (0, 0))
            in_journal = self._journal.depth(name)
            count += in_table[0] + in_journal[0]
            size += in_table[1] + in_journal[1]
        return count, size

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


def _disk_error(exc: OSError, doing: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreFull(f"store full while {doing}: {exc}")
    return StoreError(f"store failed while {doing}: {exc}")
