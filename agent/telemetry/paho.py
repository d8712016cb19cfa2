"""paho-mqtt driven by the asyncio loop, the way aiomqtt drives it: no paho network thread.

paho's socket joins the loop with ``add_reader``; ``add_writer`` while paho has bytes to
send (its register/unregister-write callbacks); a one-second timer runs ``loop_misc`` for
keepalive pings and their timeouts. Only the blocking ``connect()`` (TCP connect and TLS
handshake, up to the connect timeout on a bad cellular link) runs in a one-thread executor;
the socket callbacks it triggers there are handed to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

_MISC_INTERVAL = 1.0


class PahoDriver:
    """Attach one paho ``Client`` to the running loop for as long as it has a socket."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self._loop = asyncio.get_running_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "mqtt-connect")
        self._connecting: concurrent.futures.Future[Any] | None = None
        self._sock: Any = None
        self._fd = -1
        self._misc: asyncio.TimerHandle | None = None
        self._closed = False
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    async def connect(self, blocking_connect: Callable[[], Any]) -> None:
        """Run paho's blocking connect (or a wrapper of it) off the loop."""
        self._connecting = self._executor.submit(blocking_connect)
        await asyncio.wrap_future(self._connecting)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            fn(*args)  # on the loop: at once, before paho closes the socket
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._attach, sock)

    def _on_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._detach, sock)

    def _on_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock, True)

    def _on_unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock, False)

    def _attach(self, sock: Any) -> None:
        if self._closed:
            sock.close()  # stop() came first: this socket belongs to no one
            return
        self._sock, self._fd = sock, sock.fileno()
        tcp_no_delay(sock)
        self._loop.add_reader(self._fd, self._read)
        self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def _detach(self, sock: Any) -> None:
        if sock is not self._sock:
            return
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if self._misc:
            self._misc.cancel()
        self._sock, self._fd, self._misc = None, -1, None

    def _want_write(self, sock: Any, wanted: bool) -> None:
        if sock is not self._sock:
            return
        if wanted:
            self._loop.add_writer(self._fd, self.client.loop_write)
        else:
            self._loop.remove_writer(self._fd)

    def _read(self) -> None:
        self.client.loop_read()
        # TLS may hold whole records already read off the socket: select() won't say so.
        sock = self._sock
        while isinstance(sock, ssl.SSLSocket) and sock is self._sock and sock.pending():
            self.client.loop_read()

    def _tick(self) -> None:
        self.client.loop_misc()
        if self._sock is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    async def close(self) -> None:
        """Forget the socket (closing it if paho has not) and end the connect thread."""
        self._closed = True
        if self._connecting is not None and not self._connecting.done():
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._connecting)
        await asyncio.sleep(0)  # let socket callbacks handed over by that thread run
        sock = self._sock
        if sock is not None:
            self._detach(sock)
            sock.close()
        # paho closes its socket again when collected: that must not reach this loop.
        client = self.client
        client.on_socket_open = client.on_socket_close = None
        client.on_socket_register_write = client.on_socket_unregister_write = None
        self._executor.shutdown(wait=False)


def tcp_no_delay(sock: Any) -> None:
    """Small MQTT packets go at once: with Nagle on, a publish right after a PUBACK waits for the
    broker's delayed ACK (about 40 ms a hop). TLS sockets wrap a TCP socket and take it too."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
