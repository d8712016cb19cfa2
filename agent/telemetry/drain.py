"""What every uplink shares: the outbox it drains, its settings, and the drain loop.

The ``Drainer`` takes readings from the outbox, batches them (agent.telemetry.batch), paces them
(agent.telemetry.pacing) and hands each batch to a transport (MQTT or HTTP). A reading leaves the
outbox only when the transport reports its batch acknowledged. It wakes on the outbox's
listener, on an acknowledgement, or on the latency timer of a partial batch: never a poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Protocol

from agent.core.backoff import Backoff
from agent.telemetry.batch import EncodedBatch, encode_entries, fit
from agent.telemetry.outbox import EVENTS, TELEMETRY, USAGE, Reading
from agent.telemetry.pacing import RateLimiter

log = logging.getLogger(__name__)

# Order of service when several streams have work: alarms first, bulk telemetry last.
STREAMS = (EVENTS, USAGE, TELEMETRY)

StrPath = str | PathLike[str]


class OutboxLike(Protocol):
    """The part of agent.telemetry.outbox.Outbox that an uplink uses."""

    async def fetch(self, stream: str, max_count: int, max_bytes: int) -> Sequence[Reading]: ...
    def ack_soon(self, ids: Sequence[str]) -> None: ...
    def depth(self, stream: str | None = None) -> tuple[int, int]: ...
    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]: ...


class UplinkSettings(Protocol):
    """The ``[uplink]`` table (agent.core.config.UplinkConfig fits it)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def profile(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def tls(self) -> bool: ...
    @property
    def ca(self) -> StrPath | None: ...
    @property
    def cert(self) -> StrPath | None: ...
    @property
    def key(self) -> StrPath | None: ...
    @property
    def allow_plain(self) -> bool: ...
    @property
    def keepalive(self) -> int: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password_file(self) -> StrPath | None: ...
    @property
    def batch_max_count(self) -> int: ...
    @property
    def batch_max_bytes(self) -> int: ...
    @property
    def batch_max_latency(self) -> float: ...
    @property
    def rate_messages_per_minute(self) -> float: ...
    @property
    def rate_bytes_per_minute(self) -> float: ...
    @property
    def reconnect_min(self) -> float: ...
    @property
    def reconnect_max(self) -> float: ...
    @property
    def http_url(self) -> str: ...


class BatchRejected(Exception):
    """The far end refused a batch (MQTT 5 PUBACK failure, HTTP non-2xx, transport error)."""


class Transport(Protocol):
    """Carries batches: ``submit`` returns a future done when the far end acknowledged the
    batch, or failed with BatchRejected. Submit only while ``ready``."""

    @property
    def ready(self) -> bool: ...
    async def wait_ready(self) -> None: ...
    def submit(self, stream: str, batch: EncodedBatch) -> asyncio.Future[None]: ...


@dataclass(slots=True)
class UplinkStats:
    batches: int = 0  # batches acknowledged
    readings: int = 0  # readings acknowledged (and removed from the outbox)
    filtered: int = 0  # readings the allow() hook dropped (usage plan throttling)
    rejected: int = 0  # batches refused by the far end (sent again after a backoff)
    wire_bytes: int = 0  # payload bytes of acknowledged batches
    json_bytes: int = 0  # the same batches as uncompressed JSON


class Drainer:
    """Moves readings from the outbox to a transport, at most ``window`` batches in flight.

    ``allow(reading)`` (usage plan throttling) may refuse a reading: it is then dropped from
    the outbox unsent and counted in ``stats.filtered``, since deferring it would spend the
    same plan later. ``set_telemetry_allowed(False)`` (a ``telemetry`` suspension) holds the
    telemetry stream in the outbox; events and usage keep flowing.
    """

    def __init__(
        self,
        outbox: OutboxLike,
        transport: Transport,
        device_id: str,
        settings: UplinkSettings,
        *,
        window: int,
        compress: bool = True,
        allow: Callable[[Reading], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._transport = transport
        self._device_id = device_id
        self._max_count = settings.batch_max_count
        self._max_bytes = settings.batch_max_bytes
        self._latency = settings.batch_max_latency
        self._limiter = RateLimiter(
            settings.rate_messages_per_minute,
            settings.rate_bytes_per_minute,
            min_burst_bytes=settings.batch_max_bytes,
        )
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._window = window
        self._compress = compress
        self._allow = allow
        self._clock = clock
        self._wall = wall
        self._telemetry_allowed = True
        self._inflight: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._inflight_ids: set[str] = set()
        self._pending_since: dict[str, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.stats = UplinkStats()

    @property
    def limiter(self) -> RateLimiter:
        """Control messages (state, results) are charged here, so they count against the rate."""
        return self._limiter

    def wake(self) -> None:
        """Thread-safe: the outbox may call its listeners from an executor thread."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def set_telemetry_allowed(self, allowed: bool) -> None:
        self._telemetry_allowed = allowed
        self._wake.set()

    async def run(self) -> None:
        remove = self._outbox.add_listener(self.wake)
        try:
            await self._drain()
        finally:
            remove()
            if self._timer:
                self._timer.cancel()
            for _, future in list(self._inflight.values()):
                future.cancel()  # unacknowledged: the readings stay in the outbox

    async def _drain(self) -> None:
        while True:
            self._wake.clear()
            if self._failed:
                self._failed = False
                await asyncio.sleep(self._backoff.next_delay())
            await self._transport.wait_ready()
            picked = await self._pick() if len(self._inflight) < self._window else None
            if picked is None:
                await self._wake.wait()
                continue
            stream, batch = picked
            await self._limiter.acquire(len(batch.payload))
            # The link may have dropped, or telemetry been suspended, while we waited.
            if self._transport.ready and self._open(stream):
                self._submit(stream, batch)

    def _open(self, stream: str) -> bool:
        return self._telemetry_allowed or stream != TELEMETRY

    async def _fetch(self, stream: str) -> list[Reading]:
        """The stream's oldest readings not already in flight, after the allow() hook."""
        # In-flight readings are still the oldest in the outbox: ask for that much more.
        spare = 1 + sum(1 for s, _ in self._inflight.values() if s == stream)
        flying = set(self._inflight_ids)  # one acked during the fetch may still be in its rows
        rows = await self._outbox.fetch(stream, self._max_count * spare, self._max_bytes * spare)
        fresh = [r for r in rows if r.id not in flying and r.id not in self._inflight_ids]
        if self._allow is not None:
            verdicts = [(r, self._allow(r)) for r in fresh]
            if dropped := [r.id for r, ok in verdicts if not ok]:
                self._outbox.ack_soon(dropped)
                self.stats.filtered += len(dropped)
                fresh = [r for r, ok in verdicts if ok]
        return fresh[: self._max_count]

    async def _pick(self) -> tuple[str, EncodedBatch] | None:
        now = self._clock()
        next_due: float | None = None
        for stream in STREAMS:
            # An empty stream (the outbox counts in memory) costs no trip to the store's thread.
            wanted = self._open(stream) and self._outbox.depth(stream)[0] > 0
            readings = await self._fetch(stream) if wanted else []
            if not readings:
                self._pending_since.pop(stream, None)
                continue
            entries = fit(self._device_id, readings, self._max_bytes)
            full = len(entries) < len(readings) or len(entries) >= self._max_count
            # A partial batch waits at most the latency from its OLDEST reading's commit, not
            # from when the drainer first saw it: the tail of a backlog goes at once.
            waited = max(0.0, self._wall() - readings[0].created)
            since = min(self._pending_since.setdefault(stream, now), now - waited)
            due = since + (self._latency if stream == TELEMETRY else 0.0)
            if full or now >= due:
                del self._pending_since[stream]
                ids = [r.id for r in readings[: len(entries)]]
                return stream, encode_entries(
                    self._device_id, ids, entries, compress=self._compress
                )
            next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            if self._timer:
                self._timer.cancel()
            self._timer = self._loop.call_later(next_due - now, self._wake.set)
        return None

    def _submit(self, stream: str, batch: EncodedBatch) -> None:
        future = self._transport.submit(stream, batch)
        self._inflight[batch.batch_id] = (stream, future)
        self._inflight_ids.update(batch.ids)
        future.add_done_callback(lambda f: self._done(batch, f))

    def _done(self, batch: EncodedBatch, future: asyncio.Future[None]) -> None:
        self._inflight.pop(batch.batch_id, None)
        self._inflight_ids.difference_update(batch.ids)
        self._wake.set()
        if future.cancelled():
            return
        if (exc := future.exception()) is not None:
            log.warning("batch %s refused, will resend: %s", batch.batch_id, exc)
            self.stats.rejected += 1
            self._failed = True
            return
        self._outbox.ack_soon(batch.ids)
        self._backoff.reset()
        stats = self.stats
        stats.batches += 1
        stats.readings += len(batch.ids)
        stats.wire_bytes += len(batch.payload)
        stats.json_bytes += batch.json_size
