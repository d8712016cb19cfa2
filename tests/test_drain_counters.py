"""The uplink's counters reach the runtime row that ``simkeeper status`` reads: soon after
readings are delivered, not at the next heartbeat, and on their own at most once a heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from agent.cli.status import read_status
from agent.core.config import parse
from agent.core.store import Store
from agent.core.tasks import Supervisor
from agent.telemetry.outbox import Outbox
from agent.telemetry.state import Snapshot, StateReporter
from agent.telemetry.uplinks import Uplinks
from tests.broker import Broker, fill, until

DEVICE = "gw-test"


async def test_readings_sent_reach_the_runtime_row_without_the_heartbeat(
    broker: Broker, tmp_path: Path
) -> None:
    database = tmp_path / "simkeeper.db"
    # One batch carries each fill below: the count goes from one total to the next in one step.
    cfg = parse(
        f'device_id = "{DEVICE}"\n[uplink]\nport = {broker.port}\nbatch_max_count = 1000\n'
        "batch_max_bytes = 1048576\nbatch_max_latency = 0.05\nreconnect_min = 0.1\n"
        "rate_messages_per_minute = 100000\nrate_bytes_per_minute = 1073741824\n"
        f'[store]\npath = "{database}"\n'
    )
    store = Store(database)
    outbox = Outbox(store, max_bytes=1 << 24, max_age=86400.0)
    uplinks = Uplinks(cfg, outbox, Supervisor(), on_command=lambda _: None, allow=lambda _: True)
    looks = 0

    def snapshot() -> Snapshot:
        nonlocal looks
        looks += 1
        return Snapshot(modems=[], uplink=uplinks.state(), sims=[], tasks={})

    # A heartbeat far beyond the test: whatever the row shows was written for a change; and
    # counters alone write it once in the test at most.
    reporter = StateReporter(store, DEVICE, asyncio.Event(), snapshot=snapshot, usage=list,
                             publish=lambda _: None, heartbeat=3600.0, counts_every=3600.0)

    def row() -> dict[str, Any]:
        uplink: dict[str, Any] | None = read_status(database, DEVICE)["uplink"]
        return uplink or {}  # none before the first write

    await uplinks.start()
    reporting = asyncio.create_task(reporter.run())
    try:
        await until(lambda: row().get("state") == "connected", "the row to show the connection")
        fill(outbox, 400)
        await until(lambda: row()["readings_sent"] == 400, "the count in the row")
        assert row()["batches_sent"] == 1
        # Counters alone wrote the row just now: a new count waits for the next write.
        fill(outbox, 100)
        await until(lambda: uplinks.stats.readings == 500, "the next 100 delivered")
        # The second look finds it settled and may write; the third begins after that write.
        after = looks
        await until(lambda: looks >= after + 3, "three looks at the new count")
        assert row()["readings_sent"] == 400
        await uplinks.stop()  # the uplink's state changes: that write carries the count
        await until(lambda: row().get("state") == "stopped", "the row to show the stop")
        assert row()["readings_sent"] == 500
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        await uplinks.stop()
        store.close()
