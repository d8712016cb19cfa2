"""What every part of the SIM keeper (:mod:`agent.sim.keeper`) shares: the channel it talks through,
its errors, and what wakes its run loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from drivers.at import Urc
from drivers.errors import NotConnected, PortError

FATAL = (PortError, NotConnected)  # the port is gone: the keeper waits for the next attach


class KeeperChannel(Protocol):
    """What the keeper needs of :class:`drivers.channel.AtChannel`."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]: ...

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...

    def add_reset_listener(self, callback: Callable[[str], None]) -> Callable[[], None]: ...

    def add_hang_listener(self, callback: Callable[[str], None]) -> Callable[[], None]: ...


class KeeperError(Exception):
    """An order the keeper cannot carry out; the message says why."""


class Interrupted(Exception):
    """An order, reset or swap made the work under way pointless: start a new round."""


class Wake:
    """What ends the keeper's pauses. Two kinds of pause, two kinds of reason:

    - :meth:`kick`: new work (an order, attach after a detach, a malfunction reported). It marks
      the work under way ``dirty`` and ends every pause, the backoff between two activation
      attempts included;
    - :meth:`interrupt` (the work under way became pointless: a modem reset, a ``+CPIN`` URC)
      and :meth:`poke` (look again: time and registration URCs) end only an idle pause
      (:meth:`idle`), never a backoff pause (:meth:`backoff`): a URC cannot make two attempts
      closer than the backoff chose.

    Wake-ups are counted, not latched: :meth:`mark` (the round's maintenance, which looks at
    everything) says which ones were seen, and a pause ends only for those that came after it.
    So a wake-up is neither lost (it came while the round ran: the next idle pause ends at once)
    nor seen twice (the kick of an attach before the first round does not cut later pauses).
    """

    def __init__(self) -> None:
        self.dirty = False
        self.kicks = 0  # new work so far
        self._wakes = 0  # every wake-up so far
        self._seen = 0  # wake-ups the last maintenance saw
        self._next_kick = asyncio.Event()  # set by the next kick (a new one after each)
        self._next_wake = asyncio.Event()  # set by the next wake-up of any kind

    def kick(self) -> None:
        """New work: the work under way may be pointless, and every pause ends."""
        self.dirty = True
        self.kicks += 1
        self._next_kick.set()
        self._next_kick = asyncio.Event()
        self.poke()

    def interrupt(self) -> None:
        """The work under way became pointless; an idle pause ends, a backoff pause does not."""
        self.dirty = True
        self.poke()

    def poke(self) -> None:
        """Look again when idle, without making the work under way pointless."""
        self._wakes += 1
        self._next_wake.set()
        self._next_wake = asyncio.Event()

    def mark(self) -> None:
        """Everything up to now was looked at (the round's maintenance starts)."""
        self.dirty = False
        self._seen = self._wakes

    async def idle(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when woken (for any reason) since :meth:`mark`."""
        if self._wakes != self._seen:
            await asyncio.sleep(0)
            return
        await _wait(self._next_wake, delay)

    async def backoff(self, delay: float, since: int) -> None:
        """Sleep ``delay`` seconds, or less when new work came (:meth:`kick`) after the
        ``since``-th kick."""
        if self.kicks != since:
            await asyncio.sleep(0)
            return
        await _wait(self._next_kick, delay)


async def _wait(event: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        await asyncio.sleep(0)
        return
    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await event.wait()
