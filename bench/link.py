"""A cellular link for the benches and the tests: a TCP relay with a bandwidth cap, latency,
jitter, stalls and cuts, in pure Python on asyncio (no kernel traffic shaping here).

:class:`LinkEmulator` listens on a free loopback port and forwards each connection to a target.
Each direction (up: client to target; down: back) has a :class:`Shape`: a bandwidth cap (a token
bucket in bytes/s with one segment of burst, shared by every connection: one radio link), a
one-way latency and a jitter (delay = latency +- uniform(jitter), never below 0; a segment never
overtakes an earlier one of its connection). Faults, on a schedule (:class:`Faults`) or by call:

- ``stall(s)``: the link freezes; bytes queue in it but nothing moves until it ends;
- ``cut(s)``: every connection is reset (RST) and, until the cut ends, a new connection is
  reset at once, or with ``blackhole`` held silent (what it sends is lost) and reset at the end;
- ``restore()``: ends a stall or a cut now. One fault at a time: a new one replaces the last.

Counters per direction (:class:`Direction`); with ``trace``, each segment sent as (time, bytes)
on the bucket's own clock, so a test checks the cap without timing anything. On the caller's
loop: ``async with``; in a thread of its own: ``with`` (or start/stop). Manual use:
``python -m bench.link --listen PORT --target HOST:PORT --up-kbit 256 --rtt-ms 150 ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.telemetry.pacing import TokenBucket

SEGMENT = 1460  # bytes: a TCP segment on a 1500-byte MTU; also the bucket's burst
CHUNK = 65536  # read size: at most this much of a connection waits in the link each way


@dataclass(frozen=True)
class Shape:
    """One direction of the link."""

    kbit: float | None = None  # kbit/s (1000 bit/s); None: no cap
    latency: float = 0.0  # one-way, seconds
    jitter: float = 0.0  # seconds either side of the latency


@dataclass(frozen=True)
class Faults:
    """The schedule: a cut every ``cut_every`` s lasting ``cut_for`` s; stalls likewise."""

    cut_every: float | None = None
    cut_for: float = 3.0
    stall_every: float | None = None
    stall_for: float = 1.0


class Direction:
    """One way of the link, shared by every connection. Bytes ``received`` from senders,
    ``sent`` through the cap (on the wire), ``delivered`` to receivers, ``lost`` to cuts;
    ``held_back``: segments the jitter would have put before an earlier one; ``trace``: (clock,
    bytes) of each segment sent, when asked."""

    def __init__(self, shape: Shape, rng: random.Random, trace: bool) -> None:
        self.shape, self._rng = shape, rng
        self.received = self.sent = self.delivered = self.lost = self.held_back = 0
        self.trace: list[tuple[float, int]] | None = [] if trace else None
        self._now = 0.0
        self._bucket = TokenBucket(shape.kbit * 125, SEGMENT, self._clock) if shape.kbit else None
        self._turn = asyncio.Lock()  # FIFO: the first segment waiting goes first

    def _clock(self) -> float:
        self._now = time.monotonic()
        return self._now

    async def send(self, size: int) -> None:
        """Wait until the cap lets ``size`` bytes go, and count them."""
        if self._bucket is None:
            self._clock()
        else:
            async with self._turn:
                # One exact sleep: a wake a hair early is a debt the next segment pays.
                await asyncio.sleep(self._bucket.delay(size))
                self._bucket.take(size)
        self.sent += size
        if self.trace is not None:
            self.trace.append((self._now, size))

    def delay(self) -> float:
        return max(0.0, self.shape.latency + self._rng.uniform(-1, 1) * self.shape.jitter)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a link that drops a session does (not a polite FIN)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client's connection to the target: a pipe each way."""

    def __init__(self, link: LinkEmulator, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self._link, self._client = link, (reader, writer)
        self._writers = [writer]
        self._held = {link.up: 0, link.down: 0}  # received, not yet delivered
        self._tasks: list[asyncio.Task[None]] = []
        self.dead = False

    async def run(self) -> None:
        link = self._link
        try:
            target_r, target_w = await asyncio.open_connection(*link.target)
        except OSError:
            self.kill()
            return
        self._writers.append(target_w)
        if self.dead:  # cut while connecting
            _reset(target_w)
            return
        client_r, client_w = self._client
        self._tasks = [asyncio.create_task(self._pipe(client_r, target_w, link.up)),
                       asyncio.create_task(self._pipe(target_r, client_w, link.down))]
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        # One side reset: so is the other. Else both ended (FIN each way): close.
        self.kill(reset=any(not t.cancelled() and t.exception() for t in done))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill(self, *, reset: bool = True) -> None:
        """Reset both sides now (or close them); what is still in the link is lost."""
        if self.dead:
            return
        self.dead = True
        for way, held in self._held.items():
            way.lost += held
        for writer in self._writers:
            _reset(writer) if reset else writer.close()
        for task in self._tasks:
            task.cancel()
        self._link.connections.discard(self)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    way: Direction) -> None:
        loop = asyncio.get_running_loop()
        flight: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliverer = asyncio.create_task(self._deliver(flight, dst, way))
        try:
            due = 0.0
            while data := await src.read(CHUNK):
                way.received += len(data)
                self._held[way] += len(data)
                for at in range(0, len(data), SEGMENT):
                    segment = data[at:at + SEGMENT]
                    await self._link.moving.wait()
                    await way.send(len(segment))
                    wanted = loop.time() + way.delay()
                    way.held_back += wanted < due
                    due = max(due, wanted)
                    flight.put_nowait((due, segment))
            flight.put_nowait(None)
            await deliverer
        finally:
            deliverer.cancel()
            await asyncio.gather(deliverer, return_exceptions=True)

    async def _deliver(self, flight: asyncio.Queue[tuple[float, bytes] | None],
                       dst: asyncio.StreamWriter, way: Direction) -> None:
        loop = asyncio.get_running_loop()
        while (item := await flight.get()) is not None:
            due, segment = item
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._link.moving.wait()
            if self.dead:
                return
            dst.write(segment)
            way.delivered += len(segment)
            self._held[way] -= len(segment)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()


