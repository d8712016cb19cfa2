"""A scripted peer on the far side of a real pty, for byte-exact channel tests.

The modem simulator (``drivers.simulator``) is what tests use to play a modem; this peer exists
for the few tests that must place bytes exactly (a URC between two lines of one reply, a banner
in the middle of a command), which no modem can be asked to do on cue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable

Reply = bytes | Callable[[str], bytes | None] | None


class PtyPeer:
    def __init__(self, script: dict[str, Reply], *, echo: bool = False) -> None:
        self.script = script
        self.echo = echo
        self.received: list[str] = []
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave
        self._buf = b""
        os.set_blocking(self.master, False)
        asyncio.get_running_loop().add_reader(self.master, self._on_readable)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_reader(self.master)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_readable(self) -> None:
        try:
            self._buf += os.read(self.master, 4096)
        except OSError:
            return
        while b"\r" in self._buf:
            raw, self._buf = self._buf.split(b"\r", 1)
            cmd = raw.decode().strip()
            if not cmd:
                continue
            self.received.append(cmd)
            if self.echo:
                self.write(raw + b"\r")
            if cmd.upper() == "ATE0":
                self.echo = False
            reply = self.script.get(cmd, b"\r\nERROR\r\n")
            if callable(reply):
                reply = reply(cmd)
            if reply is not None:
                self.write(reply)
