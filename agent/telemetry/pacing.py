"""Pacing of the uplink: token buckets for messages and bytes per minute.

A backlog that drains after an outage must not flood Flux or the carrier: every batch waits
for its tokens. Waiting is one ``asyncio.sleep`` for exactly the missing tokens, never a poll.
While the message rate holds messages back, :meth:`RateLimiter.room` says how many bytes the
next one may carry by the time it goes: the drainer fills batches to it, so a backlog drains at
the byte budget rather than at the message rate times a batch's count.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``.

    ``take(n)`` may drive the level below zero (a message larger than the bucket still goes,
    and the debt is paid before the next one), so the long-run rate holds for any sizes.
    """

    def __init__(self, rate: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self, n: float) -> float:
        """Seconds until ``n`` tokens (at most a full bucket) are available; 0 if now."""
        self._refill()
        missing = min(n, self.capacity) - self._level
        # Below a millionth of a token is float rounding, not a reason to sleep again.
        return missing / self.rate if missing > 1e-6 else 0.0

    def take(self, n: float) -> None:
        self._refill()
        self._level -= n

    def level_in(self, seconds: float) -> float:
        """The tokens there will be in ``seconds`` if none are taken meanwhile."""
        self._refill()
        return min(self.capacity, self._level + seconds * self.rate)


class RateLimiter:
    """Messages per minute and bytes per minute; ``None`` or 0 means unlimited.

    The bursts: one second's worth of messages (at least one) and as many bytes (at least
    ``min_burst_bytes``, the largest message the caller sends, so a full batch never waits
    longer than its own bytes take to earn).
    """

    def __init__(
        self,
        messages_per_minute: float | None,
        bytes_per_minute: float | None,
        *,
        min_burst_bytes: int = 1,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._sleep = sleep
        self._messages = (
            TokenBucket(messages_per_minute / 60, max(1.0, messages_per_minute / 60), clock)
            if messages_per_minute
            else None
        )
        self._bytes = (
            TokenBucket(
                bytes_per_minute / 60, max(float(min_burst_bytes), bytes_per_minute / 60), clock
            )
            if bytes_per_minute
            else None
        )

    def _delay(self, size: int) -> float:
        return max(
            self._messages.delay(1) if self._messages else 0.0,
            self._bytes.delay(size) if self._bytes else 0.0,
        )

    def room(self) -> float | None:
        """None when a message may go now. Else the message rate holds the next message back,
        and this is how many bytes it may carry without waiting longer than that: what the byte
        budget will hold when it goes (unbounded without a byte limit)."""
        if self._messages is None or (wait := self._messages.delay(1)) <= 0:
            return None
        return self._bytes.level_in(wait) if self._bytes else math.inf

    async def acquire(self, size: int) -> None:
        """Wait until one message of ``size`` bytes may go, then charge it."""
        while (wait := self._delay(size)) > 0:
            await self._sleep(wait)
        self.charge(size)

    def charge(self, size: int) -> None:
        """Count a message that must go now (state, status, command results) without waiting;
        later batches pay for it."""
        if self._messages:
            self._messages.take(1)
        if self._bytes:
            self._bytes.take(size)
