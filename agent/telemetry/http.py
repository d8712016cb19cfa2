"""The ``unified-endpoint`` uplink: the same batches, POSTed to SORACOM's Unified Endpoint.

Flux's IoT Device trigger listens there, not on MQTT. The network adds the IMSI and SIM id, so
the request carries no credentials. A 2xx answer is the acknowledgement (Unified Endpoint
answers 207 when one of several destinations failed: that is still an answer from the
network, logged, not retried, or one broken destination would stall the outbox for ever).
Anything else (non-2xx, timeout, reset) makes the Drainer back off with full jitter and send
the batch again.

Flux parses JSON bodies, so batches go as ``application/json`` unless ``compress`` is set, in
which case a batch that zlib shrinks goes as ``application/octet-stream`` (the consumer tells
the two apart by the first byte, as on MQTT). One request at a time, on one kept-alive
connection, through stdlib ``http.client`` in the default executor: zero dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from agent.core.tasks import Spawn
from agent.telemetry.batch import EncodedBatch
from agent.telemetry.drain import (
    BatchRejected,
    Drainer,
    OutboxLike,
    UplinkSettings,
    UplinkStats,
)
from agent.telemetry.outbox import Reading
from agent.telemetry.tls import describe

log = logging.getLogger(__name__)

DEFAULT_URL = "http://uni.soracom.io"
_TIMEOUT = 30.0  # a whole request on a slow cellular link


class HttpUplink:
    """Drains the outbox by HTTP POST to ``settings.http_url``.

    Wiring (the daemon, ``kind = "unified-endpoint"``)::

        http = HttpUplink(cfg.uplink, cfg.device_id, outbox, allow=usage.allow)
        await http.start()          # commands and state still use MqttUplink(carry_readings=False)
        http.set_telemetry_allowed(False)   # a telemetry suspension
        await http.stop()
    """

    def __init__(
        self,
        settings: UplinkSettings,
        device_id: str,
        outbox: OutboxLike,
        *,
        allow: Callable[[Reading], bool] | None = None,
        compress: bool = False,
        timeout: float = _TIMEOUT,
    ) -> None:
        url = urlsplit(settings.http_url or DEFAULT_URL)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"uplink.http_url: {settings.http_url!r} is not an http(s) URL")
        self._url = url
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._timeout = timeout
        self._settings = settings
        self._device_id = device_id
        self._outbox = outbox
        self._allow = allow
        self._compress = compress
        self._conn: http.client.HTTPConnection | None = None
        self._drainer: Drainer | None = None
        self._task: asyncio.Task[None] | None = None
        self.parts: tuple[str, ...] = ()  # names of the parts given to spawn()
        self.last_status: int | None = None  # the last POST's HTTP status
        self._telemetry_allowed = True
        self.failing = False  # the last POST failed (no answer, or not 2xx)
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    @property
    def stats(self) -> UplinkStats:
        return self._drainer.stats if self._drainer else UplinkStats()

    async def start(self, spawn: Spawn | None = None) -> None:
        """Start draining (``spawn``: as :meth:`agent.telemetry.mqtt.MqttUplink.start`).
        One request at a time keeps the readings in order per topic."""
        self._drainer = Drainer(
            self._outbox,
            self,
            self._device_id,
            self._settings,
            window=1,
            compress=self._compress,
            allow=self._allow,
        )
        self._drainer.set_telemetry_allowed(self._telemetry_allowed)
        if spawn is None:
            self._task = asyncio.create_task(self._drainer.run())
        else:
            spawn("http drain", self._drainer.run)
            self.parts = ("http drain",)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._close()

    def set_telemetry_allowed(self, allowed: bool) -> None:
        self._telemetry_allowed = allowed  # before start(): from the first batch
        if self._drainer:
            self._drainer.set_telemetry_allowed(allowed)

    # -- Transport (for the Drainer) ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return True  # HTTP has no session to wait for; a failed POST is retried with backoff

    async def wait_ready(self) -> None:
        return

    def submit(self, stream: str, batch: EncodedBatch) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._post(batch))

    async def _post(self, batch: EncodedBatch) -> None:
        kind = "application/octet-stream" if batch.compressed else "application/json"
        loop = asyncio.get_running_loop()
        try:
            status = await loop.run_in_executor(None, self._request, batch.payload, kind)
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            raise self._failed(describe(exc)) from exc
        self.last_status = status
        if not 200 <= status < 300:
            raise self._failed(f"HTTP {status}")
        self.failing = False
        if status == 207:
            log.warning("batch %s: a Unified Endpoint destination failed (207)", batch.batch_id)

    def _failed(self, why: str) -> BatchRejected:
        self.failing = True
        self.last_error, self.last_error_at = f"POST {self._url.geturl()}: {why}", time.time()
        return BatchRejected(self.last_error)

    def _request(self, body: bytes, content_type: str) -> int:
        """Blocking, in the executor: one POST on the kept-alive connection."""
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._url.scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self._url.hostname or "", self._url.port, timeout=self._timeout)
        conn = self._conn
        conn.request("POST", self._path, body, {"Content-Type": content_type})
        response = conn.getresponse()
        response.read()  # drain it, or the connection cannot be reused
        if response.will_close:
            self._close()
        return response.status

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
