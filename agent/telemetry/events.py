"""Events: alarms and transitions, written to the outbox's ``events`` stream and told to
in-process listeners (the live view, the lifecycle's own watchers).

An event is the JSON object ``{"kind": ..., "ts": ..., **fields}`` (see
:func:`agent.telemetry.outbox.event_item`); its topic in the outbox is its kind.

:meth:`Events.emit` never commits on the event loop: there it queues the event on the store's
writer thread, after every write handed over before it (a lifecycle record saved before its
transition's event commits before it). On the writer thread, or inside a transaction, the event
joins the transaction in progress, so it commits (or rolls back) with what it reports.
Listeners hear an event once it has committed, on the loop they were registered from.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from agent.telemetry.outbox import Item, Outbox, event_item, on_loop

Listener = Callable[[str, dict[str, Any]], None]


class Events:
    def __init__(self, outbox: Outbox, *, clock: Callable[[], float] = time.time) -> None:
        self._outbox = outbox
        self._clock = clock
        self._listeners: dict[int, Listener] = {}
        self._keys = itertools.count()

    def emit(self, kind: str, /, **fields: Any) -> None:
        """Commit one event (``fields`` must be JSON values), stamped now. Invalid fields raise
        :class:`~agent.telemetry.outbox.OutboxError` at once. Queued from the loop (a failed
        commit is logged by the store); elsewhere committed before it returns (raises
        :class:`~agent.core.store.StoreError`, e.g. ``StoreFull``)."""
        ts = self._clock()
        item = event_item(kind, ts, fields)
        self._outbox.check([item])
        payload = {"kind": kind, "ts": ts, **fields}
        self._outbox.store.write(lambda: self._commit(item, payload), what=f"event {kind}")

    def _commit(self, item: Item, payload: dict[str, Any]) -> None:
        store = self._outbox.store
        with store.transaction():
            self._outbox.add([item])
            store.after_commit(lambda: self._tell(payload))

    def _tell(self, payload: dict[str, Any]) -> None:
        for listener in list(self._listeners.values()):
            listener(str(payload["kind"]), payload)

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(kind, payload)`` after each emitted event commits (on the loop it
        was registered from; its exceptions are logged); returns its remover."""
        key = next(self._keys)
        self._listeners[key] = on_loop(callback)

        def remove() -> None:
            self._listeners.pop(key, None)

        return remove
