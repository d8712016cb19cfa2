"""A modem with two SIM slots and one radio: which SIM it uses, and when it switches
(``[modem.dual_sim]``; the vendor's command is :meth:`drivers.modem.Modem.select_sim_slot`).

The keeper calls :meth:`DualSim.step` each round, after its maintenance read the SIM in use;
a step switches at most once, and a switch ends the round (the next one reads the other SIM).

- **To the backup**, from the primary: on a permanent network reject (the primary's lifecycle
  suspended by the network), on the primary's plan cap (throttle or stop), or after the primary
  has had no registration for ``no_registration`` seconds.
- **Back to the primary**, never before ``min_dwell`` on the backup: for a cap, once the cap
  no longer holds (a new period, a new plan); otherwise every ``recheck`` seconds the primary is
  tried: it stays if it registers within ``switch_timeout``, else the backup again.
- **A standby SIM keeps its deadline.** The SIM in the slot not in use is read once (an
  ``inventory`` switch, when its ICCID was never read); its deadline alarms go out as for the
  SIM in use; ``standby_lead`` before its deadline (at once without trusted time) the keeper
  switches to it, its activation runs as for any SIM (one proven round trip), and the keeper
  switches back once it is active, or after ``switch_timeout`` without success (tried again
  at the next step). Readings wait in the outbox meanwhile.

Every switch is a ``sim-switch`` event (``from_slot``, ``to_slot``, ``from_iccid``,
``to_iccid``, ``reason``, ``errand``, ``took``: seconds the modem took), its new situation
persisted (keeper note ``dual.<slot>``) before the event is emitted. After a restart the modem
says which SIM it uses (its choice is kept in its non-volatile memory) and the note says why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.core.modem_config import DualSimConfig
from agent.sim.lifecycle import Lifecycle
from agent.sim.shared import FATAL
from agent.sim.slot import SimSlot
from drivers.errors import ModemError, SimSlotsUnsupported
from drivers.modem import Modem

log = logging.getLogger("agent.sim.keeper")  # the keeper's parts log as one

_WAITING = ("awaiting-activation", "activating")


class DualSim:
    def __init__(self, cfg: DualSimConfig, sim: SimSlot, *, slot: str,
                 capped: Callable[[str], bool], mono: Callable[[], float]) -> None:
        self.cfg = cfg
        self._sim = sim
        self._slot = slot
        self._capped = capped
        self._mono = mono
        self.primary, self.backup = cfg.primary, 3 - cfg.primary
        self.supported: bool | None = None  # unknown until the modem was asked
        saved = sim.notes.get(self._note)
        saved = saved if isinstance(saved, dict) else {}
        self.reason: str | None = saved.get("reason")
        self.errand: str | None = saved.get("errand")  # inventory | activate | probe | None
        self._since = mono()  # on the SIM in use since (a restart starts the dwell again)
        self._unregistered_since: float | None = None
        self._next_try = mono() + cfg.recheck if self.errand is None else mono()

    @property
    def _note(self) -> str:
        return f"dual.{self._slot}"

    def attached(self) -> None:
        self.supported = None  # ask the (new) modem again

    async def step(self, modem: Modem) -> bool:
        """One look (module doc); True when the modem switched."""
        if not self.cfg.enabled or self.supported is False:
            return False
        if self.supported is None:
            try:
                card = await modem.sim_slot()
            except SimSlotsUnsupported as exc:
                log.warning("[modem.dual_sim] enabled, but this modem has one SIM slot: %s", exc)
                self.supported = False
                return False
            self.supported = True
            if card != self._sim.card:
                self._sim.use_card(card)
                return True  # read that SIM first
        lc, now = self._sim.lc, self._mono()
        if lc is None:
            return False
        if self._sim.card == self.primary:
            return await self._on_primary(modem, lc, now)
        return await self._on_backup(modem, lc, now)

    def until_due(self) -> float | None:
        """Seconds until the policy's next look falls due, which the keeper's rounds (every
        ``[lifecycle] poll_interval``) may not otherwise meet; None: it waits for nothing."""
        if not self.cfg.enabled or not self.supported:
            return None
        if self.errand in ("probe", "activate"):  # the SIM switched to has switch_timeout
            due = [self._since + self.cfg.switch_timeout]
        elif self._sim.card != self.primary:
            due = [max(self._since + self.cfg.min_dwell, self._next_try)]
        else:  # a reason to leave may be waiting out the dwell, or the registration
            due = [self._since + self.cfg.min_dwell]
            if self._unregistered_since is not None:
                due.append(self._unregistered_since + self.cfg.no_registration)
        now = self._mono()
        ahead = [t - now for t in due if t > now]
        return min(ahead) if ahead else None

    async def _on_primary(self, modem: Modem, lc: Lifecycle, now: float) -> bool:
        if self.errand == "probe":  # trying the primary again: registered in time?
            if await self._registered(modem):
                return self._settle("the primary SIM is usable again")
            if now - self._since < self.cfg.switch_timeout:
                return False
            return await self._switch(modem, self.backup, "the primary SIM is still unusable",
                                      None)
        why = await self._why_leave(modem, lc, now)
        if why is not None and now - self._since >= self.cfg.min_dwell:
            return await self._switch(modem, self.backup, why, None)
        standby = self._standby()
        if standby is None:
            if self._sim.known_in(self.backup) is None and self.errand != "inventory-done":
                return await self._switch(modem, self.backup, "read the standby SIM",
                                          "inventory")
            return False
        if self._due(standby):
            return await self._switch(modem, self.backup, f"activate the standby SIM"
                                      f" {standby.iccid} before its deadline", "activate")
        return False

    async def _on_backup(self, modem: Modem, lc: Lifecycle, now: float) -> bool:
        if self.errand == "inventory":
            return await self._switch(modem, self.primary, "standby SIM read", "inventory-done")
        if self.errand == "activate":
            if lc.state in _WAITING and now - self._since < self.cfg.switch_timeout:
                return False
            done = lc.state not in _WAITING
            return await self._switch(modem, self.primary, "standby SIM activated" if done
                                      else "standby activation not done in time; retried",
                                      None)
        if now - self._since < self.cfg.min_dwell or now < self._next_try:
            return False
        primary = self._sim.known_in(self.primary)
        if self.reason == "plan cap" and primary is not None and self._capped(primary):
            self._next_try = now + self.cfg.recheck
            return False
        return await self._switch(modem, self.primary, "try the primary SIM again", "probe")

    async def _why_leave(self, modem: Modem, lc: Lifecycle, now: float) -> str | None:
        held = lc.suspension
        if lc.state == "suspended" and held is not None and held.source == "network":
            return "permanent network reject"
        if self._capped(lc.iccid):
            return "plan cap"
        if await self._registered(modem):
            self._unregistered_since = None
            return None
        if self._unregistered_since is None:
            self._unregistered_since = now
        if now - self._unregistered_since >= self.cfg.no_registration:
            return "no registration"
        return None

    async def _registered(self, modem: Modem) -> bool:
        try:
            return (await modem.registration()).registered
        except FATAL:
            raise
        except ModemError:
            return False

    def _standby(self) -> Lifecycle | None:
        """The backup slot's SIM (when known), its deadline alarms checked as the SIM in
        use's are."""
        iccid = self._sim.known_in(self.backup)
        if iccid is None:
            return None
        lc = self._sim.open(iccid)
        lc.tick()
        self._sim.alarms.check(lc.record, self._sim.clock.now())
        return lc

    def _due(self, lc: Lifecycle) -> bool:
        if lc.state not in _WAITING or lc.record.activated_at is not None:
            return False
        left = self._sim.clock.time_left(lc.record.deadline)
        return left is not None and left <= self.cfg.standby_lead

    def _settle(self, reason: str) -> bool:
        """Stay where the modem is (no switch): the errand is over."""
        self._save(None, None)
        self._sim.emit("sim-switch-settled", slot=self._slot, sim_slot=self._sim.card,
                       iccid=self._sim.iccid, reason=reason)
        return False

    async def _switch(self, modem: Modem, card: int, reason: str, errand: str | None) -> bool:
        before = self._sim.iccid
        self._save(reason if errand in (None, "probe") else self.reason, errand)
        started = self._mono()
        try:
            await modem.select_sim_slot(card)
        except FATAL:
            raise
        except ModemError as exc:
            log.error("SIM slot %d not selected (%s): %s", card, reason, exc)
            self._next_try = self._mono() + self.cfg.recheck
            return False
        self._sim.use_card(card)
        self._since = self._mono()
        self._unregistered_since = None
        if errand is None:
            self._next_try = self._since + self.cfg.recheck
        try:
            after: str | None = await modem.iccid()
        except FATAL:
            raise
        except ModemError:
            after = self._sim.known_in(card)
        log.warning("SIM slot %d -> %d (%s)", 3 - card, card, reason)
        self._sim.emit("sim-switch", slot=self._slot, from_slot=3 - card, to_slot=card,
                       from_iccid=before, to_iccid=after, reason=reason, errand=errand,
                       took=round(self._since - started, 3))
        return True

    def _save(self, reason: str | None, errand: str | None) -> None:
        self.reason, self.errand = reason, errand
        self._sim.notes.put(self._note, {"reason": reason, "errand": errand, "at": time.time()})

    def summary(self) -> dict[str, Any] | None:
        if not self.cfg.enabled or not self.supported:
            return None
        return {"sim_slot": self._sim.card, "primary": self.primary, "reason": self.reason,
                "errand": self.errand, "standby_iccid": self._sim.known_in(3 - self._sim.card)}
