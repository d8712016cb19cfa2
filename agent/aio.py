"""Small asyncio helpers the agent's long-running loops share.

Python 3.11's ``asyncio.wait_for`` can swallow the cancellation of its caller when the awaited
thing finishes at the same moment (fixed in 3.12): a task asked to stop then runs on for ever.
Every wait in a loop that must stop on cancel goes through :func:`wait_event` or
``asyncio.timeout``, never ``wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (None: no limit); whether it
    is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
