"""The best time a gateway without a real-time clock can trust, for deadline decisions.

Sources, best first:

1. ``ntp``: the system clock, only while the kernel says it is synchronised (``adjtimex(2)``
   does not return ``TIME_ERROR``; systemd-timesyncd's ``/run/systemd/timesync/synchronized``
   when ``adjtimex`` cannot be called).
2. ``network``: the modem's clock set by the network (``+CCLK`` after ``+CTZU=1``), handed in
   with :meth:`TrustedClock.observe_network` and carried forward with the monotonic clock.
3. ``floor``: the last trusted reading, persisted as an :class:`Anchor` (wall time at a
   monotonic instant in one boot). In the boot it was taken in it advances with the monotonic
   clock and stays exact; after a reboot the downtime is unknown, so it only gives a lower bound
   (the anchor plus the time since boot) and ``ts`` is None.

Time never goes backwards below the floor. With no trusted time a deadline counts as near
(:meth:`TrustedClock.time_left`), never as far; a deadline counts as passed only when the lower
bound is past it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from agent.core.store import Store

Source = Literal["ntp", "network", "floor"]

# No trusted reading can predate this agent (2024-01-01T00:00:00Z): modems whose clock was never
# set print 1970, 1980 or 2000.
EARLIEST = 1_704_067_200.0
_TIME_ERROR = 5  # adjtimex(2): "clock not synchronised"
_TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_META_KEY = "trusted_time.anchor"


def ntp_synchronised() -> bool:
    """Whether the kernel's clock is NTP-disciplined (chrony, ntpd and timesyncd all clear
    ``STA_UNSYNC``)."""
    try:
        timex = ctypes.create_string_buffer(512)  # struct timex is 208 bytes; modes = 0: read
        state = int(_libc().adjtimex(timex))
    except (OSError, AttributeError):
        return _TIMESYNC_FLAG.exists()
    if state < 0:
        return _TIMESYNC_FLAG.exists()
    return state != _TIME_ERROR


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library the process already has: no ``ctypes.util.find_library``, which runs
    ``ldconfig`` in a subprocess on every call."""
    return ctypes.CDLL(None, use_errno=True)


def boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class TrustedNow:
    """``ts``: trusted Unix time, None when no source is trusted; ``lower_bound``: the time is
    at least this (equal to ``ts`` when there is one)."""

    ts: float | None
    source: Source | None
    lower_bound: float


@dataclass(frozen=True, slots=True)
class Anchor:
    """A trusted wall time ``ts`` read at monotonic instant ``mono`` in boot ``boot``."""

    ts: float
    mono: float
    boot: str


class TrustedClock:
    """``anchor``: the floor persisted by an earlier run; ``persist`` is called with a new
    anchor whenever the floor has advanced ``persist_every`` seconds past the last one persisted
    (an SD card is not written on every reading)."""

    def __init__(
        self,
        *,
        anchor: Anchor | None = None,
        persist: Callable[[Anchor], None] = lambda _anchor: None,
        synchronised: Callable[[], bool] = ntp_synchronised,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        boot: str | None = None,
        persist_every: float = 600.0,
    ) -> None:
        self._persist = persist
        self._synchronised = synchronised
        self._wall = wall
        self._mono = mono
        self._boot = boot_id() if boot is None else boot
        self._persist_every = persist_every
        self._anchor = anchor
        self._persisted = anchor
        self._anchor_source: Source = "floor"
        self._anchored_here = False

    def _floor(self) -> tuple[float, bool]:
        """The floor now, and whether it is exact (anchored in this boot)."""
        anchor = self._anchor
        if anchor is None:
            return EARLIEST, False
        mono = self._mono()
        if self._anchored_here or (anchor.boot and anchor.boot == self._boot):
            return max(anchor.ts, anchor.ts + mono - anchor.mono), True
        if not (anchor.boot and self._boot):  # which boot is unknown: no elapsed time to add
            return max(EARLIEST, anchor.ts), False
        return max(EARLIEST, anchor.ts + max(0.0, mono)), False

    def _advance(self, ts: float, source: Source) -> None:
        self._anchor = Anchor(ts, self._mono(), self._boot)
        self._anchored_here = True
        self._anchor_source = source
        last = self._persisted
        if last is None or last.boot != self._boot or ts - last.ts >= self._persist_every:
            self._persist(self._anchor)
            self._persisted = self._anchor

    def now(self) -> TrustedNow:
        floor, exact = self._floor()
        if self._synchronised():
            wall = self._wall()
            if wall >= EARLIEST:
                ts = max(wall, floor)
                self._advance(ts, "floor")
                return TrustedNow(ts, "ntp", ts)
        if exact:
            return TrustedNow(floor, self._anchor_source, floor)
        return TrustedNow(None, None, floor)

    def observe_network(self, when: datetime) -> bool:
        """A network time (``+CCLK`` with its zone); False, and ignored, when it is implausible
        (before :data:`EARLIEST`, a clock the network never set) or behind the floor by more
        than a minute. An NTP-synchronised system clock wins over it."""
        ts = when.timestamp()
        floor, _exact = self._floor()
        if ts < EARLIEST or ts < floor - 60.0:
            return False
        if not self._synchronised():
            self._advance(max(ts, floor), "network")
        return True

    def time_left(self, deadline: float | None) -> float | None:
        """Seconds until ``deadline``; None when there is no deadline. Without trusted time the
        answer is at most 0 (act now), negative only when the lower bound proves it passed."""
        if deadline is None:
            return None
        now = self.now()
        if now.ts is None:
            return min(0.0, deadline - now.lower_bound)
        return deadline - now.ts


def load_anchor(store: Store) -> Anchor | None:
    """The floor persisted in the store's ``meta`` table, None when none (or unreadable)."""
    value = store.get_meta(_META_KEY)
    if value is None:
        return None
    try:
        ts, mono, boot = json.loads(value)
        anchor = Anchor(float(ts), float(mono), str(boot))
    except (ValueError, TypeError):
        return None
    return anchor if math.isfinite(anchor.ts) and math.isfinite(anchor.mono) else None


def save_anchor(store: Store, anchor: Anchor) -> None:
    """Persist the floor (a :class:`TrustedClock` ``persist`` hook; from the event loop it is
    queued on the store's writer thread, :meth:`Store.put_meta`)."""
    store.put_meta({_META_KEY: json.dumps([anchor.ts, anchor.mono, anchor.boot])},
                   what="trusted time anchor")
