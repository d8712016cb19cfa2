"""The daemon: every part of the agent on one asyncio loop, wired once, stopped in order.

Start: the store, outbox, events, usage meter, trusted clock, SIM keeper and command processor;
the uplink (MQTT, or the Unified Endpoint for readings with MQTT kept for commands and state); a
modem session per port (named in config, or each AT port hotplug finds when ``[modem] port =
"auto"``), the first of which carries the SIM keeper and the SMS command reader; then the
ingest socket, and ``READY=1`` to systemd. Stop (SIGTERM/SIGINT, see :mod:`agent.cli.run`):
``STOPPING=1``, answer the ingest lines already queued, stop the keeper and the sessions,
publish the retained ``offline`` and disconnect, write the runtime row a last time, close the
store.

Every long-running part runs under :func:`supervise`: an unexpected exception is logged and the
part started again after a capped, jittered backoff; nothing but a stop ends the daemon.

The runtime row (table ``runtime``, read by ``simkeeper status``) and the retained ``state``
are written when something they show changes, and the row's heartbeat at most once per
``heartbeat`` seconds, to spare the SD card.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.status import HEARTBEAT
from agent.commands import handlers
from agent.commands.processor import CommandProcessor, Result, mqtt_callback
from agent.commands.sms import ModemSmsReply, Reply, SmsCommandReader
from agent.core.backoff import Backoff
from agent.core.config import Config
from agent.core.sdnotify import Notifier
from agent.core.store import Store
from agent.core.tasks import wait_event
from agent.core.trusted_time import TrustedClock, load_anchor, save_anchor
from agent.modem.session import ModemSession
from agent.sim import decommission
from agent.sim.keeper import SimKeeper
from agent.telemetry.events import Events
from agent.telemetry.health import HealthReporter
from agent.telemetry.ingest import IngestServer
from agent.telemetry.mqtt import MqttUplink
from agent.telemetry.outbox import Outbox, Reading
from agent.usage.meter import Counters, UsageMeter
from drivers.channel import AtChannel
from drivers.errors import ModemError
from drivers.hotplug import Hotplug, PortMatch
from drivers.vendors import Profile

if TYPE_CHECKING:
    from agent.telemetry.http import HttpUplink

log = logging.getLogger(__name__)

_TICK = 1.0  # how often the in-memory view is compared with what was last written
_SMS_RETRY = 30.0  # a modem that refused the SMS set-up is asked again after this long


async def supervise(name: str, work: Callable[[], Awaitable[None]], backoff: Backoff) -> None:
    """Run ``work()`` for ever: log whatever ends it and start it again after ``backoff``
    (reset once a run outlasted the backoff's cap). Only cancellation stops it."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await work()
            log.error("%s ended unexpectedly; starting it again", name)
        except Exception:
            log.exception("%s failed; starting it again", name)
        if loop.time() - started > backoff.cap:
            backoff.reset()
        await asyncio.sleep(backoff.next_delay())


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        notifier: Notifier | None = None,
        heartbeat: float = HEARTBEAT,
        restart_min: float = 1.0,
        restart_max: float = 60.0,
        config_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path  # where cfg came from: the bundle's keys and certificate
        self.notifier = notifier or Notifier()
        self.poll_interval = cfg.modem.poll_interval
        self.health_interval = cfg.health.interval
        self.heartbeat = heartbeat
        self._restart = (restart_min, restart_max)
        self.sessions: dict[str, ModemSession] = {}
        self.started_at = time.time()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        self._stopped_at: float | None = None
        self.serving = asyncio.Event()  # set once READY=1 went (the demo waits for it)
        self._uplinks_stopped = False
        self._reprovisioned: dict[str, Any] | None = None

    # -- the parts, for the live view and the lifecycle -------------------------------------------

    store: Store
    outbox: Outbox
    events: Events
    usage: UsageMeter
    clock: TrustedClock
    keeper: SimKeeper
    commands: CommandProcessor
    mqtt: MqttUplink
    readings_uplink: MqttUplink | HttpUplink  # HttpUplink only for "unified-endpoint"
    health: HealthReporter
    decommissioner: decommission.Decommissioner

    # -- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. Raises StoreError or IngestError when it cannot start,
        :class:`agent.sim.decommission.Decommissioned` when it must not."""
        self.store = store = Store(self.cfg.store.path)
        try:
            self._reprovisioned = decommission.check_start(store, self.cfg, self.config_path)
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self._final_write)
                await self._start(stack)
                self.notifier.ready(f"serving {self.cfg.ingest.socket}")
                self.serving.set()
                log.info("simkeeper %s: running", self.cfg.device_id)
                await stop.wait()
                self.notifier.stopping()
                log.info("simkeeper %s: stopping", self.cfg.device_id)
        finally:
            store.close()
            self.notifier.close()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.cfg
        self.outbox = Outbox(
            self.store, max_bytes=cfg.outbox.max_bytes, max_age=cfg.outbox.max_age,
            on_drop=_log_drop,
        )
        store = self.store
        self.events = Events(self.outbox)
        self.decommissioner = decommission.Decommissioner(self)
        if (old := self._reprovisioned) is not None:
            self.events.emit("re-provisioned", decommissioned_at=old.get("at"),
                             old_cert_sha256=old.get("cert_sha256"))
        self.usage = UsageMeter(store, self.outbox, self.events, cfg.usage)
        self.health = HealthReporter(
            self.outbox, lambda: list(self.sessions.values()), interval=self.health_interval
        )
        self.clock = TrustedClock(anchor=load_anchor(store),
                                  persist=lambda anchor: save_anchor(store, anchor))
        self.keeper = SimKeeper.from_config(cfg, store, self.events.emit, clock=self.clock,
                                            on_change=self._keeper_changed)
        self.commands = CommandProcessor(store, cfg.device_id, self._operator_keys(),
                                         self.clock, handlers.handlers(self))
        # Closed in reverse: ingest first (answers owed), then the keeper, tasks, sessions,
        # uplink.
        await self._start_uplinks()
        stack.push_async_callback(self.stop_uplinks)
        stack.push_async_callback(self._stop_tasks)
        stack.push_async_callback(self.keeper.stop)
        stack.push_async_callback(self.decommissioner.close)
        self._spawn("sim-keeper", self.keeper.run)
        self._start_sessions(stack)
        self._spawn("health", self.health.run)
        self._spawn("runtime", self._keep_runtime)
        self._spawn("usage-report", self._report_usage)
        if (interval := self.notifier.watchdog_interval) is not None:
            self._spawn("watchdog", lambda: self._watchdog(interval))
        ingest = IngestServer(
            self.outbox, cfg.ingest.socket, group=cfg.ingest.group,
            max_line=cfg.ingest.max_reading_bytes, max_clients=cfg.ingest.max_clients,
            client_timeout=cfg.ingest.client_timeout,
            gates=(self.usage.accepting, self.keeper.accepting, self.decommissioner.accepting),
        )
        await ingest.start()
        stack.push_async_callback(ingest.close)

    def _operator_keys(self) -> list[bytes]:
        """The pinned operator key, if any. An unreadable one is logged and leaves none: every
        command is then refused ("unknown key"), the rest of the agent runs."""
        path = self.cfg.commands.operator_key
        if path is None:
            return []
        try:
            return [path.read_bytes()]
        except OSError as exc:
            log.error("commands.operator_key %s unreadable (%s): refusing every command",
                      path, exc.strerror or exc)
            return []

    def _keeper_changed(self) -> None:
        uplink = getattr(self, "readings_uplink", None)
        if uplink is not None:
            uplink.set_telemetry_allowed(self.keeper.telemetry_allowed()
                                         and not self.decommissioner.active)
        self._changed.set()

    gates_changed = _keeper_changed  # agent.sim.decommission.Plant

    def _spawn(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(*self._restart)
        self._tasks[name] = asyncio.create_task(supervise(name, work, backoff), name=name)

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- uplink -----------------------------------------------------------------------------------

    async def _start_uplinks(self) -> None:
        cfg, usage = self.cfg, self.usage

        def allow(reading: Reading) -> bool:
            return usage.allowed(reading.topic, reading.priority)

        http = None
        if cfg.uplink.kind == "unified-endpoint":
            from agent.telemetry.http import HttpUplink  # http.client only when it is used

            http = HttpUplink(cfg.uplink, cfg.device_id, self.outbox, allow=allow)
        self.mqtt = MqttUplink(
            cfg.uplink, cfg.device_id, self.outbox,
            on_command=mqtt_callback(self.commands, self._publish_result), allow=allow,
            carry_readings=http is None,
        )
        self.readings_uplink = http or self.mqtt
        await self.mqtt.start()
        if http is not None:
            await http.start()

    async def stop_uplinks(self) -> None:
        """The retained ``offline`` and disconnect; at most once (decommission, then stop)."""
        if self._uplinks_stopped:
            return
        self._uplinks_stopped = True
        if self.readings_uplink is not self.mqtt:
            await self.readings_uplink.stop()
        await self.mqtt.stop()  # the retained "offline"

    def _publish_result(self, result: Result) -> None:
        self.mqtt.publish_result(result)
        self.decommissioner.note_result()

    def uplink_state(self) -> dict[str, Any]:
        stats = self.readings_uplink.stats
        connected = self.mqtt.ready
        return {
            "kind": self.cfg.uplink.kind,
            "connected": connected and self._stopped_at is None,
            "state": "stopped" if self._stopped_at else "connected" if connected else "connecting",
            "connect_attempts": self.mqtt.connect_attempts,
            "readings_sent": stats.readings,
            "batches_sent": stats.batches,
        }

    # -- modem sessions ---------------------------------------------------------------------------

    def _start_sessions(self, stack: contextlib.AsyncExitStack) -> None:
        port = self.cfg.modem.port
        if port != "auto":
            self.add_session(port)
            return
        hotplug = Hotplug(self._port_added, self.remove_session)
        try:
            hotplug.start()
        except Exception as exc:  # no udev in a container, no permission for netlink
            log.warning("modem hotplug unavailable (%s): no modem will be found", exc)
            return
        stack.callback(hotplug.stop)

    def _port_added(self, match: PortMatch) -> None:
        self.add_session(match.path)

    def add_session(self, path: str) -> ModemSession:
        # The first modem meters usage and carries the SIM keeper: one SIM slot per gateway.
        first = not any(s.observe is not None for s in self.sessions.values())
        session = ModemSession(
            path, baud=self.cfg.modem.baud, poll_interval=self.poll_interval,
            interface=self.cfg.modem.interface, observe=self._observe if first else None,
            on_change=self._changed.set, on_ready=self.health.kick,
            hooks=self if first else None,
        )
        self.sessions[path] = session
        self._spawn(f"modem {path}", session.run)
        self._changed.set()
        return session

    def remove_session(self, path: str) -> None:
        if self.sessions.pop(path, None) is not None:
            if (task := self._tasks.pop(f"modem {path}", None)) is not None:
                task.cancel()
            self._changed.set()

    # -- what rides on the first modem (agent.modem.session.SessionHooks) --------------------

    def attached(self, channel: AtChannel, profile: Profile) -> None:
        self.keeper.attach(channel, profile)
        self._spawn("sms-commands", lambda: self._sms_commands(channel))

    def detached(self) -> None:
        self.keeper.detach()
        if (task := self._tasks.pop("sms-commands", None)) is not None:
            task.cancel()

    async def _sms_commands(self, channel: AtChannel) -> None:
        """Commands by SMS on this modem, set up again after every modem reset (text mode and
        new-message indications go with it); a modem not ready for it is asked again later."""
        reset = asyncio.Event()
        unlisten = channel.add_reset_listener(lambda _why: reset.set())
        try:
            while True:
                reset.clear()
                reader = SmsCommandReader(channel, self.commands, self._sms_reply(channel))
                try:
                    await reader.start()
                    ready = True
                except ModemError as exc:
                    log.warning("SMS commands not set up yet: %s", exc)
                    ready = False
                try:
                    await wait_event(reset, None if ready else _SMS_RETRY)
                finally:
                    await reader.stop()
        finally:
            unlisten()

    def timed_out(self) -> None:
        self.keeper.note_timeout()

    def _sms_reply(self, channel: AtChannel) -> Reply:
        """Answer by MQTT while the session is up; by SMS when the data path is down."""
        by_sms = ModemSmsReply(channel)

        async def reply(sender: str, result: Result) -> None:
            if self.mqtt.ready:
                self.mqtt.publish_result(result)
            else:
                await by_sms(sender, result)

        return reply

    # -- orders (agent.commands.handlers) ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return self._state(self.snapshot())

    async def reset_modem(self) -> str:
        session = next((s for s in self.sessions.values() if s.hooks is not None), None)
        if session is None:
            raise ModemError("no modem")
        return await session.reset()

    def decommission(self) -> str:
        return self.decommissioner.begin()

    async def in_store(self, fn: Callable[[], Any]) -> Any:
        return await self.store.run(fn)

    async def _observe(self, iccid: str, source: str, counters: Counters, epoch: str) -> None:
        usage = self.usage
        await self.store.run(lambda: usage.observe(iccid, source, counters, epoch=epoch))

    # -- periodic work ----------------------------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _report_usage(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.usage.publish_interval)
            await self.store.run(self.usage.publish)

    def snapshot(self) -> dict[str, Any]:
        """What ``status`` and the retained ``state`` show, from memory."""
        return {
            "modems": [s.summary() for s in self.sessions.values()],
            "uplink": self.uplink_state(),
            "sims": self.keeper.summaries(),
        }

    async def _keep_runtime(self) -> None:
        loop = asyncio.get_running_loop()
        shown: Any = None
        written = -self.heartbeat
        while True:
            self._changed.clear()
            snap = self.snapshot()
            key = _what_shows(snap)
            if key != shown or loop.time() - written >= self.heartbeat:
                await self.store.run(self._write_runtime, snap)
                if key != shown:
                    self.mqtt.publish_state(self._state(snap))
                shown, written = key, loop.time()
            await wait_event(self._changed, _TICK)

    def _state(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The retained ``state``: the SIM in the slot (lifecycle, suspension, conformance),
        every SIM the keeper knows, and the modems."""
        sim = next((s for s in snap["sims"] if s["current"]), None)
        return {
            "device_id": self.cfg.device_id,
            "ts": time.time(),
            "started_at": self.started_at,
            "lifecycle": sim["state"] if sim else None,
            "suspension": sim["suspension"] if sim else None,
            "conformance": sim["conformance"] if sim else None,
            "sim": sim,
            "sims": snap["sims"],
            "modems": snap["modems"],
        }

    def _usage(self) -> list[dict[str, Any]]:
        sims = {s.iccid for s in self.sessions.values()} | {self.usage.sim}
        return [self.usage.report(iccid) for iccid in sorted(i for i in sims if i)]

    def _write_runtime(self, snap: dict[str, Any]) -> None:
        """On the store's thread: the one runtime row."""
        now = time.time()
        with self.store.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runtime"
                " (id, pid, started_at, heartbeat, stopped_at, modems, uplink, usage, sims)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    os.getpid(), self.started_at, now, self._stopped_at,
                    json.dumps(snap["modems"]), json.dumps(snap["uplink"]),
                    json.dumps(self._usage()), json.dumps(snap["sims"]),
                ),
            )

    async def _final_write(self) -> None:
        self._stopped_at = time.time()
        await self.store.run(self._write_runtime, self.snapshot())


def _what_shows(snap: dict[str, Any]) -> Any:
    """The part of a snapshot whose change is worth a write: not signal, counters or times."""
    modems = [
        (m["port"], m["state"], m["reopens"], m["resets"],
         json.dumps({k: v for k, v in (m["modem"] or {}).items() if k != "signal"},
                    sort_keys=True))
        for m in snap["modems"]
    ]
    sims = [{k: v for k, v in sim.items() if k not in ("time_left", "trusted_time")}
            for sim in snap["sims"]]
    return modems, snap["uplink"]["state"], json.dumps(sims, sort_keys=True)


def _log_drop(count: int, size: int, reason: str) -> None:
    log.warning("outbox full: dropped %d readings (%d bytes) by %s", count, size, reason)
