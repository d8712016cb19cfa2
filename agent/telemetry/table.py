"""The outbox's table in SQLite: the statements, run inside the caller's transaction.

Readings reach the table in bulk (moved from the journal, :mod:`agent.telemetry.spool`) or
inside another transaction (an event with the state change it reports); see
:mod:`agent.telemetry.outbox`. Each function returns what it removed as (stream, size) pairs,
for the outbox's depth (:class:`Tally`, applied after the commit).
"""

from __future__ import annotations

import functools
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from agent.core.backoff import Backoff
from agent.core.disk import RESERVE_BYTES, Reserve, free_bytes
from agent.core.store import Store, StoreError, StoreFull
from agent.telemetry.reading import Row
from agent.telemetry.spool import SpoolRow, table_depths

log = logging.getLogger(__name__)

AGE_FLOOR = 1_577_836_800.0  # 2020-01-01T00:00Z: an earlier clock is not trusted for ages
# ``[outbox] drop_policy`` -> the order in which readings go when the outbox is over its bound
DROP_ORDER = {"oldest-lowest-priority": "priority, seq"}
Gone = list[tuple[str, int]]

_COLUMNS = "seq, stream, size, topic, ts, priority, created, data"


def open_table(db: sqlite3.Connection, journal: list[SpoolRow]) -> tuple[
        str, int, list[SpoolRow], dict[str, tuple[int, int]]]:
    """At start: the id prefix (made once per database), the highest seq the table ever had,
    the journal's readings not in the table already (a kill between a move and the journal's
    restart), and the table's depth per stream."""
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('outbox.id_prefix', ?)",
               (secrets.token_hex(4),))
    (prefix,) = db.execute("SELECT value FROM meta WHERE key = 'outbox.id_prefix'").fetchone()
    (last,) = db.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'"
    ).fetchone()
    if journal:
        moved = {s for (s,) in db.execute("SELECT seq FROM outbox WHERE seq >= ?",
                                          (journal[0][0],))}
        journal = [r for r in journal if r[0] not in moved]
    return str(prefix), int(last), journal, table_depths(db)


def insert(db: sqlite3.Connection, rows: Iterable[SpoolRow], *, again: bool = False) -> None:
    """Insert readings with their seqs (``again``: one already there is left as it is)."""
    verb = "INSERT OR IGNORE" if again else "INSERT"
    db.executemany(f"{verb} INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


def oldest(query: Callable[[str, Sequence[Any]], list[Any]], stream: str,
           limit: int) -> list[SpoolRow]:
    """The stream's first ``limit`` readings by seq, read with ``query`` (the store's)."""
    return query(f"SELECT {_COLUMNS} FROM outbox WHERE stream = ? ORDER BY seq LIMIT ?",
                 (stream, limit))


def expire(db: sqlite3.Connection, cutoff: float) -> Gone:
    """Readings committed before ``cutoff`` (by a clock past 2020) leave."""
    return db.execute(
        "DELETE FROM outbox WHERE created >= ? AND created < ? RETURNING stream, size",
        (AGE_FLOOR, cutoff),
    ).fetchall()


def bound(db: sqlite3.Connection, order: str, first_new: int, excess: int) -> Gone:
    """Drop readings older than ``first_new`` in ``order`` until ``excess`` bytes went."""
    dropped: Gone = []
    while excess > 0:
        candidates = db.execute(
            f"SELECT seq, size FROM outbox WHERE seq < ? ORDER BY {order} LIMIT 256",
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
        dropped += delete(db, victims)
    return dropped


def delete(db: sqlite3.Connection, seqs: Sequence[int]) -> Gone:
    gone: Gone = []
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        gone += db.execute(
            f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(chunk))})"
            " RETURNING stream, size",
            chunk,
        ).fetchall()
    return gone


