"""Typed reads of one modem over an :class:`drivers.channel.AtChannel`, in its vendor's dialect.

Every read raises :class:`drivers.errors.ModemError` subclasses only. :meth:`Modem.info` is the
probe behind ``simkeeper modem info --json``: one failing command costs one field (null),
never the probe; a port that vanishes (:class:`PortError`, :class:`NotConnected`) ends it.
Transient failures (SIM busy, 515, timeouts) are retried with back-off for ``retry_for``
seconds; nothing else is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from drivers.at import Urc, line_prefix
from drivers.errors import (
    CmeError,
    CommandError,
    ModemError,
    NotConnected,
    OperationNotSupported,
    PortError,
    SimBusy,
    SimSlotsUnsupported,
    TransientError,
)
from drivers.parsers import ParseError
from drivers.parsers.device import NetworkTime, Radio, RadioState, parse_cfun
from drivers.parsers.identity import parse_manufacturer, parse_model, parse_revision, parse_serial
from drivers.parsers.network import (
    Act,
    ErrorReport,
    Operator,
    Registration,
    RegState,
    is_registered,
    parse_ceer,
    parse_cops,
    parse_registration,
)
from drivers.parsers.packet import (
    DataCounters,
    parse_cgact,
    parse_cgdcont,
    parse_cgpaddr,
)
from drivers.parsers.signal import Signal, parse_csq
from drivers.parsers.sim import (
    PinState,
    SimState,
    iccid_from_crsm,
    parse_cpin,
    parse_iccid,
    parse_imsi,
    parse_sim_slot,
    pin_state_from_error,
)
from drivers.parsers.thermal import Temperature
from drivers.vendors import GENERIC, Profile, SlotDialect, identify

log = logging.getLogger(__name__)
T = TypeVar("T")

ICCID_FALLBACK = "AT+CRSM=176,12258,0,0,10"  # READ BINARY of EF_ICCID (2FE2), 10 bytes
REGISTRATION_COMMANDS = ("AT+C5GREG?", "AT+CEREG?", "AT+CGREG?", "AT+CREG?")
CFUN_LEVELS: dict[RadioState, int] = {"on": 1, "off": 0, "low-power": 4}
_FATAL = (PortError, NotConnected)


class Channel(Protocol):
    """What :class:`Modem` needs of :class:`drivers.channel.AtChannel`."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]: ...

    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...


@runtime_checkable
class Resettable(Protocol):
    """A channel that resets the modem itself (recovery): it is told the vendor's command."""

    reset_command: str


@dataclass(frozen=True, slots=True)
class Identity:
    manufacturer: str | None
    model: str | None
    revision: str | None
    imei: str | None


@dataclass(frozen=True, slots=True)
class SimInfo:
    state: SimState
    pin: PinState | None  # None when +CPIN? could not be read at all
    iccid: str | None
    imsi: str | None


@dataclass(frozen=True, slots=True)
class NetworkRegistration:
    """The best of the CS/PS/EPS/5GS registrations (registered beats denied beats searching;
    5GS, then EPS, PS, CS). ``lac`` comes from a CS/PS record, ``tac`` from an EPS/5GS one;
    ``reject_cause`` is a 3GPP cause from the ``+CEREG=3`` fields or, failing those, ``+CEER``."""

    state: RegState
    act: Act | None
    lac: str | None
    tac: str | None
    cell_id: str | None
    reject_cause: int | None
    records: tuple[Registration, ...]

    @property
    def registered(self) -> bool:
        return is_registered(self.state)


@dataclass(frozen=True, slots=True)
class OperatorInfo:
    name: str | None
    mcc_mnc: str | None
    act: Act | None


@dataclass(frozen=True, slots=True)
class PdpContextInfo:
    cid: int
    pdp_type: str
    apn: str | None
    active: bool | None
    addresses: tuple[str, ...]


_STATE_RANK: dict[RegState, int] = {
    "home": 0, "roaming": 0, "denied": 1, "searching": 2, "not-registered": 3, "unknown": 4,
}
_DOMAIN_RANK = {"5gs": 0, "eps": 1, "ps": 2, "cs": 3}


