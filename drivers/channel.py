"""The AT channel: one command in flight over a pyserial transport, on the asyncio loop.

The port is opened with ``serial_for_url`` (real ttys, ``socket://``, ``loop://``, ``spy://``),
in the loop's executor (an open can block: a busy USB hub, a tty's carrier), and joins the
event loop with ``loop.add_reader`` on its file descriptor; nothing polls. Bytes go through the
sans-IO :class:`drivers.at.AtCodec`; the waiter for a command is registered before its bytes are
written (zigpy-znp's ``request()`` shape), so a fast modem can never answer before anyone
listens. Writes go out with ``os.write`` until every byte is written, waiting for the port to
take more with ``loop.add_writer`` (a full tty buffer is back-pressure, not a lost port).

Failures, and what the channel does about them:

- a final error result raises its typed error (``drivers.errors``);
- no final result within the timeout raises :class:`CommandTimeout` to its caller at once and,
  unless ``recover=False``, starts recovery (below);
- a reboot banner (``RDY``) during a command fails it at once with :class:`ModemReset` (the
  modem lost it); reset listeners hear of the banner, and of an echo that comes back after
  ``ATE0`` was accepted (a modem that restarted without a banner);
- the port vanishing (or a reopen that fails) fails the command with :class:`PortError` and
  tells close listeners.

Recovery, and why it is shaped this way
---------------------------------------
Recovery runs in its own task, never inside the caller's command: the caller whose command
timed out gets its :class:`CommandTimeout` at once. It climbs a ladder, stopping as soon as the
modem answers: ``AT`` ping; port reopen, ping; the profile's reset command
(:attr:`AtChannel.reset_command`: ``AT+CFUN=1,1``, Telit's ``AT#REBOOT``, ... set from
:class:`drivers.vendors.Profile` by :meth:`drivers.modem.Modem.init`), then pings until the
modem is back (at most ``boot_timeout``); then the optional power-cycle hook, likewise. A modem
still silent after the whole ladder stays ``hung``; the next command that times out starts the
ladder over (it never gives up for good, and never resets a modem nobody talks to).

The port stays exclusive: one holder at a time (:class:`_Turns`), recovery's steps first
(zigpy-znp's priority lock: a reset jumps the queue). Recovery holds the port only for one step
at a time (a ping, the reopen, the reset command), never across the wait for a rebooting
modem. While recovery runs, a gate keeps commands from the port: a rebooting or hung modem
would only time them out, each one counted as a new failure and each one a reason to escalate.
Commands wait behind the gate in arrival order and, once it opens, go out in that order; but
none waits longer than its own timeout: then it fails with :class:`ModemHung` (a
:class:`CommandTimeout`), unsent. So no caller is stuck behind the whole ladder, and the
ladder never interleaves with commands it would have to wait out.

A reset command sent by a caller (``AT+CFUN=1,1``, the profile's, or :meth:`reset_modem`) is
watched the same way: the channel is ``resetting`` until the modem answers again, and commands
wait at the gate meanwhile.

What listeners are told
-----------------------
- :meth:`add_hang_listener`: once per hang, when its first command times out (a hang lasts
  until the modem answers again, however many commands time out, however long recovery takes);
- :meth:`add_reset_listener`: once per modem restart, with a :class:`Reset`, a ``str`` (the
  reason, as ever) whose ``cause`` says ``"spontaneous"`` (a banner or the echo coming back that
  nobody asked for: a malfunction), ``"recovery"`` (the channel's own reset or power cycle, told
  once the modem answers again; its hang was already reported) or ``"requested"`` (a caller's
  reset command). Line noise is never a reset: echo is only a line equal to the command sent;
- :meth:`add_close_listener`: the port is gone for good (lost, or a reopen failed);
- :meth:`add_condition_listener`: every change of :attr:`AtChannel.condition`, which is one of
  ``ready``, ``hung`` (a command timed out and the modem has not answered since; recovery may be
  under way), ``resetting`` (a reset or power cycle is in progress: waiting for the modem to come
  back) or ``closed``, with the seconds since the channel entered it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal

import serial

from drivers.at import AtCodec, Discarded, Echo, Event, Final, Info, Noise, Prompt, Urc
from drivers.errors import (
    CallError,
    CommandError,
    CommandTimeout,
    ModemError,
    ModemHung,
    ModemReset,
    NotConnected,
    PortError,
    cme_error,
    cms_error,
)

log = logging.getLogger(__name__)
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

Condition = Literal["ready", "hung", "resetting", "closed"]
ResetCause = Literal["spontaneous", "recovery", "requested"]
GENERIC_RESET = "AT+CFUN=1,1"


class Reset(str):
    """What a reset listener is given: the reason (a ``str``: ``"RDY"``, ``"echo came back
    on"``, ``"AT+CFUN=1,1 (recovery of a hang)"``) and its ``cause``: ``"spontaneous"`` (the
    modem restarted by itself: a malfunction), ``"recovery"`` (the channel reset it to end a
    hang) or ``"requested"`` (a caller sent a reset command)."""

    cause: ResetCause

    def __new__(cls, reason: str, cause: ResetCause = "spontaneous") -> Reset:
        self = super().__new__(cls, reason)
        self.cause = cause
        return self

    @property
    def spontaneous(self) -> bool:
        return self.cause == "spontaneous"


UrcListener = Callable[[Urc], None]
ResetListener = Callable[[Reset], None]  # a Callable[[str], None] is one too
CloseListener = Callable[[BaseException | None], None]
HangListener = Callable[[str], None]
ConditionListener = Callable[[str], None]
PowerCycle = Callable[[], Awaitable[None]]


def _raw(port: serial.SerialBase) -> bool:
    """A plain tty, or a ``socket://`` port: pyserial imports that transport's module only when
    such a URL is opened, so it is looked up, not imported, here."""
    sock = sys.modules.get("serial.urlhandler.protocol_socket")
    return type(port) is serial.Serial or (sock is not None and type(port) is sock.Serial)


def open_serial(url: str, baudrate: int = 115200, *, exclusive: bool = True) -> serial.SerialBase:
    """Open a port by pyserial URL; a busy or missing port raises :class:`PortError`.
    Blocking: on the loop, call it through :func:`open_serial_async`."""
    if url.startswith("spy://") and "raw" in urllib.parse.parse_qs(
            urllib.parse.urlsplit(url).query, keep_blank_values=True):
        # pyserial's raw spy formatter writes bytes to its text log: the first write fails.
        raise PortError(f"cannot open {url}: pyserial's spy:// cannot log raw (a pyserial bug):"
                        " drop `raw` for its hex dump")
    try:
        port = serial.serial_for_url(url, baudrate=baudrate, timeout=0, do_not_open=True)
        if url.startswith("/") or "://" not in url:
            port.exclusive = exclusive
        port.open()
    except (serial.SerialException, OSError, ValueError) as exc:
        raise PortError(f"cannot open {url}: {_reason(exc)}") from exc
    return port


async def open_serial_async(url: str, baudrate: int = 115200) -> serial.SerialBase:
    """:func:`open_serial` in the loop's executor; a port opened for a caller that was
    cancelled meanwhile is closed, not leaked (it would hold the port's lock)."""
    future = asyncio.get_running_loop().run_in_executor(None, open_serial, url, baudrate)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_opened)
        raise


