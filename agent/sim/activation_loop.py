"""The keeper's activation loop: attempts (:mod:`agent.sim.activation`) retried by tenacity with
:class:`agent.sim.rejects.Backoff` delays that shrink as the deadline nears.

Between attempts the keeper's round maintenance runs again (time, SIM, verdict, enforcement),
and its wakeable pause is the sleep, so an order, a reset or a swap abandons the loop at once.
A permanent reject suspends the SIM (source ``network``) and hands it to the network probe.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

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
                 maintain: Callable[[Modem], Awaitable[None]]) -> None:
        self._sim = sim
        self._activator = activator
        self._backoff = backoff
        self._network = network
        self._wake = wake
        self._maintain = maintain  # the keeper's round maintenance

    def _retry_wait(self, _state: RetryCallState) -> float:
        self._sim.next_delay = delay = self._backoff.next_delay(self._sim.time_left())
        return delay

    def _stop_retrying(self, _state: RetryCallState) -> bool:
        return not self._sim.wants_activation()

    async def run(self, modem: Modem) -> None:
        retrying = AsyncRetrying(retry=retry_if_exception_type(AttemptFailed),
                                 wait=self._retry_wait, stop=self._stop_retrying,
                                 sleep=self._wake.pause, reraise=True)
        first = True
        with contextlib.suppress(AttemptFailed):
            async for attempt in retrying:
                with attempt:
                    if not first:
                        await self._maintain(modem)
                        if not self._sim.wants_activation():
                            raise Interrupted
                    first = False
                    await self._attempt(modem)

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
