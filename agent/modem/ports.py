"""The gateway's modems: one :class:`ModemSession` per AT port, named in config or found by
hotplug (``[modem] port = "auto"``), each run under the daemon's supervisor.

The first modem carries the SIM keeper and the SMS command reader (its ``hooks``) and feeds the
usage meter: one SIM slot per gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.core.config import ModemConfig
from agent.core.tasks import Supervisor
from agent.modem.session import ModemSession, Observe, SessionHooks
from drivers.errors import ModemError
from drivers.hotplug import Hotplug, PortMatch

log = logging.getLogger(__name__)


class ModemPorts:
    def __init__(self, cfg: ModemConfig, supervisor: Supervisor, *, hooks: SessionHooks,
                 observe: Observe, on_change: Callable[[], None],
                 on_ready: Callable[[], None]) -> None:
        self._cfg = cfg
        self._supervisor = supervisor
        self._hooks = hooks
        self._observe = observe
        self._on_change = on_change
        self._on_ready = on_ready
        self.sessions: dict[str, ModemSession] = {}

    def start(self) -> Callable[[], None]:
        """Open the configured port, or watch hotplug; returns what ends the watch."""
        if self._cfg.port != "auto":
            self.add(self._cfg.port)
            return lambda: None
        hotplug = Hotplug(self._added, self.remove)
        try:
            hotplug.start()
        except Exception as exc:  # no udev in a container, no permission for netlink
            log.warning("modem hotplug unavailable (%s): no modem will be found", exc)
            return lambda: None
        return hotplug.stop

    def _added(self, match: PortMatch) -> None:
        self.add(match.path)

    @property
    def _slot(self) -> ModemSession | None:
        """The session that carries the SIM keeper."""
        return next((s for s in self.sessions.values() if s.hooks is not None), None)

    def add(self, path: str) -> ModemSession:
        first = self._slot is None
        session = ModemSession(
            path, baud=self._cfg.baud, poll_interval=self._cfg.poll_interval,
            interface=self._cfg.interface, observe=self._observe if first else None,
            on_change=self._on_change, on_ready=self._on_ready,
            hooks=self._hooks if first else None,
        )
        self.sessions[path] = session
        self._supervisor.spawn(f"modem {path}", session.run)
        self._on_change()
        return session

    def remove(self, path: str) -> None:
        if self.sessions.pop(path, None) is not None:
            self._supervisor.cancel(f"modem {path}")
            self._on_change()

    def summaries(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.sessions.values()]

    def iccids(self) -> set[str]:
        return {s.iccid for s in self.sessions.values() if s.iccid}

    async def reset_slot_modem(self) -> str:
        """The ``reset-modem`` order, on the modem that carries the SIM keeper."""
        session = self._slot
        if session is None:
            raise ModemError("no modem")
        return await session.reset()

