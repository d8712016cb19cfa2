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
from agent.telemetry.batch import EncodedBatch, encode_batch
from agent.telemetry.outbox import EVENTS, TELEMETRY, USAGE, Reading
from agent.telemetry.pacing import RateLimiter

log = logging.getLogger(__name__)

# Order of service when several streams have work: alarms first, bulk telemetry last.
STREAMS = (EVENTS, USAGE, TELEMETRY)
# A batch's readings are fetched by their outbox bytes, estimated from the stream's last batch;
# a quarter more than that estimate, so a batch is seldom short of what fits.
_FETCH_SLACK = 1.25

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
    def session_expiry(self) -> int: ...
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


@dataclass(frozen=True, slots=True)
class _Batch:
    stream: str
    batch: EncodedBatch
    size: int  # its readings' outbox size


@dataclass(frozen=True, slots=True)
class _Flight(_Batch):
    """A batch handed to the transport and not yet acknowledged."""

    future: asyncio.Future[None]


class Drainer:
    """Moves readings from the outbox to a transport, at most ``window`` batches in flight.

    A batch holds at most ``batch_max_count`` readings and ``batch_max_bytes`` of payload. While
    the message rate holds batches back, the count cap is lifted: a batch carries what the byte
    budget allows by the time it may go (agent.telemetry.pacing, ``room``), up to
    ``batch_max_bytes``, so a backlog drains at the byte budget.

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
        self._inflight: dict[str, _Flight] = {}
        self._inflight_ids: set[str] = set()
        self._pending_since: dict[str, float] = {}
        # Per stream, readings and outbox bytes per payload byte in its last batch: how much to
        # fetch for a batch of so many bytes.
        self._per_byte: dict[str, tuple[float, float]] = {}
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
            for flight in list(self._inflight.values()):
                flight.future.cancel()  # unacknowledged: the readings stay in the outbox

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
            await self._limiter.acquire(len(picked.batch.payload))
            # The link may have dropped, or telemetry been suspended, while we waited.
            if self._transport.ready and self._open(picked.stream):
                self._submit(picked)

    def _open(self, stream: str) -> bool:
        return self._telemetry_allowed or stream != TELEMETRY

    async def _fetch(self, stream: str, count: int, size: int) -> tuple[list[Reading], bool]:
        """The stream's oldest readings not already in flight, after the allow() hook: at most
        ``count`` of them and about ``size`` outbox bytes; and whether more may be waiting."""
        flights = [f for f in self._inflight.values() if f.stream == stream]
        # In-flight readings are still the oldest in the outbox: ask for that much more.
        count += sum(len(f.batch.ids) for f in flights)
        size += sum(f.size for f in flights)
        flying = set(self._inflight_ids)  # one acked during the fetch may still be in its rows
        rows = await self._outbox.fetch(stream, count, size)
        # The outbox stops before the reading that would go past ``size``: one as large as the
        # largest here would have.
        largest = max((r.size for r in rows), default=0)
        more = len(rows) >= count or sum(r.size for r in rows) + largest > size
        fresh = [r for r in rows if r.id not in flying and r.id not in self._inflight_ids]
        if self._allow is not None:
            verdicts = [(r, self._allow(r)) for r in fresh]
            if dropped := [r.id for r, ok in verdicts if not ok]:
                self._outbox.ack_soon(dropped)
                self.stats.filtered += len(dropped)
                fresh = [r for r, ok in verdicts if ok]
        return fresh, more

    async def _pick(self) -> _Batch | None:
        """The next batch due, in stream order."""
        now = self._clock()
        room = self._limiter.room()
        # Held back by the message rate, a batch carries the bytes it may by then, in any count.
        max_bytes = self._max_bytes if room is None else max(1, int(min(self._max_bytes, room)))
        next_due: float | None = None
        for stream in STREAMS:
            # An empty stream (the outbox counts in memory) costs no trip to the store's thread.
            found = None
            if self._open(stream) and self._outbox.depth(stream)[0] > 0:
                found = await self._take(stream, max_bytes, held=room is not None)
            if found is None:
                self._pending_since.pop(stream, None)
                continue
            oldest, picked, full = found
            # A partial batch waits at most the latency from its OLDEST reading's commit, not
            # from when the drainer first saw it: the tail of a backlog goes at once.
            waited = max(0.0, self._wall() - oldest.created)
            since = min(self._pending_since.setdefault(stream, now), now - waited)
            due = since + (self._latency if stream == TELEMETRY else 0.0)
            if full or now >= due:
                del self._pending_since[stream]
                return picked
            next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            if self._timer:
                self._timer.cancel()
            self._timer = self._loop.call_later(next_due - now, self._wake.set)
        return None

    async def _take(
        self, stream: str, max_bytes: int, *, held: bool
    ) -> tuple[Reading, _Batch, bool] | None:
        """The stream's next batch of at most ``max_bytes`` (and ``batch_max_count`` readings
        unless ``held``): its oldest reading, the batch, and whether it is full (more wait)."""
        known = stream in self._per_byte
        while True:
            count, size = self._max_count, max_bytes * _FETCH_SLACK
            if stream in self._per_byte:
                readings_per_byte, size_per_byte = self._per_byte[stream]
                size *= size_per_byte
                if held:
                    count = 1 + int(max_bytes * readings_per_byte * _FETCH_SLACK)
            readings, more = await self._fetch(stream, count, int(size))
            if not readings:
                return None
            batch = encode_batch(self._device_id, readings[:count], max_bytes,
                                 compress=self._compress)
            taken = sum(r.size for r in readings[: len(batch.ids)])
            self._per_byte[stream] = (len(batch.ids) / len(batch.payload),
                                      taken / len(batch.payload))
            full = more or len(batch.ids) < len(readings)
            # Held back, with nothing known yet of the stream's readings, the first fetch took
            # a normal batch's count: once more, now knowing how many make the bytes.
            if known or not held or not more:
                return readings[0], _Batch(stream, batch, taken), full
            known = True

    def _submit(self, picked: _Batch) -> None:
        batch = picked.batch
        future = self._transport.submit(picked.stream, batch)
        self._inflight[batch.batch_id] = _Flight(picked.stream, batch, picked.size, future)
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
