"""Every long-running part runs under one supervisor: a failure is logged, the part restarted
with backoff, and the failure visible (restarts, last error); a stop is a stop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agent.commands.inbox import CommandInbox
from agent.core.store import StoreError
from agent.core.tasks import Supervisor
from agent.telemetry.mqtt import MqttUplink
from agent.telemetry.outbox import Outbox
from tests.broker import Broker, Subscriber, fill, open_outbox, until, uplink_settings


async def test_a_failing_part_is_restarted_and_its_failure_shown() -> None:
    runs: list[int] = []
    changes: list[int] = []
    healthy = asyncio.Event()

    async def work() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise StoreError(f"store failed while reading: attempt {len(runs)}")
        healthy.set()
        await asyncio.Event().wait()

    sup = Supervisor(0.01, 0.05, on_change=lambda: changes.append(1))
    sup.spawn("drain", work)
    await asyncio.wait_for(healthy.wait(), 30)
    status = sup.status()["drain"]
    assert status["running"] and status["restarts"] == 2
    assert status["last_error"] == "StoreError: store failed while reading: attempt 2"
    assert len(changes) == 2
    await sup.stop()
    assert sup.status() == {}


async def test_a_part_that_returns_is_started_again() -> None:
    runs = 0
    again = asyncio.Event()

    async def work() -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            again.set()

    sup = Supervisor(0.01, 0.05)
    sup.spawn("ends", work)
    await asyncio.wait_for(again.wait(), 30)
    assert "ended unexpectedly" in (sup.status()["ends"]["last_error"] or "")
    await sup.stop()


async def test_stop_is_final_even_while_a_part_waits_to_restart() -> None:
    failed = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        failed.set()
        raise RuntimeError("boom")

    sup = Supervisor(30.0, 60.0)  # the restart would come long after the stop
    sup.spawn("p", work)
    await asyncio.wait_for(failed.wait(), 30)
    await sup.stop()
    assert runs == 1
    assert "p" not in sup


class _FailingOnce:
    """An outbox whose first fetch fails the way a broken database does."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._outbox, name)

    async def fetch(self, *args: Any) -> Any:
        if self.failures == 0:
            self.failures += 1
            raise StoreError("store failed while reading: disk I/O error")
        return await self._outbox.fetch(*args)


async def test_the_drain_survives_a_store_error(tmp_path: Path, broker: Broker) -> None:
    """Before: one StoreError from the fetch ended the drainer for good, silently, while the
    uplink still reported ready and readings piled up."""
    outbox = open_outbox(tmp_path)
    failing = _FailingOnce(outbox)
    sub = Subscriber(broker.port, "simkeeper/gw-test/telemetry")
    sup = Supervisor(0.01, 0.05)
    uplink = MqttUplink(uplink_settings(broker.port), "gw-test", failing)  # type: ignore[arg-type]
    try:
        await uplink.start(sup.spawn)
        ids = fill(outbox, 5)
        await until(lambda: len(sub.readings()) >= 5, "the readings after the failed fetch")
        assert [r["id"] for r in sub.readings()] == ids
        assert failing.failures == 1
        drain = sup.status()["mqtt drain"]
        assert drain["restarts"] == 1 and "disk I/O error" in drain["last_error"]
    finally:
        await sup.stop()
        await uplink.stop()
        sub.close()


class _Processor:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle(self, payload: bytes, **_: Any) -> dict[str, Any]:
        command = json.loads(payload)
        if command["name"] == "slow":
            await self.release.wait()
        if command["name"] == "bug":
            raise KeyError("a bug in a handler")
        return {"id": command["id"], "status": "ok", "detail": command["name"]}


async def test_command_failures_are_answered_and_slow_ones_do_not_block() -> None:
    """Before: command tasks were fire-and-forget; an exception reached only the loop's
    exception handler and the operator got no result."""
    processor = _Processor()
    results: list[dict[str, Any]] = []
    inbox = CommandInbox(processor, results.append)  # type: ignore[arg-type]
    sup = Supervisor(0.01, 0.05)
    sup.spawn("commands", inbox.run)
    try:
        for cid, name in (("1", "slow"), ("2", "bug"), ("3", "get-state")):
            inbox.put(json.dumps({"id": cid, "name": name}).encode())
        await until(lambda: len(results) == 2, "the two quick answers")
        assert results[0]["status"] == "failed" and "a bug in a handler" in results[0]["detail"]
        assert results[1] == {"id": "3", "status": "ok", "detail": "get-state"}
        processor.release.set()
        await until(lambda: len(results) == 3, "the slow answer")
        assert results[2]["id"] == "1"
        assert sup.status()["commands"]["restarts"] == 0
    finally:
        await sup.stop()


async def test_a_command_flood_is_refused_beyond_the_limit() -> None:
    limit = 2
    processor = _Processor()
    results: list[dict[str, Any]] = []
    inbox = CommandInbox(processor, results.append, limit=limit)  # type: ignore[arg-type]
    for cid in range(limit + 3):
        inbox.put(json.dumps({"id": str(cid), "name": "get-state"}).encode())
    sup = Supervisor(0.01, 0.05)
    sup.spawn("commands", inbox.run)
    try:
        await until(lambda: len(results) == limit, "the commands within the limit")
        inbox.put(json.dumps({"id": "marker", "name": "get-state"}).encode())
        await until(lambda: results[-1]["id"] == "marker", "a later command, so the flood ran")
        assert [r["id"] for r in results] == ["0", "1", "marker"]
    finally:
        await sup.stop()


async def test_stop_waits_for_a_part_cancelled_before() -> None:
    started, ended = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # its own clean-up takes a turn of the loop
            ended.set()

    sup = Supervisor(0.01, 0.05)
    sup.spawn("sms commands", work)
    await asyncio.wait_for(started.wait(), 30)
    sup.cancel("sms commands")  # the modem went away
    await sup.stop()
    assert ended.is_set()


async def test_a_part_waiting_to_restart_is_not_shown_running() -> None:
    failed = asyncio.Event()

    async def work() -> None:
        failed.set()
        raise RuntimeError("boom")

    sup = Supervisor(30.0, 60.0)
    sup.spawn("p", work)
    await asyncio.wait_for(failed.wait(), 30)
    await until(lambda: sup.status()["p"]["restarts"] == 1, "the failure noted")
    assert sup.status()["p"]["running"] is False
    await sup.stop()