def _rank(reg: Registration) -> tuple[int, int]:
    return _STATE_RANK[reg.state], _DOMAIN_RANK[reg.domain]


class Modem:
    def __init__(self, channel: Channel, profile: Profile = GENERIC, *,
                 retry_for: float = 10.0, retry_wait: float = 0.5) -> None:
        self.channel = channel
        self.profile = profile
        self.retry_for = retry_for
        self.retry_wait = retry_wait

    # -- plumbing ------------------------------------------------------------------------
    async def _retry(self, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, retried while it fails with a TransientError, ``retry_wait`` seconds
        after the first failure, doubling up to 2 s; a failure ``retry_for`` seconds after the
        first try is raised."""
        give_up = time.monotonic() + self.retry_for
        wait = self.retry_wait
        while True:
            try:
                return await read()
            except TransientError:
                if time.monotonic() >= give_up:
                    raise
            await asyncio.sleep(min(wait, 2.0))
            wait *= 2

    async def _read(self, cmd: str, parse: Callable[[list[str]], T],
                    expect: tuple[str, ...] = ()) -> T:
        async def once() -> T:
            return parse(await self.channel.command(cmd, expect=expect))
        return await self._retry(once)

    @staticmethod
    async def _optional(read: Awaitable[T]) -> T | None:
        """``await read``, or None on a ModemError other than a lost port."""
        try:
            return await read
        except _FATAL:
            raise
        except ModemError as exc:
            log.debug("optional read failed: %s", exc)
            return None

    # -- set-up --------------------------------------------------------------------------
    async def init(self) -> Profile:
        """Echo off, numeric ``+CME ERROR``, identify the vendor, enable registration reports
        (with reject causes where the modem has them). Failures are tolerated. A channel that
        resets the modem itself (:class:`Resettable`, e.g. AtChannel) learns the vendor's reset
        command here (Telit's ``AT#REBOOT``, ``AT+CFUN=1,1`` elsewhere)."""
        for cmd in ("ATE0", "AT+CMEE=1"):
            await self._optional(self.channel.command(cmd))
        manufacturer = await self._optional(self._read("AT+CGMI", parse_manufacturer))
        model = await self._optional(self._read("AT+CGMM", parse_model))
        self.profile = identify(manufacturer, model)
        if isinstance(self.channel, Resettable):
            self.channel.reset_command = self.profile.reset_command
        for cmd in self.profile.init_commands:
            if await self._optional(self.channel.command(cmd)) is None and cmd == "AT+CEREG=3":
                await self._optional(self.channel.command("AT+CEREG=2"))
        return self.profile

    # -- typed reads ---------------------------------------------------------------------
    async def identity(self) -> Identity:
        manufacturer = await self._optional(self._read("AT+CGMI", parse_manufacturer))
        model = await self._optional(self._read("AT+CGMM", parse_model))
        revision = await self._optional(self._read("AT+CGMR", parse_revision))
        serial = await self._optional(self._read("AT+CGSN", parse_serial))
        return Identity(manufacturer, model, revision, serial.imei if serial else None)

    async def pin_state(self) -> PinState:
        async def once() -> PinState:
            try:
                state = parse_cpin(await self.channel.command("AT+CPIN?"))
            except CmeError as exc:
                if isinstance(exc, TransientError):
                    raise
                return pin_state_from_error(exc)
            if state.code == "NOT READY":
                raise SimBusy("AT+CPIN?", 14, "SIM not ready")
            return state
        return await self._retry(once)

    async def iccid(self) -> str:
        """The vendor's ICCID command first, then EF_ICCID through ``+CRSM``; both work while
        the SIM waits for its PIN."""
        p = self.profile
        expect = (p.iccid_prefix,) if p.iccid_prefix else ()
        try:
            return await self._read(p.iccid_command, parse_iccid, expect)
        except _FATAL:
            raise
        except ModemError as exc:
            log.debug("%s failed (%s); reading EF_ICCID", p.iccid_command, exc)
        return await self._read(ICCID_FALLBACK, iccid_from_crsm)

    async def sim(self) -> SimInfo:
        pin = await self._optional(self.pin_state())
        state: SimState = pin.state if pin else "error"
        if state == "absent":
            return SimInfo(state, pin, None, None)
        imsi = await self._optional(self._read("AT+CIMI", parse_imsi)) if state == "ready" else None
        return SimInfo(state, pin, await self._optional(self.iccid()), imsi)

    async def registration(self) -> NetworkRegistration:
        records = []
        for cmd in REGISTRATION_COMMANDS:
            lines = await self._optional(self._read(cmd, list))
            prefix = cmd[2:-1]
            line = next((x for x in lines or () if line_prefix(x.strip()) == prefix), None)
            if line is not None:
                records.append(parse_registration(line, self.profile.act_names))
        if not records:
            raise ParseError("no registration answer")
        records.sort(key=_rank)
        best = records[0]
        cause = best.reject_cause if best.cause_type == 0 else None
        if cause is None and best.state == "denied":
            report: ErrorReport | None = await self._optional(self._read("AT+CEER", parse_ceer))
            cause = report.cause if report and report.cause else None
        return NetworkRegistration(
            state=best.state, act=best.act,
            lac=next((r.lac for r in records if r.lac), None),
            tac=next((r.tac for r in records if r.tac), None),
            cell_id=best.cell_id, reject_cause=cause, records=tuple(records),
        )

    async def operator(self) -> OperatorInfo:
        """Numeric MCC-MNC (``+COPS=3,2``), then the long name (``+COPS=3,0``, the default
        format, which the modem keeps afterwards). Format and read go as one command line, so
        another user of the port (the SIM keeper) cannot switch the format in between; a modem
        that refuses to switch is read in whatever format it has."""
        def parse(lines: Sequence[str]) -> Operator:
            return parse_cops(lines, self.profile.act_names)

        found = [op for fmt in (2, 0)
                 if (op := await self._optional(self._read(f"AT+COPS=3,{fmt};+COPS?", parse)))]
        if not found and (op := await self._optional(self._read("AT+COPS?", parse))):
            found = [op]
        if not found:
            raise ParseError("no +COPS answer")
        return OperatorInfo(name=next((op.name for op in found if op.name), None),
                            mcc_mnc=next((op.mcc_mnc for op in found if op.mcc_mnc), None),
                            act=next((op.act for op in found if op.act), None))

    async def signal(self) -> Signal:
        """``+CSQ``, gaps filled from the vendor's extended report."""
        signal = await self._optional(self._read("AT+CSQ", parse_csq)) or Signal()
        p = self.profile
        if p.signal_command is not None:
            extended = await self._optional(self._read(p.signal_command, p.signal_parser))
            signal = signal.merge(extended or Signal())
        return signal

    async def pdp_contexts(self) -> tuple[PdpContextInfo, ...]:
        contexts = await self._read("AT+CGDCONT?", parse_cgdcont)
        active = await self._optional(self._read("AT+CGACT?", parse_cgact)) or {}
        addresses = await self._optional(self._read("AT+CGPADDR", parse_cgpaddr)) or {}
        return tuple(
            PdpContextInfo(c.cid, c.pdp_type, c.apn, active.get(c.cid), addresses.get(c.cid, ()))
            for c in contexts)

    async def radio(self) -> Radio:
        states = self.profile.cfun_states
        return await self._read("AT+CFUN?", lambda lines: parse_cfun(lines, states))

    async def set_radio(self, mode: RadioState, *, timeout: float = 30.0) -> None:
        """``+CFUN`` 1 (on), 0 (off) or 4 (low-power: both RF paths off, SIM kept)."""
        await self.channel.command(f"AT+CFUN={CFUN_LEVELS[mode]}", timeout=timeout)

    async def network_time(self) -> NetworkTime:
        return await self._read(self.profile.clock_command, self.profile.clock_parser)

    async def data_counters(self) -> tuple[DataCounters, ...]:
        """The vendor's byte counters; empty when the vendor has none (SIMCom, generic)."""
        p = self.profile
        if p.counters_command is None or p.counters_parser is None:
            return ()
        return await self._read(p.counters_command, p.counters_parser)

    async def temperature_reading(self) -> Temperature | None:
        """The vendor's temperature read: the hottest sensor, named, and every sensor. None when
        the profile has no temperature command or the read fails with a ModemError; a lost port
        (PortError, NotConnected) still raises, as in every read: it ends the session."""
        p = self.profile
        if p.temperature_command is None or p.temperature_parser is None:
            return None
        expect = (p.temperature_prefix,) if p.temperature_prefix else ()
        return await self._optional(
            self._read(p.temperature_command, p.temperature_parser, expect))

    async def temperature(self) -> float | None:
        """The module temperature in °C (its hottest sensor), or None where the modem does not
        report it (see :meth:`temperature_reading`)."""
        reading = await self.temperature_reading()
        return reading.celsius if reading is not None else None

    # -- SIM slots (dual-SIM single standby) ----------------------------------------------
    def _slots(self) -> SlotDialect:
        dialect = self.profile.slot_dialect
        if dialect is None:
            raise SimSlotsUnsupported(f"{self.profile.name} modem: one SIM slot, no slot command")
        return dialect

    @staticmethod
    async def _slot_command(sent: Awaitable[T]) -> T:
        """``await sent``; a refusal (plain ERROR, +CME ERROR: 4) means one slot."""
        try:
            return await sent
        except CommandError as exc:
            if type(exc) is CommandError or isinstance(exc, OperationNotSupported):
                raise SimSlotsUnsupported(
                    f"{exc.command}: {exc.text}: the modem has no SIM slot to choose") from exc
            raise

    async def sim_slot(self) -> int:
        """The SIM slot in use, 1-based. SimSlotsUnsupported when the profile has one slot or
        the modem refuses the vendor's command; ParseError for an answer out of shape."""
        d = self._slots()

        def parse(lines: Sequence[str]) -> int:
            return parse_sim_slot(lines, d.prefix, d.first, d.count)

        return await self._slot_command(self._read(d.query, parse, (d.prefix,)))

    async def select_sim_slot(self, slot: int, *, timeout: float = 30.0) -> None:
        """Use the SIM in ``slot`` (1-based). The SIM is powered down (``+CFUN=0``) around the
        vendor's command, as 27.007 ``+CSUS`` requires and as Quectel integrations do, then the
        radio goes back to its level: the modem reads the new card and registers with it.
        Returns once the modem reports ``slot``; read the card and the registration as usual
        (:meth:`sim`, :meth:`registration`). Errors as :meth:`sim_slot`; ValueError for a slot
        the profile has not."""
        d = self._slots()
        if not 1 <= slot <= d.count:
            raise ValueError(f"slot must be 1 to {d.count}, not {slot!r}")
        if await self.sim_slot() == slot:
            return
        fun = (await self.radio()).fun
        select = d.select.format(d.first + slot - 1)
        await self.channel.command("AT+CFUN=0", timeout=timeout)
        try:
            await self._slot_command(self.channel.command(select, timeout=timeout))
        finally:
            if fun != 0:
                await self.channel.command(f"AT+CFUN={fun}", timeout=timeout)
        if (now := await self.sim_slot()) != slot:
            raise ModemError(f"{select}: accepted, but the modem still uses SIM slot {now}")

    # -- the probe -----------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """The ``simkeeper modem info --json`` object (DESIGN.md). Call :meth:`init` first."""
        ident = await self.identity()
        sim = await self.sim()
        reg = await self._optional(self.registration())
        op = await self._optional(self.operator())
        sig = await self.signal()
        radio = await self._optional(self.radio())
        return {
            "manufacturer": ident.manufacturer, "model": ident.model,
            "revision": ident.revision, "imei": ident.imei,
            "sim": {"state": sim.state, "iccid": sim.iccid, "imsi": sim.imsi},
            "registration": {
                "state": reg.state if reg else "unknown", "act": reg.act if reg else None,
                "lac": reg.lac if reg else None, "tac": reg.tac if reg else None,
                "cell_id": reg.cell_id if reg else None,
                "reject_cause": reg.reject_cause if reg else None,
            },
            "operator": {"name": op.name if op else None, "mcc_mnc": op.mcc_mnc if op else None},
            "signal": {"rssi_dbm": sig.rssi_dbm, "ber": sig.ber, "rsrp_dbm": sig.rsrp_dbm,
                       "rsrq_db": sig.rsrq_db, "sinr_db": sig.sinr_db},
            "radio": radio.state if radio else None,
        }
