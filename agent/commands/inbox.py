"""Commands arriving by MQTT, handled under the daemon's supervisor.

The MQTT client hands each ``cmd`` payload to :meth:`CommandInbox.put` (on the loop, never
blocking); :meth:`CommandInbox.run`, a supervised part, handles each in a task of its own (a
``reset-modem`` that waits for the modem must not hold up a ``get-state``) and publishes the
result. A handler that fails unexpectedly still gets an answer (``failed``, with the reason)
and a log line; nothing is left to the loop's exception handler. At most ``limit`` commands
wait or run at once: beyond that a payload is refused with a log line (a flood of commands is
an attack or a broken operator tool, and the broker delivers a repeat anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from agent.commands.processor import CommandProcessor, Result, result

log = logging.getLogger(__name__)


class CommandInbox:
    def __init__(self, processor: CommandProcessor, publish: Callable[[Result], None], *,
                 limit: int = 64) -> None:
        self._processor = processor
        self._publish = publish
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(limit)
        self._running: set[asyncio.Task[None]] = set()
        self._limit = limit

    def put(self, payload: bytes) -> None:
        """The MQTT uplink's ``on_command``."""
        if len(self._running) + self._queue.qsize() >= self._limit:
            log.warning("command refused: %d commands already waiting or running", self._limit)
            return
        self._queue.put_nowait(payload)

    async def run(self) -> None:
        try:
            while True:
                payload = await self._queue.get()
                task = asyncio.create_task(self._answer(payload))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._running, return_exceptions=True)

    async def _answer(self, payload: bytes) -> None:
        try:
            answer = await self._processor.handle(payload)
        except Exception as exc:  # the processor answers its own failures; this is a bug
            log.exception("a command failed unexpectedly")
            answer = result(None, "failed", f"internal error: {exc!r}"[:200])
        self._publish(answer)
