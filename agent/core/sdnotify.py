"""systemd's notify protocol (``sd_notify(3)``), without libsystemd: one datagram per message.

``NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket: a path, or ``@name`` for the abstract
namespace. ``WATCHDOG_USEC`` (for ``WATCHDOG_PID``, when set, is this process) asks for
``WATCHDOG=1`` more often than that; we ping at half of it. Without ``NOTIFY_SOCKET`` (not run
by systemd, or not ``Type=notify``) every call does nothing. A send that fails is logged once
and never raised: systemd going away must not take the agent with it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(name: str) -> str | bytes:
    return b"\0" + os.fsencode(name[1:]) if name.startswith("@") else name


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _address(environ["NOTIFY_SOCKET"]) if environ.get(
            "NOTIFY_SOCKET"
        ) else None
        self.watchdog_interval = _watchdog_interval(environ)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it went."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify to %r failed: %s", self._address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when not asked."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
