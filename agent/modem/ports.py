"""The gateway's modems: one :class:`ModemSession` per AT port, named in config (one or a list)
or found by hotplug (``[modem] port = "auto"``), each run under the daemon's supervisor.

Each modem has its SIM slot, by position (agent.sim.keepers): a configured port by its place in
the list, a hotplugged one in the first slot no present modem holds (a modem that comes back
takes its slot again, and its SIM's history is the store's). ``slot_parts(index)`` gives what
rides on that slot's modem: the SIM keeper, the SMS command reader and the usage meter's feed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.core.config import ModemConfig, canonical_iccid
from agent.core.modem_config import slot_name
from agent.core.tasks import Supervisor
from agent.modem.session import ModemSession, Observe, SessionHooks
from drivers.errors import ModemError
from drivers.hotplug import Hotplug, PortMatch

log = logging.getLogger(__name__)

SlotParts = Callable[[int], tuple[SessionHooks, Observe]]


class ModemPorts:
    def __init__(self, cfg: ModemConfig, supervisor: Supervisor, *, slot_parts: SlotParts,
                 on_change: Callable[[], None], on_ready: Callable[[], None]) -> None:
        self._cfg = cfg
        self._supervisor = supervisor
        self._slot_parts = slot_parts
        self._on_change = on_change
        self._on_ready = on_ready
        self.sessions: dict[str, ModemSession] = {}
        self._slots: dict[str, int] = {}  # port: its slot index

    def start(self) -> Callable[[], None]:
        """Open the configured ports, or watch hotplug; returns what ends the watch."""
        if self._cfg.ports:
            for path in self._cfg.ports:
                self.add(path)
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

    def _slot_for(self, path: str) -> int:
        if path in self._cfg.ports:
            return self._cfg.ports.index(path)
        taken = set(self._slots.values())
        return next(i for i in range(len(taken) + 1) if i not in taken)

    def add(self, path: str) -> ModemSession:
        index = self._slot_for(path)
        hooks, observe = self._slot_parts(index)
        session = ModemSession(
            path, baud=self._cfg.baud, poll_interval=self._cfg.poll_interval,
            interface=self._cfg.interface_for(index), observe=observe,
            on_change=self._on_change, on_ready=self._on_ready, hooks=hooks,
        )
        self.sessions[path] = session
        self._slots[path] = index
        self._supervisor.spawn(f"modem {path}", session.run)
        self._on_change()
        return session

    def remove(self, path: str) -> None:
        if self.sessions.pop(path, None) is not None:
            self._slots.pop(path, None)
            self._supervisor.cancel(f"modem {path}")
            self._on_change()

    def summaries(self) -> list[dict[str, Any]]:
        """Each modem as ``status`` shows it, with its SIM slot's name."""
        return [{**s.summary(), "slot": slot_name(self._slots[p])}
                for p, s in self.sessions.items()]

    def iccids(self) -> set[str]:
        return {s.iccid for s in self.sessions.values() if s.iccid}

    async def reset(self, iccid: str | None = None) -> str:
        """The ``reset-modem`` order: the modem holding ``iccid``; without one, the only modem
        (resetting every modem at once would cut every link: with several, name the SIM)."""
        sessions = list(self.sessions.values())
        if iccid is not None:
            wanted = canonical_iccid(iccid)
            sessions = [s for s in sessions if s.iccid == wanted]
            if not sessions:
                raise ModemError(f"SIM {wanted} is in none of this gateway's modems")
        elif len(sessions) > 1:
            held = ", ".join(f"{s.iccid or 'no SIM'} ({s.port})" for s in sessions)
            raise ModemError(f"this gateway has {len(sessions)} modems: name the SIM (iccid)"
                             f" whose modem to reset: {held}")
        if not sessions:
            raise ModemError("no modem")
        return await sessions[0].reset()
