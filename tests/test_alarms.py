"""Deadline alarms are never lost: the note that an alarm was sent and the alarm's event commit
in one transaction, so a write that fails between them leaves the alarm due."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.core.store import Store, StoreFull
from agent.core.trusted_time import TrustedNow
from agent.sim.alarms import DeadlineAlarms
from agent.sim.lifecycle import SimRecord
from agent.sim.notes import KeeperStore
from agent.telemetry.events import Events
from agent.telemetry.outbox import EVENTS, Item, Outbox

ICCID = "8981100005819510018"
T0 = 1_750_000_000.0
log = logging.getLogger(__name__)


class FlakyOutbox(Outbox):
    """The outbox, its insert failing (a full disk) while ``failing`` is set."""

    failing = False

    def add(self, items: Sequence[Item]) -> list[str]:
        if self.failing:
            raise StoreFull("store full while writing: database or disk is full")
        return super().add(items)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


def keeper_emit(events: Events) -> Any:
    """Like the SIM keeper's own emit: a failure is logged and swallowed."""

    def emit(kind: str, /, **fields: Any) -> None:
        try:
            events.emit(kind, **fields)
        except Exception:
            log.exception("event %s not emitted", kind)

    return emit


def sent(outbox: Outbox) -> list[Any]:
    rows = outbox.next_batch(EVENTS, 100, 1 << 20)
    return [json.loads(r.data)["threshold"] for r in rows if r.topic == "deadline-alarm"]


@pytest.mark.parametrize("on_loop", [False, True], ids=["blocking", "queued from the loop"])
async def test_an_alarm_whose_event_fails_is_not_marked_sent(store: Store, on_loop: bool) -> None:
    outbox = FlakyOutbox(store, max_bytes=1 << 20, max_age=1e9)
    notes = KeeperStore(store)
    alarms = DeadlineAlarms(notes, keeper_emit(Events(outbox)))
    record = SimRecord(ICCID, deadline=T0 + 1800)
    now = TrustedNow(T0, "ntp", T0)

    async def check() -> None:
        if on_loop:  # queued; a failure is logged by the store
            alarms.check(record, now)
            await store.run(lambda: None)  # the queued write has run
        elif outbox.failing:  # on the store's thread: the failure is raised
            with pytest.raises(StoreFull, match="rolled back"):
                await store.run(alarms.check, record, now)
        else:
            await store.run(alarms.check, record, now)

    outbox.failing = True
    await check()
    assert sent(outbox) == []
    assert notes.notes(ICCID).alarms == []  # not marked sent: it is still due
    outbox.failing = False
    await check()
    assert sent(outbox) == [3600.0]
    assert notes.notes(ICCID).alarms == [7 * 86400.0, 86400.0, 3600.0]
    await check()
    assert sent(outbox) == [3600.0]  # once


def test_a_write_that_fails_inside_a_transaction_fails_the_transaction(store: Store) -> None:
    """Even when the failure was caught inside: half of a write is never committed."""
    notes = KeeperStore(store)

    def caught_failure() -> None:
        try:
            with store.transaction():
                raise StoreFull("store full while writing: database or disk is full")
        except StoreFull:
            pass

    with pytest.raises(StoreFull, match="rolled back"):
        notes.put("x", 1, also=caught_failure)
    assert notes.get("x") is None
