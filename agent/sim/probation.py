"""A way back for a gateway whose radio the keeper holds off: rare listening windows.

Only evidence that the terminal misbehaves on the air holds the radio off for long: an
operator's radio suspension (the stop-emission order) or the conformance policy ``enforce``
refusing the terminal. Modem hangs and resets never do (they are recovered, counted and
reported). But with the radio off no order can arrive, by MQTT or SMS, and a gateway nobody
visits would be lost for good. So a held gateway still listens: every ``[lifecycle]
probation_interval`` seconds (+-10 % jitter, so that a fleet does not come back at once) its
radio is on for ``probation_window`` seconds, long enough for the broker to deliver a queued
order (or for an SMS to come in), then off again until the next window.

:class:`Probation` only keeps the schedule (monotonic clock); :class:`agent.sim.slot.SimSlot`
asks it every round whether the window is open and enforces the radio accordingly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Probation:
    def __init__(self, interval: float, window: float, *,
                 mono: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        if interval <= 0 or window <= 0:
            raise ValueError("probation interval and window must be > 0")
        self.interval = interval
        self.window = window
        self._mono = mono
        self._rng = rng or random.Random()
        self.opens_at: float | None = None  # monotonic; None while the radio is not held

    def _next(self, after: float) -> float:
        return after + self.interval * self._rng.uniform(0.9, 1.1)

    def update(self, held: bool) -> bool:
        """Whether the listening window is open now. ``held``: the radio is held off for a
        reason that keeps a way back; when it is not, the schedule starts over."""
        if not held:
            self.opens_at = None
            return False
        now = self._mono()
        if self.opens_at is None or now >= self.opens_at + self.window:
            self.opens_at = self._next(now)
        return now >= self.opens_at

    @property
    def listening(self) -> bool:
        return self.opens_at is not None and self.opens_at <= self._mono() < (
            self.opens_at + self.window)

    def until_change(self) -> float | None:
        """Seconds until the window opens or closes; None while the radio is not held."""
        if self.opens_at is None:
            return None
        now = self._mono()
        edge = self.opens_at if now < self.opens_at else self.opens_at + self.window
        return max(0.0, edge - now)

    def times(self, wall: Callable[[], float] = time.time) -> tuple[float | None, float | None]:
        """(next opening, end of the open window) as Unix seconds, for the summary."""
        if self.opens_at is None:
            return None, None
        offset = wall() - self._mono()
        if self.listening:
            return None, self.opens_at + self.window + offset
        return self.opens_at + offset, None