def count_drops(db: sqlite3.Connection, gone: Gone, reason: str) -> None:
    db.execute(
        "INSERT INTO outbox_drops (reason, count, bytes) VALUES (?, ?, ?)"
        " ON CONFLICT (reason) DO UPDATE"
        " SET count = count + excluded.count, bytes = bytes + excluded.bytes",
        (reason, len(gone), sum(s for _, s in gone)),
    )


def unreported_drops(db: sqlite3.Connection) -> list[tuple[str, int, int, int]]:
    """(reason, count, bytes, total count) of the drops not reported yet; marks them reported
    (the caller's transaction)."""
    rows = db.execute(
        "SELECT reason, count - reported_count, bytes - reported_bytes, count"
        " FROM outbox_drops WHERE count > reported_count"
    ).fetchall()
    if rows:
        db.execute("UPDATE outbox_drops SET reported_count = count, reported_bytes = bytes")
    return rows


class Tally:
    """Per-stream (count, bytes) changes of the table in one transaction, applied after commit."""

    def __init__(self, rows: Iterable[Row] = ()) -> None:
        self.streams: dict[str, list[int]] = {}
        self.bytes = 0
        self.extend(rows)

    def extend(self, rows: Iterable[Row]) -> None:
        self._apply(((r[0], r[1]) for r in rows), +1)

    def remove(self, gone: Iterable[tuple[str, int]]) -> None:
        self._apply(gone, -1)

    def _apply(self, pairs: Iterable[tuple[str, int]], sign: int) -> None:
        for stream, size in pairs:
            change = self.streams.setdefault(stream, [0, 0])
            change[0] += sign
            change[1] += sign * size
            self.bytes += sign * size

    def apply_to(self, depth: dict[str, tuple[int, int]]) -> None:
        for stream, (count, size) in self.streams.items():
            old = depth.get(stream, (0, 0))
            depth[stream] = (old[0] + count, old[1] + size)


class Remover:
    """Deletes delivered readings from the table, on the calling thread, and never gives up:
    on a full disk the store's reserve goes first, then the delete is tried again with backoff
    (``pending()``: the seqs still to delete; ``done(change, seqs)`` after a commit). Meanwhile
    the outbox keeps those readings out of every batch: no resend storm."""

    def __init__(self, store: Store, *, done: Callable[[Tally, Sequence[int]], None],
                 pending: Callable[[], list[int]], min_free: int) -> None:
        self._store = store
        self._done = done
        self._pending = pending
        self._min_free = min_free
        self.reserve = Reserve(store.path.with_name(store.path.name + "-reserve"))
        self._backoff = Backoff(1.0, 60.0)
        self._timer: threading.Timer | None = None

    def delete(self, seqs: Sequence[int]) -> None:
        for attempt in (1, 2):
            try:
                with self._store.transaction() as db:
                    change = Tally()
                    change.remove(delete(db, seqs))
                    self._store.after_commit(functools.partial(self._deleted, change, seqs))
                return
            except StoreFull:
                if attempt == 2 or not self.reserve.release():
                    break
            except StoreError:
                break
        self._later()

    def _deleted(self, change: Tally, seqs: Sequence[int]) -> None:
        self._done(change, seqs)
        if self._backoff.attempts:
            log.warning("outbox: delivered readings removed after %d failed tries",
                        self._backoff.attempts)
            self._backoff.reset()
        if free_bytes(self._store.path.parent) > self._min_free + 2 * RESERVE_BYTES:
            self.reserve.keep()

    def _later(self) -> None:
        if self._backoff.attempts == 0:
            log.error("outbox: no room to remove delivered readings (disk full?); they stay on"
                      " disk, not sent again, and their removal is retried with backoff")
        if self._timer is not None and self._timer.is_alive():
            return

        def retry() -> None:
            if pending := self._pending():
                self._store.submit(self.delete, pending, what="retried acknowledgements")

        self._timer = threading.Timer(self._backoff.next_delay(), retry)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
