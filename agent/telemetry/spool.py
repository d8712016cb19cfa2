"""The outbox's journal: recent readings, appended to one file, so an SD card is not worn out.

A reading committed to SQLite costs whole pages: the table's leaf, its index, the WAL frame of
each, and again when it is deleted after its acknowledgement (26 KB of writes for a 78-byte
reading at 10 readings a second, measured). Appended to this file it costs its own bytes. The
outbox keeps the readings of the journal in memory too and moves them into SQLite only when
they pile up (the link is down): a gateway whose link is up never writes a reading to SQLite.

One record per line, fields separated by tabs, its CRC-32 last (a record torn by a power cut
is skipped, the rest is read):

- ``N <next seq>``: the first line of each file: reading ids are never reused, even when
  every reading was delivered and the file started again;
- ``R <seq> <stream> <priority> <ts> <created> <topic> <data>``: a reading (topics and
  compact JSON hold no tab nor newline);
- ``G <seq ranges>``: readings gone (delivered, dropped or moved into SQLite), e.g. ``4-9,12``.

A write reaches the file (the kernel) before it returns, so a SIGKILL loses nothing that was
acknowledged. Power loss is the durability mode's business (``[store] durability``):
``power-safe`` syncs the file before a reading is acknowledged; ``crash-safe`` syncs it at most
``sync_interval`` seconds after a write, so a power cut loses at most that much.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# seq, stream, size, topic, ts, priority, created, data
SpoolRow = tuple[int, str, int, str, float, int, float, str]


@dataclass(slots=True)
class Replayed:
    """What a journal holds: its live readings in order, the next seq, records skipped."""

    rows: list[SpoolRow] = field(default_factory=list)
    next_seq: int = 1
    skipped: int = 0


def _line(*fields: object) -> bytes:
    body = "\t".join(str(f) for f in fields).encode()
    return b"%s\t%08x\n" % (body, zlib.crc32(body))


def reading_line(row: SpoolRow) -> bytes:
    seq, stream, _size, topic, ts, priority, created, data = row
    return _line("R", seq, stream, priority, repr(ts), repr(created), topic, data)


def ranges(seqs: Iterable[int]) -> str:
    """``[4, 5, 6, 9]`` -> ``"4-6,9"``."""
    out: list[str] = []
    ordered = sorted(seqs)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def _expand(text: str) -> Iterable[int]:
    for part in text.split(","):
        low, _, high = part.partition("-")
        yield from range(int(low), int(high or low) + 1)


def replay(data: bytes) -> Replayed:
    """Parse a journal's bytes (see the module doc)."""
    out = Replayed()
    live: dict[int, SpoolRow] = {}
    for raw in data.split(b"\n"):
        if not raw:
            continue
        body, _, crc = raw.rpartition(b"\t")
        try:
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("bad CRC")
            kind, *fields = body.decode().split("\t", 7)
            if kind == "N":
                out.next_seq = max(out.next_seq, int(fields[0]))
            elif kind == "R":
                seq, stream, priority, ts, created, topic, text = fields
                out.next_seq = max(out.next_seq, int(seq) + 1)
                live[int(seq)] = (int(seq), stream, len(text.encode()) + len(topic), topic,
                                  float(ts), int(priority), float(created), text)
            elif kind == "G":
                for gone in _expand(fields[0]):
                    live.pop(gone, None)
            else:
                raise ValueError(f"unknown record {kind!r}")
        except (ValueError, UnicodeDecodeError, IndexError):
            out.skipped += 1
    out.rows = sorted(live.values())
    return out


def read(path: Path) -> Replayed:
    """The journal at ``path`` (none yet: empty)."""
    try:
        return replay(path.read_bytes())
    except FileNotFoundError:
        return Replayed()


