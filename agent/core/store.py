"""The agent's one SQLite database: every durable thing lives here.

- WAL journal, ``synchronous=FULL``: in WAL mode ``NORMAL`` only syncs at checkpoints, so a
  power cut can take back transactions that were already acknowledged to their producers. With
  ``FULL`` each commit syncs the WAL once; callers group their writes (the ingest server commits
  many readings per transaction), so an SD card sees one sync per batch, not one per reading.
- Schema versioned by ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes the schema from version
  ``i`` to ``i + 1``, each in its own transaction. Append, never edit, a migration.
- One connection per process, shared by the event loop and the store's single worker thread
  (``Store.run``), serialised by a lock; transactions nest (an inner one joins the outer).
- A full disk (``SQLITE_FULL``, ``ENOSPC``) raises :class:`StoreFull`; any other database
  failure raises :class:`StoreError` with a readable reason.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    topic TEXT NOT NULL,
    ts REAL NOT NULL,
    priority INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX outbox_by_stream ON outbox (stream, seq);
CREATE INDEX outbox_by_priority ON outbox (priority, seq);
CREATE INDEX outbox_by_created ON outbox (created);
CREATE TABLE outbox_drops (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    reported_count INTEGER NOT NULL DEFAULT 0,
    reported_bytes INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE usage_counter (
    source TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE usage_period (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    source TEXT NOT NULL,
    tx_bytes INTEGER NOT NULL,
    rx_bytes INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    rx_packets INTEGER NOT NULL,
    PRIMARY KEY (iccid, period, source)
) WITHOUT ROWID;
CREATE TABLE usage_alert (
    iccid TEXT NOT NULL,
    period TEXT NOT NULL,
    share REAL NOT NULL,
    PRIMARY KEY (iccid, period, share)
) WITHOUT ROWID;
CREATE TABLE usage_plan (iccid TEXT PRIMARY KEY, plan_bytes INTEGER NOT NULL) WITHOUT ROWID;
"""

# The running daemon's own row (agent.core.runtime), read by `simkeeper status`: written when
# something shown changes, the heartbeat at most once a minute.
_V2 = """
CREATE TABLE runtime (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat REAL NOT NULL,
    stopped_at REAL,
    modems TEXT NOT NULL,
    uplink TEXT NOT NULL,
    usage TEXT NOT NULL
);
"""

# Signed commands (agent.commands.journal): each id executed at most once, its result kept for
# repeats until ``keep_until`` (past the envelope's expiry); operator keys installed by
# ``rotate-key``, the newest row being the key in force.
_V3 = """
CREATE TABLE command_journal (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    name TEXT NOT NULL,
    received_at REAL NOT NULL,
    keep_until REAL NOT NULL,
    status TEXT NOT NULL,
    result TEXT
) WITHOUT ROWID;
CREATE INDEX command_journal_by_keep ON command_journal (keep_until);
CREATE TABLE operator_key (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    pem TEXT NOT NULL,
    installed_at REAL NOT NULL,
    command_id TEXT NOT NULL
);
"""

# The SIM keeper's summaries in the runtime row, for `simkeeper status`.
_V4 = """
ALTER TABLE runtime ADD COLUMN sims TEXT NOT NULL DEFAULT '[]';
"""

# The supervised tasks in the runtime row (agent.core.tasks.Supervisor.status): restarts and
# last error of each long-running part, for `simkeeper status`.
_V5 = """
ALTER TABLE runtime ADD COLUMN tasks TEXT NOT NULL DEFAULT '{}';
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5)


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


class Store:
    """The open database. Build one per process and pass it around."""

    def __init__(self, path: str | Path, *, migrations: Sequence[str] = MIGRATIONS) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._depth = 0
        self._hooks: list[Callable[[], None]] = []
        self._executor: ThreadPoolExecutor | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise _translate(exc, f"opening {self.path}") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal (got {mode!r})")
            self._db.executescript(
                "PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;"
                " PRAGMA journal_size_limit=4194304;"
            )
            self._migrate(migrations)
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

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; an exception rolls back and is re-raised
        (database errors as :class:`StoreError`). Hooks from :meth:`after_commit` run once the
        outermost transaction has committed."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            hooks: list[Callable[[], None]] = []
            self._hooks = hooks
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
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
                self._depth = 0
                self._hooks = []
            for hook in hooks:
                hook()

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after the current transaction commits (never if it rolls back)."""
        if not self._depth:
            raise RuntimeError("after_commit outside a transaction")
        self._hooks.append(hook)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read statement; rows as tuples."""
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "reading") from exc

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking store work (a commit and its fsync) on the store's worker thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def integrity_check(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            self._db.close()
