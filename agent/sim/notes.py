"""What the SIM keeper remembers across restarts, as JSON values in the store's ``meta`` table
(like :class:`agent.sim.lifecycle.LifecycleRepository`: no schema change).

- ``keeper.sim.<iccid>``: :class:`SimNotes`, per SIM: the deadline alarms already sent (for which
  deadline), activation attempts and the last error;
- ``keeper.<name>``: the keeper's own facts (the ICCID in the slot, the NetworkManager mode it
  applied, a latched malfunction), small JSON values.

An unreadable value is logged and read as absent: these are notes, not orders (the orders live in
the lifecycle record, which refuses to be misread).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.core.store import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SimNotes:
    """``alarms``: thresholds (seconds, or ``"passed"``) already alarmed for ``alarm_deadline``."""

    alarm_deadline: float | None = None
    alarms: list[float | str] = field(default_factory=list)
    attempts: int = 0
    last_attempt: float | None = None
    last_error: str | None = None
    activated: bool = False

    @classmethod
    def from_json(cls, raw: Any) -> SimNotes:
        notes = cls(**raw)
        if not isinstance(notes.alarms, list) or not isinstance(notes.attempts, int):
            raise TypeError("bad shape")
        return notes


class KeeperStore:
    """Reads and writes never wait on the event loop (:meth:`Store.put_meta`): a note written
    from the loop is queued on the store's writer thread, read back at once, and forgotten again
    (the committed one shows) if its write fails."""

    _PREFIX = "keeper."

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, name: str) -> Any:
        raw = self._store.get_meta(self._PREFIX + name)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("keeper note %s is unreadable; ignored", name)
            return None

    def put(self, name: str, value: Any, *, also: Callable[[], object] | None = None) -> None:
        """Write (None: delete) a note; ``also()`` runs in the same transaction (e.g. the event
        that the note records as sent: both commit, or neither)."""
        text = None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))
        self._store.put_meta({self._PREFIX + name: text}, also=also, what=f"keeper note {name}")

    def notes(self, iccid: str) -> SimNotes:
        raw = self.get(f"sim.{iccid}")
        if raw is None:
            return SimNotes()
        try:
            return SimNotes.from_json(raw)
        except (TypeError, ValueError):
            log.warning("keeper notes of SIM %s are unreadable; starting afresh", iccid)
            return SimNotes()

    def save_notes(self, iccid: str, notes: SimNotes, *,
                   also: Callable[[], object] | None = None) -> None:
        self.put(f"sim.{iccid}", asdict(notes), also=also)
