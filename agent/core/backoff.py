"""Exponential backoff with full jitter, shared by every retry loop of the agent."""

from __future__ import annotations

import math
import random
from collections.abc import Callable


class Backoff:
    """Exponential backoff with full jitter: attempt n waits
    uniform(min_delay, min(cap, base * 2**n, limit)).

    The same policy as tenacity's ``wait_random_exponential``; kept as a small object because
    the uplink resets it only after a connection proved stable, which a retry decorator cannot
    express. Full jitter spreads a fleet's reconnects after a broker restart. ``min_delay``
    (default 0) is a floor no delay goes below; ``limit`` lowers the ceiling of one call
    (:class:`agent.sim.rejects.Backoff` shrinks it as a deadline nears), never below the floor.
    """

    def __init__(self, base: float, cap: float, rng: Callable[[], float] = random.random, *,
                 min_delay: float = 0.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        if not 0 <= min_delay <= cap:
            raise ValueError("backoff needs 0 <= min_delay <= cap")
        self.base = base
        self.cap = cap
        self.min_delay = min_delay
        self._rng = rng
        self.attempts = 0

    def next_delay(self, limit: float = math.inf) -> float:
        """Seconds to wait before the next attempt; counts the attempt."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempts, 60), limit)
        self.attempts += 1
        return self.min_delay + (max(self.min_delay, ceiling) - self.min_delay) * self._rng()

    def reset(self) -> None:
        """An attempt succeeded: start again from ``base``."""
        self.attempts = 0
