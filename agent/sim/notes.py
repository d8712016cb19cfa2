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
    _PREFIX = "keeper."

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, name: str) -> Any:
        rows = self._store.query("SELECT value FROM meta WHERE key = ?", (self._PREFIX + name,))
        if not rows:
            return None
        try:
            return json.loads(rows[0][0])
        except ValueError:
            log.warning("keeper note %s is unreadable; ignored", name)
            return None

    def put(self, name: str, value: Any) -> None:
        key = self._PREFIX + name
        with self._store.transaction() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           (key, json.dumps(value, sort_keys=True, separators=(",", ":"))))

    def notes(self, iccid: str) -> SimNotes:
        raw = self.get(f"sim.{iccid}")
        if raw is None:
            return SimNotes()
        try:
            return SimNotes.from_json(raw)
        except (TypeError, ValueError):
            log.warning("keeper notes of SIM %s are unreadable; starting afresh", iccid)
            return SimNotes()

    def save_notes(self, iccid: str, notes: SimNotes) -> None:
        self.put(f"sim.{iccid}", asdict(notes))
