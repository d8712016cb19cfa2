"""Rate limiting and reconnect backoff, on a virtual clock."""

from __future__ import annotations

import math

import pytest

from agent.core.backoff import Backoff
from agent.telemetry.pacing import RateLimiter, TokenBucket


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_messages_per_minute_hold_over_a_backlog() -> None:
    t = VirtualTime()
    limiter = RateLimiter(60, None, clock=t.clock, sleep=t.sleep)
    sent = []
    for _ in range(300):  # a backlog after an outage: all ready at once
        await limiter.acquire(100)
        sent.append(t.now)
    for start in sent:  # any 60 s window: the rate plus the 1-message burst
        assert sum(1 for s in sent if start <= s < start + 60) <= 61
    assert all(s > 0 for s in t.sleeps)  # slept for tokens, never spun


async def test_bytes_per_minute_hold_and_big_messages_still_go() -> None:
    t = VirtualTime()
    limiter = RateLimiter(None, 6000, min_burst_bytes=4000, clock=t.clock, sleep=t.sleep)
    log = []
    for size in [4000, 4000, 50, 9000, 10, 4000] * 10:  # 9000 exceeds the bucket
        await limiter.acquire(size)
        log.append((t.now, size))
    for start, _ in log:
        window = sum(n for s, n in log if start <= s < start + 60)
        assert window <= 6000 + 9000  # the rate plus the largest single message
    total = sum(n for _, n in log)
    assert t.now >= (total - 9000) / 100  # 100 B/s on average, at least


async def test_charged_control_messages_slow_later_batches() -> None:
    t = VirtualTime()
    limiter = RateLimiter(60, None, clock=t.clock, sleep=t.sleep)
    await limiter.acquire(1)
    for _ in range(5):
        limiter.charge(10)  # state, results: go at once
    await limiter.acquire(1)
    assert t.now == pytest.approx(6.0)


def test_room_is_what_the_byte_budget_holds_when_a_held_message_may_go() -> None:
    t = VirtualTime()
    limiter = RateLimiter(60, 6000, min_burst_bytes=4000, clock=t.clock, sleep=t.sleep)
    assert limiter.room() is None  # a message may go now: no reason to grow it
    limiter.charge(3000)  # the one-message burst, and 3000 of the 4000 bytes
    assert limiter.room() == pytest.approx(1000 + 100)  # in 1 s: the rest, and 100 B earned
    t.now += 0.5
    assert limiter.room() == pytest.approx(1100)  # the same moment, seen from later
    # A debt (1050 held, 5000 charged): in the 1.5 s until the next message may go, 150 B more.
    limiter.charge(5000)
    assert limiter.room() == pytest.approx(-3800)
    t.now += 60
    assert limiter.room() is None
    unlimited_bytes = RateLimiter(60, None, clock=t.clock, sleep=t.sleep)
    unlimited_bytes.charge(1)
    assert unlimited_bytes.room() == math.inf
    assert RateLimiter(None, 6000, clock=t.clock, sleep=t.sleep).room() is None


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_backoff_is_full_jitter_capped_and_resettable() -> None:
    top = Backoff(0.5, 8.0, rng=lambda: 1.0)
    assert [top.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    top.reset()
    assert top.next_delay() == 0.5
    zero = Backoff(0.5, 8.0, rng=lambda: 0.0)
    assert zero.next_delay() == 0.0  # full jitter: anywhere from 0
    many = Backoff(1.0, 300.0)
    assert all(0 <= many.next_delay() <= 300 for _ in range(200))
