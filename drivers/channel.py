"""The AT channel: one command in flight over a pyserial transport, on the asyncio loop.

The port is opened with ``serial_for_url`` (real ttys, ``socket://``, ``loop://``, ``spy://``)
and joins the event loop with ``loop.add_reader`` on its file descriptor; nothing polls.
Bytes go through the sans-IO :class:`drivers.at.AtCodec`; the waiter for a command is
registered before its bytes are written (zigpy-znp's ``request()`` shape), so a fast modem can
never answer before anyone listens.

Failures, and what the channel does about them:

- a final error result raises its typed error (``drivers.errors``);
- no final result within the timeout raises :class:`CommandTimeout` and starts recovery, which
  escalates with each consecutive failure: ``AT`` ping, port reopen, ``AT+CFUN=1,1``, then the
  optional power-cycle hook, and starts over (it never gives up for good);
- a reboot banner (``RDY``) during a command fails it at once with :class:`ModemReset`, and reset
  listeners hear of it (so the session re-initialises and re-reads the SIM); so does an echo that
  comes back after ``ATE0`` was accepted;
- the port vanishing fails the command with :class:`PortError` and tells close listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import serial

from drivers.at import AtCodec, Discarded, Echo, Final, Info, Prompt, Urc
from drivers.errors import (
    CallError,
    CommandError,
    CommandTimeout,
    ModemError,
    ModemReset,
    NotConnected,
    PortError,
    cme_error,
    cms_error,
)

log = logging.getLogger(__name__)
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

_RAW_FD_TYPES: tuple[type, ...] = (serial.Serial,)
with contextlib.suppress(ImportError):
    from serial.urlhandler.protocol_socket import Serial as _SocketSerial

    _RAW_FD_TYPES += (_SocketSerial,)

UrcListener = Callable[[Urc], None]
ResetListener = Callable[[str], None]
CloseListener = Callable[[BaseException | None], None]
PowerCycle = Callable[[], Awaitable[None]]



def open_serial(url: str, baudrate: int = 115200, *, exclusive: bool = True) -> serial.SerialBase:
    """Open a port by pyserial URL; a busy or missing port raises :class:`PortError`."""
    try:
        port = serial.serial_for_url(url, baudrate=baudrate, timeout=0, do_not_open=True)
        if url.startswith("/") or "://" not in url:
            port.exclusive = exclusive
        port.open()
    except (serial.SerialException, OSError, ValueError) as exc:
        raise PortError(f"cannot open {url}: {_reason(exc)}") from exc
    return port


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "exclusively lock" in text or "Resource temporarily unavailable" in text:
        return "port is busy (another program holds it)"
    if "No such file" in text or "could not open port" in text:
        return "no such port"
    return text or type(exc).__name__


def raise_for_final(command: str, final: Final) -> None:
    """Raise the typed error a failing final result stands for."""
    if final.ok:
        return
    if final.kind == "cme":
        raise cme_error(command, final.value)
    if final.kind == "cms":
        raise cms_error(command, final.value)
    if final.kind == "call":
        raise CallError(command, final.text)
    raise CommandError(command, final.text)


class AtChannel:
    """One AT port. Use :meth:`open`, then :meth:`command`; close with :meth:`close`."""

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 115200,
        timeout: float = 5.0,
        power_cycle: PowerCycle | None = None,
        resync_timeout: float = 1.0,
        recover: bool = True,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.timeout = timeout
        self.power_cycle = power_cycle
        self.resync_timeout = resync_timeout
        self.recover = recover  # False for one-shot probes: never reset somebody's modem
        self.failures = 0  # consecutive timeouts (malfunction detection reads it)
        self.escalation = 0  # failed resyncs in a row: the rung of the recovery ladder
        self._port: serial.SerialBase | None = None
        self._codec = AtCodec()
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[Final] | None = None
        self._prompt: asyncio.Future[None] | None = None
        self._lines: list[str] = []
        self._echo_off = False
        self._urc_listeners: list[UrcListener] = []
        self._reset_listeners: list[ResetListener] = []
        self._close_listeners: list[CloseListener] = []
        self._reader_task: asyncio.Task[None] | None = None
        self._fd: int | None = None

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> AtChannel:
        chan = cls(url, **kwargs)
        await chan.connect()
        return chan

    @property
    def is_open(self) -> bool:
        return self._port is not None

    async def connect(self) -> None:
        self._port = open_serial(self.url, self.baudrate)
        self._codec = AtCodec()
        self._echo_off = False
        loop = asyncio.get_running_loop()
        try:
            fd = self._port.fileno()
        except (AttributeError, NotImplementedError, serial.SerialException, OSError):
            fd = None
        # A plain tty or socket is read with os.read on its fd; wrappers (spy://) keep their
        # own read() so they still see every byte.
        self._fd = fd if type(self._port) in _RAW_FD_TYPES else None
        if fd is not None:
            loop.add_reader(fd, self._on_readable)
        else:  # loop:// and other in-memory transports have no fd to watch
            self._reader_task = loop.create_task(self._read_without_fd())

    async def close(self) -> None:
        self._detach(None, notify=False)

    def _detach(self, exc: BaseException | None, *, notify: bool = True) -> None:
        port, self._port = self._port, None
        if port is None:
            return
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        else:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(port.fileno())
        with contextlib.suppress(Exception):
            port.close()
        self._fail_waiter(PortError(f"{self.url}: port closed" if exc is None
                                    else f"{self.url}: port lost ({_reason(exc)})"))
        if notify:
            for listener in list(self._close_listeners):
                listener(exc)

    # -- listeners -----------------------------------------------------------------------
    def add_urc_listener(self, callback: UrcListener) -> Callable[[], None]:
        return _add(self._urc_listeners, callback)

    def add_reset_listener(self, callback: ResetListener) -> Callable[[], None]:
        return _add(self._reset_listeners, callback)

    def add_close_listener(self, callback: CloseListener) -> Callable[[], None]:
        return _add(self._close_listeners, callback)

    # -- commands ------------------------------------------------------------------------
    async def command(
        self,
        cmd: str,
        *,
        timeout: float | None = None,
        expect: tuple[str, ...] = (),
        data: bytes | None = None,
    ) -> list[str]:
        """Send ``cmd`` and return its information lines; raise the typed error on failure.

        ``data`` is written after the ``> `` prompt and ended with Ctrl-Z (SMS text)."""
        async with self._lock:
            try:
                lines = await self._transact(cmd, timeout or self.timeout, expect, data)
            except CommandTimeout:
                self.failures += 1
                if self.recover:
                    await self._recover()
                raise
            self.failures = 0
            return lines

    async def _transact(
        self, cmd: str, timeout: float, expect: tuple[str, ...], data: bytes | None
    ) -> list[str]:
        port = self._port
        if port is None:
            raise NotConnected(f"{self.url}: channel is closed")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._prompt = loop.create_future() if data is not None else None
        self._lines = []
        wire = self._codec.send(cmd, expect=expect, prompt=data is not None)
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "%s > %r", self.url, wire)
        timer = loop.call_later(timeout, self._expire, waiter)
        try:
            self._write(port, wire)
            if self._prompt is not None and data is not None:
                await self._prompt
                self._write(port, data + b"\x1a")
            final = await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not waiter.cancelled() or (task is not None and task.cancelling()):
                raise  # the caller was cancelled (a stop), not the command's timer
            self._codec.abort()
            raise CommandTimeout(f"{cmd}: no answer within {timeout:g} s") from None
        finally:
            timer.cancel()
            self._waiter = self._prompt = None
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # failed by a detach while the write raised: seen, not lost
        lines = self._lines
        self._lines = []
        raise_for_final(cmd, final)
        if cmd.strip().upper() in ("ATE0", "ATE1"):
            self._echo_off = cmd.strip().upper() == "ATE0"
        return lines

    def _expire(self, waiter: asyncio.Future[Final]) -> None:
        if not waiter.done():
            waiter.cancel()
        if self._prompt is not None and not self._prompt.done():
            self._prompt.cancel()

    def _write(self, port: serial.SerialBase, wire: bytes) -> None:
        try:
            if self._fd is not None and len(wire) <= 512:  # fits the tty buffer in one go
                os.write(self._fd, wire)
            else:
                port.write(wire)
        except (serial.SerialException, OSError) as exc:
            self._detach(exc)
            raise PortError(f"{self.url}: write failed ({_reason(exc)})") from exc

    # -- recovery ------------------------------------------------------------------------
    async def _recover(self) -> None:
        """Resync after a timeout. A modem that still answers ``AT`` is alive (the command was
        slow); one that does not climbs one rung per failed resync: port reopen,
        ``AT+CFUN=1,1``, the power-cycle hook; then the ladder starts over."""
        if await self._ping():
            self.escalation = 0
            return
        self.escalation += 1
        rung = (self.escalation - 1) % 3
        log.warning("%s: modem silent after %d timeouts, recovery rung %d", self.url,
                    self.failures, rung)
        try:
            if rung == 0:
                self._detach(None, notify=False)
                await self.connect()
            elif rung == 1:
                with contextlib.suppress(CommandTimeout):
                    await self._transact("AT+CFUN=1,1", self.resync_timeout * 3, (), None)
                self._notify_reset("AT+CFUN=1,1 after repeated timeouts")
            elif self.power_cycle is not None:
                await self.power_cycle()
                self._notify_reset("power cycle after repeated timeouts")
        except ModemError as exc:
            log.warning("%s: recovery rung %d failed: %s", self.url, rung, exc)

    async def _ping(self) -> bool:
        for _ in range(2):
            try:
                await self._transact("AT", self.resync_timeout, (), None)
            except CommandTimeout:
                continue
            except ModemError:
                return False
            return True
        return False

    # -- input ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            data = os.read(self._fd, 4096) if self._fd is not None else port.read(4096)
        except (serial.SerialException, OSError) as exc:
            self._detach(exc)
            return
        if data:
            self.feed(data)
        elif self._fd is not None:  # EOF: the other end hung up (USB unplugged, pty closed)
            self._detach(EOFError("hang-up"))

    async def _read_without_fd(self) -> None:
        while (port := self._port) is not None:
            try:
                data = await asyncio.to_thread(_blocking_read, port)
            except (serial.SerialException, OSError) as exc:
                self._detach(exc)
                return
            if data:
                self.feed(data)

    def feed(self, data: bytes) -> None:
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "%s < %r", self.url, data)
        self._codec.receive_data(data)
        while (event := self._codec.next_event()) is not None:
            self._dispatch(event)

    def _dispatch(self, event: Echo | Info | Final | Urc | Prompt | Discarded) -> None:
        waiter = self._waiter
        if isinstance(event, Final):
            if waiter is not None and not waiter.done():
                waiter.set_result(event)
            else:
                log.debug("%s: stray final result %r", self.url, event.text)
        elif isinstance(event, Info):
            self._lines.append(event.text)
        elif isinstance(event, Urc):
            if event.banner:
                self._codec.abort()
                self._fail_waiter(ModemReset(f"modem restarted ({event.text})"))
                self._echo_off = False
                self._notify_reset(event.text)
            for listener in list(self._urc_listeners):
                _call(listener, event)
        elif isinstance(event, Echo):
            if self._echo_off:
                self._echo_off = False
                self._notify_reset("echo came back on")
        elif isinstance(event, Prompt):
            if self._prompt is not None and not self._prompt.done():
                self._prompt.set_result(None)
        else:
            log.warning("%s: dropped %d bytes of an over-long line", self.url, event.nbytes)

    def _fail_waiter(self, exc: ModemError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _notify_reset(self, reason: str) -> None:
        log.warning("%s: modem reset: %s", self.url, reason)
        for listener in list(self._reset_listeners):
            _call(listener, reason)


def _blocking_read(port: serial.SerialBase) -> bytes:
    port.timeout = 0.2
    data: bytes = port.read(max(1, getattr(port, "in_waiting", 1)))
    return data


def _add(listeners: list[Any], callback: Any) -> Callable[[], None]:
    listeners.append(callback)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            listeners.remove(callback)

    return remove


def _call(listener: Callable[[Any], None], arg: Any) -> None:
    try:
        listener(arg)
    except Exception:  # a broken listener must not break the channel
        log.exception("listener %r failed", listener)
