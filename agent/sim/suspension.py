"""What a suspension (and the other reasons to keep quiet) asks of the modem, and carrying it out.

:func:`plan` is pure: from the SIM's lifecycle state, its suspension and whether the terminal may
emit, the radio level and data state wanted. The scopes nest (``SCOPES``, narrowest first):

- ``telemetry``: nothing on the modem; the uplink holds readings (:func:`telemetry_allowed`);
- ``data``: every PDP context deactivated (``AT+CGACT=0,<cid>``) and kept down;
- ``radio``: ``AT+CFUN=4`` (both RF paths off, SIM still readable), the stop-emission case.

A terminated SIM gets ``AT+CFUN=0``; an expired one, a non-conforming terminal under policy
``enforce`` and a malfunction get ``AT+CFUN=4`` (no attach attempts); an active SIM gets its
radio back on once nothing holds it. :class:`Enforcer` applies a :class:`Want` idempotently (it
reads ``+CFUN?``/``+CGACT?`` first), so the keeper re-applies it after every modem reset and every
restart. With ``[modem] data_path = "networkmanager"`` it also
tells NetworkManager (connection down and autoconnect off, ``nmcli radio wwan off``), or
NetworkManager and ModemManager would undo it within seconds; ``nmcli`` runs through an
injectable runner, and a missing ``nmcli`` is a logged error, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.sim.lifecycle import SCOPES, State, Suspension
from drivers.errors import ModemError, NotConnected, PortError
from drivers.modem import CFUN_LEVELS, Modem
from drivers.parsers.device import RadioState
from drivers.parsers.packet import parse_cgact

log = logging.getLogger(__name__)

NmMode = Literal["on", "data-off", "radio-off"]
Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]  # argv -> (exit status, output)


@dataclass(frozen=True, slots=True)
class Want:
    """``radio``: the level to hold, None when the keeper's activation logic decides;
    ``data_down``: keep every PDP context inactive."""

    radio: RadioState | None = None
    data_down: bool = False
    why: str = ""

    @property
    def nm_mode(self) -> NmMode:
        if self.radio in ("off", "low-power"):
            return "radio-off"
        return "data-off" if self.data_down else "on"


def _covers(suspension: Suspension | None, scope: str) -> bool:
    return suspension is not None and SCOPES.index(suspension.scope) >= SCOPES.index(scope)


def plan(state: State | None, suspension: Suspension | None, *, may_emit: bool = True,
         why_not: str = "", probing: bool = False) -> Want:
    """The wanted radio and data state. ``may_emit``: the terminal conforms (or policy
    ``warn``) and no malfunction holds; ``probing``: the keeper is checking whether the
    network took back a SIM it barred, so a network ``radio`` suspension lets the radio on."""
    if state == "terminated":
        return Want("off", True, "decommissioned")
    if not may_emit:
        return Want("low-power", True, why_not or "terminal may not emit")
    if state == "suspended" and _covers(suspension, "radio"):
        assert suspension is not None
        if probing and suspension.source == "network":
            return Want(None, False, "probing the network")
        return Want("low-power", True, f"suspended ({suspension.source}, radio)")
    if state == "suspended" and _covers(suspension, "data"):
        assert suspension is not None
        return Want(None, True, f"suspended ({suspension.source}, data)")
    if state == "expired":
        return Want("low-power", True, "activation deadline passed")
    if state == "active":  # back on the air once whatever kept it quiet is lifted
        return Want("on", False, "active")
    return Want()


def telemetry_allowed(state: State | None, suspension: Suspension | None) -> bool:
    """Readings may go up: no suspension of any scope (they nest), not decommissioned."""
    return state != "terminated" and not (state == "suspended" and suspension is not None)


def ingest_refusal(state: State | None, suspension: Suspension | None) -> str | None:
    """Why local apps' readings are refused, None when accepted. A suspension keeps them (they
    wait in the outbox and go up after the resume) unless its order said ``"readings":
    "refuse"``; a decommissioned gateway refuses them (DESIGN.md, "Suspension and readings")."""
    if state == "terminated":
        return "decommissioned: this gateway's SIM was returned; readings are not accepted"
    if state == "suspended" and suspension is not None and suspension.readings == "refuse":
        until = f" until {suspension.until:.0f}" if suspension.until is not None else ""
        return f"suspended by operator order ({suspension.scope}){until}; readings are refused"
    return None


# -- carrying it out -------------------------------------------------------------------------


async def run_process(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str]:
    """The default runner: ``argv`` as a subprocess (no shell); FileNotFoundError when the
    program is missing."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, f"timed out after {timeout:g} s"
    return proc.returncode if proc.returncode is not None else -1, out.decode(errors="replace")


