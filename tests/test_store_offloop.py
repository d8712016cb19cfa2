"""The event loop never waits on the disk: every write from the loop runs on the store's writer
thread, reads on the loop never wait for a commit, a queued write reads back at once, and a
queued write that fails is logged (a full disk once per episode).

A held commit stands for an SD card's fsync: :class:`HeldCommits` wraps the writer connection
and holds the next ``COMMIT`` until the test releases it. Nothing here measures time: a
heartbeat task on the loop notes that it ran *while* the commit was held, and the test releases
the commit only after that (on the old code the loop itself sat in the commit, so it never did).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands.processor import CommandProcessor
from agent.core.store import Store
from agent.core.trusted_time import TrustedClock, TrustedNow, load_anchor, save_anchor
from agent.fleet.sign import encode, make_envelope
from agent.sim.alarms import DeadlineAlarms
from agent.sim.lifecycle import LifecycleRepository, SimRecord, events_emitter
from agent.sim.notes import KeeperStore
from agent.telemetry.events import Events
from agent.telemetry.outbox import EVENTS, TELEMETRY, Outbox
from drivers.channel import AtChannel
from drivers.simulator import SimulatedModem
from provisioning.keys import public_pem
from tests.broker import until

ICCID = "8981100005819510018"
T0 = 1_750_000_000.0
HOLD = 10.0  # a held commit gives up after this long (only ever reached on the old code)
WAIT = 20.0  # how long a test waits for a condition before it fails


class HeldCommits:
    """The store's writer connection, its next ``COMMIT`` held until :attr:`release` is set."""

    def __init__(self, store: Store) -> None:
        self._db: sqlite3.Connection = store._db
        store._db = self  # type: ignore[assignment]
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.inside = False
        self.thread = ""

    def arm(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            self.thread = threading.current_thread().name
            self.inside = True
            self.entered.set()
            try:
                self.release.wait(HOLD)
            finally:
                self.inside = False
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@dataclass
class Rig:
    store: Store
    outbox: Outbox
    events: Events
    held: HeldCommits
    beat_during_commit: asyncio.Event

    async def flush(self) -> None:
        await self.store.run(lambda: None)

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        rows = self.outbox.next_batch(EVENTS, 1000, 1 << 30)
        return [json.loads(r.data) for r in rows if r.topic == kind]

    async def loop_ran_during_the_commit(self) -> None:
        """The held commit started, and the loop ran meanwhile; then release it."""
        await until(self.held.entered.is_set, "a commit to start", WAIT)
        await asyncio.wait_for(self.beat_during_commit.wait(), WAIT)
        assert self.held.inside, "the commit was released before the loop ran"
        assert self.held.thread != threading.current_thread().name
        self.held.release.set()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = Store(tmp_path / "db")
    # journal_bytes=0: every reading goes to the table, whose commits are held here
    outbox = Outbox(store, max_bytes=1 << 20, max_age=1e9, journal_bytes=0)
    held = HeldCommits(store)
    during = asyncio.Event()

    async def heartbeat() -> None:
        while True:
            if held.inside:
                during.set()
            await asyncio.sleep(0.001)

    task = asyncio.create_task(heartbeat())
    try:
        yield Rig(store, outbox, Events(outbox), held, during)
    finally:
        held.release.set()
        task.cancel()
        store.close()


# -- writes from the loop ----------------------------------------------------------------------

Op = Callable[[Rig], Awaitable[Callable[[], None]] | None]


def _event(r: Rig) -> Callable[[], None]:
    r.events.emit("probe", n=1)
    return lambda: None


def _lifecycle(r: Rig) -> Callable[[], None]:
    repo = LifecycleRepository(r.store)
    lc = repo.open(ICCID, emit=events_emitter(r.events.emit),
                   clock=lambda: TrustedNow(T0, "ntp", T0))
    r.held.arm()
    lc.set_deadline(T0 + 86400)

    def check() -> None:
        assert repo.load(ICCID) == lc.record and lc.record.deadline == T0 + 86400
        assert [e["to"] for e in r.events_of("deadline-set")] == ["awaiting-activation"]

    return check


def _keeper_note(r: Rig) -> Callable[[], None]:
    notes = KeeperStore(r.store)
    notes.put("nm_mode", "radio-off")
    return lambda: None


def _alarm(r: Rig) -> Callable[[], None]:
    notes = KeeperStore(r.store)
    record = SimRecord(ICCID, deadline=T0 + 1800)
    DeadlineAlarms(notes, r.events.emit).check(record, TrustedNow(T0, "ntp", T0))

    def check() -> None:
        assert notes.notes(ICCID).alarms == [7 * 86400.0, 86400.0, 3600.0]  # the tightest sent
        assert [a["threshold"] for a in r.events_of("deadline-alarm")] == [3600.0]

    return check


def _time_anchor(r: Rig) -> Callable[[], None]:
    clock = TrustedClock(persist=lambda a: save_anchor(r.store, a), synchronised=lambda: True,
                         wall=lambda: T0, mono=lambda: 5.0, boot="b")
    clock.now()

    def check() -> None:
        anchor = load_anchor(r.store)
        assert anchor is not None and anchor.ts == T0

    return check


async def _journal(r: Rig) -> Callable[[], None]:
    key = Ed25519PrivateKey.generate()
    clock = TrustedClock(synchronised=lambda: True, wall=lambda: T0, boot="b")
    proc = CommandProcessor(r.store, "gw", [public_pem(key.public_key())], clock,
                            {"suspend": lambda _args: "held"})
    r.held.arm()
    payload = encode(make_envelope(key, "gw", "suspend", {"scope": "data"}, now=int(T0)))
    task = asyncio.create_task(proc.handle(payload))
    await r.loop_ran_during_the_commit()  # the journal row
    answer = await task
    assert answer["status"] == "ok", answer
    return lambda: None


async def _drainer(r: Rig) -> Callable[[], None]:
    ids = await r.outbox.add_async([(TELEMETRY, "t", "1", T0, 0), (TELEMETRY, "t", "2", T0, 0)])
    r.held.arm()
    r.outbox.ack_soon(ids[:1])  # what the drainer does when a batch is acknowledged
    fetched = asyncio.create_task(r.outbox.fetch(TELEMETRY, 10, 1 << 20))
    await r.loop_ran_during_the_commit()
    assert [x.id for x in await fetched] == ids[1:]  # the ack went first
    return lambda: None


SYNC_OPS: dict[str, Callable[[Rig], Callable[[], None]]] = {
    "event": _event, "lifecycle": _lifecycle, "keeper note": _keeper_note,
    "deadline alarm": _alarm, "time anchor": _time_anchor,
}


@pytest.mark.parametrize("name", list(SYNC_OPS))
async def test_a_write_from_the_loop_commits_while_the_loop_runs(rig: Rig, name: str) -> None:
    rig.held.arm()
    check = SYNC_OPS[name](rig)  # returns at once: the write is queued
    await rig.loop_ran_during_the_commit()
    await rig.flush()
    check()


@pytest.mark.parametrize("op", [_journal, _drainer], ids=["command journal", "drainer"])
async def test_awaited_store_work_runs_while_the_loop_runs(
        rig: Rig, op: Callable[[Rig], Awaitable[Callable[[], None]]]) -> None:
    check = await op(rig)
    check()


async def test_reads_on_the_loop_do_not_wait_for_a_commit(rig: Rig) -> None:
    notes, repo = KeeperStore(rig.store), LifecycleRepository(rig.store)
    rig.held.arm()
    add = asyncio.create_task(rig.outbox.add_async([(TELEMETRY, "t", "1", T0, 0)]))
    await until(rig.held.entered.is_set, "a commit to start", WAIT)
    # On the loop thread, while the writer sits in its commit:
    assert notes.get("nm_mode") is None and repo.load(ICCID) is None
    assert rig.outbox.drops() == {} and rig.store.query("SELECT count(*) FROM outbox") == [(0,)]
    assert rig.held.inside, "the reads waited for the commit"
    rig.held.release.set()
    await add
    assert rig.store.query("SELECT count(*) FROM outbox") == [(1,)]


async def test_a_queued_write_reads_back_at_once(rig: Rig) -> None:
    notes, repo = KeeperStore(rig.store), LifecycleRepository(rig.store)
    lc = repo.open(ICCID, emit=lambda _e: None, clock=lambda: TrustedNow(T0, "ntp", T0))
    rig.held.arm()
    notes.put("nm_mode", "data-off")
    lc.start_activation()
    await until(rig.held.entered.is_set, "a commit to start", WAIT)
    committed = rig.store.query("SELECT key FROM meta WHERE key LIKE 'keeper.%'")
    assert committed == []  # not committed yet: what follows comes from the queue
    assert notes.get("nm_mode") == "data-off"
    assert repo.load(ICCID) == lc.record and [r.state for r in repo.all()] == ["activating"]
    rig.held.release.set()
    await rig.flush()
    assert notes.get("nm_mode") == "data-off" and repo.load(ICCID) == lc.record


async def test_a_failed_queued_write_is_logged_once_per_full_disk_and_forgotten(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    notes = KeeperStore(rig.store)
    notes.put("kept", "old")
    await rig.flush()

    def limit(pages: int | None) -> None:  # None: no room beyond what is there
        with rig.store.transaction() as db:
            pages = pages or db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

    await rig.store.run(limit, None)
    caplog.set_level(logging.WARNING, logger="agent.core.store")
    for n in range(5):
        notes.put("kept", "x" * 20000 + str(n))
    assert notes.get("kept").startswith("x")  # queued: read back at once
    await rig.flush()
    full = [r for r in caplog.records if "store full" in r.getMessage()]
    assert len(full) == 1 and "keeper note kept" in full[0].getMessage()
    assert notes.get("kept") == "old"  # the failed writes are forgotten: the committed value
    await rig.store.run(limit, 1 << 30)
    notes.put("kept", "new")
    await rig.flush()
    assert notes.get("kept") == "new"
    assert any("writable again (5 queued" in r.getMessage() for r in caplog.records)
    await rig.store.run(limit, None)
    notes.put("kept", "y" * 20000)
    await rig.flush()
    assert len([r for r in caplog.records if "store full" in r.getMessage()]) == 2  # new episode


async def test_an_order_whose_write_fails_is_answered_failed(rig: Rig) -> None:
    key = Ed25519PrivateKey.generate()
    clock = TrustedClock(synchronised=lambda: True, wall=lambda: T0, boot="b")
    notes = KeeperStore(rig.store)

    def suspend(_args: dict[str, Any]) -> str:  # like an order: memory now, the store queued
        notes.put("order", "x" * 20000)
        return "suspended"

    proc = CommandProcessor(rig.store, "gw", [public_pem(key.public_key())], clock,
                            {"suspend": suspend})

    def limit() -> None:  # room for the journal, not for the note
        with rig.store.transaction() as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages + 3}")

    await rig.store.run(limit)
    payload = encode(make_envelope(key, "gw", "suspend", {"scope": "data"}, now=int(T0)))
    answer = await proc.handle(payload)
    assert answer["status"] == "failed", answer
    assert "not saved" in answer["detail"] and "keeper note order" in answer["detail"]
    assert (await proc.handle(payload)) == answer  # the journal has the true answer


async def test_the_modem_is_answered_while_a_commit_waits_for_the_disk(rig: Rig) -> None:
    """An AT round trip, the thing an SD card's fsync used to stall, completes while an event's
    commit is held."""
    async with SimulatedModem(personality="quectel") as sim:
        channel = await AtChannel.open(sim.path, timeout=WAIT)
        try:
            rig.held.arm()
            rig.events.emit("probe", n=2)  # queued; its commit is held below
            await until(rig.held.entered.is_set, "the event's commit to start", WAIT)
            lines = await channel.command("AT+CSQ")
            assert rig.held.inside, "the commit ended before the modem was answered"
            assert any(line.startswith("+CSQ:") for line in lines)
            rig.held.release.set()
            await rig.flush()
            assert [e["n"] for e in rig.events_of("probe")] == [2]
        finally:
            await channel.close()
