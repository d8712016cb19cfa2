"""The SIM in the slot of the keeper's modem, and what it is held to.

:meth:`SimSlot.maintain` is the part of every keeper round that runs whatever the SIM's state:
set-up after attach or a modem reset (``AT+CTZU=1``, the identity for conformance), the
network's time into the :class:`~agent.core.trusted_time.TrustedClock`, the ICCID compared
canonically (a new SIM opens its own lifecycle, deadline from the manifest; the old one hears
``sim-swapped``), the lifecycle's tick and deadline alarms, the conformance verdict, and
enforcement (:mod:`agent.sim.suspension`): the radio level and data state the lifecycle and the
verdict ask for, re-applied every round. A malfunction (modem hangs and spontaneous resets) is
reported, never a reason to keep quiet; a radio held off by a stop-emission order or the
conformance policy is on during rare listening windows (:mod:`agent.sim.probation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.config import LifecycleConfig, canonical_iccid
from agent.core.trusted_time import TrustedClock
from agent.sim.alarms import DeadlineAlarms
from agent.sim.conformance import Verdict
from agent.sim.lifecycle import Lifecycle, LifecycleError, LifecycleRepository, events_emitter
from agent.sim.manifest import ManifestError, SimEntry, load_manifest
from agent.sim.notes import KeeperStore
from agent.sim.probation import Probation
from agent.sim.shared import FATAL, KeeperError
from agent.sim.summary import sim_summary
from agent.sim.suspension import Enforcer, NmMode, Want, plan
from agent.sim.terminal_guard import TerminalGuard
from drivers.errors import ModemError
from drivers.modem import Identity, Modem

log = logging.getLogger("agent.sim.keeper")  # the keeper's parts log as one


class SimSlot:
    def __init__(self, cfg: LifecycleConfig, *, repo: LifecycleRepository, notes: KeeperStore,
                 clock: TrustedClock, guard: TerminalGuard, enforcer: Enforcer,
                 emit: Callable[..., None], mono: Callable[[], float], slot: str,
                 on_swap: Callable[[], None]) -> None:
        self.cfg = cfg
        self.notes = notes
        self.clock = clock
        self.guard = guard
        self.enforcer = enforcer
        self._repo = repo
        self.emit = emit
        self._mono = mono
        self._slot = slot
        self._on_swap = on_swap  # a new SIM: its activation starts from scratch
        self.alarms = DeadlineAlarms(notes, emit, cfg.alarms)
        self._manifest: dict[str, SimEntry] = {}
        self.modem: Modem | None = None  # None while no modem is attached
        self.lc: Lifecycle | None = None  # None until an ICCID was read
        # Until then, the SIM last seen in the slot: its suspension holds across a restart
        # (readings stay in the outbox until the modem says which SIM is there).
        self.card = 1  # the modem's SIM slot in use (a dual-SIM modem: agent.sim.dual_sim)
        known = self.known_in(1)
        self.last_seen = self.open(known) if known else None
        self.setup_needed = True
        self.next_time_sync = 0.0
        self._identity: Identity | None = None
        self.mcc: str | None = None
        self._verdict: Verdict | None = None
        self.reported: dict[str, Any] | bool | None = False  # False: nothing reported yet
        self.want: Want | None = None
        self.probing = False
        self._nm_tried: NmMode | None = None
        self.next_delay: float | None = None  # the last backoff delay chosen
        self.retired = False  # decommissioned: radio off whatever SIM is in the slot
        self.known = asyncio.Event()  # set once a SIM has been read in the slot
        self.probation = Probation(cfg.probation_interval, cfg.probation_window, mono=mono)
        self.listening = False  # a listening window is open: the held radio is on

    def _known_key(self, card: int) -> str:
        return f"iccid.{self._slot}" if card == 1 else f"iccid.{self._slot}.sim{card}"

    def known_in(self, card: int) -> str | None:
        """The ICCID last read in the modem's SIM slot ``card`` (1-based), if any."""
        known = self.notes.get(self._known_key(card))
        return canonical_iccid(known) if isinstance(known, str) else None

    def use_card(self, card: int) -> None:
        """The modem switched to its SIM slot ``card``: that card's SIM is the one to read
        (not a swap: each card keeps its own last ICCID)."""
        self.card, self.lc, self.mcc, self.reported = card, None, None, False
        known = self.known_in(card)
        self.last_seen = self.open(known) if known else None

    @property
    def iccid(self) -> str | None:
        return self.lc.iccid if self.lc is not None else None

    def current(self) -> Lifecycle:
        if self.lc is None:
            raise KeeperError("no SIM known yet in this modem")
        return self.lc

    def is_current(self, iccid: str | None) -> bool:
        return iccid is None or (self.lc is not None and canonical_iccid(iccid) == self.lc.iccid)

    def open(self, iccid: str) -> Lifecycle:
        """The lifecycle of a SIM by its canonical ICCID (its events go out)."""
        return self._repo.open(iccid, emit=events_emitter(self.emit), clock=self.clock.now)

    # -- what the rounds ask -----------------------------------------------------------------

    def may_emit(self) -> tuple[bool, str]:
        if self.retired:
            return False, "decommissioned"
        verdict = self._verdict
        if verdict is not None and not verdict.radio_allowed:
            return False, "terminal does not conform: " + "; ".join(
                f.reason for f in verdict.failures)
        return True, ""

    def wants_activation(self) -> bool:
        lc = self.lc
        return (lc is not None and self.modem is not None
                and lc.state in ("awaiting-activation", "activating") and self.may_emit()[0])

    def network_barred(self) -> bool:
        lc = self.lc
        return (lc is not None and lc.state == "suspended" and lc.suspension is not None
                and lc.suspension.source == "network")

    def time_left(self) -> float | None:
        """Seconds to the activation deadline; None when none or the SIM was activated."""
        lc = self.lc
        if lc is None or lc.record.activated_at is not None:
            return None
        return self.clock.time_left(lc.record.deadline)

    def apn(self, iccid: str) -> str:
        entry = self._manifest.get(iccid)
        return entry.apn if entry is not None and entry.apn else self.cfg.apn

    # -- each round --------------------------------------------------------------------------

    async def maintain(self, modem: Modem) -> None:
        if self.setup_needed:
            await self._setup(modem)
        await self._sync_time(modem)
        await self._check_sim(modem)
        lc = self.lc
        if lc is not None:
            lc.tick()
            self.alarms.check(lc.record, self.clock.now())
        self.judge()
        await self.enforce(modem)

    async def _setup(self, modem: Modem) -> None:
        with contextlib.suppress(ModemError):
            await modem.channel.command("AT+CTZU=1")
        try:
            identity = await modem.identity()
        except FATAL:
            raise
        except ModemError:
            return
        if identity.imei is not None:
            self._identity = identity
            self.setup_needed = False
            self.next_time_sync = 0.0

    async def _sync_time(self, modem: Modem) -> None:
        now = self._mono()
        if now < self.next_time_sync:
            return
        try:
            network = await modem.network_time()
        except FATAL:
            raise
        except ModemError as exc:
            log.debug("no network time: %s", exc)
            self.next_time_sync = now + min(self.cfg.time_sync_interval, 300.0)
            return
        self.next_time_sync = now + self.cfg.time_sync_interval
        if self.clock.observe_network(network.when) and self.lc is not None:
            self.lc.tick()

    async def _check_sim(self, modem: Modem) -> None:
        try:
            iccid = canonical_iccid(await modem.iccid())
        except FATAL:
            raise
        except ModemError as exc:
            log.debug("no ICCID: %s", exc)  # absent, busy or unreadable: not a swap
            return
        if self.lc is None or self.lc.iccid != iccid:
            self._switch_to(iccid)

    def _switch_to(self, iccid: str) -> None:
        new = self.open(iccid)
        self.apply_manifest(new)
        known = self.notes.get(self._known_key(self.card))
        old = self.lc
        if old is None and isinstance(known, str) and canonical_iccid(known) != iccid:
            old = self.open(canonical_iccid(known))
        if old is not None and old.iccid != iccid:
            log.warning("SIM swapped: %s -> %s", old.iccid, iccid)
            if old.can("sim-swapped"):
                old.on_swap(new)
            else:
                self.emit("sim-swapped", iccid=old.iccid, new_iccid=iccid, state=old.state)
            self.mcc = None
            self.reported = False  # conformance is re-run and reported for the new SIM
            self._on_swap()
        if known != iccid:
            self.notes.put(self._known_key(self.card), iccid)
        self.lc = new
        self.known.set()

    def judge(self) -> None:
        self._verdict = verdict = self.guard.verdict(self._identity, self.mcc)
        payload = verdict.to_json() if verdict is not None else None
        if payload is not None and payload != self.reported:
            level = "conforming" if verdict and verdict.conforming else "not conforming"
            log.log(logging.INFO if level == "conforming" else logging.WARNING,
                    "terminal %s: %s", level, payload["failures"])
            self.emit("conformance", iccid=self.iccid, **payload)
        self.reported = payload

    async def read_operator(self, modem: Modem) -> None:
        try:
            mcc_mnc = (await modem.operator()).mcc_mnc
        except FATAL:
            raise
        except ModemError:
            return
        if mcc_mnc and mcc_mnc != self.mcc:
            self.mcc = mcc_mnc
            self.judge()

    async def enforce(self, modem: Modem) -> None:
        lc = self.lc
        ok, why = self.may_emit()
        want = plan(lc.state if lc else None, lc.suspension if lc else None, may_emit=ok,
                    why_not=why, probing=self.probing)
        if self.retired:
            want = Want("off", True, "decommissioned")
        self.want = want = self._listen(want)
        await self.enforcer.apply_modem(modem, want)
        mode = want.nm_mode
        if mode != self._nm_tried:
            self._nm_tried = mode
            previous = self.notes.get("nm_mode")
            if await self.enforcer.apply_nm(mode, previous if previous in (
                    "on", "data-off", "radio-off") else None):
                self.notes.put("nm_mode", mode)

    def _held_for(self) -> str | None:
        """Why the radio is held off on evidence that the terminal misbehaves on the air (a
        way back is kept: listening windows); None when it is not, or for good."""
        lc = self.lc
        if self.retired or lc is None or lc.state in ("terminated", "expired"):
            return None
        verdict = self._verdict
        if verdict is not None and not verdict.radio_allowed:
            return "terminal does not conform"
        susp = lc.suspension
        if (lc.state == "suspended" and susp is not None and susp.source == "operator"
                and susp.scope == "radio"):
            return "stop-emission order"
        return None

    def _listen(self, want: Want) -> Want:
        """``want``, or the radio on while a listening window is open."""
        why = self._held_for() if want.radio == "low-power" else None
        listening = self.probation.update(why is not None)
        if listening != self.listening:
            self.listening = listening
            _, until = self.probation.times()
            if listening:
                log.warning("radio held off (%s): on until %.0f to listen for orders", why, until)
                self.emit("listening", iccid=self.iccid, reason=why, until=until)
            else:
                log.info("listening window over")
        if not listening:
            return want
        lc = self.lc
        activated = lc is not None and lc.record.activated_at is not None
        return Want("on", not activated, f"listening for orders ({why})")

    # -- the manifest ------------------------------------------------------------------------

    def load_manifest(self, path: Path) -> None:
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            log.error("SIM manifest not used: %s", exc)
            return
        for problem in manifest.errors:
            log.error("SIM manifest %s: %s (row skipped)", path, problem)
        self._manifest = dict(manifest.entries)
        if self.lc is not None:
            self.apply_manifest(self.lc)

    def apply_manifest(self, lc: Lifecycle) -> None:
        entry = self._manifest.get(lc.iccid)
        if entry is None or lc.record.deadline is not None:
            return  # an order's deadline wins over the factory's
        try:
            lc.set_deadline(entry.deadline)
        except (LifecycleError, ValueError) as exc:
            log.warning("SIM %s: manifest deadline not applied: %s", lc.iccid, exc)

    # -- what it shows -----------------------------------------------------------------------

    def summary(self, iccid: str | None = None) -> dict[str, Any] | None:
        """One SIM for ``state`` and ``simkeeper status``; the current one by default (None
        when no SIM was seen yet)."""
        lc: Lifecycle | None
        if iccid is not None and not self.is_current(iccid):
            lc = self._repo.open(canonical_iccid(iccid), emit=lambda _e: None,
                                 clock=self.clock.now)
        else:
            lc = self.lc
        if lc is None:
            return None
        current = lc is self.lc
        want = self.want if current else None
        listen_at, listen_until = self.probation.times()
        return sim_summary(
            lc.record, self.notes.notes(lc.iccid), self.clock, current=current,
            verdict=self._verdict if current else None, terminal=self.guard.summary(),
            enforced=None if want is None else {
                "radio": want.radio, "data_down": want.data_down, "why": want.why,
                "networkmanager_error": self.enforcer.nm_error,
                "listen_at": listen_at, "listen_until": listen_until},
            next_delay=self.next_delay if current else None)

    def summaries(self) -> list[dict[str, Any]]:
        """Every SIM this store has seen, the current one first."""
        iccids = [r.iccid for r in self._repo.all()]
        if self.lc is not None and self.lc.iccid in iccids:
            iccids.remove(self.lc.iccid)
            iccids.insert(0, self.lc.iccid)
        return [s for i in iccids if (s := self.summary(i)) is not None]
