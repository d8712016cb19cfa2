"""Local ingestion: apps hand readings to the agent over a Unix socket (DESIGN.md).

One JSON object per line in, one answer per line out, in order: ``{"ok": true, "id": ...}``
once the reading is committed, or ``{"ok": false, "error": "<why>"}``; blank lines are
ignored. Clients may pipeline; lines from all clients are committed together (what arrives
while a commit is in flight goes into the next one, after a few milliseconds of linger).

Hostile input never stops the server: an oversize line is answered at once and skipped
without being buffered, binary garbage and bad JSON get an error, and a client that sends no
complete line (or reads no answers) for ``client_timeout`` seconds is disconnected. A client
that half-closes gets every answer, then the connection closes. A reading
fails alone: the outbox checks each line before it joins a group, and a group it still refuses
is committed again line by line. With ``max_clients`` connected, a newcomer takes the slot of
the idlest client (oldest last line, none half sent, no answer owed), told why and closed; if
every client is busy, the newcomer is told so and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.core.store import StoreError
from agent.telemetry.line import error_line, parse_line
from agent.telemetry.outbox import Item, Outbox, OutboxError

log = logging.getLogger(__name__)

Gate = Callable[[], str | None]  # None: accepting; else why readings are refused
MAX_PENDING = 4096  # answers owed to one client before the server stops reading from it


class IngestError(Exception):
    """The server cannot start (socket path taken, group unknown, ...)."""


class _Slot:
    """One answer owed to a client, in line order; filled when its commit ends."""

    __slots__ = ("answer",)

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer


class IngestServer:
    def __init__(
        self, outbox: Outbox, socket_path: Path, *, group: str | None = None,
        max_line: int = 65536, max_clients: int = 64, client_timeout: float = 60.0,
        gates: Sequence[Gate] = (), linger: float = 0.002, max_batch: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.path = socket_path
        self._outbox = outbox
        self._group = group
        self.max_line = max_line
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self._gates = tuple(gates)
        self._linger = linger
        self._max_batch = max_batch
        self.clock = clock
        self.clients: set[_Client] = set()
        self._queue: list[tuple[_Client, _Slot, Item]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued, no commit in flight
        self._idle.set()
        self._server: asyncio.AbstractServer | None = None
        self._committer: asyncio.Task[None] | None = None
        self._inode = 0

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (mode 0660, group from config) and serve. Raises
        :class:`IngestError` when another agent answers on the path or it cannot be set up."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await self._remove_stale()
            sock = self._bind()
        except OSError as exc:
            raise IngestError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Client(self), sock=sock, backlog=128)
        self._committer = asyncio.create_task(self._commit_loop(), name="ingest-commit")

    async def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise IngestError(f"{self.path} exists and is not a socket; not touching it")
        try:
            async with asyncio.timeout(2):
                _, writer = await asyncio.open_unix_connection(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            self.path.unlink(missing_ok=True)  # left behind by a dead agent
            return
        except TimeoutError:
            raise IngestError(f"{self.path}: a live listener is not answering") from None
        writer.close()
        raise IngestError(f"another agent is already listening on {self.path}")

    def _bind(self) -> socket.socket:
        """Bind under a temporary name, set mode and group, then rename into place, so the
        socket is never reachable with looser permissions."""
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(temp))
            os.chmod(temp, 0o660)
            if self._group:
                try:
                    shutil.chown(temp, group=self._group)
                except LookupError:
                    raise IngestError(f"ingest.group: no group named {self._group!r}") from None
                except OSError as exc:
                    why = f"cannot give {self.path} to group {self._group!r}: {exc.strerror}"
                    raise IngestError(f"ingest.group: {why}") from None
            os.rename(temp, self.path)
            self._inode = os.stat(self.path).st_ino
        except BaseException:
            sock.close()
            temp.unlink(missing_ok=True)
            raise
        return sock

    async def close(self) -> None:
        """Stop accepting, answer what is already queued, close clients, remove the socket."""
        if self._server is None:
            return
        self._server.close()
        for client in list(self.clients):
            client.stop_reading()
        await self._idle.wait()
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        for client in list(self.clients):
            client.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        self._server = None

    # -- committing ----------------------------------------------------------------------------

    def refusal(self) -> str | None:
        return next(filter(None, (gate() for gate in self._gates)), None)

    def check(self, item: Item) -> str | None:
        """Why the outbox would refuse ``item`` on its own, or None."""
        try:
            self._outbox.check([item])
        except OutboxError as exc:
            return f"bad reading: {exc}"
        return None

    def make_room(self) -> bool:
        """Evict the idlest client that is not inside a line and owes or is owed nothing."""
        idle = [client for client in self.clients if client.idle()]
        if idle:
            min(idle, key=lambda client: client.last_line).evict(
                f"evicted: all {self.max_clients} client slots taken, this one the idlest")
        return bool(idle)

    def submit(self, client: _Client, slot: _Slot, item: Item) -> None:
        self._queue.append((client, slot, item))
        self._idle.clear()
        self._wake.set()

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._queue) < self._max_batch and self._linger:
                await asyncio.sleep(self._linger)
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._commit(batch)
            self._wake.clear()
            self._idle.set()

    async def _commit(self, batch: list[tuple[_Client, _Slot, Item]]) -> None:
        answers = await self._add([item for _, _, item in batch])
        clients = set()
        for (client, slot, _), answer in zip(batch, answers, strict=True):
            slot.answer = answer
            clients.add(client)
        for client in clients:
            client.flush()

    async def _add(self, items: list[Item]) -> list[bytes]:
        """One answer per item: committed together, or, when the group fails for any reason
        but the store's, each alone, so that one bad reading fails no other line."""
        try:
            ids = await self._outbox.add_async(items)
        except StoreError as exc:  # StoreFull included: its message says "store full"
            return [error_line(str(exc))] * len(items)
        except Exception as exc:
            if len(items) > 1:
                return [answer for item in items for answer in await self._add([item])]
            if isinstance(exc, OutboxError):
                return [error_line(f"bad reading: {exc}")]
            log.exception("ingest commit failed")
            return [error_line(f"internal error: {exc}")]
        return [b'{"ok":true,"id":"%s"}\n' % i.encode() for i in ids]


