"""A throwaway mosquitto on a free loopback port, for ``simkeeper demo``, ``fleet simulate``,
the benches and the tests.

:class:`LocalBroker` writes a config file of its own into a given directory (or runs one the
caller wrote), starts mosquitto and waits until it listens, stops it (SIGTERM) or kills it
(SIGKILL), and starts it again on the same port. Why it would not start is a
:class:`BrokerError` that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

FALLBACK = "/usr/sbin/mosquitto"  # Debian's package puts it there, off a user's PATH
_POLL = 0.01  # how often a starting broker is probed


class BrokerError(RuntimeError):
    """mosquitto cannot run here, or would not start (the message says what to do)."""


def find_mosquitto() -> str | None:
    """The mosquitto binary on PATH or in /usr/sbin; None when there is none."""
    found = shutil.which("mosquitto")
    if found is None and os.access(FALLBACK, os.X_OK):
        found = FALLBACK
    return found


def mosquitto_binary(otherwise: str = "") -> str:
    """The mosquitto binary, or BrokerError saying how to install it (and ``otherwise``, what
    else would do)."""
    found = find_mosquitto()
    if found is None:
        raise BrokerError("mosquitto not found on PATH or in /usr/sbin: install it (`make deps`,"
                          f" or `sudo apt-get install mosquitto`){otherwise}")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def end_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
                wait: float = 10.0) -> None:
    """Send ``sig`` to a running ``proc`` and reap it; SIGKILL when it outlives ``wait``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(wait)


class LocalBroker:
    """mosquitto on 127.0.0.1:``port``, anonymous, its config ``mosquitto-PORT.conf`` in
    ``directory`` with ``options`` added; logging errors to ``log`` (a file) or to its stderr,
    which a failed start quotes. With ``config`` (and its ``port``), the caller's config file
    instead. Started, stopped or killed, and started again on the same port."""

    def __init__(self, directory: Path, options: Sequence[str] = (), *, binary: str | None = None,
                 log: Path | None = None, config: Path | None = None,
                 port: int | None = None) -> None:
        self.binary = binary or mosquitto_binary()
        self.port = port or free_port()
        self.log = log
        if config is None:
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / f"mosquitto-{self.port}.conf"
            lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                     f"log_dest file {log}" if log else "log_dest stderr", "log_type error",
                     *options]
            if os.geteuid() == 0:
                lines.append("user root")  # or mosquitto drops to a user that cannot read ours
            config.write_text("\n".join(lines) + "\n")
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait (blocking) until it listens."""
        for _ in self._starting(timeout):
            time.sleep(_POLL)

    async def start_async(self, timeout: float = 10.0) -> None:
        """Start it and wait until it listens, the running loop free meanwhile."""
        for _ in self._starting(timeout):
            await asyncio.sleep(_POLL)

    def _starting(self, timeout: float) -> Iterator[None]:
        """Spawn mosquitto, then yield (the caller sleeps) until it listens."""
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if self.log else subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not self._listening(self.proc):
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto is not listening on port {self.port}"
                                  f" after {timeout:g} s")
            yield

    def _listening(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited at start ({self.config}):"
                              f" {self._why() or proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def _why(self) -> str:
        """What mosquitto said before it exited: its stderr, or the last line of its log."""
        if self.log is None:
            stderr = self.proc.stderr if self.proc else None
            return stderr.read().decode(errors="replace").strip() if stderr else ""
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End it with ``sig`` (SIGKILL if it outlives 10 s)."""
        proc, self.proc = self.proc, None
        end_process(proc, sig)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) it and start it again on the same port."""
        self.stop(signal.SIGKILL if kill else signal.SIGTERM)
        self.start()

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.stop()
