"""What the agent shows of itself: the runtime row (``simkeeper status``, :mod:`agent.core.runtime`)
and the retained ``state`` message.

Both are written when something they show changes (modem state, SIM, registration, uplink
connected or not, a task restarted), compared once a second in memory; the row's heartbeat at
most once per ``heartbeat`` seconds, to spare the SD card. Signal, counters and times do not
count as a change.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core import runtime
from agent.core.store import Store
from agent.core.tasks import wait_event

_TICK = 1.0  # how often the in-memory view is compared with what was last written


@dataclass(frozen=True, slots=True)
class Snapshot:
    modems: list[dict[str, Any]]
    uplink: dict[str, Any]
    sims: list[dict[str, Any]]
    tasks: dict[str, Any]


class StateReporter:
    def __init__(
        self,
        store: Store,
        device_id: str,
        changed: asyncio.Event,
        *,
        snapshot: Callable[[], Snapshot],
        usage: Callable[[], list[dict[str, Any]]],
        publish: Callable[[dict[str, Any]], None],
        heartbeat: float = runtime.HEARTBEAT,
    ) -> None:
        self._store = store
        self._device_id = device_id
        self._snapshot = snapshot
        self._usage = usage
        self._publish = publish
        self.heartbeat = heartbeat
        self.started_at = time.time()
        self._changed = changed  # set by whoever changes something shown

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        shown: Any = None
        written = -self.heartbeat
        while True:
            self._changed.clear()
            snap = self._snapshot()
            key = _what_shows(snap)
            if key != shown or loop.time() - written >= self.heartbeat:
                await self._write(snap, None)
                if key != shown:
                    self._publish(self.state(snap))
                shown, written = key, loop.time()
            await wait_event(self._changed, _TICK)

    async def final(self) -> None:
        """The last write: the row says the agent stopped."""
        await self._write(self._snapshot(), time.time())

    def state(self, snap: Snapshot | None = None) -> dict[str, Any]:
        """The retained ``state``: the SIM in the slot (lifecycle, suspension, conformance),
        every SIM the keeper knows, and the modems."""
        snap = snap or self._snapshot()
        sim = next((s for s in snap.sims if s["current"]), None)
        return {
            "device_id": self._device_id,
            "ts": time.time(),
            "started_at": self.started_at,
            "lifecycle": sim["state"] if sim else None,
            "suspension": sim["suspension"] if sim else None,
            "conformance": sim["conformance"] if sim else None,
            "sim": sim,
            "sims": snap.sims,
            "modems": snap.modems,
        }

    async def _write(self, snap: Snapshot, stopped_at: float | None) -> None:
        row = runtime.Row(
            pid=os.getpid(), started_at=self.started_at, heartbeat=time.time(),
            stopped_at=stopped_at, modems=snap.modems, uplink=snap.uplink, usage=self._usage(),
            sims=snap.sims, tasks=snap.tasks,
        )

        def write() -> None:
            with self._store.transaction() as db:
                runtime.write(db, row)

        await self._store.run(write)


def _what_shows(snap: Snapshot) -> Any:
    """The part of a snapshot whose change is worth a write: not signal, counters or times."""
    modems = [
        (m["port"], m["state"], m["reopens"], m["resets"],
         json.dumps({k: v for k, v in (m["modem"] or {}).items() if k != "signal"},
                    sort_keys=True))
        for m in snap.modems
    ]
    sims = [{k: v for k, v in sim.items() if k not in ("time_left", "trusted_time")}
            for sim in snap.sims]
    tasks = {name: (t["running"], t["restarts"]) for name, t in snap.tasks.items()}
    return modems, snap.uplink["state"], json.dumps(sims, sort_keys=True), tasks
