"""The agent's long-running tasks: one supervisor starts them, restarts them, and stops them.

- :class:`Supervisor` runs every long-running part of the daemon (uplink loops, the drain, modem
  sessions, the SIM keeper, periodic reports, command handlers). A part that raises, or returns
  (only a stop should end it), is logged and started again after a capped, jittered backoff. Its
  last error, its restarts and whether it is running show in :meth:`Supervisor.status`
  (``simkeeper status``). Stopping is one thing: cancel the task, await it; nobody else stops a
  supervised part, so a restart can never undo a stop.
- :func:`retry_forever` is the one "try, back off, try again" loop: the backoff starts again
  from its base once an attempt lasted longer than the backoff's cap (it was a success, not a
  crash loop).
- :func:`wait_event`: Python 3.11's ``asyncio.wait_for`` can swallow the cancellation of its
  caller when the awaited thing finishes at the same moment (fixed in 3.12): a task asked to
  stop then runs on for ever. Every wait in a loop that must stop on cancel goes through
  :func:`wait_event` or ``asyncio.timeout``, never ``wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agent.core.backoff import Backoff

log = logging.getLogger(__name__)

Work = Callable[[], Coroutine[Any, Any, None]]
Spawn = Callable[[str, Work], None]  # Supervisor.spawn: run a named long-running part


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (None: no limit); whether it
    is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def retry_forever(
    attempt: Callable[[], Awaitable[None]],
    backoff: Backoff,
    *,
    on_error: Callable[[Exception], None] | None = None,
) -> NoReturn:
    """Run ``attempt()`` again and again, ``backoff`` apart. An exception is handed to
    ``on_error`` (or logged) and the loop goes on; only cancellation ends it. The backoff
    starts again from its base after an attempt that lasted longer than its cap."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await attempt()
        except Exception as exc:
            if on_error is None:
                log.exception("retrying after a failure")
            else:
                on_error(exc)
        if loop.time() - started > backoff.cap:
            backoff.reset()
        await asyncio.sleep(backoff.next_delay())


@dataclass(slots=True)
class TaskStatus:
    """What ``status`` shows of one supervised part."""

    running: bool = True  # False while it waits out the backoff before a restart
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None  # Unix seconds

    def as_dict(self) -> dict[str, Any]:
        return {"running": self.running, "restarts": self.restarts,
                "last_error": self.last_error, "last_error_at": self.last_error_at}


@dataclass(slots=True)
class _Part:
    task: asyncio.Task[None]
    status: TaskStatus = field(default_factory=TaskStatus)


class Supervisor:
    """Every long-running part of the daemon, by name."""

    def __init__(self, restart_min: float = 1.0, restart_max: float = 60.0, *,
                 on_change: Callable[[], None] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self._restart = (restart_min, restart_max)
        self._parts: dict[str, _Part] = {}
        self._ending: set[asyncio.Task[None]] = set()  # cancelled, not yet ended
        self._on_change = on_change or (lambda: None)
        self._wall = wall

    def spawn(self, name: str, work: Work) -> None:
        """Run ``work()`` under supervision; a part of the same name is cancelled first."""
        self.cancel(name)
        status = TaskStatus()
        task = asyncio.create_task(self._keep(name, work, status), name=name)
        self._parts[name] = _Part(task, status)

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    async def _keep(self, name: str, work: Work, status: TaskStatus) -> None:
        def failed(exc: Exception) -> None:
            log.error("%s failed; starting it again: %s", name, exc, exc_info=exc)
            status.running = False
            status.restarts += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            status.last_error_at = self._wall()
            self._on_change()

        async def once() -> None:
            status.running = True
            await work()
            raise _Ended(f"{name} ended unexpectedly")

        await retry_forever(once, Backoff(*self._restart), on_error=failed)

    def cancel(self, name: str) -> None:
        """Stop one part (it is cancelled; :meth:`stop` awaits whatever is left)."""
        part = self._parts.pop(name, None)
        if part is not None:
            part.task.cancel()
            self._ending.add(part.task)
            part.task.add_done_callback(self._ending.discard)

    async def stop(self, *names: str) -> None:
        """Cancel the parts named (every part when none is, and wait for those cancelled
        before) and wait until each has ended."""
        for name in names or tuple(self._parts):
            self.cancel(name)
        tasks = [t for t in self._ending if not names or t.get_name() in names]
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: part.status.as_dict() for name, part in sorted(self._parts.items())}


class _Ended(Exception):
    """A supervised part returned although only a stop should end it."""
