"""Activation-deadline alarms: one ``deadline-alarm`` event per threshold (7 days, 1 day, 1 hour
before the deadline by default), and one when the deadline passed with the SIM never activated.

Each alarm is sent once per deadline: what was sent is noted with the SIM's notes
(:mod:`agent.sim.notes`) in the same transaction as the event (both commit or neither: a failed
write leaves the alarm due, and the next check sends it), and a new deadline starts afresh. An alarm
fires only when the deadline is *certainly* that close: the time left is measured from the
trusted lower bound of time (:class:`agent.core.trusted_time.TrustedNow`), so a gateway
booted in 1970 does not cry wolf; it still activates at once
(:meth:`TrustedClock.time_left`). When several thresholds are crossed at once (the deadline
became known late), only the tightest is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from agent.core.trusted_time import TrustedNow
from agent.sim.lifecycle import SimRecord
from agent.sim.notes import KeeperStore

log = logging.getLogger(__name__)

PASSED = "passed"
KIND = "deadline-alarm"


def crossed(thresholds: Sequence[float], remaining: float,
            sent: Sequence[float | str]) -> list[float]:
    """Thresholds (seconds before the deadline) reached with ``remaining`` seconds left and not
    yet alarmed, widest first."""
    return [t for t in sorted(thresholds, reverse=True) if remaining <= t and t not in sent]


class DeadlineAlarms:
    def __init__(self, notes: KeeperStore, emit: Callable[..., Any],
                 thresholds: Sequence[float] = (7 * 86400.0, 86400.0, 3600.0)) -> None:
        self._notes = notes
        self._emit = emit
        self.thresholds = tuple(thresholds)

    def check(self, record: SimRecord, now: TrustedNow) -> float | str | None:
        """Send what is due for ``record``; the alarm sent (a threshold or ``"passed"``), if any."""
        deadline = record.deadline
        if deadline is None or record.activated_at is not None:
            return None
        notes = self._notes.notes(record.iccid)
        if notes.alarm_deadline != deadline:
            notes.alarm_deadline, notes.alarms = deadline, []
        if record.state == "expired":
            due: list[float | str] = [] if PASSED in notes.alarms else [PASSED]
        elif record.state in ("awaiting-activation", "activating"):
            remaining = deadline - now.lower_bound
            if remaining <= 0:
                return None  # passed: the lifecycle expires the SIM, then "passed" is sent
            due = list(crossed(self.thresholds, remaining, notes.alarms))
        else:
            return None
        if not due:
            return None
        alarm = due[-1]
        notes.alarms.extend(due)
        fields: dict[str, Any] = {
            "iccid": record.iccid, "deadline": deadline, "threshold": alarm,
            "time_left": None if now.ts is None else deadline - now.ts,
            "trusted_time": now.ts is not None,
        }
        if alarm == PASSED:
            fields["message"] = "activation deadline passed before activation: SIM expired"
        else:
            fields["message"] = f"activation deadline within {_span(float(alarm))}, not activated"
        if now.ts is not None:
            fields["ts"] = now.ts
        log.warning("SIM %s: %s", record.iccid, fields["message"])
        self._notes.save_notes(record.iccid, notes, also=lambda: self._emit(KIND, **fields))
        return alarm


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} s"
