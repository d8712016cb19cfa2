"""Files the factory writes: created whole, fsynced, with the mode they must have.

A file is first written under a temporary name in its own directory, fsynced, then renamed
into place and the directory fsynced, so a crash leaves either no file or the whole file.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SECRET = 0o600
PUBLIC = 0o644


class ProvisionError(Exception):
    """What went wrong, in one line; nothing was left half-written."""


@dataclass(frozen=True, slots=True)
class File:
    data: bytes
    mode: int = PUBLIC
    gid: int | None = None  # the file's group; None: the writer's

    def for_group(self, gid: int | None) -> File:
        """This file given to group ``gid`` (None: unchanged), read-only: the group may read
        what the owner may read (a secret becomes 0640), and never write."""
        if gid is None:
            return self
        mode = (self.mode & ~0o070) | (0o040 if self.mode & 0o400 else 0)
        return File(self.data, mode, gid)


def why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProvisionError(f"cannot read {what} {path}: {why(exc)}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: Path, file: File) -> None:
    """Create ``path`` (it must not exist) with ``file``'s bytes, mode and group, and fsync
    it. It is created 0600 and given its group and mode before the first byte is written: a key
    is never readable by anyone else, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SECRET)
    try:
        if file.gid is not None:
            os.fchown(fd, -1, file.gid)
        os.fchmod(fd, file.mode)  # the umask may have narrowed it
        view = memoryview(file.data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, file: File, *, replace: bool = False) -> None:
    """Write ``path`` whole or not at all; without ``replace`` an existing file is an error
    (checked atomically: the temporary file is hard-linked into place)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(tmp, file)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_dir(path.parent)
    except FileExistsError:
        raise ProvisionError(f"{path} already exists; not overwriting it") from None
    except OSError as exc:
        raise ProvisionError(f"cannot write {path}: {why(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProvisionError(f"cannot create directory {path}: {why(exc)}") from None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed): one writer at a time."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, SECRET)
    except OSError as exc:
        raise ProvisionError(f"cannot open lock {path}: {why(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
