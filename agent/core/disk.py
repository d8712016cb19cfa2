"""The disk under the store: its free space, and a reserve of it for when it is full."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 20


def free_bytes(directory: Path) -> int:
    """Free space for an unprivileged user on the filesystem of ``directory``."""
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


class Reserve:
    """A file holding ``size`` bytes of the disk, given back when the disk is full so that what
    must still be written (a delivered reading's removal) finds room."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def keep(self) -> None:
        """Hold the space, unless held already. Best effort: without the room, nothing."""
        if self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            log.warning("no room for the %d-byte reserve %s: %s", self.size, self.path, exc)

    def release(self) -> bool:
        """Give the space back to the filesystem; whether there was any."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.warning("disk full: released the %d-byte reserve %s", self.size, self.path)
        return True
