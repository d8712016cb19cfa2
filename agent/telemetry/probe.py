"""The activation's round trip through the broker itself: one MQTT session, opened and closed.

A bare TCP connection would prove the path as well, but a broker logs a client that closes
before its CONNECT as a protocol error (mosquitto: ``Client <unknown> disconnected: Protocol
error``), once per activation attempt; on a TLS listener even a completed handshake without
CONNECT is logged so. The probe therefore speaks the uplink's own way in: TCP, TLS with the
device's certificate when the uplink uses it, an MQTT 3.1.1 CONNECT (every broker speaks it)
with a clean session under ``{client_id}-probe`` (the agent's own session is never taken
over), the CONNACK, and a DISCONNECT. Any CONNACK is a round trip, a refusal included: the
network carried it both ways, which is what the activation has to prove.

With several modems, each probe goes out through its own modem's interface (``interface``:
``SO_BINDTODEVICE``, :func:`bound_socket`), never the default route, which may be another
modem's link. Linux 5.7 and later let an unprivileged process bind a socket not yet bound; an
older kernel needs ``CAP_NET_RAW``. A socket that cannot be bound raises :class:`BindError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable

from agent.telemetry.drain import UplinkSettings
from agent.telemetry.tls import client_context, credentials

log = logging.getLogger(__name__)

_KEEPALIVE = 10  # seconds: the session lasts one round trip
_DISCONNECT = b"\xe0\x00"


class BindError(OSError):
    """The probe's socket could not be bound to its interface (none of that name, or no
    permission): the probe was never sent."""


def bound_socket(family: int, kind: socket.SocketKind, interface: str | None) -> socket.socket:
    """A non-blocking socket, bound to ``interface`` when one is given."""
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if interface:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        except OSError as exc:
            sock.close()
            raise BindError(f"the probe cannot go out through interface {interface!r}:"
                            f" {exc.strerror or exc} (SO_BINDTODEVICE)") from None
    return sock


async def resolve(host: str, port: int, kind: socket.SocketKind) -> tuple[int, tuple[str, int]]:
    """The address family and address of ``host:port``, the first the resolver gives."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=kind)
    if not infos:
        raise OSError(f"{host}: no address")
    family, _type, _proto, _name, address = infos[0]
    return family, (str(address[0]), int(address[1]))


async def _connect(settings: UplinkSettings, context: ssl.SSLContext | None,
                   interface: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    hostname = settings.host if context else None
    if not interface:
        return await asyncio.open_connection(settings.host, settings.port, ssl=context,
                                             server_hostname=hostname)
    family, address = await resolve(settings.host, settings.port, socket.SOCK_STREAM)
    sock = bound_socket(family, socket.SOCK_STREAM, interface)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
        return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise


def mqtt_probe(settings: UplinkSettings, *, timeout: float = 10.0,
               client_id: str = "simkeeper", suffix: str = "probe",
               interface: str | None = None) -> Callable[[], Awaitable[None]]:
    """A probe (agent.sim.activation): returns after a CONNACK from ``settings``' broker;
    raises OSError or TimeoutError without one. Its session is ``{client_id}-{suffix}``: each
    modem's keeper has its own (``probe``, ``probe-modem2``...), so two never take over one
    another's session. With ``interface``, through that interface only."""

    async def probe() -> None:
        context = client_context(settings) if settings.tls else None
        packet = connect_packet(f"{settings.client_id or client_id}-{suffix}",
                                *credentials(settings))
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(settings, context, interface)
            try:
                writer.write(packet)
                await writer.drain()
                try:
                    connack = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    raise ConnectionError("the broker closed before CONNACK") from None
                if connack[:2] != b"\x20\x02":
                    raise ConnectionError(f"not an MQTT broker (answered {connack.hex()})")
                if connack[3]:
                    log.info("probe: the broker refused the probe's session (CONNACK %d); "
                             "the round trip counts", connack[3])
                writer.write(_DISCONNECT)
                await writer.drain()
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()

    return probe


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, no will."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _text("MQTT") + bytes((4, flags)) + struct.pack("!H", _KEEPALIVE) + _text(client_id)
    for field in (username, password):
        if field is not None:
            body += _text(field)
    return b"\x10" + _length(len(body)) + body


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _length(n: int) -> bytes:
    """MQTT's remaining length: 7 bits a byte, the high bit saying more follow."""
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)
