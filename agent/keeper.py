"""The SIM keeper: keeps the SIM in the slot of one modem inside its service terms.

One task (:meth:`SimKeeper.run`) owns every command the keeper sends; orders (suspend, resume,
set-activation-deadline, activate, decommission, clear-malfunction, update-conformance) only
change the lifecycle and wake it, so nothing races on the modem. Each round:

1. set-up after attach or a modem reset (``AT+CTZU=1``, the identity for conformance);
2. the network's time (``+CCLK``) into the :class:`~agent.trusted_time.TrustedClock` every
   ``time_sync_interval``, then ``tick()`` of the lifecycle and the deadline alarms;
3. the ICCID, compared canonically (F padding never makes a swap): a new SIM opens its own
   lifecycle (deadline from the manifest), the old one hears ``sim-swapped``;
4. the conformance verdict (identity, MCC once registered), reported when it changes;
5. enforcement (:mod:`agent.suspension`): the radio level and data state the lifecycle,
   the verdict and a malfunction ask for, re-applied every round, so a modem that rebooted
   with its radio on is put back to ``+CFUN=4`` at once (its reset wakes the keeper);
6. then, by state: activation attempts (:mod:`agent.activation`) retried by tenacity with
   :class:`agent.rejects.Backoff` delays that shrink as the deadline nears; a rare probe of a SIM
   the network barred (permanent reject: suspended, source ``network``); watching an active
   SIM's registration for a permanent reject.

The daemon attaches the keeper to a modem session's channel (:meth:`attach` / :meth:`detach`),
hands :meth:`telemetry_allowed` to the uplink and :meth:`accepting` to the ingest server, and
publishes :meth:`summary` in ``state`` and ``simkeeper status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from agent.activation import Activator, AttemptFailed, Probe, default_probe, reject_of
from agent.alarms import DeadlineAlarms
from agent.config import Config, ConformanceConfig, LifecycleConfig, canonical_iccid
from agent.conformance import ConformanceError, Format, Verdict
from agent.keeper_conformance import TerminalGuard
from agent.keeper_store import KeeperStore
from agent.keeper_summary import sim_summary
from agent.lifecycle import (
    Lifecycle,
    LifecycleError,
    LifecycleRepository,
    Scope,
    events_emitter,
)
from agent.manifest import ManifestError, SimEntry, load_manifest
from agent.rejects import Backoff
from agent.store import Store
from agent.suspension import (
    Enforcer,
    NmMode,
    Runner,
    Want,
    ingest_refusal,
    plan,
    run_process,
    telemetry_allowed,
)
from agent.trusted_time import TrustedClock, load_anchor, save_anchor
from drivers.at import Urc
from drivers.errors import CommandTimeout, ModemError, NotConnected, PortError
from drivers.modem import Identity, Modem
from drivers.vendors import GENERIC, Profile

log = logging.getLogger(__name__)

_FATAL = (PortError, NotConnected)
_TIME_URCS = ("+CTZV", "+CTZE", "+QLTS", "+NITZ", "+CTZEU")
_REG_URCS = ("+CREG", "+CGREG", "+CEREG", "+C5GREG", "+CGEV")


class KeeperChannel(Protocol):
    """What the keeper needs of :class:`drivers.channel.AtChannel`."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]: ...

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...

    def add_reset_listener(self, callback: Callable[[str], None]) -> Callable[[], None]: ...


class KeeperError(Exception):
    """An order the keeper cannot carry out; the message says why."""


class _Interrupted(Exception):
    """An order, reset or swap made the work under way pointless: start a new round."""


