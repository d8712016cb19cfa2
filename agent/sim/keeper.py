"""The SIM keeper: keeps the SIM in the slot of one modem inside its service terms.

One task (:meth:`SimKeeper.run`) owns every command the keeper sends; orders (suspend, resume,
set-activation-deadline, activate, decommission, clear-malfunction, update-conformance) only
change the lifecycle and wake it, so nothing races on the modem. Each round:

1. maintenance (:class:`agent.sim.slot.SimSlot`): set-up after attach or a modem reset, the
   network's time, the ICCID (a swap opens the new SIM's lifecycle), the lifecycle's tick and
   deadline alarms, the conformance verdict, and enforcement of the radio and data state, so a
   modem that rebooted with its radio on is put back to ``+CFUN=4`` at once (its reset wakes
   the keeper);
2. then, by state: activation attempts spaced by the backoff
   (:class:`agent.sim.activation_loop.ActivationLoop`); a rare probe of a SIM the network barred,
   the watch on an active SIM, or the listening window of a held radio
   (:class:`agent.sim.network_watch.NetworkWatch`, :mod:`agent.sim.probation`).

Between rounds it pauses (:class:`agent.sim.shared.Wake`): orders and an attach end any pause;
resets and URCs end only the idle one, never the backoff between activation attempts. A
registration URC (``+CEREG`` and kin, reject fields or not) or a time URC starts a round at once
(a network reject suspends within seconds, not at the poll; a storm of them is throttled:
:meth:`agent.sim.network_watch.NetworkWatch.look_again`).

The channel's hang listener counts one malfunction signal per hang episode, its reset listener
one per spontaneous reset (resets the agent asked for are not malfunctions); a malfunction is
reported, and the radio stays on. Every reset of the keeper's modem is a ``modem-reset`` event.

One owner runs it: :meth:`run` ends only when its task is cancelled (the daemon's supervisor;
:meth:`start` / :meth:`stop` for tests and tools that run the keeper alone). One keeper per
modem (agent.sim.keepers): each attaches to its modem session's channel (:meth:`attach`)
and gives its gates and :meth:`summary` to what the daemon builds over all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.config import (
    ConformanceConfig,
    LifecycleConfig,
    UplinkConfig,
    canonical_iccid,
)
from agent.core.modem_config import DualSimConfig
from agent.core.store import Store
from agent.core.trusted_time import TrustedClock, load_anchor, save_anchor
from agent.sim.activation import Activator, Probe, default_probe
from agent.sim.activation_loop import ActivationLoop
from agent.sim.conformance import ConformanceError, Format
from agent.sim.dual_sim import DualSim
from agent.sim.lifecycle import LifecycleError, LifecycleRepository, Readings, Scope
from agent.sim.network_watch import NetworkWatch
from agent.sim.notes import KeeperStore
from agent.sim.rejects import Backoff
from agent.sim.shared import FATAL, Interrupted, KeeperChannel, KeeperError, Wake
from agent.sim.slot import SimSlot
from agent.sim.suspension import Enforcer, Runner, ingest_refusal, run_process, telemetry_allowed
from agent.sim.terminal_guard import TerminalGuard
from drivers.at import Urc
from drivers.channel import Reset
from drivers.errors import ModemError
from drivers.modem import Modem
from drivers.vendors import GENERIC, Profile

__all__ = ["KeeperChannel", "KeeperError", "SimKeeper", "default_probe"]

log = logging.getLogger(__name__)

SUMMARY_MAX_AGE = 10.0  # seconds a summary read from the store is shown without a change
ORDER_WAIT = 30.0  # seconds an order waits for the SIM to be read (after a start)



_TIME_URCS = ("+CTZV", "+CTZE", "+QLTS", "+NITZ", "+CTZEU")
_REG_URCS = ("+CREG", "+CGREG", "+CEREG", "+C5GREG", "+CGEV")


class SimKeeper:
    def __init__(
        self,
        store: Store,
        emit: Callable[..., Any],
        *,
        lifecycle: LifecycleConfig | None = None,
        conformance: ConformanceConfig | None = None,
        operator_key: Path | None = None,
        data_path: str = "agent",
        nm_connection: str | None = None,
        probe: Probe | None = None,
        probe_interface: str | None = None,
        uplink: UplinkConfig | None = None,
        clock: TrustedClock | None = None,
        backoff: Backoff | None = None,
        runner: Runner = run_process,
        mono: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
        slot: str = "modem",
        register_poll: float = 2.0,
        nm_radio: bool = True,
        dual_sim: DualSimConfig | None = None,
        capped: Callable[[str], bool] = lambda _iccid: False,
    ) -> None:
        self.cfg = lc = lifecycle or LifecycleConfig()
        conf = conformance or ConformanceConfig()
        self._emit_raw = emit
        self._on_change = on_change
        self._summaries: list[dict[str, Any]] | None = None  # until the next change...
        self._summaries_at = 0.0  # ...or SUMMARY_MAX_AGE (monotonic seconds)
        notes = KeeperStore(store)
        self.clock = clock or TrustedClock(anchor=load_anchor(store),
                                           persist=lambda a: save_anchor(store, a))
        self._backoff = backoff or Backoff(base=lc.retry_base, cap=lc.retry_cap,
                                           min_delay=lc.retry_min, urgent_cap=lc.retry_urgent,
                                           probe=lc.network_probe_interval)
        self.guard = TerminalGuard(
            notes, list_path=conf.list, signature_path=conf.signature,
            key_path=operator_key, malfunction_resets=conf.malfunction_resets,
            malfunction_window=conf.malfunction_window, mono=mono, slot=slot)
        activator = Activator(probe or default_probe(lc, uplink, slot, interface=probe_interface),
                              cid=lc.cid, register_timeout=lc.register_timeout,
                              register_poll=register_poll)
        self._wake = Wake()
        self._sim = SimSlot(
            lc, repo=LifecycleRepository(store), notes=notes, clock=self.clock, guard=self.guard,
            enforcer=Enforcer(data_path=data_path, runner=runner, nm_connection=nm_connection,
                              nm_radio=nm_radio),
            emit=self._emit, mono=mono, slot=slot, on_swap=self._swapped)
        self._network = NetworkWatch(self._sim, activator, self._backoff, self._wake, mono)
        self.dual = (DualSim(dual_sim, self._sim, slot=slot, capped=capped, mono=mono)
                     if dual_sim is not None and dual_sim.enabled else None)
        self._activation = ActivationLoop(self._sim, activator, self._backoff,
                                          network=self._network, wake=self._wake,
                                          maintain=self._maintain)
        self._unlisten: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self.slot = slot  # which modem's SIM slot (agent.sim.keepers names them)
        self.last_error: str | None = None  # the last modem error of a round

    @property
    def next_delay(self) -> float | None:  # the last backoff delay chosen
        return self._sim.next_delay

    # -- running -----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the keeper in a task of its own (tests, tools); :meth:`stop` ends it. The daemon
        does not: its supervisor runs :meth:`run` and cancels it."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="sim-keeper")
        return self._task

    async def stop(self) -> None:
        """End the task :meth:`start` made, and let go of the modem. Idempotent; it touches no
        other task (a keeper under a supervisor is stopped by cancelling its task)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.detach()

    def attach(self, channel: KeeperChannel, profile: Profile = GENERIC) -> None:
        """A modem is ready on ``channel`` (after :meth:`Modem.init`; ``profile`` is what it
        identified). The keeper listens to its hangs, resets and URCs and takes it from here."""
        self.detach()
        self._sim.modem = Modem(channel, profile)
        self._unlisten = [channel.add_reset_listener(self.note_reset),
                          channel.add_hang_listener(self.note_hang),
                          channel.add_urc_listener(self._on_urc)]
        self._sim.setup_needed = True
        if self.dual is not None:
            self.dual.attached()
        self._kick()

    def detach(self) -> None:
        """The modem's port is gone (the session will attach again when it is back)."""
        for remove in self._unlisten:
            remove()
        self._unlisten = []
        self._sim.modem = None

    async def run(self) -> None:
        """The keeper's rounds, until the task is cancelled (the only way it ends: a supervised
        restart after a failure starts it again from the store, and undoes nothing)."""
        self.guard.load()
        self.reload_manifest()
        while True:
            delay = self.cfg.poll_interval
            modem = self._sim.modem
            if modem is None:
                self._wake.mark()  # nothing to look at until an attach
            else:
                try:
                    await self._round(modem)
                    delay = self._idle_delay()
                except Interrupted:
                    delay = 0.0
                except FATAL as exc:
                    log.warning("SIM keeper: modem port lost: %s", exc)
                    if self._sim.modem is modem:
                        self.detach()
                except ModemError as exc:
                    self.last_error = str(exc)
                    log.warning("SIM keeper: %s", exc)
                    delay = min(delay, 5.0) if self._dirty else delay
                except (LifecycleError, ValueError) as exc:  # an order raced the round
                    log.warning("SIM keeper: %s", exc)
                    delay = 0.0
                self._changed()
            await self._wake.idle(delay)

    def _idle_delay(self) -> float:
        """The poll interval, or less when a probe or a dual-SIM step falls due or a listening
        window opens or closes sooner."""
        sooner = (self._sim.probation.until_change(),
                  self.dual.until_due() if self.dual is not None else None)
        return min([self._network.delay(self.cfg.poll_interval),
                    *(s for s in sooner if s is not None)])

    async def _round(self, modem: Modem) -> None:
        await self._maintain(modem)
        if self.dual is not None and await self.dual.step(modem):
            self._swapped()  # the other SIM: read it next round (a barred one probed at once)
            self._network.probe_at = 0.0 if self.dual.errand == "probe" else None
            raise Interrupted
        sim = self._sim
        lc = sim.lc
        if lc is None:
            return
        if sim.wants_activation():
            await self._activation.run(modem)
            if self.dual is not None and self.dual.errand == "activate":
                raise Interrupted  # a standby SIM's errand: back to the primary at once
        elif sim.network_barred() and sim.may_emit()[0]:
            await self._network.barred(modem)
        elif lc.state == "active" and sim.may_emit()[0]:
            await self._network.watch(modem)
        elif sim.listening:
            await self._network.listen(modem)

    async def _maintain(self, modem: Modem) -> None:
        self._wake.mark()
        await self._sim.maintain(modem)

    def _swapped(self) -> None:
        self._network.reset()  # the new SIM is neither barred nor backed off
        self._activation.reset()

    @property
    def _dirty(self) -> bool:
        return self._wake.dirty

    def _kick(self) -> None:
        self._summaries = None  # an order or a new modem: the summaries change
        self._wake.kick()

    def _changed(self) -> None:
        self._summaries = None
        try:
            self._on_change()
        except Exception:
            log.exception("SIM keeper on_change hook failed")

    def _emit(self, kind: str, /, **fields: Any) -> None:
        try:
            self._emit_raw(kind, **fields)
        except Exception:
            log.exception("SIM keeper: event %s not emitted", kind)

    # -- hooks -------------------------------------------------------------------------------

    def note_hang(self, what: str) -> None:
        """The modem stopped answering (the channel's hang listener: once per hang episode,
        however many commands time out until it answers again; the channel recovers it)."""
        self._malfunction_signal(f"modem hung ({what})")

    def note_reset(self, reason: str) -> None:
        """The modem restarted (the channel's reset listener): re-apply everything. Only a
        reset nobody asked for is a malfunction signal: not the channel's recovery of a hang
        (the hang was counted), not the ``reset-modem`` order."""
        self._sim.setup_needed = True
        cause = reason.cause if isinstance(reason, Reset) else "spontaneous"
        self._emit("modem-reset", iccid=self.iccid, reason=str(reason), cause=cause)
        if cause == "spontaneous":
            self._malfunction_signal(f"modem reset ({reason})")
        self._wake.interrupt()

    def _malfunction_signal(self, what: str) -> None:
        if self.guard.record(what):
            malfunction = self.guard.malfunction or {}
            log.error("terminal malfunction: %s; reported, the radio stays on",
                      malfunction.get("reason"))
            self._emit("malfunction", iccid=self.iccid, reason=malfunction.get("reason"),
                       message="terminal malfunction: modem hangs or resets; radio stays on")
            self._changed()

    def _on_urc(self, urc: Urc) -> None:
        prefix = urc.prefix
        if prefix == "+CPIN":
            self._wake.interrupt()  # a SIM inserted, removed or swapped: look again
        elif prefix in _TIME_URCS:
            self._sim.next_time_sync = 0.0
            self._network.look_again()
        elif prefix in _REG_URCS:  # registered, searching, denied (with its cause)
            self._network.look_again()

    # -- orders (the commands module calls these; each raises KeeperError or LifecycleError) --

    async def sim_known(self, timeout: float = ORDER_WAIT) -> None:
        """Return once the SIM in the modem is known, or after ``timeout`` seconds (an order
        that waited at the broker arrives before the first round read the SIM)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._sim.known.wait()

    def suspend(self, scope: Scope, until: float | None = None, reason: str = "",
                readings: Readings = "keep") -> None:
        self._sim.current().suspend(scope, until, reason, readings=readings)
        self._kick()

    def resume(self, reason: str = "order") -> None:
        self._sim.current().resume(reason)
        self._backoff.reset()
        self._kick()

    def set_deadline(self, deadline: float, iccid: str | None = None) -> None:
        if iccid is not None and not self._sim.is_current(iccid):
            self._sim.open(canonical_iccid(iccid)).set_deadline(deadline)
        else:
            self._sim.current().set_deadline(deadline)
        self._kick()

    def activate(self) -> None:
        """Try now (the ``activate`` order): the backoff starts over."""
        lc = self._sim.current()
        if lc.state not in ("awaiting-activation", "activating", "active"):
            raise KeeperError(f"SIM {lc.iccid} is {lc.state}: nothing to activate")
        self._backoff.reset()
        self._kick()

    def decommission(self, *, announce: bool = True) -> None:
        """The contract ended: radio off for good, lifecycle ``terminated``; the SIM goes back.
        ``announce=False``: the caller (:mod:`agent.sim.decommission`) emitted the event itself."""
        lc = self._sim.current()
        lc.decommission()
        if announce:
            self._emit("decommissioned", iccid=lc.iccid,
                       message="decommissioned: return the SIM")
        self._kick()

    def retire(self) -> None:
        """The gateway was decommissioned: radio off (``+CFUN=0``) and no activation for any
        SIM in the slot, re-applied every round, until this process ends."""
        self._sim.retired = True
        self._kick()

    def clear_malfunction(self) -> bool:
        cleared = self.guard.clear_malfunction()
        if cleared:
            self._emit("malfunction-cleared", iccid=self.iccid)
        self._kick()
        return cleared

    def update_conformance(self, data: bytes, signature: str, fmt: Format) -> None:
        try:
            self.guard.update(data, signature, fmt)
        except ConformanceError as exc:
            raise KeeperError(f"conformance list refused: {exc}") from None
        self._sim.reported = False  # report the new verdict
        self._kick()

    def reload_manifest(self, path: Path | None = None) -> None:
        path = path or self.cfg.manifest
        if path is not None:
            self._sim.load_manifest(path)

    # -- gates and what it shows -------------------------------------------------------------

    @property
    def iccid(self) -> str | None:
        return self._sim.iccid

    @property
    def seen(self) -> bool:  # a SIM was read in this slot, now or before a restart
        return (self._sim.lc or self._sim.last_seen) is not None

    @property
    def attached(self) -> bool:
        return self._sim.modem is not None

    def telemetry_allowed(self) -> bool:
        """Readings may go up (not during a listening window: that is for orders only)."""
        lc = self._sim.lc or self._sim.last_seen
        if self._sim.listening:
            return False
        return lc is None or telemetry_allowed(lc.state, lc.suspension)

    def accepting(self) -> str | None:
        lc = self._sim.lc or self._sim.last_seen
        return None if lc is None else ingest_refusal(lc.state, lc.suspension)

    def summary(self, iccid: str | None = None) -> dict[str, Any] | None:
        """One SIM for ``state`` and ``simkeeper status``; the current one by default (None
        when no SIM was seen yet)."""
        return self._sim.summary(iccid)

    def summaries(self) -> list[dict[str, Any]]:
        """Every SIM this store has seen, the current one first: read from the store once per
        change (each keeper round, order or attach) and at least every
        :data:`SUMMARY_MAX_AGE` seconds (attempts within a round), not every time the state is
        compared; ``time_left`` is as of that read."""
        now = time.monotonic()
        if self._summaries is None or now - self._summaries_at > SUMMARY_MAX_AGE:
            self._summaries, self._summaries_at = self._sim.summaries(), now
        return self._summaries
