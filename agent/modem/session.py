"""One modem session per AT port: open, initialise, poll, and come back from anything.

A :class:`ModemSession` owns its port for as long as it runs:

- it opens an :class:`~drivers.channel.AtChannel` (recovery ladder on) and runs
  :meth:`Modem.init <drivers.modem.Modem.init>`; after every modem reset the channel reports
  (banner, echo back on, ``AT+CFUN=1,1`` of the ladder) it initialises again at once;
- when the port vanishes (USB unplugged, the modem rebooting into a new tty) it opens it again,
  waiting with capped, fully jittered exponential backoff; only :meth:`stop` (hotplug says the
  port is gone, or shutdown) ends it;
- every ``poll_interval`` seconds (and right after each initialisation) it reads the modem as
  ``simkeeper modem info --json`` shows it, plus the data counters and the module temperature
  (one AT command, where the vendor profile has one), and feeds the usage meter with the
  modem's and the kernel's counters of ``interface`` on the same tick;
- it shows the modem's real state (:attr:`ModemSession.state`, with ``since``, Unix seconds):
  ``opening``, ``ready``, ``hung`` (commands time out; the channel's recovery is under way),
  ``resetting`` (a reset or power cycle: waiting for the modem to answer again), ``lost`` (the
  port is gone; reopening) or ``stopped``. ``hung`` and ``resetting`` come from the channel's
  condition (:meth:`drivers.channel.AtChannel.add_condition_listener`);
- it counts, with their times, command timeouts, hang episodes (one per hang however many
  commands timed out: the channel's hang listener) and modem resets, for ``status``. The SIM
  keeper counts its malfunction signals from the same channel listeners.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.core.backoff import Backoff
from agent.core.store import StoreError
from agent.core.tasks import wait_event
from agent.usage.meter import Counters, read_kernel
from drivers.at import Urc
from drivers.channel import AtChannel
from drivers.errors import CommandTimeout, ModemError, NotConnected, PortError
from drivers.modem import Modem
from drivers.vendors import Profile

log = logging.getLogger(__name__)

# (iccid, source, cumulative counters, epoch) -> committed
Observe = Callable[[str, str, Counters, str], Awaitable[None]]


class SessionHooks(Protocol):
    """What else rides on a session's modem (the SIM keeper, the SMS command reader): told
    when the modem is up (after its first initialisation on an opened port) and when the port
    is gone. Hangs and resets they hear from the channel's own listeners."""

    def attached(self, channel: AtChannel, profile: Profile) -> None: ...
    def detached(self) -> None: ...


MALFUNCTION_MEMORY = 256  # timestamps kept per kind, newest last


class Malfunctions:
    """Command timeouts, hang episodes and modem resets, each with its time (``clock()``,
    newest last)."""

    def __init__(self) -> None:
        self.timeouts: deque[float] = deque(maxlen=MALFUNCTION_MEMORY)
        self.hangs: deque[float] = deque(maxlen=MALFUNCTION_MEMORY)
        self.resets: deque[float] = deque(maxlen=MALFUNCTION_MEMORY)

    def within(self, window: float, now: float) -> tuple[int, int]:
        """(timeouts, resets) seen in the last ``window`` seconds."""
        return (
            sum(1 for t in self.timeouts if now - t <= window),
            sum(1 for t in self.resets if now - t <= window),
        )


class _Watched:
    """The channel as :class:`Modem` sees it, with every command timeout counted (for
    ``status`` only: a hang is one episode, however many commands time out in it)."""

    def __init__(self, channel: AtChannel, on_timeout: Callable[[], None]) -> None:
        self._channel = channel
        self._on_timeout = on_timeout

    async def command(
        self, cmd: str, *, timeout: float | None = None, expect: tuple[str, ...] = ()
    ) -> list[str]:
        try:
            return await self._channel.command(cmd, timeout=timeout, expect=expect)
        except CommandTimeout:
            _honour_cancellation()  # a stop, not a timeout
            self._on_timeout()
            raise

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]:
        return self._channel.add_urc_listener(callback)


