"""One activation attempt, step by step, and the round-trip probes that prove it.

Activation = the radio on (``+CFUN=1``), the SIM registered (home or roaming), the PDP context
``cid`` set to the APN (``+CGDCONT`` read back; a stale APN is replaced with
``AT+CGDCONT=<cid>,"IP","<apn>"``, the context deactivated first), the context active
(``AT+CGACT=1,<cid>``) with an address (``+CGPADDR``), and one round trip through a
:data:`Probe`. A failing step raises :class:`AttemptFailed`, carrying the classified network
refusal when there is one (registration reject fields or ``AT+CEER``; ``+CME ERROR`` of
``+CGACT``); retrying is the caller's business (:mod:`agent.sim.activation_loop`).

``checkpoint`` is awaited between steps: the keeper raises there to abandon an attempt that an
order (suspend, decommission, SIM swap) made pointless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.core.config import LifecycleConfig
from agent.sim.rejects import (
    Reject,
    classify_ceer,
    classify_cme,
    classify_mobility,
    classify_registration,
)
from agent.telemetry.drain import UplinkSettings
from agent.telemetry.probe import BindError, bound_socket, mqtt_probe, resolve
from drivers.errors import CmeError, ModemError
from drivers.modem import Modem, NetworkRegistration
from drivers.parsers.network import parse_ceer
from drivers.parsers.packet import parse_cgpaddr

Probe = Callable[[], Awaitable[None]]  # raises (OSError, TimeoutError) when no round trip
Checkpoint = Callable[[], Awaitable[None]]
_NO_ADDRESS = ("0.0.0.0", "::", "")


class AttemptFailed(Exception):
    """An activation step failed; ``reject`` is the network's classified refusal, if any."""

    def __init__(self, reason: str, reject: Reject | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reject = reject


def reject_of(reg: NetworkRegistration) -> Reject | None:
    """The refusal a denied registration stands for: the ``+CEREG=3`` reject fields, else the
    cause ``AT+CEER`` gave (:meth:`Modem.registration` reads it for a denial without one)."""
    if reg.state != "denied":
        return None
    for record in reg.records:
        if (reject := classify_registration(record)) is not None:
            return reject
    return classify_mobility(reg.reject_cause) if reg.reject_cause is not None else None


@dataclass(frozen=True, slots=True)
class Activated:
    registration: NetworkRegistration
    addresses: tuple[str, ...]
    apn_replaced: str | None  # the stale APN replaced, if any


class Activator:
    def __init__(self, probe: Probe, *, cid: int = 1, register_timeout: float = 180.0,
                 register_poll: float = 2.0) -> None:
        self.probe = probe
        self.cid = cid
        self.register_timeout = register_timeout
        self.register_poll = register_poll

    async def attempt(self, modem: Modem, apn: str, checkpoint: Checkpoint,
                      on_registered: Callable[[], Awaitable[None]] | None = None) -> Activated:
        pin = await modem.pin_state()
        if pin.state != "ready":
            raise AttemptFailed(f"SIM is {pin.state}")
        if (await modem.radio()).state != "on":
            await modem.set_radio("on")
        await checkpoint()
        reg = await self.wait_registered(modem, checkpoint)
        if on_registered is not None:
            await on_registered()  # e.g. the conformance check, now that the MCC is known
        await checkpoint()
        replaced = await self.ensure_apn(modem, apn)
        await checkpoint()
        addresses = await self.ensure_active(modem)
        await checkpoint()
        try:
            await self.probe()
        except BindError as exc:
            raise AttemptFailed(str(exc)) from None
        except (OSError, TimeoutError) as exc:
            raise AttemptFailed(f"no round trip: {exc or type(exc).__name__}") from None
        return Activated(reg, addresses, replaced)

    async def wait_registered(self, modem: Modem, checkpoint: Checkpoint) -> NetworkRegistration:
        """Registration within ``register_timeout``; a denial fails at once with its cause."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.register_timeout
        while True:
            reg = await modem.registration()
            if reg.registered:
                return reg
            if reg.state == "denied":
                reject = reject_of(reg)
                why = f"{reject.origin} #{reject.code}: {reject.reason}" if reject else "no cause"
                raise AttemptFailed(f"registration denied ({why})", reject)
            if loop.time() >= end:
                raise AttemptFailed(
                    f"not registered within {self.register_timeout:g} s ({reg.state})")
            await asyncio.sleep(min(self.register_poll, max(0.0, end - loop.time())))
            await checkpoint()

    async def ensure_apn(self, modem: Modem, apn: str) -> str | None:
        """Context ``cid`` set to ``apn`` (read back); the stale APN replaced, if any."""
        current = next((c for c in await modem.pdp_contexts() if c.cid == self.cid), None)
        if current is not None and (current.apn or "").casefold() == apn.casefold():
            return None
        if current is not None and current.active:
            await self._command(modem, f"AT+CGACT=0,{self.cid}")
        await self._command(modem, f'AT+CGDCONT={self.cid},"IP","{apn}"')
        check = next((c for c in await modem.pdp_contexts() if c.cid == self.cid), None)
        if check is None or (check.apn or "").casefold() != apn.casefold():
            raise AttemptFailed(f"context {self.cid} did not take APN {apn!r}")
        return (current.apn or "") if current is not None else ""

    async def ensure_active(self, modem: Modem) -> tuple[str, ...]:
        """Context ``cid`` active with an address; a refusal carries its cause."""
        current = next((c for c in await modem.pdp_contexts() if c.cid == self.cid), None)
        if current is None or not current.active:
            try:
                await modem.channel.command(f"AT+CGACT=1,{self.cid}", timeout=150.0)
            except CmeError as exc:
                reject = classify_cme(exc.code) if exc.code is not None else None
                reject = reject or await self.ceer(modem)
                raise AttemptFailed(f"AT+CGACT=1,{self.cid} refused: {exc}", reject) from None
            except ModemError as exc:
                raise AttemptFailed(f"AT+CGACT=1,{self.cid} failed: {exc}",
                                    await self.ceer(modem)) from None
        lines = await modem.channel.command(f"AT+CGPADDR={self.cid}")
        addresses = tuple(a for a in parse_cgpaddr(lines).get(self.cid, ())
                          if a not in _NO_ADDRESS)
        if not addresses:
            raise AttemptFailed(f"context {self.cid} is active but has no address")
        return addresses

    @staticmethod
    async def ceer(modem: Modem) -> Reject | None:
        try:
            return classify_ceer(parse_ceer(await modem.channel.command("AT+CEER")))
        except ModemError:
            return None

    @staticmethod
    async def _command(modem: Modem, cmd: str) -> None:
        try:
            await modem.channel.command(cmd)
        except ModemError as exc:
            raise AttemptFailed(f"{cmd} failed: {exc}") from None


# -- probes ----------------------------------------------------------------------------------


def tcp_probe(host: str, port: int, *, timeout: float = 10.0,
              interface: str | None = None) -> Probe:
    """A TCP handshake with ``host:port`` is the round trip."""

    async def probe() -> None:
        family, address = await resolve(host, port, socket.SOCK_STREAM)
        sock = bound_socket(family, socket.SOCK_STREAM, interface)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, address)
        finally:
            sock.close()

    return probe


def udp_probe(host: str, port: int, *, timeout: float = 10.0,
              interface: str | None = None) -> Probe:
    """A datagram with a random token, echoed back by ``host:port``."""

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        family, address = await resolve(host, port, socket.SOCK_DGRAM)
        sock = bound_socket(family, socket.SOCK_DGRAM, interface)
        token = b"simkeeper-probe " + os.urandom(8).hex().encode()
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, address)
                await loop.sock_sendall(sock, token)
                while await loop.sock_recv(sock, 2048) != token:
                    pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    return probe


def default_probe(lc: LifecycleConfig, uplink: UplinkSettings | None,
                  slot: str = "modem", *, interface: str | None = None) -> Probe:
    """The probe ``[lifecycle] probe`` names; ``"uplink"`` opens an MQTT session with the
    broker the way the uplink does (agent.telemetry.probe), one per modem's slot. With
    ``interface``, the probe goes out through that interface only (SO_BINDTODEVICE)."""
    if lc.probe == "udp":
        return udp_probe(lc.probe_host, lc.probe_port, timeout=lc.probe_timeout,
                         interface=interface)
    if lc.probe == "uplink" and uplink is not None:
        return mqtt_probe(uplink, timeout=lc.probe_timeout, interface=interface,
                          suffix="probe" if slot == "modem" else f"probe-{slot}")
    return tcp_probe(lc.probe_host, lc.probe_port, timeout=lc.probe_timeout,
                     interface=interface)
