"""The listening windows of a held radio (agent.sim.probation), on a clock the test moves."""

from __future__ import annotations

import random

import pytest

from agent.sim.probation import Probation


class Mono:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_windows_come_rarely_jittered_and_close_again() -> None:
    mono = Mono()
    p = Probation(3600.0, 600.0, mono=mono, rng=random.Random(1))
    assert not p.update(False) and p.until_change() is None and p.times() == (None, None)
    assert not p.update(True)  # held from now: the first window is an interval away
    first = p.opens_at
    assert first is not None and 1000 + 0.9 * 3600 <= first <= 1000 + 1.1 * 3600
    assert p.until_change() == pytest.approx(first - mono.now)
    mono.now = first
    assert p.update(True) and p.listening
    assert p.until_change() == pytest.approx(600.0)
    at, until = p.times(wall=lambda: mono.now + 5.0)
    assert at is None and until == pytest.approx(first + 600.0 + 5.0)
    mono.now = first + 600.0
    assert not p.update(True)  # over: the next one an interval later
    second = p.opens_at
    assert second is not None and mono.now + 0.9 * 3600 <= second <= mono.now + 1.1 * 3600
    assert not p.update(False) and p.opens_at is None  # no longer held: the schedule is gone


def test_jitter_spreads_a_fleet() -> None:
    opens = set()
    for seed in range(20):
        p = Probation(21600.0, 600.0, mono=Mono(), rng=random.Random(seed))
        p.update(True)
        opens.add(p.opens_at)
    assert len(opens) == 20


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Probation(0.0, 600.0)
    with pytest.raises(ValueError):
        Probation(3600.0, 0.0)
