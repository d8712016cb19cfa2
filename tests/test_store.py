"""The store: WAL + FULL sync, migrations, transactions, a full disk, SIGKILL at any moment."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from agent.core.store import MIGRATIONS, Store, StoreError, StoreFull
from agent.telemetry.outbox import TELEMETRY, Outbox

ROOT = Path(__file__).resolve().parent.parent


def test_fresh_database_is_wal_full_sync_and_migrated(tmp_path: Path) -> None:
    store = Store(tmp_path / "sub" / "db.sqlite")
    assert store.query("PRAGMA journal_mode") == [("wal",)]
    with store.transaction() as db:  # the writer's connection
        assert db.execute("PRAGMA synchronous").fetchall() == [(2,)]  # FULL
    assert store.version == len(MIGRATIONS)
    assert store.integrity_check() == "ok"
    store.close()


def test_migrations_apply_in_order_once(tmp_path: Path) -> None:
    path = tmp_path / "db"
    first = ("CREATE TABLE a (x INTEGER);",)
    Store(path, migrations=first).close()
    second = (*first, "CREATE TABLE b (y INTEGER); INSERT INTO a VALUES (1);")
    store = Store(path, migrations=second)
    assert store.version == 2
    assert store.query("SELECT x FROM a") == [(1,)]
    store.close()
    store = Store(path, migrations=second)  # nothing re-run
    assert store.query("SELECT x FROM a") == [(1,)]
    store.close()


def test_failed_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "db"
    Store(path, migrations=("CREATE TABLE a (x);",)).close()
    with pytest.raises(StoreError, match="no such table"):
        Store(
            path,
            migrations=("CREATE TABLE a (x);", "CREATE TABLE b (y); INSERT INTO nope VALUES (1);"),
        )
    store = Store(path, migrations=("CREATE TABLE a (x);",))
    assert store.version == 1
    assert store.query("SELECT name FROM sqlite_master WHERE name = 'b'") == []
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        Store(path)


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="not a database"):
        Store(path)


def test_transactions_roll_back_nest_and_run_hooks_after_commit(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", migrations=("CREATE TABLE t (x INTEGER);",))
    ran: list[str] = []
    with pytest.raises(RuntimeError), store.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
        store.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("boom")
    assert store.query("SELECT x FROM t") == []
    with store.transaction() as db:
        db.execute("INSERT INTO t VALUES (2)")
        with store.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (3)")
            store.after_commit(lambda: ran.append("inner"))
        assert ran == []  # the inner block does not commit
        store.after_commit(lambda: ran.append("outer"))
    assert ran == ["inner", "outer"]
    assert store.query("SELECT x FROM t ORDER BY x") == [(2,), (3,)]
    with pytest.raises(RuntimeError):
        store.after_commit(lambda: None)
    with pytest.raises(StoreError, match="no such table"), store.transaction() as db:
        db.execute("INSERT INTO missing VALUES (1)")
    store.close()


def test_full_disk_is_store_full_and_keeps_committed_data(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", migrations=("CREATE TABLE t (x BLOB);",))
    with store.transaction() as db:
        db.execute("INSERT INTO t VALUES (zeroblob(1000))")
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages + 4}")
    with pytest.raises(StoreFull, match="full"), store.transaction() as db:
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (zeroblob(4000))")
    assert store.query("SELECT COUNT(*) FROM t") == [(1,)]
    with store.transaction() as db:  # the store keeps working
        db.execute("DELETE FROM t")
    assert store.integrity_check() == "ok"
    store.close()


async def test_run_uses_one_worker_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    names = {await store.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert len(names) == 1
    assert names != {threading.current_thread().name}
    store.close()


async def test_writes_from_the_loop_run_in_order_on_the_writer_thread(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "db", migrations=("CREATE TABLE t (x INTEGER);",))
    threads: set[str] = set()

    def insert(x: int) -> None:
        threads.add(threading.current_thread().name)
        with store.transaction() as db:
            db.execute("INSERT INTO t VALUES (?)", (x,))

    for x in range(10):
        store.submit(insert, x)
        store.write(lambda x=x: insert(x + 100))  # on the loop: queued too
    rows = await store.run(store.query, "SELECT x FROM t ORDER BY rowid")
    assert rows == [(x + d,) for x in range(10) for d in (0, 100)]
    assert threads == {await store.run(lambda: threading.current_thread().name)}
    assert threading.current_thread().name not in threads
    store.close()
    refused = store.submit(insert, 99)
    assert isinstance(refused.exception(), StoreError)
    assert "insert not saved" in caplog.text and "closed" in caplog.text


def test_writes_without_an_event_loop_are_done_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", migrations=(
        "CREATE TABLE t (x INTEGER); CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);",))
    queued = store.submit(store.query, "SELECT 1")  # the writer thread exists: ordered after it

    def insert() -> None:
        with store.transaction() as db:
            db.execute("INSERT INTO t VALUES (1)")

    store.write(insert)
    assert queued.done() and store.query("SELECT x FROM t") == [(1,)]
    store.put_meta({"k": "v"})
    assert store.query("SELECT value FROM meta WHERE key = 'k'") == [("v",)]
    with pytest.raises(StoreError, match="no such table"):
        store.write(lambda: store.query("SELECT * FROM missing"))
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from agent.telemetry.outbox import Outbox
    from agent.core.store import Store
    store = Store(sys.argv[1])
    outbox = Outbox(store, max_bytes=1 << 30, max_age=1e9, journal_bytes=2048)  # moves often
    n = 0
    while True:
        batch = [
            ("telemetry", "t/%d" % (n % 7), '{"n":%d}' % (n + i), 1.0, 0)
            for i in range(n % 13 + 1)
        ]
        n += len(batch)
        ids = outbox.add(batch)
        sys.stdout.write(" ".join(ids) + "\\n")
        sys.stdout.flush()
    """
)


def test_sigkill_at_any_moment_loses_nothing_acked(tmp_path: Path) -> None:
    path = tmp_path / "db"
    acked: list[str] = []
    for kill_after in (1, 7, 40, 150, 333):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        assert proc.stdout is not None
        for _ in range(kill_after):
            acked += proc.stdout.readline().split()
        proc.send_signal(signal.SIGKILL)
        acked += proc.stdout.read().split()  # lines written before the kill landed
        proc.wait()
        store = Store(path)
        assert store.integrity_check() == "ok"
        outbox = Outbox(store, max_bytes=1 << 30, max_age=1e9)  # the table and the journal
        present = {r.id for r in outbox.next_batch(TELEMETRY, 1 << 20, 1 << 40)}
        assert set(acked) <= present
        outbox.close()
        store.close()
    assert len(acked) == len(set(acked))  # ids never reused across restarts