def _close_opened(future: asyncio.Future[serial.SerialBase]) -> None:
    if not future.cancelled() and future.exception() is None:
        with contextlib.suppress(Exception):
            future.result().close()


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


class _Turn:
    __slots__ = ("expired", "future", "patience", "timer")

    def __init__(self, future: asyncio.Future[None], patience: float,
                 expired: Callable[[], BaseException]) -> None:
        self.future = future
        self.patience = patience
        self.expired = expired
        self.timer: asyncio.TimerHandle | None = None


class _Turns:
    """Who uses the port next: one holder at a time; recovery (``urgent``) first; commands in
    arrival order, none while the gate is shut, and none of those waits longer than its
    ``patience`` for the gate: then it fails with the exception its ``expired()`` makes."""

    def __init__(self) -> None:
        self._held = False
        self._urgent: deque[asyncio.Future[None]] = deque()
        self._queue: deque[_Turn] = deque()
        self.gate_open = True

    async def take(self, *, urgent: bool = False, patience: float = 0.0,
                   expired: Callable[[], BaseException] = ModemHung) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turn: _Turn | None = None
        if urgent:
            self._urgent.append(future)
        else:
            turn = _Turn(future, patience, expired)
            self._queue.append(turn)
            if not self.gate_open:
                self._arm(turn)
        self._grant()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.give()  # granted just as the caller was cancelled: pass it on
            else:
                self._forget(future, turn)
            raise

    def give(self) -> None:
        self._held = False
        self._grant()

    def shut(self) -> None:
        self.gate_open = False
        for turn in self._queue:
            self._arm(turn)

    def open(self) -> None:
        self.gate_open = True
        for turn in self._queue:
            if turn.timer is not None:
                turn.timer.cancel()
                turn.timer = None
        self._grant()

    def _arm(self, turn: _Turn) -> None:
        if turn.timer is None:
            loop = asyncio.get_running_loop()
            turn.timer = loop.call_later(turn.patience, self._expire, turn)

    def _expire(self, turn: _Turn) -> None:
        turn.timer = None
        self._forget(turn.future, turn)
        if not turn.future.done():
            turn.future.set_exception(turn.expired())

    def _forget(self, future: asyncio.Future[None], turn: _Turn | None) -> None:
        if turn is not None:
            if turn.timer is not None:
                turn.timer.cancel()
                turn.timer = None
            with contextlib.suppress(ValueError):
                self._queue.remove(turn)
        else:
            with contextlib.suppress(ValueError):
                self._urgent.remove(future)

    def _grant(self) -> None:
        if self._held:
            return
        while self._urgent:
            future = self._urgent.popleft()
            if not future.done():
                self._held = True
                future.set_result(None)
                return
        while self.gate_open and self._queue:
            turn = self._queue.popleft()
            if turn.timer is not None:
                turn.timer.cancel()
                turn.timer = None
            if not turn.future.done():
                self._held = True
                turn.future.set_result(None)
                return


