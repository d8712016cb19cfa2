"""The daemon: composition only. It builds every part of the agent once, starts them under one
:class:`~agent.core.tasks.Supervisor`, and stops them in order.

Start: the store (a decommissioned gateway refuses to start), outbox, events, usage meter,
trusted clock, SIM keepers (one per modem, agent.sim.keepers), command processor and its inbox,
the uplinks (MQTT; the Unified Endpoint for readings where configured), the modem sessions (each
carries its slot's SIM keeper and an SMS command reader, feeds the usage meter, and is
reachable by the AT console under its slot's name), health and state reports, the ingest
socket; then ``READY=1``.

Stop (SIGTERM/SIGINT, see :mod:`agent.cli.run`), in reverse: ``STOPPING=1``; the ingest socket
answers the lines already queued and closes; a decommission under way is cancelled; every
supervised part is cancelled (keeper, sessions, reports, commands, drains); the uplinks say the
retained ``offline`` and disconnect; the runtime row is written a last time; the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.commands import diagnosis_host
from agent.commands.at_console import AtConsole
from agent.commands.handlers import handlers
from agent.commands.inbox import CommandInbox
from agent.commands.metrics import CountingProcessor, Metrics
from agent.commands.processor import CommandProcessor, Result
from agent.commands.sms import SmsCommands
from agent.core import runtime
from agent.core.config import Config
from agent.core.modem_config import slot_name
from agent.core.sdnotify import Notifier
from agent.core.store import Store
from agent.core.tasks import Supervisor
from agent.core.trusted_time import TrustedClock, load_anchor, save_anchor
from agent.modem.ports import ModemPorts
from agent.modem.session import Observe
from agent.sim import decommission
from agent.sim.keeper import SimKeeper
from agent.sim.keepers import SimKeepers, keeper_from_config
from agent.telemetry.events import Events
from agent.telemetry.health import HealthReporter
from agent.telemetry.ingest import IngestServer
from agent.telemetry.outbox import Outbox, Reading
from agent.telemetry.state import Snapshot, StateReporter
from agent.telemetry.uplinks import Uplinks
from agent.usage.meter import SAVE_INTERVAL, Counters, UsageMeter
from drivers.channel import AtChannel
from drivers.vendors import Profile

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Parts:
    """Every part of a running agent, built at once by :func:`build`."""

    supervisor: Supervisor
    store: Store
    outbox: Outbox
    events: Events
    usage: UsageMeter
    clock: TrustedClock
    keepers: SimKeepers
    commands: CommandProcessor
    inbox: CommandInbox
    sms: SmsCommands
    uplinks: Uplinks
    modems: ModemPorts
    health: HealthReporter
    reporter: StateReporter
    decommissioner: decommission.Decommissioner
    ingest: IngestServer
    metrics: Metrics

    def snapshot(self) -> Snapshot:
        """What ``status`` and the retained ``state`` show, from memory."""
        return Snapshot(modems=self.modems.summaries(), uplink=self.uplinks.state(),
                        sims=self.keepers.summaries(), tasks=self.supervisor.status(),
                        usage=self.usage.reported, decommissioned=self.decommissioner.marker)

    def usage_reports(self) -> list[dict[str, Any]]:
        """Every SIM's usage report, from the meter's memory (no query per SIM each time)."""
        return self.usage.reports(self.modems.iccids())


class _SlotHooks:
    """What rides on a modem (agent.modem.session.SessionHooks): its slot's SIM keeper, an SMS
    command reader, and the AT console's way to it (by slot)."""

    def __init__(self, keeper: SimKeeper, sms: SmsCommands, supervisor: Supervisor,
                 console: AtConsole, index: int) -> None:
        self._keeper = keeper
        self._sms = sms
        self._supervisor = supervisor
        self._console = console
        self._slot = slot_name(index)
        self._task = "sms commands" if index == 0 else f"sms commands {self._slot}"

    def attached(self, channel: AtChannel, profile: Profile) -> None:
        self._keeper.attach(channel, profile)
        self._console.attach(channel, self._slot)
        self._supervisor.spawn(self._task, lambda: self._sms.serve(channel))

    def detached(self) -> None:
        self._keeper.detach()
        self._console.detach(self._slot)
        self._supervisor.cancel(self._task)