class Spool:
    """The journal file, open for appending. Thread-safe: appends come from the store's writer
    thread, timed syncs from a timer thread."""

    def __init__(self, path: Path, *, power_safe: bool, sync_interval: float) -> None:
        self.path = path
        self.power_safe = power_safe
        self._interval = sync_interval
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: bytes, *, sync: bool = False) -> None:
        """Write ``data`` (whole records) to the file; sync it at once when ``sync``, else
        within the sync interval. Raises OSError (``ENOSPC``): nothing of it counts. The lock
        is not held while syncing: a short write (a delivery's record, from the event loop)
        never waits for a sync."""
        with self._lock:
            self._write(data)
            fd = self._fd
            if not sync and self._timer is None:
                self._timer = threading.Timer(self._interval, self._timed_sync)
                self._timer.daemon = True
                self._timer.start()
        if sync:
            os.fdatasync(fd)

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
        except OSError:
            self._cut()
            raise
        self._size += written
        if written != len(data):  # ENOSPC half-way: take the torn record back
            self._cut()
            raise OSError(28, "No space left on device (journal write cut short)")

    def _cut(self) -> None:
        """Take back a partly written record, so the next record starts on a line of its own."""
        if os.fstat(self._fd).st_size != self._size:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.warning("outbox journal: could not take back a torn record")

    def _timed_sync(self) -> None:
        with self._lock:
            self._timer = None
            fd = self._fd
        try:
            os.fdatasync(fd)
        except OSError as exc:  # closed meanwhile (a restart syncs its new file) or failed
            log.warning("outbox journal: sync failed: %s", exc)

    def restart(self, next_seq: int, rows: Sequence[SpoolRow]) -> None:
        """Start a new file holding only ``rows`` (the live readings) and the next seq: written
        and synced beside the old one, then renamed over it."""
        fresh = self.path.with_name(self.path.name + ".new")
        data = _line("N", next_seq) + b"".join(reading_line(r) for r in rows)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(fresh, flags, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fdatasync(fd)
        except OSError:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            raise
        with self._lock:
            os.replace(fresh, self.path)
            os.close(self._fd)
            self._fd = fd
            self._size = len(data)
        _sync_dir(self.path.parent)

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._fd >= 0:
                os.fdatasync(self._fd)
                os.close(self._fd)
                self._fd = -1


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gone_line(seqs: Iterable[int]) -> bytes:
    return _line("G", ranges(seqs))


class Journal:
    """The journal's live readings in memory, by stream in seq order, and its file. Safe from
    any thread: the loop reads and forgets, the store's writer thread adds."""

    def __init__(self, path: Path, *, power_safe: bool, sync_interval: float,
                 rows: Sequence[SpoolRow], next_seq: int) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, OrderedDict[int, SpoolRow]] = {}
        self._bytes: dict[str, int] = {}
        self._failing = False
        self.file = Spool(path, power_safe=power_safe, sync_interval=sync_interval)
        self.file.restart(next_seq, rows)
        self._keep(rows)

    def add(self, rows: Sequence[SpoolRow]) -> None:
        """On disk (synced when power-safe), then in memory. Raises OSError (``ENOSPC``)."""
        self.file.append(b"".join(reading_line(r) for r in rows), sync=self.file.power_safe)
        self._keep(rows)

    def _keep(self, rows: Sequence[SpoolRow]) -> None:
        with self._lock:
            for row in rows:
                self._rows.setdefault(row[1], OrderedDict())[row[0]] = row
                self._bytes[row[1]] = self._bytes.get(row[1], 0) + row[2]

    def forget(self, seqs: Iterable[int]) -> list[int]:
        """Take readings out of memory; the seqs it held (the file learns with :meth:`gone`)."""
        found = []
        with self._lock:
            for seq in seqs:
                for stream, rows in self._rows.items():
                    row = rows.pop(seq, None)
                    if row is not None:
                        self._bytes[stream] -= row[2]
                        found.append(seq)
                        break
        return found

    def gone(self, seqs: Sequence[int]) -> None:
        """Record in the file that readings left. Not recorded (a full disk), they may go up
        again after a restart: duplicates only, said once."""
        try:
            self.file.append(gone_line(seqs))
            self._failing = False
        except OSError as exc:
            if not self._failing:
                log.warning("outbox journal: delivery of %d readings not recorded: %s",
                            len(seqs), exc)
            self._failing = True

    def depth(self, stream: str) -> tuple[int, int]:
        with self._lock:
            return len(self._rows.get(stream, ())), self._bytes.get(stream, 0)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def rows(self) -> list[SpoolRow]:
        """Every live reading, by seq."""
        with self._lock:
            return sorted(r for rows in self._rows.values() for r in rows.values())

    def first(self, stream: str, limit: int) -> list[SpoolRow]:
        with self._lock:
            return list(itertools.islice(self._rows.get(stream, {}).values(), limit))

    def older_than(self, floor: float, cutoff: float) -> bool:
        """Whether a reading was committed at ``floor`` or later but before ``cutoff``."""
        with self._lock:
            return any(floor <= r[6] < cutoff for rows in self._rows.values()
                       for r in rows.values())

    def restart(self, next_seq: int) -> None:
        """A new file holding the live readings only. Raises OSError."""
        self.file.restart(next_seq, self.rows())


def table_depths(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """(count, bytes) per stream of the outbox's table."""
    return {stream: (count, int(size)) for stream, count, size in db.execute(
        "SELECT stream, COUNT(*), TOTAL(size) FROM outbox GROUP BY stream")}


def waiting(db: sqlite3.Connection, journal: Path) -> dict[str, tuple[int, int]]:
    """(count, bytes) per stream of the whole outbox, table and journal, read from outside
    the agent (``simkeeper status``: ``db`` read-only)."""
    depth = table_depths(db)
    rows = read(journal).rows
    if rows:
        moved = {s for (s,) in db.execute("SELECT seq FROM outbox WHERE seq >= ?",
                                          (rows[0][0],))}
        for seq, stream, size, *_ in rows:
            if seq not in moved:
                count, total = depth.get(stream, (0, 0))
                depth[stream] = (count + 1, total + size)
    return depth


def journal_of(database: Path) -> Path:
    """The outbox's journal file of the database at ``database``."""
    return database.with_name(database.name + "-outbox")
