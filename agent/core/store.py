"""The agent's one SQLite database: every durable thing lives here.

- WAL journal, ``synchronous=FULL``: in WAL mode ``NORMAL`` only syncs at checkpoints, so a
  power cut can take back transactions that were already acknowledged. With ``FULL`` each
  commit syncs the WAL once. Readings do not come here one by one (the outbox's journal takes
  them, :mod:`agent.telemetry.spool`), so commits are few; the WAL is checkpointed every 256
  pages and kept to 1 MiB, which a nearly full disk can spare. Each connection's page cache is
  512 KiB (SQLite's default 2 MiB grew the daemon by as much during an outage).
- Schema versioned by ``PRAGMA user_version`` (:mod:`agent.core.schema`), each migration in its
  own transaction.
- The event loop never commits. Every write runs on the store's one writer thread, in the order
  it was handed over: ``await store.run(fn)`` when the caller needs the result (or the error),
  ``store.submit(fn)`` to queue it and go on (sync code on the loop); ``store.write(fn)`` picks:
  at once where blocking is fine (the writer thread, inside a transaction, a thread without an
  event loop), else queued. A queued write that fails is logged, never lost silently; a full
  disk is logged once per episode (until a queued write succeeds again).
- Reads on any other thread use a second, read-only connection: a WAL reader never waits for
  the writer, so a read on the loop does not wait behind a commit's fsync. It sees what is
  committed; ``meta`` values queued with :meth:`Store.put_meta` are read back at once by
  :meth:`Store.get_meta` / :meth:`Store.meta_items` (read-your-writes), until they commit or fail.
- :meth:`Store.transaction` from any other thread (start-up, tools, tests) first waits for the
  queued writes, so the order holds; transactions nest (an inner one joins the outer), and an
  exception that leaves an inner one fails the outer one even when someone caught it: half of
  a write is never committed.
- A full disk (``SQLITE_FULL``, ``ENOSPC``) raises :class:`StoreFull`; any other database
  failure raises :class:`StoreError` with a readable reason.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from agent.core.schema import MIGRATIONS

__all__ = ["MIGRATIONS", "Store", "StoreError", "StoreFull"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class StoreError(Exception):
    """The database failed; the message says how."""


class StoreFull(StoreError):
    """No space left for the database: new data is refused, committed data is intact."""


def _translate(exc: BaseException, doing: str) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    ):
        return StoreFull(f"store full while {doing}: {exc}")
    return StoreError(f"store failed while {doing}: {exc}")


def _doomed(exc: BaseException) -> StoreError:
    """The error of a transaction rolled back because a write inside it failed."""
    if isinstance(exc, StoreError):
        return type(exc)(f"{exc} (the whole transaction was rolled back)")
    if isinstance(exc, sqlite3.Error | OSError):
        return _translate(exc, "writing")
    return StoreError(f"rolled back: a write inside the transaction failed: {exc!r}")


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


class Store:
    """The open database. Build one per process and pass it around."""

    def __init__(self, path: str | Path, *, migrations: Sequence[str] = MIGRATIONS) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()  # the writer connection
        self._owner: int | None = None  # the thread inside the open transaction
        self._depth = 0
        self._hooks: list[Callable[[], None]] = []
        self._failed_inside: BaseException | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._writer: int | None = None  # the writer thread's ident, once it started
        self._closed = False
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._overlay: dict[str, tuple[int, str | None]] = {}  # queued meta writes
        self._overlay_lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._submitted = 0
        self._failures: deque[tuple[int, str]] = deque(maxlen=256)
        self._refused = 0  # queued writes refused by a full disk, this episode
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = _connect(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc, f"opening {self.path}") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal (got {mode!r})")
            self._db.executescript(
                "PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA cache_size=-512;"
                " PRAGMA journal_size_limit=1048576; PRAGMA wal_autocheckpoint=256;"
            )
            self._migrate(migrations)
            reader = _connect(self.path)
            reader.executescript(
                "PRAGMA query_only=1; PRAGMA busy_timeout=5000; PRAGMA cache_size=-512;"
            )
            self._reader = reader
        except sqlite3.Error as exc:
            self._db.close()
            raise _translate(exc, f"opening {self.path}") from exc
        except BaseException:
            self._db.close()
            raise

    @property
    def version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    def _migrate(self, migrations: Sequence[str]) -> None:
        current = self.version
        if current > len(migrations):
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this agent knows"
                f" ({len(migrations)}); refusing to touch it"
            )
        for version in range(current, len(migrations)):
            with self.transaction() as db:
                for statement in migrations[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={version + 1}")

    # -- transactions ------------------------------------------------------------------------

    def in_writer(self) -> bool:
        """Whether this thread writes synchronously: the writer thread, or a thread inside a
        transaction."""
        me = threading.get_ident()
        return me in (self._writer, self._owner)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; an exception rolls back and is re-raised
        (database errors as :class:`StoreError`). Hooks from :meth:`after_commit` run once the
        outermost transaction has committed. Off the writer thread, the writes queued before
        commit first."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            try:
                yield self._db
            except BaseException as exc:
                if self._failed_inside is None:
                    self._failed_inside = exc
                raise
            finally:
                self._depth -= 1
            return
        if me != self._writer:
            self._wait_queued()
        with self._lock:
            self._owner, self._depth, self._failed_inside = me, 1, None
            hooks: list[Callable[[], None]] = []
            self._hooks = hooks
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                if self._failed_inside is not None:
                    raise _doomed(self._failed_inside)
                if not self._db.in_transaction:
                    raise StoreError("transaction was rolled back by the database")
                self._db.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error | OSError):
                    raise _translate(exc, "writing") from exc
                raise
            finally:
                self._owner, self._depth, self._hooks, self._failed_inside = None, 0, [], None
            for hook in hooks:
                hook()

    def in_transaction(self) -> bool:
        """Whether this thread is inside an open :meth:`transaction`."""
        return self._owner == threading.get_ident()

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after the current transaction commits (never if it rolls back)."""
        if self._owner != threading.get_ident():
            raise RuntimeError("after_commit outside a transaction")
        self._hooks.append(hook)

    # -- reading -----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read statement; rows as tuples. On the writer thread and inside a transaction it
        sees that transaction; elsewhere what is committed, without waiting for the writer."""
        try:
            if self._reader is None or self.in_writer():
                with self._lock:
                    return self._db.execute(sql, params).fetchall()
            with self._read_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc, "reading") from exc

    def get_meta(self, key: str) -> str | None:
        """A ``meta`` value, counting the ones queued by :meth:`put_meta` and not committed."""
        if not self.in_writer():
            with self._overlay_lock:
                queued = self._overlay.get(key)
            if queued is not None:
                return queued[1]
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def meta_items(self, prefix: str) -> dict[str, str]:
        """The ``meta`` values whose key starts with ``prefix``, by key, counting queued ones."""
        queued: dict[str, str | None] = {}
        if not self.in_writer():  # taken before the read: a write committing meanwhile is kept
            with self._overlay_lock:
                queued = {k: v for k, (_, v) in self._overlay.items() if k.startswith(prefix)}
        rows = self.query(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        items: dict[str, str] = dict(rows)
        for key, value in queued.items():
            if value is None:
                items.pop(key, None)
            else:
                items[key] = value
        return dict(sorted(items.items()))

    # -- writing off the loop ----------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking store work (a commit and its fsync) on the writer thread, after every
        write handed over before it; its result or exception comes back."""
        loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(self._queue(functools.partial(fn, *args)), loop=loop)

    def submit(self, fn: Callable[..., T], *args: Any, what: str = "") -> Future[T]:
        """Queue ``fn(*args)`` on the writer thread (after every write handed over before it)
        and return at once. A failure is logged, naming ``what``; the future has it too."""
        what = what or getattr(fn, "__qualname__", repr(fn))
        with self._executor_lock:
            seq = self._submitted = self._submitted + 1

        def job() -> T:
            try:
                value = fn(*args)
            except BaseException as exc:
                self._failed(seq, what, exc)
                raise
            if self._refused:
                log.warning("store writable again (%d queued writes were refused while full)",
                            self._refused)
                self._refused = 0
            return value

        try:
            return self._queue(job)
        except StoreError as exc:
            log.error("store: %s not saved: %s", what, exc)
            failed: Future[T] = Future()
            failed.set_exception(exc)
            return failed

    def write(self, fn: Callable[[], object], *, what: str = "") -> None:
        """Run the write ``fn`` at once where blocking is fine (the writer thread, inside a
        transaction, a thread without a running event loop: its error is raised), else queue it
        (:meth:`submit`: its error is logged)."""
        if self._must_queue():
            self.submit(fn, what=what)
        else:
            fn()

    def put_meta(self, values: Mapping[str, str | None], *, also: Callable[[], object] | None
                 = None, what: str = "") -> None:
        """Set ``meta`` values (None deletes) and run ``also()`` in the same transaction, via
        :meth:`write`. Queued values are read back at once by :meth:`get_meta`; if the write
        fails they are forgotten (the committed values show again)."""
        values = dict(values)

        def put() -> None:
            with self.transaction() as db:
                for key, value in values.items():
                    if value is None:
                        db.execute("DELETE FROM meta WHERE key = ?", (key,))
                    else:
                        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                   (key, value))
                if also is not None:
                    also()

        if not self._must_queue():
            put()
            return
        token = next(self._tokens)
        with self._overlay_lock:
            self._overlay.update((key, (token, value)) for key, value in values.items())

        def job() -> None:
            try:
                put()
            finally:
                with self._overlay_lock:
                    for key in values:
                        if self._overlay.get(key, (0, None))[0] == token:
                            del self._overlay[key]

        self.submit(job, what=what or f"meta {', '.join(values)}")

    def write_mark(self) -> int:
        """A mark for :meth:`failures_since`: the count of writes queued so far."""
        return self._submitted

    def failures_since(self, mark: int) -> list[str]:
        """What failed among the queued writes handed over since ``mark`` and already run."""
        return [what for seq, what in list(self._failures) if seq > mark]

    def flush(self) -> None:
        """Block until every write queued so far has run (tools and tests; never on the writer
        thread nor inside a transaction)."""
        if self.in_writer():
            raise RuntimeError("flush on the store's writer thread or inside a transaction")
        self._wait_queued()

    def _must_queue(self) -> bool:
        if self.in_writer():
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _queue(self, job: Callable[[], T]) -> Future[T]:
        with self._executor_lock:
            if self._closed:
                raise StoreError(f"{self.path}: store is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="store", initializer=self._started
                )
            return self._executor.submit(job)

    def _started(self) -> None:
        self._writer = threading.get_ident()

    def _wait_queued(self) -> None:
        with self._executor_lock:
            executor = self._executor
            if executor is None or self._closed:
                return
            barrier = executor.submit(lambda: None)
        barrier.result()

    def _failed(self, seq: int, what: str, exc: BaseException) -> None:
        self._failures.append((seq, f"{what} ({exc})"))
        if isinstance(exc, StoreFull):
            self._refused += 1
            if self._refused == 1:
                log.error("store full: %s not saved (%s); while it lasts, refused writes are"
                          " counted, not logged", what, exc)
        elif isinstance(exc, StoreError):
            log.error("store: %s not saved: %s", what, exc)
        else:
            log.error("store: %s failed", what, exc_info=exc)

    # -- the rest ----------------------------------------------------------------------------

    def integrity_check(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])

    def close(self) -> None:
        """Run the queued writes, then close."""
        with self._executor_lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
        with self._lock:
            self._db.close()
