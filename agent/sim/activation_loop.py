"""The keeper's activation loop: attempts (:mod:`agent.sim.activation`) spaced by
:class:`agent.sim.rejects.Backoff` delays that shrink as the deadline nears.

Never two attempts closer than the backoff's ``min_delay`` (``[lifecycle] retry_min``), nor a
failed one and the next closer than the delay the backoff chose: the spacing holds across
rounds (an attempt a modem reset interrupted counts), and the pause that keeps it is ended only
by new work (:meth:`agent.sim.shared.Wake.kick`: an order, attach after a detach; a new SIM
starts from scratch, :meth:`ActivationLoop.reset`), never by a URC or a reset. Before each
attempt after a pause the keeper's round maintenance runs again (time, SIM, verdict,
enforcement). A permanent reject suspends the SIM (source ``network``) and hands it to the
network probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from agent.sim.activation import Activator, AttemptFailed
from agent.sim.lifecycle import Lifecycle
from agent.sim.network_watch import NetworkWatch
from agent.sim.rejects import Backoff
from agent.sim.shared import FATAL, Interrupted, Wake
from agent.sim.slot import SimSlot
from drivers.errors import ModemError
from drivers.modem import Modem

log = logging.getLogger("agent.sim.keeper")  # the keeper's parts log as one


class ActivationLoop:
    def __init__(self, sim: SimSlot, activator: Activator, backoff: Backoff, *,
                 network: NetworkWatch, wake: Wake,
                 maintain: Callable[[Modem], Awaitable[None]],
                 mono: Callable[[], float] = time.monotonic) -> None:
        self._sim = sim
        self._activator = activator
        self._backoff = backoff
        self._network = network
        self._wake = wake
        self._maintain = maintain  # the keeper's round maintenance
        self._mono = mono
        self._due = 0.0  # monotonic: no attempt before this, unless new work came since...
        self._kicks = 0  # ...the kick count when it was set

    def reset(self) -> None:
        """A new SIM: its first attempt is not held back by the old one's."""
        self._due = 0.0

    async def run(self, modem: Modem) -> None:
        """Attempts, spaced, until one succeeds or activation is no longer wanted (right after
        the round's maintenance)."""
        while True:
            if await self._wait_due():
                await self._maintain(modem)
                if not self._sim.wants_activation():
                    raise Interrupted
            try:
                await self._attempt(modem)
                return
            except AttemptFailed:
                self._sim.next_delay = delay = self._backoff.next_delay(self._sim.time_left())
                self._due = max(self._due, self._mono() + delay)
            if not self._sim.wants_activation():
                return

    async def _wait_due(self) -> bool:
        """Hold the next attempt until it is due; only new work ends the wait early. Whether
        it waited (then the round's maintenance runs again)."""
        waited = False
        while self._wake.kicks == self._kicks and (left := self._due - self._mono()) > 0:
            await self._wake.backoff(left, self._kicks)
            waited = True
        return waited

    async def _checkpoint(self) -> None:
        if self._wake.dirty or not self._sim.wants_activation():
            raise Interrupted

    async def _attempt(self, modem: Modem) -> None:
        sim = self._sim
        lc = sim.current()
        deadline = lc.record.deadline
        if (lc.state == "activating" and lc.record.activated_at is None and deadline is not None
                and sim.clock.now().lower_bound >= deadline):  # restarted mid-attempt, too late
            lc.activation_failed("activation deadline passed")
            raise Interrupted
        if lc.state == "awaiting-activation":
            lc.start_activation()
        self._kicks = self._wake.kicks
        self._due = self._mono() + self._backoff.min_delay  # never two closer, whatever ends it
        notes = sim.notes.notes(lc.iccid)
        notes.attempts += 1
        notes.last_attempt = sim.clock.now().ts
        sim.notes.save_notes(lc.iccid, notes)
        apn = sim.apn(lc.iccid)
        try:
            done = await self._activator.attempt(modem, apn, self._checkpoint,
                                                 on_registered=lambda: self._registered(modem))
        except FATAL:
            raise
        except (AttemptFailed, ModemError) as exc:
            failure = exc if isinstance(exc, AttemptFailed) else AttemptFailed(str(exc))
            self._failed(lc, failure)
            raise failure from None
        if lc.state != "activating":
            raise Interrupted
        if done.apn_replaced is not None:
            sim.emit("apn-replaced", iccid=lc.iccid, old=done.apn_replaced, new=apn)
        lc.activation_succeeded()
        self._backoff.reset()
        notes.last_error = None
        sim.notes.save_notes(lc.iccid, notes)
        log.info("SIM %s active (%s)", lc.iccid, ", ".join(done.addresses))

    async def _registered(self, modem: Modem) -> None:
        await self._sim.read_operator(modem)
        ok, why = self._sim.may_emit()
        if not ok:
            raise AttemptFailed(why)

    def _failed(self, lc: Lifecycle, failure: AttemptFailed) -> None:
        notes = self._sim.notes.notes(lc.iccid)
        notes.last_error = failure.reason
        self._sim.notes.save_notes(lc.iccid, notes)
        log.warning("SIM %s: activation attempt failed: %s", lc.iccid, failure.reason)
        if failure.reject is not None and lc.can("network-reject") and lc.on_reject(
                failure.reject):
            self._network.schedule_probe()
            raise Interrupted from None
        if lc.state == "activating":
            lc.activation_failed(failure.reason)
