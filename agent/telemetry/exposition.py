"""Prometheus metrics out of the agent: the text exposition format 0.0.4, a node_exporter
textfile replaced atomically, and a small HTTP server for ``GET /metrics``.

What the metrics are is :mod:`agent.commands.metrics`'s; this module only writes them out.

- The format (https://prometheus.io/docs/instrumenting/exposition_formats/): per family a
  ``# HELP`` (backslash and newline escaped) and a ``# TYPE`` line, then its samples; label
  values escape backslash, double quote and newline; one line feed ends every line.
- The textfile: written to ``PATH.tmp`` beside it (node_exporter reads ``*.prom`` only) and
  renamed over it, so a reader sees the old file or the new one, never a part. It is written
  every ``interval`` seconds even when nothing changed: node_exporter's
  ``node_textfile_mtime_seconds`` is how a stale file (a hung agent) is seen. No fsync: it
  belongs on a tmpfs such as /run.
- The server: ``GET`` (or ``HEAD``) ``/metrics`` answers 200 with
  ``text/plain; version=0.0.4``, any other path 404, any other method 405. A request head over
  :data:`MAX_REQUEST` bytes is refused (431), a client that takes over :data:`CLIENT_TIMEOUT`
  seconds is dropped, and at most :data:`MAX_CLIENTS` are served at once (more are closed at
  once). One request per connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line and headers
CLIENT_TIMEOUT = 10.0  # seconds a client has to send its request and read the answer
MAX_CLIENTS = 8

Labels = Mapping[str, str]


@dataclass(slots=True)
class Family:
    """One metric family: ``kind`` is ``gauge`` or ``counter`` (whose name ends ``_total``)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        """One sample; none for an unknown value (null is never a made-up number)."""
        if value is not None:
            self.samples.append((labels, value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool | int):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition (format 0.0.4) of ``families``."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            pairs = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{family.name}{{{pairs}}} {_number(value)}" if pairs
                         else f"{family.name} {_number(value)}")
    return "".join(line + "\n" for line in lines)


# -- the textfile ---------------------------------------------------------------------------


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (a temporary file beside it, renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(temporary, 0o644)  # node_exporter runs as its own user
    os.replace(temporary, path)


async def keep_textfile(path: Path, interval: float, text: Callable[[], str]) -> None:
    """Write ``text()`` to ``path`` now and every ``interval`` seconds (a supervised part: a
    failure, such as a missing directory, is logged and retried with backoff)."""
    while True:
        write_textfile(path, text())
        await asyncio.sleep(interval)


# -- the HTTP server ------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on ``host:port``; :meth:`serve` is a supervised part."""

    def __init__(self, host: str, port: int, text: Callable[[], str], *,
                 timeout: float = CLIENT_TIMEOUT, max_clients: int = MAX_CLIENTS) -> None:
        self.host, self.port = host, port
        self._text = text
        self._timeout = timeout
        self._max_clients = max_clients
        self.clients: set[asyncio.Task[None]] = set()  # being served
        self.bound: tuple[str, int] | None = None  # where it listens, once it does

    async def serve(self) -> None:
        server = await asyncio.start_server(self._client, self.host, self.port,
                                            limit=MAX_REQUEST)
        self.bound = server.sockets[0].getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            self.bound = None
            for task in self.clients:
                task.cancel()
            await asyncio.gather(*self.clients, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self.clients) >= self._max_clients:
            writer.close()
            return
        self.clients.add(task)
        try:
            async with asyncio.timeout(self._timeout):
                await self._answer(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a slow or vanished client: nothing owed
        finally:
            self.clients.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _respond(writer, "431 Request Header Fields Too Large", "request too large\n")
            return
        method, target = _request_line(head)
        if method not in ("GET", "HEAD"):
            await _respond(writer, "405 Method Not Allowed", "GET /metrics only\n",
                           extra="Allow: GET, HEAD\r\n")
            return
        if target.split("?", 1)[0] != "/metrics":
            await _respond(writer, "404 Not Found", "the metrics are at /metrics\n")
            return
        try:
            body = self._text()
        except Exception as exc:  # a bug must not take the part down with one scrape
            log.exception("metrics not rendered")
            await _respond(writer, "500 Internal Server Error", f"not rendered: {exc!r}\n")
            return
        await _respond(writer, "200 OK", body, content_type=CONTENT_TYPE, head=method == "HEAD")


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, target) of a request head; empty strings for a line that is not one."""
    words = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return (words[0], words[1]) if len(words) == 3 else ("", "")


async def _respond(writer: asyncio.StreamWriter, status: str, body: str, *,
                   content_type: str = "text/plain; charset=utf-8", extra: str = "",
                   head: bool = False) -> None:
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        f"Connection: close\r\n{extra}\r\n".encode() + (b"" if head else data))
    await writer.drain()
