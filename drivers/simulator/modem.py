"""``SimulatedModem``: the engine on a real pty, driven by the running asyncio loop.

The master side of an ``os.openpty()`` pair joins the loop with ``add_reader``; the slave is
set raw so the kernel neither echoes nor edits lines (the modem's own ATE echo is simulated).
Faults (silence, slowness, noise, URC floods, reboots, the port vanishing) and scenario steps
are timers on the same loop: no threads, no polling.

What a test can wait for instead of sleeping: :attr:`SimulatedModem.booting`,
:attr:`SimulatedModem.silent`, :attr:`SimulatedModem.flooding` and the count of input bytes the
modem ignored (:attr:`SimulatedModem.ignored`: read while silent or booting). ``clock`` is the
engine's clock (SIM busy time, traffic counters): a test that passes its own clock decides when
the SIM stops being busy and how many bytes a traffic rate adds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from drivers.simulator import sms
from drivers.simulator.controls import Controls
from drivers.simulator.engine import Engine
from drivers.simulator.personalities import PERSONALITIES, Personality
from drivers.simulator.ptyport import PtyPort
from drivers.simulator.scenario import Scenario, load_scenario, parse_scenario
from drivers.simulator.state import ModemState
from drivers.simulator.steps import run_step

log = logging.getLogger(__name__)

_NOISE_BYTES = bytes(b for b in range(256) if b not in (0x0D, 0x0A))
_MAX_LINE = 4096


class SimulatedModem(Controls):
    """A virtual modem on a pty. ``async with SimulatedModem("quectel") as sim: sim.path``.
    Its world (SIM cards, network, signal...) changes through :class:`Controls`."""

    def __init__(
        self,
        personality: str | None = None,
        scenario: Scenario | Mapping[str, Any] | str | Path | None = None,
        *,
        link: str | Path | None = None,
        seed: int | None = None,
        boot_seconds: float | None = None,
        sim_busy_seconds: float | None = None,
        banner_on_start: bool = False,
        on_path: Callable[[str], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(scenario, str | Path):
            scenario = load_scenario(scenario)
        elif isinstance(scenario, Mapping):
            scenario = parse_scenario(dict(scenario))
        self.scenario: Scenario = scenario or Scenario()
        name = personality or self.scenario.personality or "quectel"
        if name not in PERSONALITIES:
            raise ValueError(f"unknown personality {name!r} (known: {', '.join(PERSONALITIES)})")
        self.personality: Personality = PERSONALITIES[name]
        sc = self.scenario
        self.boot_seconds = (
            sc.timing.get("boot_seconds", 1.0) if boot_seconds is None else boot_seconds
        )
        busy = (
            sc.timing.get("sim_busy_seconds", 1.0) if sim_busy_seconds is None else sim_busy_seconds
        )
        self.state = ModemState()
        self.engine = Engine(
            self.personality, self.state, on_urc=self.emit_urc, sim_busy_seconds=busy,
            **({"clock": clock} if clock is not None else {}),
        )
        self.link = Path(link) if link is not None else None
        self.on_path = on_path
        self.banner_on_start = banner_on_start
        self.commands: list[str] = []  # every command line received, for tests and demos
        self.ignored = 0  # input bytes dropped while silent or booting
        self.path = ""
        self._rng = random.Random(sc.seed if seed is None else seed)
        self._apply_initial(sc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: PtyPort | None = None
        self._inbuf = bytearray()
        self._timers: set[asyncio.TimerHandle] = set()
        self._flood: asyncio.Handle | None = None
        self._mute_until = 0.0
        self._booting = False
        self._reply_delay = float(sc.faults.get("reply_delay", 0.0))
        self._noise = float(sc.faults.get("noise", 0.0))
        self._noise_inside = bool(sc.faults.get("noise_inside", False))
        self._last_send = 0.0
        self._last_line = "AT"
        self.closed = asyncio.Event()

    # -- set-up ------------------------------------------------------------------------------
    async def __aenter__(self) -> SimulatedModem:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._port = PtyPort(self._loop, self._on_data, link=self.link)
        self._open_port()
        for step in self.scenario.steps:
            self._later(step.at, run_step, self, step)
        if self.banner_on_start:
            self._send_banner()

    async def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._flood is not None:
            self._flood.cancel()
            self._flood = None
        if self._port is not None:
            self._port.close()
        self.closed.set()

    def _open_port(self, *, announce: bool = True) -> None:
        assert self._port is not None
        self._inbuf.clear()
        self.path = self._port.open()
        log.info("simulated %s modem on %s", self.personality.key, self.path)
        if announce:
            self._announce()

    def _announce(self) -> None:
        if self.on_path is not None:
            self.on_path(self.path)

    @property
    def _online(self) -> bool:
        return self._port is not None and self._port.is_open

    def _later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        holder: list[asyncio.TimerHandle] = []

        def fire() -> None:
            self._timers.discard(holder[0])
            fn(*args)

        handle = self._loop.call_later(delay, fire)
        holder.append(handle)
        self._timers.add(handle)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- input -------------------------------------------------------------------------------
    def _on_data(self, data: bytes) -> None:
        if self._silent():
            self.ignored += len(data)
            return
        self._inbuf += data
        while (end := self._inbuf.find(b"\r")) >= 0:
            raw = bytes(self._inbuf[:end])
            del self._inbuf[: end + 1]
            self._on_line(raw.replace(b"\n", b"").decode("latin-1"))
        if len(self._inbuf) > _MAX_LINE:
            self._inbuf.clear()

    def _on_line(self, line: str) -> None:
        if self.state.echo:
            self._write((line + "\r").encode("latin-1"), noisy=False)
        start = line.upper().find("AT")
        if line.upper().strip() == "A/":
            line = self._last_line
        elif start < 0:
            return  # a modem ignores everything until "AT"
        else:
            line = line[start:]
        self._last_line = line
        self.commands.append(line)
        reply, urcs = self.engine.execute(line)
        data = reply + b"".join(f"\r\n{u}\r\n".encode() for u in urcs)
        delay = self._reply_delay
        if delay <= 0 and self._last_send <= self._now():
            self._send_reply(data)
            return
        send_at = max(self._now() + delay, self._last_send)
        self._last_send = send_at
        self._later(send_at - self._now(), self._send_reply, data)

    def _send_reply(self, data: bytes) -> None:
        if self._silent():
            return
        self._write(data)
        if self.engine.reboot_requested:
            self.engine.reboot_requested = False
            self.reboot()

    @property
    def silent(self) -> bool:
        """Neither answering nor sending URCs now (silenced, booting or vanished)."""
        return self._silent()

    @property
    def booting(self) -> bool:
        """Rebooting: silent until the banner."""
        return self._booting

    @property
    def flooding(self) -> bool:
        """A :meth:`flood` still has URCs to send."""
        return self._flood is not None

    def _silent(self) -> bool:
        return (
            self._booting
            or not self._online
            or (self._loop is not None and self._now() < self._mute_until)
        )

    # -- output ------------------------------------------------------------------------------
    def _write(self, data: bytes, *, noisy: bool = True) -> None:
        if self._port is None:
            return
        if noisy and self._noise and self._rng.random() < self._noise:
            noise = self._garbage(self._rng.randint(1, 8))
            pos = self._rng.randint(0, len(data)) if self._noise_inside else 0
            data = data[:pos] + noise + data[pos:]
        self._port.write(data)

    def _garbage(self, n: int) -> bytes:
        return bytes(self._rng.choice(_NOISE_BYTES) for _ in range(n))

    def emit_urc(self, text: str) -> None:
        """Send an unsolicited line now (dropped while silent, booting or vanished)."""
        if not self._silent():
            self._write(f"\r\n{text}\r\n".encode())

    # -- runtime state changes (the others: Controls) ----------------------------------------
    def receive_sms(self, text: str, sender: str = "+818000000000") -> int | None:
        """Store an incoming SMS (``+CMTI`` per ``+CNMI``); its index, or None when full."""
        if self._silent():
            return sms.receive(self.engine, sender, text, notify=False)
        return sms.receive(self.engine, sender, text)

    # -- faults ------------------------------------------------------------------------------
    def silence(self, duration: float | None = None) -> None:
        """Stop answering (and stop URCs) for ``duration`` seconds, or for good."""
        self._mute_until = math.inf if duration is None else self._now() + duration
        self._inbuf.clear()

    def set_reply_delay(self, seconds: float) -> None:
        self._reply_delay = max(0.0, seconds)

    def inject_garbage(self, n: int = 16) -> bytes:
        """Write ``n`` random bytes (never CR or LF) now; returns them."""
        noise = self._garbage(n)
        self._write(noise, noisy=False)
        return noise

    def set_noise(self, probability: float, *, inside: bool = False) -> None:
        """Before (or, ``inside``, within) each output frame, random bytes with this chance."""
        self._noise = probability
        self._noise_inside = inside

    def flood(self, rate: float, duration: float, text: str | None = None) -> None:
        """``rate`` URCs per second for ``duration`` seconds (default: a +CEREG report):
        ``round(rate * duration)`` of them in all, however late the loop runs the timers (a
        late tick sends what is due; the last sends the rest). Silence drops them, as any URC;
        the port vanishing ends the flood."""
        if self._flood is not None:
            self._flood.cancel()
        assert self._loop is not None
        start = self._now()
        end = start + duration
        total = round(rate * duration)
        interval = max(1.0 / rate, 0.01)
        sent = [0]

        def tick() -> None:
            now = self._now()
            due = total if now + interval > end else min(total, int(rate * (now - start)) + 1)
            line = text or self.engine.reg_line("+CEREG", 2, solicited=False)
            while sent[0] < due:
                sent[0] += 1
                self.emit_urc(line)
            if sent[0] < total and self._online and self._loop is not None:
                self._flood = self._loop.call_later(interval, tick)
            else:
                self._flood = None

        self._flood = self._loop.call_soon(tick)

    def reboot(self) -> None:
        """A spontaneous reset: silence for ``boot_seconds``, then the banner, echo back on,
        state back to power-on defaults and the SIM busy for a moment."""
        if self._booting:
            return
        self._booting = True
        self._mute_until = 0.0  # a reset also cures a hung modem
        self._inbuf.clear()
        self._last_send = 0.0
        self._later(self.boot_seconds, self._finish_boot)

    def _finish_boot(self) -> None:
        self._booting = False
        self.engine.power_on()
        self.engine.sim_busy_for_a_while()
        self._send_banner()

    def _send_banner(self) -> None:
        for line in self.engine.banner():
            self.emit_urc(line)

    def vanish(self, reappear_after: float | None = None) -> None:
        """The port disappears (USB unplugged): the host's reads get EOF or EIO. With
        ``reappear_after``, a rebooted modem comes back on a new pty path (``on_path``)."""
        if not self._online:
            return
        assert self._port is not None
        self._port.vanish()
        if self._flood is not None:
            self._flood.cancel()
            self._flood = None
        if reappear_after is not None:
            self._later(reappear_after, self._reappear)

    def _reappear(self) -> None:
        # The banner goes out before the path is announced, so a host that opens the new
        # path (pyserial flushes input on open) starts clean, whatever the timing.
        self._open_port(announce=False)
        self._booting = False
        self._mute_until = 0.0
        self.engine.power_on()
        self.engine.sim_busy_for_a_while()
        self._send_banner()
        self._announce()