class AtChannel:
    """One AT port. Use :meth:`open`, then :meth:`command`; close with :meth:`close`.

    ``timeout``: a command's default; ``resync_timeout``: one recovery ping's;
    ``boot_timeout``: how long a reset modem has to answer again; ``reset_command``: the
    vendor's reset (:attr:`drivers.vendors.Profile.reset_command`); ``recover=False`` for
    one-shot probes: never reset somebody's modem."""

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = 115200,
        timeout: float = 5.0,
        power_cycle: PowerCycle | None = None,
        resync_timeout: float = 1.0,
        recover: bool = True,
        boot_timeout: float = 30.0,
        reset_command: str = GENERIC_RESET,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self.timeout = timeout
        self.power_cycle = power_cycle
        self.resync_timeout = resync_timeout
        self.recover = recover
        self.boot_timeout = boot_timeout
        self.reset_command = reset_command
        self.failures = 0  # consecutive command timeouts (until the modem answers again)
        self.escalation = 0  # rungs of the recovery ladder climbed in this hang
        self._port: serial.SerialBase | None = None
        self._open = False
        self._codec = AtCodec()
        self._turns = _Turns()
        self._supervisor: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[Final] | None = None
        self._prompt: asyncio.Future[None] | None = None
        self._write_wait: asyncio.Future[None] | None = None
        self._lines: list[str] = []
        self._echo_off = False
        self._condition: Condition = "closed"
        self._since = time.monotonic()
        self._hang_reported = False
        self._probing = False  # a recovery AT is in flight: a banner does not cut it short
        self._restart_expected_until = 0.0  # time.monotonic(): a banner before it is ours
        self._urc_listeners: list[UrcListener] = []
        self._reset_listeners: list[ResetListener] = []
        self._close_listeners: list[CloseListener] = []
        self._hang_listeners: list[HangListener] = []
        self._condition_listeners: list[ConditionListener] = []
        self._reader_task: asyncio.Task[None] | None = None
        self._reader_fd: int | None = None
        self._fd: int | None = None

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> AtChannel:
        chan = cls(url, **kwargs)
        await chan.connect()
        return chan

    @property
    def is_open(self) -> bool:
        """True from :meth:`connect` until :meth:`close` or the port is lost (a reopen during
        recovery does not count as closed)."""
        return self._open

    @property
    def condition(self) -> tuple[Condition, float]:
        """What the modem behind the channel is doing, and for how many seconds it has been:
        ``("ready", s)``, ``("hung", s)`` (a command timed out and the modem has not answered
        since), ``("resetting", s)`` (a reset or power cycle: waiting for it to come back) or
        ``("closed", s)``."""
        return self._condition, time.monotonic() - self._since

    @property
    def recovering(self) -> bool:
        """Recovery (or the wait for a reset modem) is under way: commands wait at the gate."""
        return self._supervisor is not None and not self._supervisor.done()

    async def connect(self) -> None:
        port = await open_serial_async(self.url, self.baudrate)
        self._attach(port)
        self._open = True
        self._set_condition("ready")

    async def close(self) -> None:
        supervisor = self._supervisor
        self._detach(None, notify=False)
        if supervisor is not None and supervisor is not asyncio.current_task():
            await asyncio.wait({supervisor})

    def _attach(self, port: serial.SerialBase) -> None:
        self._port = port
        self._codec = AtCodec()
        self._echo_off = False
        loop = asyncio.get_running_loop()
        try:
            fd = port.fileno()
        except (AttributeError, NotImplementedError, serial.SerialException, OSError):
            fd = None
        # A plain tty or socket is read with os.read on its fd; wrappers (spy://) keep their
        # own read() so they still see every byte.
        self._fd = fd if _raw(port) else None
        if fd is not None:
            self._reader_fd = fd
            loop.add_reader(fd, self._on_readable)
        else:  # loop:// and other in-memory transports have no fd to watch
            self._reader_task = loop.create_task(self._read_without_fd())

    def _drop_port(self) -> None:
        """Let go of the transport (the channel itself may stay open: a reopen)."""
        port, self._port = self._port, None
        if port is None:
            return
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if self._reader_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._reader_fd)
            self._reader_fd = None
        self._fd = None
        if self._write_wait is not None and not self._write_wait.done():
            self._write_wait.set_exception(PortError(f"{self.url}: port closed"))
        with contextlib.suppress(Exception):
            port.close()

    def _detach(self, exc: BaseException | None, *, notify: bool = True) -> None:
        """The channel is closed for good: ``exc`` None for :meth:`close`, else why it was
        lost (close listeners hear of it)."""
        if not self._open:
            return
        self._open = False
        self._drop_port()
        self._fail_waiter(PortError(f"{self.url}: port closed" if exc is None
                                    else f"{self.url}: port lost ({_reason(exc)})"))
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
        self._set_condition("closed")
        if notify:
            for listener in list(self._close_listeners):
                _call(listener, exc)

    # -- listeners -----------------------------------------------------------------------
    def add_urc_listener(self, callback: UrcListener) -> Callable[[], None]:
        return _add(self._urc_listeners, callback)

    def add_reset_listener(self, callback: ResetListener) -> Callable[[], None]:
        """``callback(reset)`` once per modem restart; ``reset`` is a :class:`Reset` (a str
        whose ``cause`` is ``spontaneous``, ``recovery`` or ``requested``)."""
        return _add(self._reset_listeners, callback)

    def add_close_listener(self, callback: CloseListener) -> Callable[[], None]:
        return _add(self._close_listeners, callback)

    def add_hang_listener(self, callback: HangListener) -> Callable[[], None]:
        """``callback(what)`` once per hang: when its first command times out (``what``: that
        command and its timeout). The hang lasts until the modem answers again."""
        return _add(self._hang_listeners, callback)

    def add_condition_listener(self, callback: ConditionListener) -> Callable[[], None]:
        """``callback(condition)`` on every change of :attr:`condition`."""
        return _add(self._condition_listeners, callback)

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

        ``data`` is written after the ``> `` prompt and ended with Ctrl-Z (SMS text). While
        recovery runs the command waits for it, at most ``timeout``, then raises
        :class:`ModemHung` unsent."""
        limit = timeout or self.timeout

        def hung() -> ModemHung:
            return ModemHung(f"{cmd}: not sent; the modem has been {self._condition} for "
                             f"{limit:g} s (recovery under way)")

        await self._turns.take(patience=limit, expired=hung)
        try:
            if self._is_reset(cmd):
                return await self._requested_reset(cmd, limit, expect)
            try:
                return await self._transact(cmd, limit, expect, data)
            except CommandTimeout:
                self._timed_out(f"{cmd}: no answer within {limit:g} s")
                raise
        finally:
            self._turns.give()

    async def reset_modem(self, *, timeout: float = 15.0) -> None:
        """Reset the modem with :attr:`reset_command` (an order, not recovery). Returns once
        the modem accepted it; the channel is ``resetting`` until the modem answers again, and
        reset listeners then hear of it with cause ``"requested"``."""
        await self.command(self.reset_command, timeout=timeout)

    def _is_reset(self, cmd: str) -> bool:
        text = cmd.strip().upper()
        return text in (self.reset_command.strip().upper(), GENERIC_RESET)

    async def _requested_reset(self, cmd: str, limit: float,
                               expect: tuple[str, ...]) -> list[str]:
        self._expect_restart()
        try:
            lines = await self._transact(cmd, limit, expect, None)
        except CommandTimeout:  # it may be rebooting without a word: watch for it
            self._supervise(functools.partial(self._watch_restart, f"{cmd} (requested)"))
            raise
        except ModemError:
            self._restart_expected_until = 0.0
            if self._open:
                self._set_condition("ready")
            raise
        self._supervise(functools.partial(self._watch_restart, f"{cmd} (requested)"))
        return lines

    async def _transact(
        self, cmd: str, timeout: float, expect: tuple[str, ...], data: bytes | None
    ) -> list[str]:
        if self._port is None:
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
            await self._write(wire)
            if self._prompt is not None and data is not None:
                await self._prompt
                await self._write(data + b"\x1a")
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
        self._answered()
        raise_for_final(cmd, final)
        if cmd.strip().upper() in ("ATE0", "ATE1"):
            self._echo_off = cmd.strip().upper() == "ATE0"
        return lines

    def _expire(self, waiter: asyncio.Future[Final]) -> None:
        if not waiter.done():
            waiter.cancel()
        for pending in (self._prompt, self._write_wait):
            if pending is not None and not pending.done():
                pending.cancel()

    async def _write(self, wire: bytes) -> None:
        """Write every byte of ``wire``; a port that takes no more for now is waited for."""
        port = self._port
        if port is None:
            raise NotConnected(f"{self.url}: channel is closed")
        fd = self._fd
        try:
            if fd is None:
                port.write(wire)
                return
            view = memoryview(wire)
            while view:
                try:
                    written = os.write(fd, view)
                except BlockingIOError:
                    await self._writable(fd)
                    continue
                view = view[written:]
        except (serial.SerialException, OSError) as exc:
            self._detach(exc)
            raise PortError(f"{self.url}: write failed ({_reason(exc)})") from exc

    async def _writable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        self._write_wait = ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._write_wait = None
            with contextlib.suppress(Exception):
                loop.remove_writer(fd)

    # -- condition -----------------------------------------------------------------------
    def _set_condition(self, condition: Condition) -> None:
        if condition == self._condition:
            return
        log.debug("%s: modem %s", self.url, condition)
        self._condition, self._since = condition, time.monotonic()
        if condition == "ready":
            self._hang_reported = False
            self.escalation = 0
        for listener in list(self._condition_listeners):
            _call(listener, condition)

    def _answered(self) -> None:
        """A final result came: the modem is alive (a reset in progress stays in progress)."""
        self.failures = 0
        if self._condition == "hung":
            self._set_condition("ready")

    def _timed_out(self, what: str) -> None:
        self.failures += 1
        self._hang(what)
        if self.recover and not self.recovering and self._open:
            self._supervise(self._recover_hang)

    def _hang(self, what: str) -> None:
        if not self._open:
            return
        self._set_condition("hung")
        if not self._hang_reported:
            self._hang_reported = True
            # A probe (recover=False) expects silence from a port without a modem: no warning.
            log.log(logging.WARNING if self.recover else logging.DEBUG, "%s: modem hung: %s",
                    self.url, what)
            for listener in list(self._hang_listeners):
                _call(listener, what)

    def _expect_restart(self) -> None:
        """A reset is about to be sent: the banner (or echo) that follows is ours."""
        self._restart_expected_until = time.monotonic() + self.boot_timeout
        self._set_condition("resetting")

    def _restart_expected(self) -> bool:
        return time.monotonic() <= self._restart_expected_until

    # -- recovery ------------------------------------------------------------------------
    def _supervise(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` (recovery, or the wait for a reset modem) with the gate shut."""
        self._turns.shut()
        task = asyncio.get_running_loop().create_task(self._supervised(work))
        self._supervisor = task
        task.add_done_callback(self._supervision_ended)  # also when cancelled before it ran

    async def _supervised(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await work()
        except (PortError, NotConnected) as exc:
            log.info("%s: recovery ended: %s", self.url, exc)
        except Exception:
            log.exception("%s: recovery failed", self.url)

    def _supervision_ended(self, task: asyncio.Task[None]) -> None:
        if self._supervisor is task:
            self._supervisor = None
        self._turns.open()

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        await self._turns.take(urgent=True)
        try:
            yield
        finally:
            self._turns.give()

    async def _recover_hang(self) -> None:
        """Climb the ladder until the modem answers: ping; reopen; the reset command; the
        power-cycle hook. A modem silent after all of it stays ``hung``."""
        if await self._ping():
            return
        rungs: list[tuple[str, Callable[[], Awaitable[bool]]]] = [
            ("port reopen", self._reopen), (self.reset_command, self._reset)]
        if self.power_cycle is not None:
            rungs.append(("power cycle", self._power))
        for name, rung in rungs:
            if not self._open:
                return
            self.escalation += 1
            log.warning("%s: modem silent after %d timeouts; recovery: %s", self.url,
                        self.failures, name)
            if await rung():
                return
        log.error("%s: modem still silent after the recovery ladder; it starts over on the "
                  "next timeout", self.url)

    async def _ping(self) -> bool:
        """Two unanswered ``AT``s in a row make a silent modem."""
        for _ in range(2):
            if await self._probe(self.resync_timeout):
                return True
        return False

    async def _probe(self, limit: float) -> bool:
        """One ``AT``: True if the modem answered anything at all. A banner does not cut it
        short: a modem that read it just after booting answers it, and an answer left to come
        after a next command would be taken for that command's."""
        async with self._exclusive():
            self._probing = True
            try:
                await self._transact("AT", limit, (), None)
            except (CommandTimeout, ModemReset):
                return False
            except (PortError, NotConnected):
                raise
            except ModemError:
                return True  # ERROR is an answer
            finally:
                self._probing = False
            return True

    async def _reopen(self) -> bool:
        async with self._exclusive():
            self._drop_port()
            try:
                port = await open_serial_async(self.url, self.baudrate)
            except PortError as exc:
                log.warning("%s: reopen failed: %s", self.url, exc)
                self._detach(exc)
                return False
            if not self._open:  # closed while the port was opening
                port.close()
                return False
            self._attach(port)
        return await self._ping()

    async def _reset(self) -> bool:
        cmd = self.reset_command
        self._expect_restart()
        async with self._exclusive():
            try:
                await self._transact(cmd, self.resync_timeout * 3, (), None)
            except (CommandTimeout, ModemReset):
                pass  # rebooting without a word, or already back
            except (PortError, NotConnected):
                raise
            except ModemError as exc:  # refused: the modem answers, so it is not hung
                log.warning("%s: %s refused (%s)", self.url, cmd, exc)
                self._restart_expected_until = 0.0
                self._set_condition("ready")
                return True
        return await self._await_restart(f"{cmd} (recovery of a hang)", "recovery")

    async def _power(self) -> bool:
        assert self.power_cycle is not None
        self._expect_restart()
        try:
            await self.power_cycle()
        except Exception:
            log.exception("%s: power-cycle hook failed", self.url)
        return await self._await_restart("power cycle (recovery of a hang)", "recovery")

    async def _watch_restart(self, reason: str) -> None:
        if await self._await_restart(reason, "requested"):
            return
        if self.recover and self._open:
            await self._recover_hang()

    async def _await_restart(self, reason: str, cause: ResetCause) -> bool:
        """Ping a reset modem (without holding the port in between) until it answers, at most
        ``boot_timeout``; then tell reset listeners. A modem that does not come back is hung."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.boot_timeout
        while self._open and (left := deadline - loop.time()) > 0:
            if await self._probe(min(self.resync_timeout, left)):
                self.failures = 0
                self._set_condition("ready")
                self._notify_reset(Reset(reason, cause))
                return True
        self._restart_expected_until = 0.0
        self._hang(f"no answer within {self.boot_timeout:g} s after {reason}")
        return False

    # -- input ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        port = self._port
        if port is None:
            return
        try:
            data = os.read(self._fd, 4096) if self._fd is not None else port.read(4096)
        except BlockingIOError:  # a spurious wake-up: nothing to read after all
            return
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
                if self._port is port:
                    self._detach(exc)
                return
            if data and self._port is port:
                self.feed(data)

    def feed(self, data: bytes) -> None:
        if log.isEnabledFor(TRACE):
            log.log(TRACE, "%s < %r", self.url, data)
        self._codec.receive_data(data)
        while (event := self._codec.next_event()) is not None:
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
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
                if not self._probing:
                    self._codec.abort()
                    self._fail_waiter(ModemReset(f"modem restarted ({event.text})"))
                self._echo_off = False
                self._restarted(event.text)
            for listener in list(self._urc_listeners):
                _call(listener, event)
        elif isinstance(event, Echo):
            if self._echo_off:
                self._echo_off = False
                self._restarted("echo came back on")
        elif isinstance(event, Prompt):
            if self._prompt is not None and not self._prompt.done():
                self._prompt.set_result(None)
        elif isinstance(event, Noise):
            log.debug("%s: line noise %r", self.url, event.text)
        elif isinstance(event, Discarded):
            log.warning("%s: dropped %d bytes of an over-long line", self.url, event.nbytes)

    def _restarted(self, sign: str) -> None:
        """A sign of a restart: ours (a reset we sent or watch, told when the modem answers) or
        one nobody asked for."""
        if self._restart_expected():
            self._restart_expected_until = 0.0
            log.info("%s: modem restarting (%s)", self.url, sign)
        else:
            self._notify_reset(Reset(sign, "spontaneous"))

    def _fail_waiter(self, exc: ModemError) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _notify_reset(self, reset: Reset) -> None:
        log.warning("%s: modem reset (%s): %s", self.url, reset.cause, reset)
        for listener in list(self._reset_listeners):
            _call(listener, reset)


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
