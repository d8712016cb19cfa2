"""The modem's brain, sans-IO: a command line in, framed reply bytes out; URCs to a callback.

The pty server (``modem.py``) owns the file descriptors, timers and faults; the engine only
knows state, the personality's dialect and the clock it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from drivers.simulator import sms, std
from drivers.simulator.personalities import Handler, Personality
from drivers.simulator.state import ModemState, Traffic
from drivers.simulator.syntax import (
    CME_TEXT,
    CMS_TEXT,
    AtFailure,
    CmeFailure,
    CmsFailure,
    split_line,
)

STANDARD: dict[str, Handler] = {**std.HANDLERS, **sms.HANDLERS}

RegKey = tuple[int, int, int, int, int | None]


class Engine:
    def __init__(
        self,
        personality: Personality,
        state: ModemState,
        *,
        on_urc: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sim_busy_seconds: float = 1.0,
    ) -> None:
        self.personality = personality
        self.state = state
        self.clock = clock
        self.wall_clock = wall_clock
        self.sim_busy_seconds = sim_busy_seconds
        self._on_urc = on_urc
        self._handlers: dict[str, Handler] = {**STANDARD, **personality.extensions}
        self._deferred: list[str] | None = None
        self._last_reg: RegKey | None = None
        self.reboot_requested = False

    # -- lifecycle ---------------------------------------------------------------------------
    def power_on(self, radio: int = 1) -> None:
        self.state.power_on(self.clock(), self.personality.cmee_default, radio)
        self.reboot_requested = False
        self._last_reg = None
        self.sync()

    def banner(self) -> list[str]:
        cpin = self.cpin_text() or "NOT READY"
        return [line.replace("{cpin}", cpin) for line in self.personality.banner]

    def cpin_text(self) -> str | None:
        sim = self.state.sim
        if not sim.present:
            return None
        return {"pin": "SIM PIN", "puk": "SIM PUK"}.get(sim.lock, "READY")

    # -- commands ----------------------------------------------------------------------------
    def execute(self, line: str) -> tuple[bytes, list[str]]:
        """Run one command line: the framed reply (without echo), then the URCs it caused,
        which the caller sends after the reply."""
        self._deferred = []
        info: list[str] = []
        final = "OK"
        try:
            for cmd in split_line(line):
                handler = self._handlers.get(cmd.name)
                if handler is None:
                    raise AtFailure(cmd.name)
                info.extend(handler(self, cmd))
        except CmeFailure as exc:
            final = self._error("+CME ERROR", exc.code, CME_TEXT)
        except CmsFailure as exc:
            final = self._error("+CMS ERROR", exc.code, CMS_TEXT)
        except AtFailure:
            final = "ERROR"
        self.sync()
        deferred, self._deferred = self._deferred, None
        return self.frame(info, final), deferred

    def _error(self, prefix: str, code: int, texts: dict[int, str]) -> str:
        if self.state.cmee == 0:
            return "ERROR"
        if self.state.cmee == 2:
            return f"{prefix}: {texts.get(code, str(code))}"
        return f"{prefix}: {code}"

    def frame(self, info: list[str], final: str) -> bytes:
        if self.state.verbose:
            body = ("\r\n" + "\r\n".join(info) + "\r\n") if info else ""
            return (body + f"\r\n{final}\r\n").encode("utf-8", "replace")
        numeric = {"OK": "0", "ERROR": "4"}.get(final, final)
        body = "".join(f"{line}\r\n" for line in info)
        tail = f"{numeric}\r" if numeric.isdigit() else f"{numeric}\r\n"
        return (body + tail).encode("utf-8", "replace")

    # -- helpers for handlers ----------------------------------------------------------------
    def urc(self, line: str) -> None:
        """Emit an unsolicited line; during a command it follows that command's reply."""
        if self._deferred is not None:
            self._deferred.append(line)
        else:
            self._on_urc(line)

    def require_sim(self, *, unlocked: bool = True, busy_ok: bool = False) -> None:
        sim = self.state.sim
        if not sim.present:
            raise CmeFailure(10)
        if not self.sim_powered:
            raise CmeFailure(13)
        if unlocked and sim.lock == "pin":
            raise CmeFailure(11)
        if unlocked and sim.lock == "puk":
            raise CmeFailure(12)
        if not busy_ok and self.clock() < sim.busy_until:
            raise CmeFailure(14)

    def sim_busy_for_a_while(self) -> None:
        self.state.sim.busy_until = self.clock() + self.sim_busy_seconds

    @property
    def sim_powered(self) -> bool:
        """False at ``+CFUN=0`` on modules that power the SIM down there (Quectel)."""
        return self.state.radio != 0 or not self.personality.sim_off_at_cfun0

    def read_sim(self) -> None:
        """The active slot's card is read (switched to, inserted or swapped): locked as the card
        stands, busy for a moment, then ``+CPIN`` with its state."""
        self.state.sim.power_on()
        self.sim_busy_for_a_while()
        self.urc(f"+CPIN: {self.cpin_text() or 'NOT READY'}")

    def select_slot(self, slot: int) -> None:
        """Use the card in ``slot`` (1-based), as a dual-SIM single-standby modem does: the
        old card's registration drops, the new card is read (``+CPIN``) and registers as its
        network answers it. With the SIM powered down only the choice changes; the card is
        read at power-up. The choice is the modem's NV setting: reboots keep it."""
        st = self.state
        if slot == st.active_slot:
            return
        st.active_slot = slot
        if not self.sim_powered:
            st.sim.power_on()
            return
        st.switching_slot = True
        self.sync()
        st.switching_slot = False
        self.read_sim()
        self.sync()

    def traffic(self) -> Traffic:
        """The counters, brought up to now with the configured rate."""
        t = self.state.traffic
        now = self.clock()
        dt = max(0.0, now - t.accrued_at)
        t.accrued_at = now
        if self.data_active() and (t.up_bps or t.down_bps):
            t.add(t.up_bps * dt, t.down_bps * dt)
        return t

    def data_active(self) -> bool:
        return self.state.attached and any(c.active for c in self.state.pdp.values())

    def add_traffic(self, up: int, down: int) -> bool:
        t = self.traffic()
        if not self.data_active():
            return False
        t.add(up, down)
        return True

    # -- registration ------------------------------------------------------------------------
    def sync(self) -> None:
        """Apply consequences of a state change: PDP follows attach; URCs for reg changes."""
        st = self.state
        stat = st.reg_stat()
        attached = stat in (1, 5)
        was_attached = self._last_reg is not None and self._last_reg[0] in (1, 5)
        if attached and not was_attached and 1 in st.pdp:
            self.traffic()
            st.pdp[1].active = True  # an LTE attach brings up the default bearer
            st.traffic.sent_session = st.traffic.recv_session = 0.0
        if not attached:
            self.traffic()
            for ctx in st.pdp.values():
                ctx.active = False
        cause = st.network.reject_cause if stat == 3 else None
        key: RegKey = (stat, st.network.tac, st.network.cell_id, st.network.act, cause)
        last, self._last_reg = self._last_reg, key
        if last is None or last == key:
            return
        for kind in ("+CREG", "+CGREG", "+CEREG"):
            n = st.reg_modes.get(kind, 0)
            if n == 0 or (n == 1 and last[0] == stat):
                continue
            self.urc(self.reg_line(kind, n, solicited=False))

    def reg_line(self, kind: str, n: int, *, solicited: bool) -> str:
        st = self.state
        stat = st.reg_stat()
        fields = [str(n)] if solicited else []
        fields.append(str(stat))
        if n >= 2 and stat in (1, 3, 5):
            net = st.network
            fields += [f'"{net.tac:04X}"', f'"{net.cell_id:08X}"', str(net.act)]
            if n >= 3 and stat == 3 and net.reject_cause is not None:
                if kind == "+CGREG":
                    fields.append("")  # <rac>
                fields += ["0", str(net.reject_cause)]
        return f"{kind}: " + ",".join(fields)
