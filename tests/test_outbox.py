"""The outbox: ids, order, batches, acks, bounds and the drop policy, a full disk, listeners;
and the events emitter on top of it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core.store import Store, StoreFull
from agent.telemetry.events import Events
from agent.telemetry.outbox import AGE_FLOOR, EVENTS, TELEMETRY, Item, Outbox, OutboxError

NOW = 1_750_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


def reading(topic: str, n: int, priority: int = 0, pad: int = 0) -> Item:
    return (TELEMETRY, topic, json.dumps({"n": n, "pad": "x" * pad}), NOW, priority)


def test_ids_order_and_batches(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    ids = outbox.add([reading("a", i) for i in range(5)] + [reading("b", i) for i in range(5)])
    assert len(set(ids)) == 10
    batch = outbox.next_batch(TELEMETRY, 4, 1 << 20)
    assert [r.id for r in batch] == ids[:4]
    assert [json.loads(r.data)["n"] for r in batch] == [0, 1, 2, 3]
    assert batch[0].topic == "a" and batch[0].stream == TELEMETRY and batch[0].priority == 0
    assert batch[0].size == len(batch[0].data.encode()) + 1
    size = batch[0].size
    assert len(outbox.next_batch(TELEMETRY, 100, size * 3)) == 3
    assert outbox.next_batch(EVENTS, 10, 1000) == []
    assert outbox.depth() == (10, size * 10)
    outbox.ack([*ids[:4], "nonsense", "ffffffff-1", f"{ids[0]}x"])
    assert outbox.depth(TELEMETRY) == (6, size * 6)
    rest = outbox.next_batch(TELEMETRY, 100, 1 << 20)
    assert [r.id for r in rest] == ids[4:]
    assert [r.topic for r in rest] == ["a"] + ["b"] * 5


def test_a_reading_larger_than_max_bytes_still_goes_alone(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    big, small = outbox.add([reading("a", 0, pad=5000), reading("a", 1)])
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 100)] == [big]
    outbox.ack([big])
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 100)] == [small]


def test_ids_are_never_reused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    first = outbox.add([reading("a", 0)])
    outbox.ack(first)
    store.close()
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    second = outbox.add([reading("a", 0)])
    assert first != second
    assert first[0].split("-")[0] == second[0].split("-")[0]
    other = Outbox(Store(tmp_path / "other"), max_bytes=1 << 20, max_age=3600)
    assert other.add([reading("a", 0)])[0].split("-")[0] != first[0].split("-")[0]
    store.close()


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (("nope", "a", "1", NOW, 0), "unknown stream"),
        ((TELEMETRY, "a/+", "1", NOW, 0), "bad topic"),
        ((TELEMETRY, "", "1", NOW, 0), "bad topic"),
        ((TELEMETRY, "a", "1", float("nan"), 0), "bad ts"),
        ((TELEMETRY, "a", "1", NOW, 101), "priority 101"),
        ((TELEMETRY, "a", "x" * 2000, NOW, 0), "exceeds outbox.max_bytes"),
    ],
)
def test_invalid_items_add_nothing(store: Store, item: Item, match: str) -> None:
    outbox = Outbox(store, max_bytes=1024 * 1024, max_age=3600)
    outbox._max_bytes = 1024  # a tiny bound, below the config minimum
    with pytest.raises(OutboxError, match=match):
        outbox.add([reading("ok", 1), item])
    assert outbox.depth() == (0, 0)
    assert store.query("SELECT COUNT(*) FROM outbox") == [(0,)]


def test_byte_bound_drops_oldest_lowest_priority_first(tmp_path: Path) -> None:
    clock = Clock()
    drops: list[tuple[int, int, str]] = []
    store = Store(tmp_path / "db")
    size = len(reading("h", 0, pad=70)[2]) + 1  # every reading below has this size
    outbox = Outbox(
        store, max_bytes=10 * size, max_age=86400, on_drop=lambda *a: drops.append(a), clock=clock
    )
    high = outbox.add([reading("h", i, priority=5, pad=70) for i in range(3)])
    low = outbox.add([reading("l", i, priority=-1, pad=70) for i in range(3)])
    mid = outbox.add([reading("m", i, priority=0, pad=70) for i in range(4)])
    assert outbox.depth() == (10, 10 * size)
    new = outbox.add([reading("n", i, priority=-5, pad=70) for i in range(4)])
    kept = {r.id for r in outbox.next_batch(TELEMETRY, 1000, 1 << 20)}
    # 4 new readings need 4 older ones gone: the 3 of priority -1 (oldest first), then the
    # oldest of priority 0; the new ones (priority -5) are never dropped by their own add
    assert set(new) <= kept and set(high) <= kept
    assert not set(low) & kept
    assert set(mid) & kept == set(mid[1:])
    assert drops == [(4, 4 * size, "max_bytes")]
    assert outbox.drops() == {"max_bytes": (4, 4 * size)}
    events = outbox.next_batch(EVENTS, 10, 1 << 20)
    assert len(events) == 1
    event = json.loads(events[0].data)
    assert event == {
        "kind": "outbox-drop",
        "ts": NOW,
        "reason": "max_bytes",
        "count": 4,
        "bytes": 4 * size,
        "total": 4,
    }
    assert events[0].topic == "outbox-drop" and events[0].priority == 100
    # drops within the next minute are counted but reported together later
    outbox.add([reading("n", 9, priority=-5, pad=70)])
    assert len(outbox.next_batch(EVENTS, 10, 1 << 20)) == 1
    clock.now += 61
    outbox.add([reading("n", 10, priority=-5, pad=70)])
    later = [json.loads(e.data) for e in outbox.next_batch(EVENTS, 10, 1 << 20)]
    assert len(later) == 2 and later[1]["total"] == later[1]["count"] + 4
    store.close()
    store = Store(tmp_path / "db")  # counts are persisted
    again = Outbox(store, max_bytes=10 * size, max_age=86400, clock=clock)
    assert again.drops()["max_bytes"][0] == later[1]["total"]
    assert again.depth() == outbox.depth()
    store.close()


def test_age_bound_by_enqueue_clock_not_before_2020(tmp_path: Path) -> None:
    clock = Clock(AGE_FLOOR - 1000)  # a gateway booted without RTC
    store = Store(tmp_path / "db")
    drops: list[tuple[int, int, str]] = []
    outbox = Outbox(
        store, max_bytes=1 << 20, max_age=3600, on_drop=lambda *a: drops.append(a), clock=clock
    )
    untrusted = outbox.add([reading("a", 0)])
    clock.now = NOW
    old = outbox.add([reading("a", 1)])
    clock.now = NOW + 3000
    fresh = outbox.add([reading("a", 2)])
    clock.now = NOW + 3700
    outbox.add([reading("a", 3)])
    ids = {r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)}
    assert set(untrusted) <= ids and set(fresh) <= ids and not set(old) & ids
    assert drops == [(1, outbox.drops()["max_age"][1], "max_age")]
    store.close()
    clock.now = NOW + 10_000  # expired while the agent was down: dropped at open
    store = Store(tmp_path / "db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600, clock=clock)
    assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == untrusted
    assert outbox.depth(TELEMETRY) == (1, outbox.next_batch(TELEMETRY, 1, 1 << 20)[0].size)
    store.close()


def test_a_rolled_back_expiry_is_done_again_at_once(store: Store) -> None:
    clock = Clock()
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600, clock=clock)
    old = outbox.add([reading("a", 0)])
    clock.now += 3700
    with pytest.raises(RuntimeError), store.transaction() as db:
        outbox.add([reading("a", 1)])  # expires the old reading, in a transaction ...
        assert db.execute("SELECT COUNT(*) FROM outbox WHERE seq = ?",
                          (int(old[0].split("-")[1]),)).fetchone() == (0,)
        raise RuntimeError("... that fails")
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 1 << 20)] == old  # rolled back
    clock.now += 1  # well within the expiry interval
    new = outbox.add([reading("a", 2)])
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 1 << 20)] == new
    assert outbox.drops() == {"max_age": (1, len(reading("a", 0)[2]) + 1)}


def test_a_rolled_back_drop_report_is_made_again_at_once(store: Store) -> None:
    clock = Clock()
    size = len(reading("a", 0, pad=70)[2]) + 1
    outbox = Outbox(store, max_bytes=3 * size, max_age=86400, clock=clock)
    outbox.add([reading("a", i, pad=70) for i in range(3)])
    with pytest.raises(RuntimeError), store.transaction() as db:
        outbox.add([reading("a", i, pad=70) for i in range(3, 6)])  # drops 3, reports them
        assert db.execute("SELECT topic FROM outbox WHERE stream = 'events'").fetchall() == [
            ("outbox-drop",)
        ]
        raise RuntimeError("and fails")
    assert outbox.next_batch(EVENTS, 10, 1 << 20) == [] and outbox.drops() == {}
    clock.now += 1  # well within the report interval
    outbox.add([reading("a", i, pad=70) for i in range(6, 9)])
    (event,) = outbox.next_batch(EVENTS, 10, 1 << 20)
    assert json.loads(event.data)["count"] == 3


def test_full_disk_refuses_new_readings_and_keeps_old(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 30, max_age=3600, journal_bytes=0)  # all in the table
    kept = outbox.add([reading("a", i) for i in range(10)])
    with store.transaction() as db:  # on the writer's connection
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(StoreFull):
        outbox.add([reading("a", i, pad=3000) for i in range(20)])
    assert outbox.depth() == (10, sum(r.size for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)))
    assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == kept
    outbox.ack(kept[:5])  # delivering still works, and frees room
    assert outbox.depth()[0] == 5


def boom() -> None:
    raise ZeroDivisionError


def test_listeners_hear_commits_only(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    heard: list[int] = []
    remove = outbox.add_listener(lambda: heard.append(outbox.depth()[0]))
    outbox.add_listener(boom)  # a failing listener does not make the add fail
    outbox.add([reading("a", 0)])
    with pytest.raises(OutboxError):
        outbox.add([reading("a/#", 0)])
    outbox.ack(outbox.next_batch(TELEMETRY, 1, 1000)[0].id.split())
    assert heard == [1]
    remove()
    outbox.add([reading("a", 1)])
    assert heard == [1]


async def test_add_async_commits_off_loop_and_notifies_on_loop(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    woke = asyncio.Event()
    threads: list[str] = []

    def listener() -> None:
        threads.append(threading.current_thread().name)
        woke.set()

    outbox.add_listener(listener)
    ids = await outbox.add_async([reading("a", 0), reading("a", 1)])
    await asyncio.wait_for(woke.wait(), 5)
    assert threads == [threading.current_thread().name]
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 1000)] == ids


def test_events_emit_to_outbox_and_listeners(store: Store) -> None:
    outbox = Outbox(store, max_bytes=1 << 20, max_age=3600)
    events = Events(outbox, clock=Clock())
    heard: list[tuple[str, dict[str, object]]] = []
    remove = events.add_listener(lambda kind, payload: heard.append((kind, payload)))
    events.add_listener(lambda kind, payload: boom())
    events.emit("sim-swapped", old="1", new="2")  # no loop here: committed before it returns
    (stored,) = outbox.next_batch(EVENTS, 10, 1000)
    assert stored.topic == "sim-swapped"
    payload = {"kind": "sim-swapped", "ts": NOW, "old": "1", "new": "2"}
    assert json.loads(stored.data) == payload
    assert heard == [("sim-swapped", payload)]
    remove()
    events.emit("x")
    assert len(heard) == 1
    with pytest.raises(OutboxError):
        events.emit("bad kind")
