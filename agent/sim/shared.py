"""What every part of the SIM keeper (:mod:`agent.sim.keeper`) shares: the channel it talks through,
its errors, and the wake-up of its run loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from drivers.at import Urc
from drivers.errors import CommandTimeout, NotConnected, PortError

FATAL = (PortError, NotConnected)  # the port is gone: the keeper waits for the next attach


class KeeperChannel(Protocol):
    """What the keeper needs of :class:`drivers.channel.AtChannel`."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]: ...

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...

    def add_reset_listener(self, callback: Callable[[str], None]) -> Callable[[], None]: ...


class KeeperError(Exception):
    """An order the keeper cannot carry out; the message says why."""


class Interrupted(Exception):
    """An order, reset or swap made the work under way pointless: start a new round."""


class CountedChannel:
    """The channel as the keeper's :class:`Modem` sees it: each command timeout is a hang."""

    def __init__(self, channel: KeeperChannel, on_timeout: Callable[[], None]) -> None:
        self._channel = channel
        self._on_timeout = on_timeout

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]:
        try:
            return await self._channel.command(cmd, timeout=timeout, expect=expect)
        except CommandTimeout:
            self._on_timeout()
            raise

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]:
        return self._channel.add_urc_listener(callback)


class Wake:
    """Orders, resets, attaches and some URCs wake the run loop; ``dirty`` says the work under
    way may have become pointless (the next round's maintenance clears it)."""

    def __init__(self) -> None:
        self.dirty = False
        self._event = asyncio.Event()

    def kick(self) -> None:
        self.dirty = True
        self._event.set()

    def poke(self) -> None:
        """Wake the loop without making the work under way pointless."""
        self._event.set()

    async def pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when woken."""
        if delay <= 0:
            await asyncio.sleep(0)
        else:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._event.wait()
        self._event.clear()
