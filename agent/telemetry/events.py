"""Events: alarms and transitions, written to the outbox's ``events`` stream and told to
in-process listeners (the live view, the lifecycle's own watchers).

An event is the JSON object ``{"kind": ..., "ts": ..., **fields}`` (see
:func:`agent.telemetry.outbox.event_item`); its topic in the outbox is its kind.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.telemetry.outbox import Outbox, event_item

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]


class Events:
    def __init__(self, outbox: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self._outbox = outbox
        self._clock = clock
        self._listeners: dict[int, Listener] = {}
        self._keys = itertools.count()

    def emit(self, kind: str, /, **fields: Any) -> str:
        """Commit one event (``fields`` must be JSON values) and return its reading id.
        Raises :class:`~agent.telemetry.outbox.OutboxError` or
        :class:`~agent.core.store.StoreFull`."""
        ts = self._clock()
        (reading_id,) = self._outbox.add([event_item(kind, ts, fields)])
        payload = {"kind": kind, "ts": ts, **fields}
        for listener in list(self._listeners.values()):
            try:
                listener(kind, payload)
            except Exception:
                log.exception("event listener %r failed", listener)
        return reading_id

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(kind, payload)`` after each emitted event; returns its remover."""
        key = next(self._keys)
        self._listeners[key] = callback

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove
