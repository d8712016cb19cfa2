"""The running daemon's own row in the store (table ``runtime``), read by ``simkeeper status``.

The daemon writes it when something shown changes (modem state, SIM, registration, uplink
connected or not, a task restarted), with a heartbeat at most once per :data:`HEARTBEAT`
seconds, to spare the SD card. ``status`` opens the database read-only and counts the agent as
running while the row's process is alive, has not stopped, and its heartbeat is under
:data:`STALE` seconds old. This module is the row's one contract: the writer and the reader
both use it, and it stays light (no asyncio, no modem stack) for ``status``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The daemon writes its heartbeat at most this often: each write is a commit on the SD card
# (a hung daemon is the systemd watchdog's to catch, within seconds).
HEARTBEAT = 600.0
STALE = 2 * HEARTBEAT + 30  # no heartbeat for this long: the agent hangs or died unseen

_COLUMNS = ("pid", "started_at", "heartbeat", "stopped_at", "modems", "uplink", "usage",
            "sims", "tasks")
_JSON: dict[str, Callable[[], Any]] = {
    "modems": list, "uplink": lambda: None, "usage": list, "sims": list, "tasks": dict,
}


@dataclass(slots=True)
class Row:
    pid: int | None = None
    started_at: float | None = None
    heartbeat: float | None = None
    stopped_at: float | None = None
    modems: list[Any] = field(default_factory=list)
    uplink: dict[str, Any] | None = None
    usage: list[Any] = field(default_factory=list)
    sims: list[Any] = field(default_factory=list)
    tasks: dict[str, Any] = field(default_factory=dict)


def write(db: sqlite3.Connection, row: Row) -> None:
    """Replace the row (inside the caller's transaction)."""
    values = [getattr(row, c) for c in _COLUMNS]
    values = [json.dumps(v) if c in _JSON else v for c, v in zip(_COLUMNS, values, strict=True)]
    db.execute(
        f"INSERT OR REPLACE INTO runtime (id, {', '.join(_COLUMNS)})"
        f" VALUES (1, {', '.join('?' * len(_COLUMNS))})",
        values,
    )


def read(db: sqlite3.Connection) -> Row:
    """The row as last written; an empty :class:`Row` when the daemon never wrote one (or the
    database predates the columns)."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    if "runtime" not in tables:
        return Row()
    present = {info[1] for info in db.execute("PRAGMA table_info(runtime)")}
    columns = [c for c in _COLUMNS if c in present]
    found = db.execute(f"SELECT {', '.join(columns)} FROM runtime WHERE id = 1").fetchone()
    if found is None:
        return Row()
    values = dict(zip(columns, found, strict=True))
    for name, empty in _JSON.items():
        text = values.get(name)
        values[name] = json.loads(text) if text else empty()
    return Row(**values)
