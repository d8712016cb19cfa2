"""The daemon: every part of the agent on one asyncio loop, wired once, stopped in order.

Start: the store, outbox, events and usage meter; the uplink (MQTT, or the Unified Endpoint for
readings with MQTT kept for commands and state); a modem session per port (named in config, or
each AT port hotplug finds when ``[modem] port = "auto"``); then the ingest socket, and
``READY=1`` to systemd. Stop (SIGTERM/SIGINT, see :mod:`agent.cmd_run`): ``STOPPING=1``, answer
the ingest lines already queued, stop the sessions, publish the retained ``offline`` and
disconnect, write the runtime row a last time, close the store.

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
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent.cmd_status import HEARTBEAT
from agent.config import Config
from agent.events import Events
from agent.health import HealthReporter
from agent.http_uplink import HttpUplink
from agent.ingest import Gate, IngestServer
from agent.outbox import Outbox, Reading
from agent.ratelimit import Backoff
from agent.sdnotify import Notifier
from agent.session import ModemSession
from agent.store import Store
from agent.uplink import MqttUplink
from agent.usage import Counters, UsageMeter
from drivers.hotplug import Hotplug, PortMatch

log = logging.getLogger(__name__)

_TICK = 1.0  # how often the in-memory view is compared with what was last written
_COMMAND_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


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
        poll_interval: float = 60.0,
        health_interval: float = 300.0,
        heartbeat: float = HEARTBEAT,
        restart_min: float = 1.0,
        restart_max: float = 60.0,
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.poll_interval = poll_interval
        self.health_interval = health_interval
        self.heartbeat = heartbeat
        self._restart = (restart_min, restart_max)
        # The lifecycle's telemetry suspension: None, or why new readings are refused.
        self.telemetry_gate: Gate = lambda: None
        self.sessions: dict[str, ModemSession] = {}
        self.started_at = time.time()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()
        self._stopped_at: float | None = None
        self.serving = asyncio.Event()  # set once READY=1 went (the demo waits for it)

    # -- the parts, for the live view and the lifecycle -------------------------------------------

    store: Store
    outbox: Outbox
    usage: UsageMeter
    mqtt: MqttUplink
    readings_uplink: MqttUplink | HttpUplink
    health: HealthReporter

    # -- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set. Raises StoreError or IngestError when it cannot start."""
        self.store = store = Store(self.cfg.store.path)
        try:
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
        self.usage = UsageMeter(self.store, self.outbox, Events(self.outbox), cfg.usage)
        self.health = HealthReporter(
            self.outbox, lambda: list(self.sessions.values()), interval=self.health_interval
        )
        # Closed in reverse: ingest first (answers owed), then tasks, sessions, uplink.
        await self._start_uplinks()
        stack.push_async_callback(self._stop_uplinks)
        stack.push_async_callback(self._stop_tasks)
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
            gates=(self.usage.accepting, self._telemetry_refusal),
        )
        await ingest.start()
        stack.push_async_callback(ingest.close)

    def _telemetry_refusal(self) -> str | None:
        return self.telemetry_gate()  # looked up per line: the lifecycle replaces the gate

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
            http = HttpUplink(cfg.uplink, cfg.device_id, self.outbox, allow=allow)
        self.mqtt = MqttUplink(
            cfg.uplink, cfg.device_id, self.outbox, on_command=self._on_command, allow=allow,
            carry_readings=http is None,
        )
        self.readings_uplink = http or self.mqtt
        await self.mqtt.start()
        if http is not None:
            await http.start()

    async def _stop_uplinks(self) -> None:
        if self.readings_uplink is not self.mqtt:
            await self.readings_uplink.stop()
        await self.mqtt.stop()  # the retained "offline"

    def _on_command(self, payload: bytes) -> None:
        """Until the commands module exists: refuse every command, saying why."""
        try:
            envelope = json.loads(payload)
        except ValueError:
            envelope = None
        cid = envelope.get("id") if isinstance(envelope, dict) else None
        why = "commands are not configured on this agent"
        if self.cfg.commands.operator_key is None:
            why += " (no [commands] operator_key)"
        self.mqtt.publish_result({
            "id": cid if isinstance(cid, str) and _COMMAND_ID.fullmatch(cid) else None,
            "status": "rejected",
            "detail": why,
        })

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
        metering = any(s.observe is not None for s in self.sessions.values())
        session = ModemSession(
            path, baud=self.cfg.modem.baud, poll_interval=self.poll_interval,
            interface=self.cfg.modem.interface, observe=None if metering else self._observe,
            on_change=self._changed.set, on_ready=self.health.kick,
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), _TICK)

    def _state(self, snap: dict[str, Any]) -> dict[str, Any]:
        """The retained ``state``; lifecycle, suspension and conformance come with issue 3."""
        return {
            "device_id": self.cfg.device_id,
            "ts": time.time(),
            "started_at": self.started_at,
            "lifecycle": None,
            "suspension": None,
            "conformance": None,
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
                " (id, pid, started_at, heartbeat, stopped_at, modems, uplink, usage)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (
                    os.getpid(), self.started_at, now, self._stopped_at,
                    json.dumps(snap["modems"]), json.dumps(snap["uplink"]),
                    json.dumps(self._usage()),
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
    return modems, snap["uplink"]["state"]


def _log_drop(count: int, size: int, reason: str) -> None:
    log.warning("outbox full: dropped %d readings (%d bytes) by %s", count, size, reason)
