"""What the agent shows of itself: the runtime row (``simkeeper status``, :mod:`agent.core.runtime`)
and the retained ``state`` message.

Both are written when something they show changes (modem state, SIM, registration, uplink
connected or not, a task restarted), compared once a second in memory; the row's heartbeat at
most once per ``heartbeat`` seconds, to spare the SD card. Signal, counters and times do not
count as a change, with one exception: the count of readings sent reaches the row on its own
once it held still between two looks (a burst is written whole), at most once per
``counts_every`` seconds; changes within that time ride the next write.

The retained ``state`` also carries what ``fleet watch`` must read from a fresh subscription:
``usage``, the current SIM's last ``usage`` report (reports are not retained; a new one
publishes the state again), and ``decommissioned``, ``{"at", "iccid"}`` from the moment a
decommission begins: the SIM it returns shows ``terminated`` at once, since that state would
otherwise only be reached once the uplink is down (:meth:`StateReporter.publish_now` is the
decommission's last word before the uplink stops).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.core import runtime
from agent.core.backoff import Backoff
from agent.core.store import Store, StoreError
from agent.core.tasks import wait_event

log = logging.getLogger(__name__)

_TICK = 1.0  # how often the in-memory view is compared with what was last written
COUNTS_EVERY = 60.0  # the readings sent alone write the row at most this often


@dataclass(frozen=True, slots=True)
class Snapshot:
    modems: list[dict[str, Any]]
    uplink: dict[str, Any]
    sims: list[dict[str, Any]]
    tasks: dict[str, Any]
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # iccid: last report sent
    decommissioned: dict[str, Any] | None = None  # the decommission marker, once one began


class StateReporter:
    def __init__(
        self,
        store: Store,
        device_id: str,
        changed: asyncio.Event,
        *,
        snapshot: Callable[[], Snapshot],
        usage: Callable[[], list[dict[str, Any]]],
        publish: Callable[[dict[str, Any]], asyncio.Future[None] | None],
        heartbeat: float = runtime.HEARTBEAT,
        counts_every: float = COUNTS_EVERY,
    ) -> None:
        self._store = store
        self._device_id = device_id
        self._snapshot = snapshot
        self._usage = usage
        self._publish = publish
        self.heartbeat = heartbeat
        self._counts_every = counts_every
        self.started_at = time.time()
        self._changed = changed  # set by whoever changes something shown
        self._refused = False  # the last write was refused

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        shown: Any = None  # in the row
        published: Any = None  # in the retained state
        written, counted_at, retry_at = -self.heartbeat, -self._counts_every, -math.inf
        counted = seen = -1  # readings sent: in the row; at the previous look
        retry = Backoff(1.0, 60.0)  # a row the store refused (a full disk) waits this long
        while True:
            self._changed.clear()
            snap = self._snapshot()
            key = _what_shows(snap)
            sent: int = snap.uplink["readings_sent"]
            now = loop.time()
            if key != published:
                self._publish(self.state(snap))
                published = key
            count_due = sent == seen != counted and now - counted_at >= self._counts_every
            due = key != shown or now - written >= self.heartbeat or count_due
            if due and now >= retry_at:
                if await self._write(snap, None):
                    retry.reset()
                    if count_due:
                        counted_at = now
                    shown, written, counted = key, now, sent
                else:
                    retry_at = now + retry.next_delay()
            seen = sent
            await wait_event(self._changed, _TICK)

    async def final(self) -> None:
        """The last write: the row says the agent stopped."""
        await self._write(self._snapshot(), time.time())

    async def publish_now(self, timeout: float = 5.0) -> bool:
        """Publish the retained ``state`` as it is now and wait, at most ``timeout`` seconds,
        for its PUBACK; whether it came (not while the uplink is down)."""
        sent = self._publish(self.state())
        if sent is None:
            return False
        await asyncio.wait([sent], timeout=timeout)
        return sent.done() and not sent.cancelled() and sent.exception() is None

    def state(self, snap: Snapshot | None = None) -> dict[str, Any]:
        """The retained ``state``: the SIM in the slot (lifecycle, suspension, conformance,
        usage), every SIM the keeper knows, the modems, and the decommission (module doc)."""
        snap = snap or self._snapshot()
        gone = _decommission(snap.decommissioned)
        sims = snap.sims if gone is None else [
            {**s, "state": "terminated"} if s["iccid"] == gone["iccid"] else s
            for s in snap.sims]
        sim = next((s for s in sims if s["current"]), None)
        return {
            "device_id": self._device_id,
            "ts": time.time(),
            "started_at": self.started_at,
            "lifecycle": sim["state"] if sim else None,
            "suspension": sim["suspension"] if sim else None,
            "conformance": sim["conformance"] if sim else None,
            "sim": sim,
            "sims": sims,
            "modems": snap.modems,
            "usage": snap.usage.get(sim["iccid"]) if sim else None,
            "decommissioned": gone,
        }

    async def _write(self, snap: Snapshot, stopped_at: float | None) -> bool:
        """Write the row; whether it was. A refusal (a full disk) is logged once, until a
        write goes through again: the agent goes on without its row."""
        row = runtime.Row(
            pid=os.getpid(), started_at=self.started_at, heartbeat=time.time(),
            stopped_at=stopped_at, modems=snap.modems, uplink=snap.uplink, usage=self._usage(),
            sims=snap.sims, tasks=snap.tasks,
        )

        def write() -> None:
            with self._store.transaction() as db:
                runtime.write(db, row)

        try:
            await self._store.run(write)
        except StoreError as exc:
            if not self._refused:
                log.warning("runtime row not written (retried with backoff): %s", exc)
            self._refused = True
            return False
        if self._refused:
            log.info("runtime row written again")
        self._refused = False
        return True


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
    shown = json.dumps([snap.usage, _decommission(snap.decommissioned)], sort_keys=True)
    return modems, snap.uplink["state"], json.dumps(sims, sort_keys=True), tasks, shown


def _decommission(marker: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``state`` says of a decommission marker (agent.sim.decommission)."""
    return None if marker is None else {"at": marker.get("at"), "iccid": marker.get("iccid")}
