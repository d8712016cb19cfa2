"""The modem's end of a real pty, on the running asyncio loop.

The master fd joins the loop with ``add_reader`` (and ``add_writer`` only while output is
queued); the slave is set raw, so the kernel neither echoes nor edits lines. The port keeps its
own slave fd open: without it the master would read EIO in a tight loop whenever no host has
the port open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable
from pathlib import Path

_MAX_OUTPUT = 256 * 1024  # a host that stops reading loses output, like a UART overrun


class PtyPort:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_data: Callable[[bytes], None],
        *,
        link: Path | None = None,
    ) -> None:
        self._loop = loop
        self._on_data = on_data
        self.link = link
        self.path = ""
        self._master: int | None = None
        self._slave: int | None = None
        self._stale_slave: int | None = None
        self._out = bytearray()
        self._writing = False

    @property
    def is_open(self) -> bool:
        return self._master is not None

    def open(self) -> str:
        """A new pty (and the link pointing to it); its slave path."""
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        self._out.clear()
        self._loop.add_reader(master, self._readable)
        if self._stale_slave is not None:  # held until now so the new path differs
            os.close(self._stale_slave)
            self._stale_slave = None
        if self.link is not None:
            if self.link.exists() and not self.link.is_symlink():
                raise FileExistsError(f"{self.link} exists and is not a symlink")
            tmp = self.link.with_name(self.link.name + ".tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(self.path)
            tmp.replace(self.link)
        return self.path

    def vanish(self) -> None:
        """Close the master: the host's slave is hung up (EOF/EIO on read, HUP on poll)."""
        if self._master is None:
            return
        self._loop.remove_reader(self._master)
        if self._writing:
            self._loop.remove_writer(self._master)
            self._writing = False
        os.close(self._master)
        self._master = None
        self._stale_slave, self._slave = self._slave, None
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def close(self) -> None:
        self.vanish()
        if self._stale_slave is not None:
            with contextlib.suppress(OSError):
                os.close(self._stale_slave)
            self._stale_slave = None

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except OSError:  # EAGAIN, or EIO when no one holds the slave
            return
        if data:
            self._on_data(data)

    def write(self, data: bytes) -> None:
        if self._master is None:
            return
        self._out += data
        if len(self._out) > _MAX_OUTPUT:
            del self._out[: len(self._out) - _MAX_OUTPUT]
        self._flush()

    def _flush(self) -> None:
        if self._master is None:
            return
        try:
            while self._out:
                del self._out[: os.write(self._master, self._out)]
        except BlockingIOError:
            pass
        except OSError:
            self._out.clear()
        if self._out and not self._writing:
            self._loop.add_writer(self._master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._master)
            self._writing = False