class Enforcer:
    def __init__(self, *, data_path: str = "agent", runner: Runner = run_process,
                 nm_connection: str | None = None, nm_radio: bool = True) -> None:
        self.data_path = data_path
        self.nm_radio = nm_radio  # may turn NetworkManager's wwan radio off (one modem only)
        self.runner = runner
        self.nm_connection = nm_connection
        self.nm_error: str | None = None  # the last nmcli failure, for the summary

    async def apply_modem(self, modem: Modem, want: Want) -> list[str]:
        """Bring the modem to ``want``; the commands it took (empty when already there)."""
        done = []
        if want.radio is not None and (await modem.radio()).fun != CFUN_LEVELS[want.radio]:
            await modem.set_radio(want.radio)
            done.append(f"radio {want.radio}")
        if want.data_down:
            try:
                active = parse_cgact(await modem.channel.command("AT+CGACT?"))
            except (PortError, NotConnected):
                raise
            except ModemError:  # a modem at CFUN=0 may refuse it: nothing is active then
                active = {}
            for cid, up in sorted(active.items()):
                if up:
                    await modem.channel.command(f"AT+CGACT=0,{cid}", timeout=40.0)
                    done.append(f"context {cid} down")
        if done:
            log.info("enforced %s: %s", want.why, ", ".join(done))
        return done

    async def apply_nm(self, mode: NmMode, previous: NmMode | None) -> bool:
        """Tell NetworkManager (``data_path = "networkmanager"`` only); False when nmcli
        failed or is missing (logged, kept in :attr:`nm_error`)."""
        if self.data_path != "networkmanager":
            return True
        if mode == "on" and previous in (None, "on"):
            return True  # never touched NetworkManager: leave the admin's settings alone
        try:
            connections = await self._connections()
            commands: list[list[str]] = []
            if mode == "on":
                commands.append(["nmcli", "radio", "wwan", "on"])
                for name in connections:
                    commands.append(["nmcli", "connection", "modify", name,
                                     "connection.autoconnect", "yes"])
                    commands.append(["nmcli", "connection", "up", name])
            else:
                for name in connections:
                    commands.append(["nmcli", "connection", "modify", name,
                                     "connection.autoconnect", "no"])
                    commands.append(["nmcli", "connection", "down", name])
                if mode == "radio-off" and self.nm_radio:
                    commands.append(["nmcli", "radio", "wwan", "off"])
            failed = []
            for argv in commands:
                status, out = await self.runner(argv)
                if status != 0 and not _harmless(argv, out):
                    failed.append(" ".join(argv[1:]) + f": {out.strip() or status}")
        except FileNotFoundError:
            self.nm_error = ("nmcli not found: cannot carry out the suspension through"
                             " NetworkManager, which may undo it (install network-manager or set"
                             " [modem] data_path)")
            log.error("%s", self.nm_error)
            return False
        except OSError as exc:
            self.nm_error = f"nmcli failed to run: {exc}"
            log.error("%s", self.nm_error)
            return False
        self.nm_error = "; ".join(failed) or None
        if failed:
            log.error("NetworkManager did not take %s: %s", mode, self.nm_error)
        return not failed

    async def _connections(self) -> list[str]:
        if self.nm_connection:
            return [self.nm_connection]
        status, out = await self.runner(["nmcli", "-t", "-f", "NAME,TYPE", "connection", "show"])
        if status != 0:
            raise OSError(f"nmcli connection show: {out.strip() or status}")
        names = []
        for line in out.splitlines():
            name, _, kind = line.replace("\\:", "\0").rpartition(":")
            if kind.strip() == "gsm":
                names.append(name.replace("\0", ":"))
        if not names:
            log.warning("NetworkManager has no gsm connection to take down")
        return names


def _harmless(argv: Sequence[str], out: str) -> bool:
    """``connection down`` of a connection that is not active is not a failure."""
    return list(argv[1:3]) == ["connection", "down"] and "not an active" in out.lower()