class LinkEmulator:
    """A TCP relay to ``target`` (host, port) shaped ``up`` and ``down`` (default: as up), with
    ``faults``; ``blackhole``: during a cut, new connections are held silent, not reset."""

    def __init__(self, target: tuple[str, int], *, up: Shape = Shape(),
                 down: Shape | None = None, faults: Faults = Faults(), blackhole: bool = False,
                 listen: tuple[str, int] = ("127.0.0.1", 0), trace: bool = False,
                 seed: int | None = None) -> None:
        self.target, self.faults, self.blackhole, self._listen = target, faults, blackhole, listen
        rng = random.Random(seed)
        self.up, self.down = Direction(up, rng, trace), Direction(down or up, rng, trace)
        self.moving = asyncio.Event()  # clear while the link stalls
        self.moving.set()
        self.port = 0
        self.accepted = self.cuts = self.stalls = 0  # accepted: connections, cut ones too
        self.connections: set[_Connection] = set()
        self._holes: set[asyncio.StreamWriter] = set()  # held silent during a cut
        self._handlers: set[asyncio.Task[None]] = set()
        self._cut = False
        self._timer: asyncio.TimerHandle | None = None  # the end of the fault in effect
        self._schedule: dict[bool, asyncio.TimerHandle] = {}  # the next cut (True), stall
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def open(self) -> LinkEmulator:
        """Listen on the caller's loop (``port`` is then known); start the fault schedule."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, *self._listen)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._begin_faults()
        return self

    async def close(self) -> None:
        self._end_faults()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._end()
        for conn in list(self.connections):
            conn.kill()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> LinkEmulator:
        return await self.open()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def start(self) -> LinkEmulator:
        """Run on a loop in a thread of its own; returns once it listens."""
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.open())
            except OSError as exc:
                opened.set_exception(exc)
            else:
                opened.set_result(None)
                loop.run_forever()
                loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="link-emulator", daemon=True)
        self._thread.start()
        opened.result()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = None

    # -- faults, from any thread ----------------------------------------------------------------

    def cut(self, seconds: float | None = None) -> None:
        """Reset every connection; refuse (or black-hole) new ones for ``seconds`` (None: until
        :meth:`restore`)."""
        self._on_loop(lambda: self._fault(seconds, cut=True))

    def stall(self, seconds: float | None = None) -> None:
        """Freeze the link for ``seconds`` (None: until :meth:`restore`)."""
        self._on_loop(lambda: self._fault(seconds, cut=False))

    def restore(self) -> None:
        """End a cut or a stall now."""
        self._on_loop(self._end)

    def begin_faults(self) -> None:
        """Start the fault schedule again from now."""
        self._on_loop(self._begin_faults)

    def _on_loop(self, call: Callable[[], None]) -> None:
        if self._thread is None or threading.current_thread() is self._thread:
            call()
            return
        assert self._loop is not None

        async def on_loop() -> None:
            call()

        asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result()

    def _fault(self, seconds: float | None, *, cut: bool) -> None:
        assert self._loop is not None
        self._end()  # of the fault this one replaces
        if seconds is not None:
            self._timer = self._loop.call_later(seconds, self._end)
        if not cut:
            self.stalls += 1
            self.moving.clear()
            return
        self.cuts += 1
        self._cut = True
        for conn in list(self.connections):
            conn.kill()

    def _end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._cut = False
        self.moving.set()
        for writer in self._holes:
            _reset(writer)
        self._holes.clear()

    def _begin_faults(self) -> None:
        self._end_faults()
        f = self.faults
        for every, lasting, cut in ((f.cut_every, f.cut_for, True),
                                    (f.stall_every, f.stall_for, False)):
            if every:
                self._next(every, lasting, cut)

    def _next(self, every: float, lasting: float, cut: bool) -> None:
        assert self._loop is not None
        self._schedule[cut] = self._loop.call_later(every, self._scheduled, every, lasting, cut)

    def _scheduled(self, every: float, lasting: float, cut: bool) -> None:
        self._fault(lasting, cut=cut)
        self._next(every, lasting, cut)

    def _end_faults(self) -> None:
        for timer in self._schedule.values():
            timer.cancel()
        self._schedule.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if not self._cut:
                conn = _Connection(self, reader, writer)
                self.connections.add(conn)
                await conn.run()
            elif not self.blackhole:
                _reset(writer)
            else:
                self._holes.add(writer)
                with contextlib.suppress(OSError):
                    while data := await reader.read(CHUNK):
                        self.up.received += len(data)
                        self.up.lost += len(data)
        finally:
            self._handlers.discard(task)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.link",
                                     description="A cellular link: a shaped TCP relay.")
    add = parser.add_argument
    add("--listen", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    add("--target", required=True, help="HOST:PORT to forward to")
    add("--up-kbit", type=float, help="uplink cap, kbit/s (default: none)")
    add("--down-kbit", type=float, help="downlink cap, kbit/s (default: none)")
    add("--rtt-ms", type=float, default=0.0, help="round trip, ms")
    add("--jitter-ms", type=float, default=0.0, help="+- on each one-way delay, ms")
    add("--cut-every", type=float, help="seconds between cuts")
    add("--cut-for", type=float, default=3.0, help="seconds a cut lasts")
    add("--stall-every", type=float, help="seconds between stalls")
    add("--stall-for", type=float, default=1.0, help="seconds a stall lasts")
    add("--blackhole", action="store_true", help="during a cut, hold new connections silent")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    latency, jitter = args.rtt_ms / 2000, args.jitter_ms / 1000
    link = LinkEmulator(
        (host or "127.0.0.1", int(port)), listen=("127.0.0.1", args.listen),
        up=Shape(args.up_kbit, latency, jitter), down=Shape(args.down_kbit, latency, jitter),
        faults=Faults(args.cut_every, args.cut_for, args.stall_every, args.stall_for),
        blackhole=args.blackhole)

    async def run() -> None:
        async with link:
            print(f"listening on 127.0.0.1:{link.port}, forwarding to {args.target}", flush=True)
            while True:
                await asyncio.sleep(10)
                print(f"up {link.up.sent:,} B, down {link.down.sent:,} B, {link.accepted}"
                      f" connections, {link.cuts} cuts, {link.stalls} stalls", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