class ModemSession:
    def __init__(
        self,
        port: str,
        *,
        baud: int = 115200,
        poll_interval: float = 60.0,
        interface: str | None = None,
        observe: Observe | None = None,
        on_change: Callable[[], None] = lambda: None,
        on_ready: Callable[[], None] = lambda: None,
        hooks: SessionHooks | None = None,
        reopen_min: float = 1.0,
        reopen_max: float = 60.0,
        command_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.port = port
        self.baud = baud
        self.poll_interval = poll_interval
        self.interface = interface
        self.observe = observe
        self._on_change = on_change
        self._on_ready = on_ready
        self.hooks = hooks
        self._backoff = Backoff(reopen_min, reopen_max)
        self._command_timeout = command_timeout
        self._clock = clock
        self.malfunctions = Malfunctions()
        self.state = "opening"  # opening | ready | hung | resetting | lost | stopped
        self.since = clock()  # when it entered that state (Unix seconds)
        self.detail: str | None = None
        self.info: dict[str, Any] | None = None  # the `modem info --json` object, last poll
        self.polled_at: float | None = None
        self.temperature_c: float | None = None  # last poll; None where the modem has no read
        self.reopens = 0
        self._channel: AtChannel | None = None
        self._wake = asyncio.Event()
        self._stale = True
        self._hooked = False
        self._polled = False  # polled once on this port

    # -- what the daemon shows -------------------------------------------------------------------

    @property
    def iccid(self) -> str | None:
        return self.info["sim"]["iccid"] if self.info else None

    @property
    def consecutive_timeouts(self) -> int:
        return self._channel.failures if self._channel else 0

    def summary(self) -> dict[str, Any]:
        """The session for ``state``/``status``: port, state, the last modem reading, signals."""
        m = self.malfunctions
        return {
            "port": self.port,
            "state": self.state,
            "since": self.since,
            "detail": self.detail,
            "modem": self.info,
            "polled_at": self.polled_at,
            "temperature_c": self.temperature_c,
            "reopens": self.reopens,
            "timeouts": len(m.timeouts),
            "hangs": len(m.hangs),
            "resets": len(m.resets),
            "last_timeout": m.timeouts[-1] if m.timeouts else None,
            "last_hang": m.hangs[-1] if m.hangs else None,
            "last_reset": m.resets[-1] if m.resets else None,
        }

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the port until cancelled (:meth:`stop`)."""
        try:
            while True:
                try:
                    channel = await AtChannel.open(
                        self.port, baudrate=self.baud, timeout=self._command_timeout
                    )
                except PortError as exc:
                    self._set_state("lost", str(exc))
                else:
                    try:
                        await self._serve(channel)
                    finally:
                        self._channel = None
                        await channel.close()
                    self.reopens += 1
                    self._set_state("lost", self.detail or "port closed")
                await asyncio.sleep(self._backoff.next_delay())
        finally:
            self._set_state("stopped", None)

    def _set_state(self, state: str, detail: str | None) -> None:
        if (state, detail) != (self.state, self.detail):
            if state != self.state:
                log.info("modem %s: %s%s", self.port, state, f" ({detail})" if detail else "")
                self.since = self._clock()
            self.state, self.detail = state, detail
            self._on_change()

    async def _serve(self, channel: AtChannel) -> None:
        self._channel = channel
        self._stale = True
        self._polled = False
        self._wake.clear()
        channel.add_reset_listener(self._on_reset)
        channel.add_close_listener(self._on_close)
        channel.add_hang_listener(self._on_hang)
        channel.add_condition_listener(self._on_condition)
        modem = Modem(_Watched(channel, self._on_timeout))
        try:
            await self._serve_modem(channel, modem)
        finally:
            if self.hooks is not None and self._hooked:
                self._hooked = False
                self.hooks.detached()

    async def _serve_modem(self, channel: AtChannel, modem: Modem) -> None:
        while channel.is_open:
            try:
                if self._stale:
                    self._stale = False
                    await modem.init()
                    if self.hooks is not None and not self._hooked:
                        self._hooked = True
                        self.hooks.attached(channel, modem.profile)
                await self._poll(modem)
            except (PortError, NotConnected) as exc:
                self.detail = str(exc)
                return
            except ModemError as exc:
                _honour_cancellation()
                log.warning("modem %s: %s", self.port, exc)
            _honour_cancellation()
            if not channel.is_open:
                return
            self._wake.clear()
            await wait_event(self._wake, self.poll_interval)

    async def _poll(self, modem: Modem) -> None:
        info = await modem.info()
        if info["imei"] is None:
            self._stale = True  # still booting: set it up again next round
        try:
            counters = await modem.data_counters()
        except (PortError, NotConnected):
            raise
        except ModemError as exc:
            log.debug("modem %s: no data counters: %s", self.port, exc)
            counters = ()
        temperature = await modem.temperature()  # None, never raises, unless the port is gone
        first, self._polled = not self._polled, True
        self.info, self.polled_at = info, self._clock()
        self.temperature_c = temperature
        channel = self._channel
        if channel is None or channel.condition[0] == "ready":
            self._set_state("ready", None)
        if first:
            self._backoff.reset()
            self._on_ready()
        self._on_change()
        await self._meter(info, [(c.sent, c.received) for c in counters])

    async def _meter(self, info: dict[str, Any], modem: list[tuple[int, int]]) -> None:
        iccid = info["sim"]["iccid"]
        if self.observe is None or not iccid:
            return
        readings = []
        if modem:
            up, down = sum(s for s, _ in modem), sum(r for _, r in modem)
            readings.append(("modem", Counters(up, down), info["imei"] or ""))
        if self.interface and (kernel := read_kernel(self.interface)) is not None:
            readings.append(("kernel", *kernel))
        for source, counters, epoch in readings:
            try:
                await self.observe(iccid, source, counters, epoch)
            except (ValueError, StoreError) as exc:
                log.warning("usage from %s of %s not counted: %s", source, self.port, exc)

    # -- channel events --------------------------------------------------------------------------

    def _on_reset(self, why: str) -> None:
        self.malfunctions.resets.append(self._clock())
        self._stale = True
        self._wake.set()
        self._on_change()

    def _on_close(self, exc: BaseException | None) -> None:
        self.detail = f"port lost ({exc})" if exc else "port closed"
        self._wake.set()

    def _on_timeout(self) -> None:
        self.malfunctions.timeouts.append(self._clock())

    def _on_hang(self, what: str) -> None:
        self.malfunctions.hangs.append(self._clock())
        if self.state == "hung":
            self._set_state("hung", f"{what}; recovery under way")
        self._on_change()

    def _on_condition(self, condition: str) -> None:
        """The channel's condition: ``hung`` and ``resetting`` show as they are; ``ready``
        again ends them (after a reset, the re-initialisation follows)."""
        if condition in ("hung", "resetting"):
            self._set_state(condition, _CONDITION_DETAIL[condition])
        elif condition == "ready" and self.state in ("hung", "resetting") and self._polled:
            self._set_state("ready", None)

    async def reset(self) -> str:
        """The ``reset-modem`` order: the vendor's reset (``AT+CFUN=1,1``); the channel is
        ``resetting`` until the modem answers again (not a malfunction: the order asked for
        it), and the session re-initialises then."""
        channel = self._channel
        if channel is None or not channel.is_open:
            raise NotConnected(f"modem {self.port}: not connected ({self.state})")
        await channel.reset_modem(timeout=15.0)
        return f"modem {self.port} reset"


_CONDITION_DETAIL = {
    "hung": "not answering; recovery under way",
    "resetting": "reset or power cycle; waiting for the modem",
}


def _honour_cancellation() -> None:
    """Raise CancelledError if this task was asked to stop. A cancellation that lands on an AT
    command in flight comes out of the channel as CommandTimeout (it cannot tell its timer from
    the caller), and Modem's optional reads swallow that: without this check, stop() is lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