def build(cfg: Config, store: Store, *, config_path: Path | None = None,
          restart: tuple[float, float] = (1.0, 60.0),
          heartbeat: float = runtime.HEARTBEAT) -> Parts:
    """Every part, wired; nothing runs yet. Callbacks name parts built further down: they are
    only called once everything is started."""
    # Built further down (the parts call each other back):
    uplinks: Uplinks
    modems: ModemPorts
    decommissioner: decommission.Decommissioner
    parts: Parts
    changed = asyncio.Event()  # something shown changed: the state reporter compares soon
    supervisor = Supervisor(*restart, on_change=changed.set)
    outbox = Outbox(store, max_bytes=cfg.outbox.max_bytes, max_age=cfg.outbox.max_age,
                    drop_policy=cfg.outbox.drop_policy, on_drop=_log_drop,
                    durability=cfg.store.durability, sync_interval=cfg.store.sync_interval,
                    journal_bytes=cfg.outbox.journal_bytes,
                    min_free_bytes=cfg.outbox.min_free_bytes)
    events = Events(outbox)
    usage = UsageMeter(store, outbox, events, cfg.usage, save_interval=SAVE_INTERVAL)
    clock = TrustedClock(anchor=load_anchor(store),
                         persist=lambda anchor: save_anchor(store, anchor))

    def gates_changed() -> None:
        uplinks.set_telemetry_allowed(keepers.telemetry_allowed()
                                      and not decommissioner.active)
        changed.set()

    keepers = SimKeepers(lambda index: keeper_from_config(
        cfg, store, events.emit, index=index, clock=clock, on_change=gates_changed,
        capped=lambda iccid: usage.cap(iccid) in ("throttle", "stop")))
    at_console = AtConsole(cfg.commands.at_allow, keepers, emit=events.emit,
                           decommissioned=lambda: decommissioner.active)

    def publish_result(result: Result) -> None:
        uplinks.publish_result(result)
        decommissioner.note_result()

    def allow(reading: Reading) -> bool:
        return usage.allowed(reading.topic, reading.priority)

    def slot_parts(index: int) -> tuple[_SlotHooks, Observe]:
        slot = slot_name(index)

        async def observe(iccid: str, source: str, counters: Counters, epoch: str) -> None:
            await store.run(lambda: usage.observe(iccid, source, counters, epoch=epoch,
                                                  slot=slot))

        return _SlotHooks(keepers.slot(index), sms, supervisor, at_console, index), observe

    commands = CountingProcessor(
        store, cfg.device_id, _operator_keys(cfg), clock,
        handlers(keepers, usage, store, state=lambda: parts.reporter.state(),
                 reset_modem=lambda iccid: modems.reset(iccid),
                 decommission=lambda: decommissioner.begin(), at_console=at_console,
                 diagnose=lambda: diagnosis_host.live(cfg, parts, config_path)),
    )
    inbox = CommandInbox(commands, publish_result)
    uplinks = Uplinks(cfg, outbox, supervisor, on_command=inbox.put, allow=allow)
    sms = SmsCommands(commands, publish=uplinks.publish_result,
                      mqtt_ready=lambda: uplinks.ready, emit=events.emit)
    health = HealthReporter(outbox, lambda: modems.summaries(), interval=cfg.health.interval)
    modems = ModemPorts(cfg.modem, supervisor, slot_parts=slot_parts, on_change=changed.set,
                        on_ready=health.kick)
    decommissioner = decommission.Decommissioner(decommission.Plant(
        cfg=cfg, config_path=config_path, store=store, outbox=outbox, events=events,
        keepers=keepers, gates_changed=gates_changed,
        publish_state=lambda: parts.reporter.publish_now(), stop_uplinks=uplinks.stop,
    ))
    reporter = StateReporter(store, cfg.device_id, changed, snapshot=lambda: parts.snapshot(),
                             usage=lambda: parts.usage_reports(),
                             publish=uplinks.publish_state, heartbeat=heartbeat)
    ingest = IngestServer(
        outbox, cfg.ingest.socket, group=cfg.ingest.group,
        max_line=cfg.ingest.max_reading_bytes, max_clients=cfg.ingest.max_clients,
        client_timeout=cfg.ingest.client_timeout,
        gates=(usage.accepting, keepers.accepting, decommissioner.accepting),
    )
    metrics = Metrics(cfg.metrics, cfg.device_id, snapshot=lambda: parts.snapshot(),
                      usage=lambda: parts.usage_reports(), outbox=outbox,
                      results=commands.results)
    parts = Parts(supervisor, store, outbox, events, usage, clock, keepers, commands, inbox, sms,
                  uplinks, modems, health, reporter, decommissioner, ingest, metrics)
    gates_changed()  # a suspension from before a restart holds from the first batch on
    return parts


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Notifier | None = None,
        heartbeat: float = runtime.HEARTBEAT,
        restart_min: float = 1.0,
        restart_max: float = 60.0,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # where cfg came from: the bundle's keys and certificate
        self.notifier = notifier or Notifier()
        self.heartbeat = heartbeat
        self._restart = (restart_min, restart_max)
        self.parts: Parts | None = None  # while running
        self.serving = asyncio.Event()  # set once READY=1 went (the demo waits for it)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. Raises StoreError or IngestError when it cannot start,
        :class:`agent.sim.decommission.Decommissioned` when it must not."""
        store = Store(self.cfg.store.path)
        outbox: Outbox | None = None
        try:
            reprovisioned = decommission.check_start(store, self.cfg, self.config_path)
            self.parts = parts = build(self.cfg, store, config_path=self.config_path,
                                       restart=self._restart, heartbeat=self.heartbeat)
            outbox = parts.outbox
            if reprovisioned is not None:
                parts.events.emit("re-provisioned", decommissioned_at=reprovisioned.get("at"),
                                  old_cert_sha256=reprovisioned.get("cert_sha256"))
            async with contextlib.AsyncExitStack() as stack:
                await self._start(parts, stack)
                self.notifier.ready(f"serving {self.cfg.ingest.socket}")
                self.serving.set()
                log.info("simkeeper %s: running", self.cfg.device_id)
                await stop.wait()
                self.notifier.stopping()
                log.info("simkeeper %s: stopping", self.cfg.device_id)
        finally:
            store.close()
            if outbox is not None:
                outbox.close()
            self.notifier.close()

    async def _start(self, p: Parts, stack: contextlib.AsyncExitStack) -> None:
        # Stopped in reverse: ingest first (answers owed), the decommission under way, every
        # supervised part, the uplinks (retained "offline"), and the runtime row last.
        stack.push_async_callback(p.reporter.final)
        await p.uplinks.start()
        stack.push_async_callback(p.uplinks.stop)
        stack.push_async_callback(p.supervisor.stop)
        stack.push_async_callback(p.decommissioner.close)
        sup = p.supervisor
        p.keepers.start(sup.spawn)
        sup.spawn("commands", p.inbox.run)
        stack.callback(p.modems.start())
        sup.spawn("health", p.health.run)
        sup.spawn("state", p.reporter.run)
        sup.spawn("usage report", self._report_usage)
        for name, part in p.metrics.parts().items():
            sup.spawn(name, part)
        if (interval := self.notifier.watchdog_interval) is not None:
            sup.spawn("watchdog", lambda: self._watchdog(interval))
        await p.ingest.start()
        stack.push_async_callback(p.ingest.close)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _report_usage(self) -> None:
        assert self.parts is not None
        usage, store = self.parts.usage, self.parts.store
        while True:
            await asyncio.sleep(self.cfg.usage.publish_interval)
            await store.run(usage.publish)


def _operator_keys(cfg: Config) -> list[bytes]:
    """The pinned operator key, if any. An unreadable one is logged and leaves none: every
    command is then refused ("unknown key"), the rest of the agent runs."""
    path = cfg.commands.operator_key
    if path is None:
        return []
    try:
        return [path.read_bytes()]
    except OSError as exc:
        log.error("commands.operator_key %s unreadable (%s): refusing every command",
                  path, exc.strerror or exc)
        return []


def _log_drop(count: int, size: int, reason: str) -> None:
    log.warning("outbox full: dropped %d readings (%d bytes) by %s", count, size, reason)
