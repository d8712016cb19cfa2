"""Shared parts of the keeper tests (no tests here): the simulator on a real pty, a real SQLite
store, a settable wall clock, loopback echo servers, and a wait that polls a condition.

Nothing asserts an elapsed-time ceiling: :func:`until` only bounds how long a test may hang. The
one timing a test asserts is a floor: the gap between two activation attempts as the modem saw
them (:func:`timed`, :func:`attempt_starts`), never below the backoff's minimum.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.config import LifecycleConfig
from agent.core.store import Store
from agent.core.trusted_time import TrustedClock
from agent.sim.activation import Probe, tcp_probe
from agent.sim.keeper import SimKeeper
from agent.sim.rejects import Backoff
from agent.sim.suspension import Runner, run_process
from drivers.channel import AtChannel
from drivers.modem import Modem
from drivers.simulator import SimulatedModem

T0 = 1_760_000_000.0
DAY = 86400.0
FAST = LifecycleConfig(poll_interval=0.3, register_timeout=1.0, time_sync_interval=30.0)


class Wall:
    """A settable wall clock (the NTP-synchronised system clock of the gateway)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingBackoff(Backoff):
    """The real backoff, remembering every delay it chose."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delays: list[float] = []
        self.probes: list[float] = []

    def next_delay(self, time_left: float | None = None) -> float:
        delay = super().next_delay(time_left)
        self.delays.append(delay)
        return delay

    def probe_delay(self, time_left: float | None = None) -> float:
        delay = super().probe_delay(time_left)
        self.probes.append(delay)
        return delay


def fast_backoff(probe: float = 1000.0, **kwargs: Any) -> RecordingBackoff:
    values = {"base": 0.05, "cap": 0.2, "min_delay": 0.02, "urgent_cap": 0.06, "probe": probe}
    return RecordingBackoff(**{**values, **kwargs})


async def until(cond: Callable[[], Any], timeout: float = 8.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"not reached within {timeout} s: {what or cond}")
        await asyncio.sleep(0.01)


class TimedCommands(list[str]):
    """The simulator's command log, with the monotonic time the modem saw each line."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, line: str) -> None:
        self.times.append(time.monotonic())
        super().append(line)


def timed(sim: SimulatedModem) -> TimedCommands:
    """From now on, ``sim`` records when it saw each command."""
    log = TimedCommands()
    sim.commands = log
    return log


def attempt_starts(log: TimedCommands) -> list[float]:
    """When the modem saw each activation attempt begin: its first ``AT+CPIN?`` (an attempt's
    first command, and no other part of the keeper's; a busy SIM's retries follow at once)."""
    starts = []
    for i, line in enumerate(log):
        if line.upper() == "AT+CPIN?" and (i == 0 or log[i - 1].upper() != "AT+CPIN?"):
            starts.append(log.times[i])
    return starts


def after(commands: list[str], mark: int, *wanted: str) -> bool:
    """``wanted`` appear in this order in ``commands`` from index ``mark`` on."""
    rest = iter(commands[mark:])
    return all(any(line.upper() == want.upper() for line in rest) for want in wanted)


def state_of(keeper: SimKeeper) -> str | None:
    summary = keeper.summary()
    return None if summary is None else str(summary["state"])


@dataclass
class Events:
    items: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def emit(self, kind: str, /, **fields: Any) -> str:
        self.items.append((kind, fields))
        return str(len(self.items))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.items]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.items if k == kind]


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    """A TCP echo server on loopback: (host, port)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield "127.0.0.1", port
    finally:
        server.close()
        await server.wait_closed()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # a DatagramTransport (not a subclass of it in 3.11)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


@asynccontextmanager
async def udp_echo_server() -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    try:
        yield "127.0.0.1", transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def refused_probe() -> Probe:
    """A TCP probe to a loopback port nobody listens on (bound, never listening)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    probe = tcp_probe("127.0.0.1", port, timeout=1.0)

    async def wrapped() -> None:
        _keep = sock  # the port stays reserved while the probe lives
        await probe()

    return wrapped


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.urlsafe_b64encode(key.sign(data)).rstrip(b"=").decode()


def write_signed_list(tmp: Path, key: Ed25519PrivateKey, text: str) -> tuple[Path, Path]:
    """The list, its .sig beside it, and the operator's public key: (list, key path)."""
    lst = tmp / "conformance.toml"
    lst.write_text(text)
    (tmp / "conformance.toml.sig").write_text(sign(key, text.encode()))
    pem = tmp / "operator.pub"
    pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return lst, pem


@dataclass
class Rig:
    sim: SimulatedModem
    channel: AtChannel
    modem: Modem
    store: Store
    keeper: SimKeeper
    events: Events
    wall: Wall
    backoff: RecordingBackoff

    def count(self, command: str) -> int:
        return sum(1 for c in self.sim.commands if c.upper() == command.upper())


def make_keeper(store: Store, events: Events, wall: Wall, backoff: Backoff, *,
                lifecycle: LifecycleConfig = FAST, synchronised: bool = True,
                probe: Probe | None = None, runner: Runner = run_process,
                **kwargs: Any) -> SimKeeper:
    clock = TrustedClock(synchronised=lambda: synchronised, wall=wall, boot="test-boot")
    return SimKeeper(store, events.emit, lifecycle=lifecycle, clock=clock, backoff=backoff,
                     probe=probe, runner=runner, register_poll=0.05, **kwargs)


@asynccontextmanager
async def rig(tmp_path: Path, *, personality: str = "quectel",
              scenario: dict[str, Any] | None = None, store: Store | None = None,
              wall: Wall | None = None, backoff: RecordingBackoff | None = None,
              start: bool = True, sim: SimulatedModem | None = None,
              command_timeout: float = 2.0, **kwargs: Any) -> AsyncIterator[Rig]:
    """A simulated modem on a pty, initialised like the daemon's session does (again after each
    reset), and a keeper attached to it."""
    own_sim = sim is None
    sim = sim or SimulatedModem(personality, scenario, boot_seconds=0.2, sim_busy_seconds=0.05)
    if own_sim:
        await sim.start()
    channel = await AtChannel.open(sim.path, timeout=command_timeout, resync_timeout=0.3)
    modem = Modem(channel, retry_for=2.0, retry_wait=0.05)
    profile = await modem.init()
    inits: set[asyncio.Task[Any]] = set()

    def reinit(_why: str) -> None:  # what ModemSession does after a reset
        task = asyncio.get_running_loop().create_task(modem.init())
        inits.add(task)
        task.add_done_callback(inits.discard)

    channel.add_reset_listener(reinit)
    own_store = store is None
    store = store or Store(tmp_path / "simkeeper.db")
    events, wall = Events(), wall or Wall()
    backoff = backoff or fast_backoff()
    keeper = make_keeper(store, events, wall, backoff, **kwargs)
    keeper.attach(channel, profile)
    if start:
        keeper.start()
    try:
        yield Rig(sim, channel, modem, store, keeper, events, wall, backoff)
    finally:
        await keeper.stop()
        for task in list(inits):
            task.cancel()
        await channel.close()
        if own_store:
            store.close()
        if own_sim:
            await sim.close()


def with_lifecycle(**changes: Any) -> LifecycleConfig:
    return replace(FAST, **changes)