class _Counted:
    """The channel as the keeper's :class:`Modem` sees it: each command timeout is a hang."""

    def __init__(self, channel: KeeperChannel, on_timeout: Callable[[], None]) -> None:
        self._channel = channel
        self._on_timeout = on_timeout

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]:
        try:
            return await self._channel.command(cmd, timeout=timeout, expect=expect)
        except CommandTimeout:
            self._on_timeout()
            raise

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]:
        return self._channel.add_urc_listener(callback)


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
        uplink: tuple[str, int] | None = None,
        clock: TrustedClock | None = None,
        backoff: Backoff | None = None,
        runner: Runner = run_process,
        mono: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
        slot: str = "modem",
        register_poll: float = 2.0,
    ) -> None:
        self.cfg = lc = lifecycle or LifecycleConfig()
        conf = conformance or ConformanceConfig()
        self._emit_raw = emit
        self._on_change = on_change
        self._mono = mono
        self._slot = slot
        self._repo = LifecycleRepository(store)
        self._notes = KeeperStore(store)
        self.clock = clock or TrustedClock(anchor=load_anchor(store),
                                           persist=lambda a: save_anchor(store, a))
        self._backoff = backoff or Backoff(base=lc.retry_base, cap=lc.retry_cap,
                                           min_delay=lc.retry_min, urgent_cap=lc.retry_urgent,
                                           probe=lc.network_probe_interval)
        self._alarms = DeadlineAlarms(self._notes, self._emit, lc.alarms)
        self.guard = TerminalGuard(
            self._notes, list_path=conf.list, signature_path=conf.signature,
            key_path=operator_key, malfunction_resets=conf.malfunction_resets,
            malfunction_window=conf.malfunction_window, mono=mono)
        self._enforcer = Enforcer(data_path=data_path, runner=runner, nm_connection=nm_connection)
        self._activator = Activator(probe or default_probe(lc, uplink), cid=lc.cid,
                                    register_timeout=lc.register_timeout,
                                    register_poll=register_poll)
        self._manifest: dict[str, SimEntry] = {}
        self._lc: Lifecycle | None = None
        self._modem: Modem | None = None
        self._unlisten: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._stopping = False
        self._setup_needed = True
        self._identity: Identity | None = None
        self._mcc: str | None = None
        self._verdict: Verdict | None = None
        self._reported: dict[str, Any] | bool | None = False  # False: nothing reported yet
        self._next_time_sync = 0.0
        self._probe_at: float | None = None
        self._probing = False
        self._want: Want | None = None
        self._nm_tried: NmMode | None = None
        self.next_delay: float | None = None  # the last backoff delay chosen
        self.last_error: str | None = None  # the last modem error of a round

    @classmethod
    def from_config(cls, cfg: Config, store: Store, emit: Callable[..., Any],
                    **kwargs: Any) -> SimKeeper:
        kwargs.setdefault("uplink", (cfg.uplink.host, cfg.uplink.port))
        return cls(store, emit, lifecycle=cfg.lifecycle, conformance=cfg.conformance,
                   operator_key=cfg.commands.operator_key, data_path=cfg.modem.data_path,
                   nm_connection=cfg.modem.nm_connection, **kwargs)

    # -- running -----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run(), name="sim-keeper")
        return self._task

    async def stop(self) -> None:
        self.detach()
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def attach(self, channel: KeeperChannel, profile: Profile = GENERIC) -> None:
        """A modem is ready on ``channel`` (after :meth:`Modem.init`; ``profile`` is what it
        identified). The keeper listens to its resets and URCs and takes it from here."""
        self.detach()
        self._modem = Modem(_Counted(channel, self.note_timeout), profile)
        self._unlisten = [channel.add_reset_listener(self.note_reset),
                          channel.add_urc_listener(self._on_urc)]
        self._setup_needed = True
        self._kick()

    def detach(self) -> None:
        """The modem's port is gone (the session will attach again when it is back)."""
        for remove in self._unlisten:
            remove()
        self._unlisten = []
        self._modem = None

    async def run(self) -> None:
        self._stopping = False
        self.guard.load()
        self.reload_manifest()
        while not self._stopping:
            delay = self.cfg.poll_interval
            modem = self._modem
            if modem is not None:
                try:
                    await self._round(modem)
                    delay = self._round_delay()
                except _Interrupted:
                    delay = 0.0
                except _FATAL as exc:
                    log.warning("SIM keeper: modem port lost: %s", exc)
                    if self._modem is modem:
                        self.detach()
                except ModemError as exc:
                    self.last_error = str(exc)
                    log.warning("SIM keeper: %s", exc)
                    delay = min(delay, 5.0) if self._dirty else delay
                except (LifecycleError, ValueError) as exc:  # an order raced the round
                    log.warning("SIM keeper: %s", exc)
                    delay = 0.0
                self._changed()
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when an order, a reset or an attach wakes us."""
        if delay <= 0:
            await asyncio.sleep(0)
        else:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        self._wake.clear()

    def _kick(self) -> None:
        self._dirty = True
        self._wake.set()

    def _changed(self) -> None:
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

    def note_timeout(self) -> None:
        """A command to the modem hung (the session's polls call this too)."""
        self._malfunction_signal("command timeout")

    def note_reset(self, reason: str) -> None:
        """The modem restarted (the channel's reset listener): re-apply everything."""
        self._setup_needed = True
        self._malfunction_signal(f"modem reset ({reason})")
        self._kick()

    def _malfunction_signal(self, what: str) -> None:
        if self.guard.record(what):
            malfunction = self.guard.malfunction or {}
            log.error("terminal malfunction: %s; radio off until an order clears it",
                      malfunction.get("reason"))
            self._emit("malfunction", iccid=self.iccid, reason=malfunction.get("reason"),
                       message="terminal malfunction: radio off, waiting for an order")
            self._kick()

    def _on_urc(self, urc: Urc) -> None:
        prefix = urc.prefix
        if prefix == "+CPIN":
            self._kick()  # a SIM inserted, removed or swapped
        elif prefix in _TIME_URCS:
            self._next_time_sync = 0.0
            self._wake.set()
        elif prefix in _REG_URCS and self._want is not None and self._want.data_down:
            self._wake.set()  # a re-attach may have brought a context back up

    # -- orders (the commands module calls these; each raises KeeperError or LifecycleError) --

    def _current(self) -> Lifecycle:
        if self._lc is None:
            raise KeeperError("no SIM known yet in this modem")
        return self._lc

    def suspend(self, scope: Scope, until: float | None = None, reason: str = "") -> None:
        self._current().suspend(scope, until, reason)
        self._kick()

    def resume(self, reason: str = "order") -> None:
        self._current().resume(reason)
        self._backoff.reset()
        self._kick()

    def set_deadline(self, deadline: float, iccid: str | None = None) -> None:
        if iccid is None or (self._lc is not None and canonical_iccid(iccid) == self._lc.iccid):
            self._current().set_deadline(deadline)
        else:
            self._repo.open(canonical_iccid(iccid), emit=events_emitter(self._emit),
                            clock=self.clock.now).set_deadline(deadline)
        self._kick()

    def activate(self) -> None:
        """Try now (the ``activate`` order): the backoff starts over."""
        lc = self._current()
        if lc.state not in ("awaiting-activation", "activating", "active"):
            raise KeeperError(f"SIM {lc.iccid} is {lc.state}: nothing to activate")
        self._backoff.reset()
        self._kick()

    def decommission(self) -> None:
        """The contract ended: radio off for good, lifecycle ``terminated``; the SIM goes back."""
        lc = self._current()
        lc.decommission()
        self._emit("decommissioned", iccid=lc.iccid,
                   message="decommissioned: return the SIM")
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
        self._reported = False  # report the new verdict
        self._kick()

    def reload_manifest(self, path: Path | None = None) -> None:
        path = path or self.cfg.manifest
        if path is None:
            return
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            log.error("SIM manifest not used: %s", exc)
            return
        for problem in manifest.errors:
            log.error("SIM manifest %s: %s (row skipped)", path, problem)
        self._manifest = dict(manifest.entries)
        if self._lc is not None:
            self._apply_manifest(self._lc)

    def _apply_manifest(self, lc: Lifecycle) -> None:
        entry = self._manifest.get(lc.iccid)
        if entry is None or lc.record.deadline is not None:
            return  # an order's deadline wins over the factory's
        try:
            lc.set_deadline(entry.deadline)
        except (LifecycleError, ValueError) as exc:
            log.warning("SIM %s: manifest deadline not applied: %s", lc.iccid, exc)

    # -- gates -------------------------------------------------------------------------------

    @property
    def iccid(self) -> str | None:
        return self._lc.iccid if self._lc is not None else None

    def telemetry_allowed(self) -> bool:
        lc = self._lc
        return lc is None or telemetry_allowed(lc.state, lc.suspension)

    def accepting(self) -> str | None:
        lc = self._lc
        return None if lc is None else ingest_refusal(lc.state, lc.suspension)

    # -- one round ---------------------------------------------------------------------------

    async def _round(self, modem: Modem) -> None:
        await self._maintain(modem)
        lc = self._lc
        if lc is None:
            return
        if self._wants_activation():
            await self._activation_loop(modem)
        elif self._network_barred() and self._may_emit()[0]:
            if self._probe_at is None:
                self._schedule_probe()
            elif self._mono() >= self._probe_at:
                await self._probe_network(modem)
        elif lc.state == "active" and self._may_emit()[0]:
            await self._watch(modem)

    def _round_delay(self) -> float:
        delay = self.cfg.poll_interval
        if self._probe_at is not None and self._network_barred():
            delay = min(delay, max(0.0, self._probe_at - self._mono()))
        return delay

    async def _maintain(self, modem: Modem) -> None:
        self._dirty = False
        if self._setup_needed:
            await self._setup(modem)
        await self._sync_time(modem)
        await self._check_sim(modem)
        lc = self._lc
        if lc is not None:
            lc.tick()
            self._alarms.check(lc.record, self.clock.now())
        self._judge()
        await self._enforce(modem)

    async def _setup(self, modem: Modem) -> None:
        with contextlib.suppress(ModemError):
            await modem.channel.command("AT+CTZU=1")
        try:
            identity = await modem.identity()
        except _FATAL:
            raise
        except ModemError:
            return
        if identity.imei is not None:
            self._identity = identity
            self._setup_needed = False
            self._next_time_sync = 0.0

    async def _sync_time(self, modem: Modem) -> None:
        now = self._mono()
        if now < self._next_time_sync:
            return
        try:
            network = await modem.network_time()
        except _FATAL:
            raise
        except ModemError as exc:
            log.debug("no network time: %s", exc)
            self._next_time_sync = now + min(self.cfg.time_sync_interval, 300.0)
            return
        self._next_time_sync = now + self.cfg.time_sync_interval
        if self.clock.observe_network(network.when) and self._lc is not None:
            self._lc.tick()

    async def _check_sim(self, modem: Modem) -> None:
        try:
            iccid = canonical_iccid(await modem.iccid())
        except _FATAL:
            raise
        except ModemError as exc:
            log.debug("no ICCID: %s", exc)  # absent, busy or unreadable: not a swap
            return
        if self._lc is None or self._lc.iccid != iccid:
            self._switch_to(iccid)

    def _switch_to(self, iccid: str) -> None:
        emit = events_emitter(self._emit)
        new = self._repo.open(iccid, emit=emit, clock=self.clock.now)
        self._apply_manifest(new)
        known = self._notes.get(f"iccid.{self._slot}")
        old = self._lc
        if old is None and isinstance(known, str) and canonical_iccid(known) != iccid:
            old = self._repo.open(canonical_iccid(known), emit=emit, clock=self.clock.now)
        if old is not None and old.iccid != iccid:
            log.warning("SIM swapped: %s -> %s", old.iccid, iccid)
            if old.can("sim-swapped"):
                old.on_swap(new)
            else:
                self._emit("sim-swapped", iccid=old.iccid, new_iccid=iccid, state=old.state)
            self._mcc = None
            self._reported = False  # conformance is re-run and reported for the new SIM
            self._backoff.reset()
            self._probe_at = None
        if known != iccid:
            self._notes.put(f"iccid.{self._slot}", iccid)
        self._lc = new

    # -- conformance -------------------------------------------------------------------------

    def _judge(self) -> None:
        self._verdict = verdict = self.guard.verdict(self._identity, self._mcc)
        payload = verdict.to_json() if verdict is not None else None
        if payload is not None and payload != self._reported:
            level = "conforming" if verdict and verdict.conforming else "not conforming"
            log.log(logging.INFO if level == "conforming" else logging.WARNING,
                    "terminal %s: %s", level, payload["failures"])
            self._emit("conformance", iccid=self.iccid, **payload)
        self._reported = payload

    def _may_emit(self) -> tuple[bool, str]:
        malfunction = self.guard.malfunction
        if malfunction is not None:
            return False, f"malfunction: {malfunction.get('reason')}"
        verdict = self._verdict
        if verdict is not None and not verdict.radio_allowed:
            return False, "terminal does not conform: " + "; ".join(
                f.reason for f in verdict.failures)
        return True, ""

    async def _read_operator(self, modem: Modem) -> None:
        try:
            mcc_mnc = (await modem.operator()).mcc_mnc
        except _FATAL:
            raise
        except ModemError:
            return
        if mcc_mnc and mcc_mnc != self._mcc:
            self._mcc = mcc_mnc
            self._judge()

    # -- enforcement -------------------------------------------------------------------------

    async def _enforce(self, modem: Modem) -> None:
        lc = self._lc
        ok, why = self._may_emit()
        want = plan(lc.state if lc else None, lc.suspension if lc else None, may_emit=ok,
                    why_not=why, probing=self._probing)
        self._want = want
        await self._enforcer.apply_modem(modem, want)
        mode = want.nm_mode
        if mode != self._nm_tried:
            self._nm_tried = mode
            previous = self._notes.get("nm_mode")
            if await self._enforcer.apply_nm(mode, previous if previous in (
                    "on", "data-off", "radio-off") else None):
                self._notes.put("nm_mode", mode)

    # -- activation --------------------------------------------------------------------------

    def _wants_activation(self) -> bool:
        lc = self._lc
        return (lc is not None and self._modem is not None
                and lc.state in ("awaiting-activation", "activating") and self._may_emit()[0])

    def _time_left(self) -> float | None:
        lc = self._lc
        if lc is None or lc.record.activated_at is not None:
            return None
        return self.clock.time_left(lc.record.deadline)

    def _retry_wait(self, _state: RetryCallState) -> float:
        self.next_delay = self._backoff.next_delay(self._time_left())
        return self.next_delay

    def _stop_retrying(self, _state: RetryCallState) -> bool:
        return not self._wants_activation()

    async def _activation_loop(self, modem: Modem) -> None:
        retrying = AsyncRetrying(retry=retry_if_exception_type(AttemptFailed),
                                 wait=self._retry_wait, stop=self._stop_retrying,
                                 sleep=self._pause, reraise=True)
        first = True
        with contextlib.suppress(AttemptFailed):
            async for attempt in retrying:
                with attempt:
                    if not first:
                        await self._maintain(modem)
                        if not self._wants_activation():
                            raise _Interrupted
                    first = False
                    await self._attempt(modem)

    async def _checkpoint(self) -> None:
        if self._dirty or not self._wants_activation():
            raise _Interrupted

    async def _attempt(self, modem: Modem) -> None:
        lc = self._current()
        deadline = lc.record.deadline
        if (lc.state == "activating" and lc.record.activated_at is None and deadline is not None
                and self.clock.now().lower_bound >= deadline):  # restarted mid-attempt, too late
            lc.activation_failed("activation deadline passed")
            raise _Interrupted
        if lc.state == "awaiting-activation":
            lc.start_activation()
        notes = self._notes.notes(lc.iccid)
        notes.attempts += 1
        notes.last_attempt = self.clock.now().ts
        self._notes.save_notes(lc.iccid, notes)
        entry = self._manifest.get(lc.iccid)
        apn = entry.apn if entry is not None and entry.apn else self.cfg.apn
        try:
            done = await self._activator.attempt(modem, apn, self._checkpoint,
                                                 on_registered=lambda: self._registered(modem))
        except _FATAL:
            raise
        except (AttemptFailed, ModemError) as exc:
            failure = exc if isinstance(exc, AttemptFailed) else AttemptFailed(str(exc))
            self._attempt_failed(lc, failure)
            raise failure from None
        if lc.state != "activating":
            raise _Interrupted
        if done.apn_replaced is not None:
            self._emit("apn-replaced", iccid=lc.iccid, old=done.apn_replaced, new=apn)
        lc.activation_succeeded()
        self._backoff.reset()
        notes.last_error = None
        self._notes.save_notes(lc.iccid, notes)
        log.info("SIM %s active (%s)", lc.iccid, ", ".join(done.addresses))

    async def _registered(self, modem: Modem) -> None:
        await self._read_operator(modem)
        ok, why = self._may_emit()
        if not ok:
            raise AttemptFailed(why)

    def _attempt_failed(self, lc: Lifecycle, failure: AttemptFailed) -> None:
        notes = self._notes.notes(lc.iccid)
        notes.last_error = failure.reason
        self._notes.save_notes(lc.iccid, notes)
        log.warning("SIM %s: activation attempt failed: %s", lc.iccid, failure.reason)
        if failure.reject is not None and lc.can("network-reject") and lc.on_reject(
                failure.reject):
            self._schedule_probe()
            raise _Interrupted from None
        if lc.state == "activating":
            lc.activation_failed(failure.reason)

    # -- network barring ---------------------------------------------------------------------

    def _network_barred(self) -> bool:
        lc = self._lc
        return (lc is not None and lc.state == "suspended" and lc.suspension is not None
                and lc.suspension.source == "network")

    def _schedule_probe(self) -> None:
        self._probe_at = self._mono() + self._backoff.probe_delay(self._time_left())
        self.next_delay = self._probe_at - self._mono()

    async def _probe_network(self, modem: Modem) -> None:
        """Has the network taken the SIM back? One registration (or bearer) try, then back to
        quiet; a success lifts the network suspension and activation runs again."""
        lc = self._current()
        assert lc.suspension is not None
        self._schedule_probe()
        self._probing = True
        try:
            if lc.suspension.scope == "data":
                await self._activator.ensure_active(modem)
            else:
                await modem.set_radio("on")
                await self._activator.wait_registered(modem, self._probe_checkpoint)
        except AttemptFailed as exc:
            log.info("SIM %s still barred: %s", lc.iccid, exc.reason)
            if exc.reject is not None and exc.reject.kind == "permanent":
                lc.on_reject(exc.reject)
        else:
            log.info("SIM %s: the network accepts it again", lc.iccid)
            lc.on_recovered()
            self._probe_at = None
            self._backoff.reset()
            self._dirty = True
        finally:
            self._probing = False
            await self._enforce(modem)

    async def _probe_checkpoint(self) -> None:
        if not self._network_barred():
            raise _Interrupted

    async def _watch(self, modem: Modem) -> None:
        """An active SIM: a permanent reject suspends it; a context the network cut comes back
        up when the agent owns the data path."""
        lc = self._current()
        reg = await modem.registration()
        reject = reject_of(reg)
        if reject is not None and lc.on_reject(reject):
            self._schedule_probe()
            raise _Interrupted
        if reg.state not in ("home", "roaming"):
            return
        if self._mcc is None:
            await self._read_operator(modem)
        if self._enforcer.data_path == "agent":
            try:
                await self._activator.ensure_active(modem)
            except AttemptFailed as exc:
                log.warning("SIM %s: data context not restored: %s", lc.iccid, exc.reason)

    # -- what it shows -----------------------------------------------------------------------

    def summary(self, iccid: str | None = None) -> dict[str, Any] | None:
        """One SIM for ``state`` and ``simkeeper status``; the current one by default (None
        when no SIM was seen yet)."""
        if iccid is None or (self._lc is not None and canonical_iccid(iccid) == self._lc.iccid):
            lc = self._lc
        else:
            lc = self._repo.open(canonical_iccid(iccid), emit=lambda _e: None,
                                 clock=self.clock.now)
        if lc is None:
            return None
        current = lc is self._lc
        want = self._want if current else None
        return sim_summary(
            lc.record, self._notes.notes(lc.iccid), self.clock, current=current,
            verdict=self._verdict if current else None, terminal=self.guard.summary(),
            enforced=None if want is None else {
                "radio": want.radio, "data_down": want.data_down, "why": want.why,
                "networkmanager_error": self._enforcer.nm_error},
            next_delay=self.next_delay if current else None)

    def summaries(self) -> list[dict[str, Any]]:
        """Every SIM this store has seen, the current one first."""
        iccids = [r.iccid for r in self._repo.all()]
        if self._lc is not None and self._lc.iccid in iccids:
            iccids.remove(self._lc.iccid)
            iccids.insert(0, self._lc.iccid)
        return [s for i in iccids if (s := self.summary(i)) is not None]
