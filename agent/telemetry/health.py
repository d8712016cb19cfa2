"""The agent's own health, as readings: they go through the outbox like any app's.

One reading on topic ``agent/health`` (low priority: the first dropped when the outbox is full,
held back by a plan's throttle) at start, whenever a modem session comes (back) up, and every
``interval`` seconds::

    {"modems": [{"port", "state", "registration": {...}, "operator": {...}, "signal": {...},
                 "temperature_c": float}],
     "outbox": {"count", "bytes"}, "drops": {"<reason>": <count>, ...}}

``registration``, ``operator`` and ``signal`` are those of ``simkeeper modem info --json``
(``registration`` carries the cell: ``act``, ``lac``, ``tac``, ``cell_id``); they are null
before the first poll. ``temperature_c`` is the module's hottest sensor in °C as of the last
poll, present only where the modem reports it (Quectel ``+QTEMP``, SIMCom ``+CPMUTEMP``,
Telit ``#TEMPMEAS``; see ``drivers/vendors.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.core.tasks import wait_event
from agent.telemetry.outbox import TELEMETRY, Outbox, compact_json

TOPIC = "agent/health"
PRIORITY = -10


class HealthReporter:
    def __init__(
        self,
        outbox: Outbox,
        modems: Callable[[], Iterable[dict[str, Any]]],
        *,
        interval: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._modems = modems
        self.interval = interval
        self._clock = clock
        self._kick = asyncio.Event()

    def reading(self) -> dict[str, Any]:
        count, size = self._outbox.depth()
        return {
            "modems": [_modem(m) for m in self._modems()],
            "outbox": {"count": count, "bytes": size},
            "drops": {reason: n for reason, (n, _) in self._outbox.drops().items()},
        }

    def kick(self) -> None:
        """Report soon (a modem came up)."""
        self._kick.set()

    async def report(self) -> str:
        """Commit one health reading; its id."""
        item = (TELEMETRY, TOPIC, compact_json(self.reading()), self._clock(), PRIORITY)
        (reading_id,) = await self._outbox.add_async([item])
        return reading_id

    async def run(self) -> None:
        while True:
            self._kick.clear()
            await self.report()
            await wait_event(self._kick, self.interval)


def _modem(summary: dict[str, Any]) -> dict[str, Any]:
    """One modem of the reading, from its session's summary (``status``'s ``modems`` entry)."""
    info = summary["modem"] or {}
    modem: dict[str, Any] = {
        "port": summary["port"],
        "state": summary["state"],
        "registration": info.get("registration"),
        "operator": info.get("operator"),
        "signal": info.get("signal"),
    }
    if summary["temperature_c"] is not None:
        modem["temperature_c"] = summary["temperature_c"]
    return modem
