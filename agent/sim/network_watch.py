"""The keeper and the network, once activation is over: a rare probe of a SIM the network
barred (a permanent reject: suspended, source ``network``), the watch on an active SIM, and the
listening window of a gateway whose radio is held off (:mod:`agent.sim.probation`).

A probe is one registration try (or, when only data was barred, one bearer try) at
:meth:`agent.sim.rejects.Backoff.probe_delay` intervals; a success lifts the network suspension and
activation runs again. The watch suspends an active SIM on a permanent reject, and brings back
up a context the network cut when the agent owns the data path. While a listening window is
open, the context of a SIM that was activated is brought up too (the agent's data path), so a
queued order can arrive by MQTT; SMS needs only the radio on.

The network also speaks unasked: a registration URC (registered, searching, denied with its
reject cause) or a time URC makes :meth:`NetworkWatch.look_again` start the keeper's next round
at once, not at its poll, so a reject suspends the SIM within seconds; a storm of URCs starts
at most one round per :data:`URC_GAP` seconds, and the last URC is never left unlooked at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agent.sim.activation import Activator, AttemptFailed, reject_of
from agent.sim.rejects import Backoff
from agent.sim.shared import Interrupted, Wake
from agent.sim.slot import SimSlot
from drivers.modem import Modem

log = logging.getLogger("agent.sim.keeper")  # the keeper's parts log as one

URC_GAP = 1.0  # seconds: URCs start at most one keeper round per gap, however many come


class NetworkWatch:
    def __init__(self, sim: SimSlot, activator: Activator, backoff: Backoff, wake: Wake,
                 mono: Callable[[], float]) -> None:
        self._sim = sim
        self._activator = activator
        self._backoff = backoff
        self._wake = wake
        self._mono = mono
        self.probe_at: float | None = None  # when to probe a barred SIM next (monotonic)
        self._look: asyncio.TimerHandle | None = None  # the round URCs asked for, when due
        self._looked_at = -URC_GAP  # when URCs last started one (loop time)

    def reset(self) -> None:
        """The network took the SIM (back), or another SIM came: no probe, no backoff."""
        self.probe_at = None
        self._backoff.reset()

    def look_again(self) -> None:
        """The network spoke (a URC): the keeper's next round starts now, or :data:`URC_GAP`
        after the last one URCs started; while that one is due, more URCs add nothing."""
        if self._look is None:
            loop = asyncio.get_running_loop()
            self._look = loop.call_at(max(loop.time(), self._looked_at + URC_GAP), self._looked)

    def _looked(self) -> None:
        self._look = None
        self._looked_at = asyncio.get_running_loop().time()
        self._wake.poke()  # ends the idle pause only: never a backoff between attempts

    def schedule_probe(self) -> None:
        self.probe_at = self._mono() + self._backoff.probe_delay(self._sim.time_left())
        self._sim.next_delay = self.probe_at - self._mono()

    def delay(self, poll: float) -> float:
        """The pause before the next round: ``poll``, or less when a probe falls due sooner."""
        if self.probe_at is not None and self._sim.network_barred():
            return min(poll, max(0.0, self.probe_at - self._mono()))
        return poll

    async def barred(self, modem: Modem) -> None:
        """A round of a SIM the network barred: probe it when the time has come."""
        if self.probe_at is None:
            self.schedule_probe()
        elif self._mono() >= self.probe_at:
            await self._probe(modem)

    async def _probe(self, modem: Modem) -> None:
        """Has the network taken the SIM back? One registration (or bearer) try, then back to
        quiet; a success lifts the network suspension and activation runs again."""
        sim = self._sim
        lc = sim.current()
        assert lc.suspension is not None
        self.schedule_probe()
        sim.probing = True
        try:
            if lc.suspension.scope == "data":
                await self._activator.ensure_active(modem)
            else:
                await modem.set_radio("on")
                await self._activator.wait_registered(modem, self._checkpoint)
        except AttemptFailed as exc:
            log.info("SIM %s still barred: %s", lc.iccid, exc.reason)
            if exc.reject is not None and exc.reject.kind == "permanent":
                lc.on_reject(exc.reject)
        else:
            log.info("SIM %s: the network accepts it again", lc.iccid)
            lc.on_recovered()
            self.reset()
            self._wake.interrupt()  # activation runs again at once
        finally:
            sim.probing = False
            await sim.enforce(modem)

    async def _checkpoint(self) -> None:
        if not self._sim.network_barred():
            raise Interrupted

    async def watch(self, modem: Modem) -> None:
        """An active SIM: a permanent reject suspends it; a context the network cut comes back
        up when the agent owns the data path."""
        sim = self._sim
        lc = sim.current()
        reg = await modem.registration()
        reject = reject_of(reg)
        if reject is not None and lc.on_reject(reject):
            self.schedule_probe()
            raise Interrupted
        if not reg.registered:
            return
        if sim.mcc is None:
            await sim.read_operator(modem)
        if sim.enforcer.data_path == "agent":
            try:
                await self._activator.ensure_active(modem)
            except AttemptFailed as exc:
                log.warning("SIM %s: data context not restored: %s", lc.iccid, exc.reason)

    async def listen(self, modem: Modem) -> None:
        """A listening window is open (the radio is on): bring the data context up, when the
        SIM was activated and the agent owns the data path, so a queued order can arrive."""
        sim = self._sim
        lc = sim.current()
        if lc.record.activated_at is None or sim.enforcer.data_path != "agent":
            return
        reg = await modem.registration()
        if not reg.registered:
            return
        try:
            await self._activator.ensure_active(modem)
        except AttemptFailed as exc:
            log.warning("SIM %s: no data context to listen for orders: %s", lc.iccid,
                        exc.reason)