class _Client(asyncio.Protocol):
    def __init__(self, server: IngestServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._skipping = False  # inside an oversize line, already answered
        self._pending: deque[_Slot] = deque()
        self._write_paused = False
        self._reading = True
        self._eof = False  # the client half-closed: close once every answer is out
        self.last_line = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self._server
        if len(server.clients) >= server.max_clients and not server.make_room():
            transport.write(error_line(f"too many clients (max {server.max_clients})"))
            transport.close()
            return
        self._transport = transport
        server.clients.add(self)
        self._arm(server.client_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.clients.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        start = 0
        limit = self._server.max_line
        while (end := data.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            elif len(self._buf) + end - start > limit:
                self._answer(error_line(f"too large: a line may hold at most {limit} bytes"))
            elif self._buf:
                self._buf += data[start:end]
                self._line(bytes(self._buf))
            else:
                self._line(data[start:end])
            self._buf.clear()
            start = end + 1
        if start < len(data) and not self._skipping:
            if len(self._buf) + len(data) - start > limit:
                self._answer(error_line(f"too large: a line may hold at most {limit} bytes"))
                self._buf.clear()
                self._skipping = True
            else:
                self._buf += data[start:]
        self.flush()

    def eof_received(self) -> bool:
        """The client is done sending (a half-close: ``shutdown(SHUT_WR)``, ``socat``): its
        last line counts even without its newline; every line read is answered, then the
        connection closes."""
        if self._buf and not self._skipping:
            self._line(bytes(self._buf))
        self._buf.clear()
        self._reading, self._eof = False, True
        self.flush()
        return True  # keep the writing half open for the answers

    def _line(self, line: bytes) -> None:
        self.last_line = time.monotonic()
        if not line.strip():
            return
        parsed = self._server.refusal() or parse_line(line, self._server.clock())
        if isinstance(parsed, tuple):
            parsed = self._server.check(parsed) or parsed
        if isinstance(parsed, str):
            self._answer(error_line(parsed))
            return
        slot = _Slot()
        self._pending.append(slot)
        self._server.submit(self, slot, parsed)

    def _answer(self, answer: bytes) -> None:
        self._pending.append(_Slot(answer))

    # -- writing -------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the answers that are ready, in line order."""
        out = []
        pending = self._pending
        while pending and pending[0].answer is not None:
            out.append(pending.popleft().answer)
        if out and self._transport is not None:
            self._transport.write(b"".join(a for a in out if a is not None))
        if self._eof and not pending and self._transport is not None:
            self._transport.close()  # after the answers written: the transport sends them first
        self._steer()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._steer()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._steer()

    def _steer(self) -> None:
        """Stop reading from a client that does not read its answers or owes too many."""
        if self._transport is None or self._transport.is_closing():
            return
        want = not self._write_paused and len(self._pending) < MAX_PENDING and self._reading
        if want and not self._transport.is_reading():
            self._transport.resume_reading()
        elif not want and self._transport.is_reading():
            self._transport.pause_reading()

    def stop_reading(self) -> None:
        self._reading = False
        self._steer()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def idle(self) -> bool:
        """Connected, not inside a line, owing no answer and reading those it was sent."""
        busy = self._buf or self._skipping or self._pending or self._write_paused
        return self._transport is not None and not busy

    def evict(self, why: str) -> None:
        """Give up the slot now; the idle timer still drops a peer that never reads ``why``."""
        self._server.clients.discard(self)
        if self._transport is not None:
            self._transport.write(error_line(why))
            self._transport.close()

    # -- timing out ----------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self._server.client_timeout
        idle = time.monotonic() - self.last_line
        if self._transport is None:
            return
        waiting_on_us = any(slot.answer is None for slot in self._pending)
        if idle < timeout or (waiting_on_us and not self._write_paused):
            self._arm(max(timeout - idle, 0.05))
            return
        log.info("ingest client idle for %.0f s: disconnecting", idle)
        self._transport.abort()
