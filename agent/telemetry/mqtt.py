"""The MQTT uplink: readings, state, status and command results up; commands down.

Topics (DESIGN.md) live under ``{prefix}/{device_id}/``. Everything goes at QoS 1. A batch's
readings leave the outbox only on its PUBACK; unacknowledged batches stay with paho and are
sent again (DUP) on the next connection, and after a crash the outbox rebuilds them with the
same batch ids. ``status`` carries a retained ``online``, and the last will ``offline``;
``stop()`` publishes ``offline`` itself, since a clean DISCONNECT discards the will.

Settings are validated by agent.core.config (TLS or allow_plain, beam keepalive 5-1200 s, cert
with key). Profiles: ``default`` speaks MQTT 5 and falls back to 3.1.1 when the broker does not
speak it (agent.telemetry.mqtt_client); ``beam`` (SORACOM Beam) speaks 3.1.1 with a clean
session, keepalive within 5-1200 s, and relies on no stored session.

The ``default`` profile keeps a session at the broker (``session_expiry`` seconds, MQTT 5; a
3.1.1 session without clean session under the same client id), so a command published while
the gateway is away waits there and runs when it is back (the command journal runs each id once,
and an expired one is answered ``rejected``). It subscribes again on every connection anyway.

Reconnects wait with exponential backoff and full jitter. A connection proves itself with its
first PUBACK: the backoff then starts again from ``reconnect_min``, so a broker back from a short
restart is rejoined at once, while one that kicks us right after CONNACK meets the same growing
delays as one that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.backoff import Backoff
from agent.core.tasks import Spawn, Work, retry_forever
from agent.telemetry.batch import EncodedBatch
from agent.telemetry.drain import (
    BatchRejected,
    Drainer,
    OutboxLike,
    UplinkSettings,
    UplinkStats,
)
from agent.telemetry.mqtt_client import (
    CONNECT_TIMEOUT,
    Dialect,
    LastError,
    connect,
    new_client,
)
from agent.telemetry.outbox import Reading
from agent.telemetry.paho import PahoDriver
from agent.telemetry.tls import describe

log = logging.getLogger(__name__)

class MqttUplink:
    """One MQTT session for the device: drains the outbox, carries state, results, commands.

    Wiring (the daemon)::

        uplink = MqttUplink(cfg.uplink, cfg.device_id, outbox,
                            on_command=commands.handle, allow=usage.allow)
        await uplink.start()
        uplink.set_telemetry_allowed(not suspended_for_telemetry)
        uplink.publish_state({...}); uplink.publish_result({...})
        ...
        await uplink.stop()
    """

    def __init__(
        self,
        settings: UplinkSettings,
        device_id: str,
        outbox: OutboxLike,
        *,
        on_command: Callable[[bytes], None] | None = None,
        allow: Callable[[Reading], bool] | None = None,
        window: int = 4,
        compress: bool = True,
        carry_readings: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        self._settings = settings
        self._backoff = backoff or Backoff(settings.reconnect_min, settings.reconnect_max)
        self._base = f"{settings.prefix}/{device_id}"
        self._device_id = device_id
        self._outbox = outbox
        self._on_command = on_command
        self._allow = allow
        self._window = window
        self._compress = compress
        self._carry_readings = carry_readings
        self._dialect = Dialect(settings.profile)
        # A session the broker keeps while we are away, so that commands sent meanwhile wait
        # for us; SORACOM Beam keeps none (fleet send publishes again instead).
        self._persistent = settings.profile != "beam" and settings.session_expiry > 0
        self._state: bytes | None = None
        self._telemetry_allowed = True
        self._unsent: list[tuple[str, bytes]] = []  # results produced while offline
        self._pending: dict[int, asyncio.Future[None]] = {}  # mid -> PUBACK
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._driver: PahoDriver | None = None
        self._drainer: Drainer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.parts: tuple[str, ...] = ()  # names of the parts given to spawn()
        self.connect_attempts = 0
        self.last_error: str | None = None  # why the last connection failed or ended, in words
        self.last_error_at: float | None = None
        self._paho_errors = LastError()

    # -- public API ---------------------------------------------------------------------------

    def topic(self, name: str) -> str:
        """``{prefix}/{device_id}/{name}``: telemetry, state, usage, events, status, cmd, ..."""
        return f"{self._base}/{name}"

    @property
    def ready(self) -> bool:
        """Connected, CONNACK received: publishes go out now."""
        return self._connected.is_set()

    async def wait_ready(self) -> None:
        await self._connected.wait()

    @property
    def stats(self) -> UplinkStats:
        return self._drainer.stats if self._drainer else UplinkStats()

    @property
    def protocol(self) -> MQTTProtocolVersion:
        return self._dialect.version

    @property
    def speaks(self) -> str:
        """The MQTT version in use, and whether the broker made us fall back: ``status``."""
        return f"MQTT {self._dialect.name}" + (" (the broker's only)" if self._dialect.settled
                                                and self._settings.profile != "beam" else "")

    async def start(self, spawn: Spawn | None = None) -> None:
        """Start connecting and draining; returns at once (the link may be down for hours).
        ``spawn(name, work)`` runs the long-running parts (the daemon's supervisor); without
        it they run in tasks of the uplink's own, which :meth:`stop` ends."""
        self._driver = PahoDriver(self._new_client())
        work: dict[str, Work] = {"mqtt connection": self._connect_loop}
        if self._carry_readings:
            self._drainer = Drainer(
                self._outbox,
                self,
                self._device_id,
                self._settings,
                window=self._window,
                compress=self._compress,
                allow=self._allow,
            )
            self._drainer.set_telemetry_allowed(self._telemetry_allowed)
            work["mqtt drain"] = self._drainer.run
        if spawn is None:
            self._tasks = [asyncio.create_task(w(), name=n) for n, w in work.items()]
        else:
            for name, w in work.items():
                spawn(name, w)
        self.parts = tuple(work)

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish a retained ``offline``, disconnect cleanly, and end the uplink's own tasks
        (parts run by a supervisor are the supervisor's to stop, first)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        driver = self._driver
        if driver is None:
            return
        client = driver.client
        if client.is_connected():
            offline = self._publish("status", b"offline", retain=True)
            with contextlib.suppress(TimeoutError, BatchRejected):
                async with asyncio.timeout(timeout):
                    await offline
            client.disconnect()
            if self._lost is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await asyncio.shield(self._lost)
        self._connected.clear()
        await driver.close()
        self._end_pending(None)

    def set_telemetry_allowed(self, allowed: bool) -> None:
        """False under a ``telemetry`` suspension: readings wait in the outbox; state, events,
        usage and commands keep flowing. Said before :meth:`start`, it holds from the first
        batch."""
        self._telemetry_allowed = allowed
        if self._drainer:
            self._drainer.set_telemetry_allowed(allowed)

    def publish_state(self, state: dict[str, Any]) -> asyncio.Future[None] | None:
        """Retained ``state``; the latest one is published again on every connection. Its
        PUBACK's future when it went now, None while offline."""
        self._state = _json(state)
        return self._publish("state", self._state, retain=True) if self.ready else None

    def publish_result(self, result: dict[str, Any]) -> None:
        """``cmd/result``: ``{"id", "status", "detail"}``; kept in memory while offline."""
        payload = _json(result)
        if self.ready:
            self._publish("cmd/result", payload)
        else:
            self._unsent.append(("cmd/result", payload))

    # -- Transport (for the Drainer) ------------------------------------------------------------

    def submit(self, stream: str, batch: EncodedBatch) -> asyncio.Future[None]:
        return self._publish(stream, batch.payload, charged=True)

    # -- connection management ------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = new_client(self._settings, self._settings.client_id or self._device_id,
                            self._dialect.version, persistent=self._persistent,
                            will=self.topic("status"), errors=self._paho_errors.logger)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _blocking_connect(self) -> None:
        """Runs in the connect thread: touches only the client that is not yet on the loop."""
        assert self._driver is not None
        connect(self._driver.client, self._settings, persistent=self._persistent)

    async def _connect_loop(self) -> None:
        async def attempt() -> None:
            if await self._connect_once():
                await self._serve()

        await retry_forever(attempt, self._backoff)

    async def _connect_once(self) -> bool:
        assert self._driver is not None
        loop = asyncio.get_running_loop()
        self.connect_attempts += 1
        self._paho_errors.message = None
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        try:
            await self._driver.connect(self._blocking_connect)
            async with asyncio.timeout(CONNECT_TIMEOUT):  # not wait_for: see agent.core.tasks
                reason = await asyncio.shield(self._connack)
        except OSError as exc:  # refused, unreachable, TLS handshake, no CONNACK in time
            self._failed(f"connect to {self._settings.host}:{self._settings.port} with MQTT "
                         f"{self._dialect.name} failed: {describe(exc)}")
            if not self._connack.cancel():  # already failed by on_disconnect: mark it seen
                self._connack.exception()
            self._driver.client.disconnect()  # closes a socket left open; harmless otherwise
            if isinstance(exc, _ClosedEarly) and self._dialect.closed(str(exc)):
                await self._new_driver()
            return False
        if reason.value == 0:  # a 3.1.1-style refusal seen by an MQTT 5 client is not >= 0x80
            self._dialect.connected()
            return True
        self._failed(f"broker refused the connection: {reason}")
        if self._dialect.refused(reason):
            await self._new_driver()
        return False

    async def _new_driver(self) -> None:
        """A client of the other protocol version for the next attempt."""
        assert self._driver is not None
        await self._driver.close()
        self._end_pending(BatchRejected(f"client replaced for MQTT {self._dialect.name}"))
        self._driver = PahoDriver(self._new_client())

    async def _serve(self) -> None:
        """One connected session: subscribe, announce, flush, then wait for its end."""
        assert self._driver is not None and self._lost is not None
        self._driver.client.subscribe(self.topic("cmd"), qos=1)
        self._publish("status", b"online", retain=True)
        if self._state is not None:
            self._publish("state", self._state, retain=True)
        unsent, self._unsent = self._unsent, []
        for name, payload in unsent:
            self._publish(name, payload)
        self._connected.set()
        try:
            await asyncio.shield(self._lost)
        finally:
            self._connected.clear()

    def _publish(
        self, name: str, payload: bytes, *, retain: bool = False, charged: bool = False
    ) -> asyncio.Future[None]:
        """QoS 1 publish; the future is done on PUBACK. Control messages are charged to the
        rate limiter without waiting (the drainer already waited for batches)."""
        assert self._driver is not None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not charged and self._drainer:
            self._drainer.limiter.charge(len(payload))
        info = self._driver.client.publish(self.topic(name), payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            future.set_exception(BatchRejected(mqtt.error_string(info.rc)))
        else:
            self._pending[info.mid] = future  # NO_CONN: paho keeps it for the next connection
        return future

    def _failed(self, error: str) -> None:
        log.warning("MQTT %s", error)
        self.last_error, self.last_error_at = error, time.time()

    def _end_pending(self, error: BatchRejected | None) -> None:
        """Fail (or, on stop, cancel) every publish still waiting for its PUBACK."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if future.done():
                continue
            if error is None:
                future.cancel()
            else:
                future.set_exception(error)

    # -- paho callbacks (on the loop) -----------------------------------------------------------

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        log.info("MQTT connection closed: %s", reason)
        if self._connack is not None and not self._connack.done():
            why = self._paho_errors.message  # TLS 1.3: the broker's alert comes on a read
            detail = f"{reason}: {why}" if why else str(reason)
            self._connack.set_exception(_ClosedEarly(f"closed before CONNACK: {detail}"))
        elif self._connected.is_set() and reason.is_failure:
            why = self._paho_errors.message
            self._failed(describe(f"connection lost: {reason}" + (f": {why}" if why else "")))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason: ReasonCode,
        _properties: Properties,
    ) -> None:
        self._backoff.reset()  # a PUBACK: this connection works (see the module docstring)
        future = self._pending.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(BatchRejected(f"PUBACK {reason}"))
        else:
            future.set_result(None)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.topic("cmd") or self._on_command is None:
            return
        try:
            self._on_command(bytes(msg.payload))
        except Exception:
            log.exception("command handler failed")


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _ClosedEarly(ConnectionError):
    """The broker (or the network) closed the connection before any CONNACK."""
