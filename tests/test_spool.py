"""The outbox's journal: its file format (torn and damaged records skipped), its restart, and
the outbox's use of it: delivered readings never reach SQLite, piled-up ones move there once,
a kill between the move and the journal's restart duplicates nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.core.store import Store
from agent.telemetry import spool, table
from agent.telemetry.outbox import TELEMETRY, Outbox
from agent.telemetry.spool import SpoolRow
from tests.broker import wait_until

T0 = 1_750_000_000.0


def row(seq: int, stream: str = TELEMETRY, data: str = '{"n":1}') -> SpoolRow:
    return (seq, stream, len(data) + 1, "a", T0, 0, T0 + 0.5, data)


def item(n: int) -> tuple[str, str, str, float, int]:
    return (TELEMETRY, "a", f'{{"n":{n}}}', T0, 0)


def test_records_read_back_and_gone_ranges_apply() -> None:
    data = (spool._line("N", 7) + b"".join(spool.reading_line(row(s)) for s in range(7, 13))
            + spool.gone_line([7, 8, 9, 11]))
    replayed = spool.replay(data)
    assert [r[0] for r in replayed.rows] == [10, 12]
    assert replayed.rows[0] == row(10)
    assert replayed.next_seq == 13 and replayed.skipped == 0
    assert spool.ranges([4, 5, 6, 9, 11, 12]) == "4-6,9,11-12"


def test_a_torn_or_damaged_record_is_skipped_and_the_rest_read() -> None:
    good = [spool.reading_line(row(s)) for s in (1, 2, 3)]
    damaged = good[1].replace(b'"n":1', b'"n":2')  # one bit of the data changed: CRC fails
    torn = spool.reading_line(row(4))[:-9]  # a power cut in the middle of the last write
    replayed = spool.replay(good[0] + damaged + good[2] + torn)
    assert [r[0] for r in replayed.rows] == [1, 3]
    assert replayed.skipped == 2


def test_restart_keeps_the_live_readings_and_the_next_seq(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = spool.Journal(path, power_safe=False, sync_interval=60, rows=[], next_seq=1)
    journal.add([row(1), row(2), row(3)])
    journal.forget([1, 3])
    journal.gone([1, 3])
    before = path.stat().st_size
    journal.restart(4)
    assert path.stat().st_size < before
    journal.file.close()
    replayed = spool.read(path)
    assert [r[0] for r in replayed.rows] == [2] and replayed.next_seq == 4


def test_delivered_readings_never_reach_the_table(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9, journal_bytes=1024)
    for n in range(500):  # one at a time, each delivered before the next: a link that is up
        assert outbox.next_batch(TELEMETRY, 10, 1 << 20) == []
        outbox.ack(outbox.add([item(n)]))
    assert store.query("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'outbox'") == [(0,)]
    assert spool.journal_of(store.path).stat().st_size <= 4 * 1024 + 200  # started again
    outbox.close()
    store.close()
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9)
    assert outbox.depth() == (0, 0)
    assert outbox.add([item(500)])[0].endswith("-501")  # ids go on from the journal's
    outbox.close()
    store.close()


def test_piled_up_readings_move_into_the_table_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9, journal_bytes=100)
    ids = [i for n in range(20) for i in outbox.add([item(n)])]
    in_table = store.query("SELECT COUNT(*) FROM outbox")[0][0]
    assert 0 < in_table < 20  # moved in bulk, the newest still in the journal
    assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == ids
    assert outbox.depth()[0] == 20
    outbox.ack(ids[:15])
    assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == ids[15:]
    outbox.close()
    store.close()


def test_a_kill_between_a_move_and_the_journal_restart_duplicates_nothing(
        tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9)
    ids = outbox.add([item(n) for n in range(5)])
    path = spool.journal_of(store.path)
    with store.transaction() as db:  # what a move commits, the journal not restarted yet
        table.insert(db, spool.read(path).rows)
    store.close()  # and the agent is killed here
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9)
    assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == ids
    assert outbox.depth()[0] == 5
    assert spool.read(path).rows == []  # the journal started again without them
    outbox.close()
    store.close()


def test_crash_safe_syncs_within_the_interval_and_power_safe_before_returning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        real(fd)
        synced.append(fd)

    monkeypatch.setattr(spool.os, "fdatasync", counting)
    crash_safe = spool.Journal(tmp_path / "a", power_safe=False, sync_interval=1.0, rows=[],
                               next_seq=1)
    synced.clear()  # the restart at open syncs its new file
    crash_safe.add([row(1)])
    crash_safe.add([row(2)])  # the same timed sync covers both (1 s apart at most)
    assert synced == []  # none before it returned
    wait_until(lambda: len(synced) >= 1, what="the timed sync")
    done = len(synced)
    crash_safe.add([row(3)])
    wait_until(lambda: len(synced) == done + 1, what="the next timed sync")
    power_safe = spool.Journal(tmp_path / "b", power_safe=True, sync_interval=60, rows=[],
                               next_seq=1)
    synced.clear()
    power_safe.add([row(1)])
    assert len(synced) == 1  # before add returned
    crash_safe.file.close()
    power_safe.file.close()
