"""The cellular link emulator (bench/link.py): its cap, order, stalls and cuts checked on its own
accounting, never on a stopwatch; then the MQTT uplink and the daemon through it to a real
mosquitto, with cuts mid-flow, losing no reading."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from itertools import accumulate
from pathlib import Path

import pytest

from agent.telemetry.mqtt import MqttUplink
from bench.link import SEGMENT, Faults, LinkEmulator, Shape
from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker, Subscriber, fill, open_outbox, until, uplink_settings
from tests.test_daemon import DEVICE, Agent, online
from tests.test_e2e_agent import readings


class Target:
    """A TCP server behind the link: what each connection sent it; ``echo`` sends it back."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[bytearray] = []  # per connection, in order of arrival
        self.ended = 0  # connections closed or reset
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            while data := await reader.read(65536):
                got += data
                if self.echo:
                    writer.write(data)
        except OSError:
            pass
        self.ended += 1
        writer.close()


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target(echo=True)
    server = await asyncio.start_server(t._handle, "127.0.0.1", 0)
    t.port = int(server.sockets[0].getsockname()[1])
    async with server:
        yield t


def pattern(n: int) -> bytes:
    """``n`` bytes in which any reordering or loss shows."""
    return b"".join(i.to_bytes(4, "big") for i in range(n // 4 + 1))[:n]


async def ended(reader: asyncio.StreamReader) -> bool:
    """The connection was closed or reset (not merely quiet: a hang fails after WAIT)."""
    async with asyncio.timeout(WAIT):
        try:
            return await reader.read(65536) == b""
        except ConnectionResetError:
            return True


async def round_trip(port: int, message: bytes = b"ping"
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the link that has carried ``message`` there and back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(message)
    async with asyncio.timeout(WAIT):
        assert await reader.readexactly(len(message)) == message
    return reader, writer


async def test_bandwidth_cap_holds_in_every_window_across_connections(target: Target) -> None:
    rate = 64 * 125  # 64 kbit/s in bytes/s
    async with LinkEmulator(("127.0.0.1", target.port), up=Shape(kbit=64), down=Shape(),
                            trace=True) as link:
        data = pattern(8000)
        writers = []
        for _ in range(2):  # two connections share the one link
            _, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(data)
            writers.append(writer)
        await until(lambda: sum(map(len, target.received)) == 2 * len(data), "all the bytes")
        for writer in writers:
            writer.close()
    assert [bytes(got) for got in target.received] == [data, data]
    assert link.up.received == link.up.sent == link.up.delivered == 2 * len(data)
    trace = link.up.trace
    assert trace is not None and sum(n for _, n in trace) == 2 * len(data)
    assert max(n for _, n in trace) <= SEGMENT
    # Over any run of segments, the bytes sent fit one burst plus the rate times the time the
    # run spans on the bucket's own clock: a cap ignored shows as a dense run.
    before = [0, *accumulate(n for _, n in trace)]
    worst = max(before[j + 1] - before[i] - rate * (trace[j][0] - trace[i][0])
                for i in range(len(trace)) for j in range(i, len(trace)))
    assert worst <= SEGMENT + 1


async def test_jitter_never_reorders_bytes(target: Target) -> None:
    async with LinkEmulator(("127.0.0.1", target.port), up=Shape(latency=0.02, jitter=0.02),
                            seed=7) as link:
        data = pattern(400_000)
        _, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(data)
        await until(lambda: sum(map(len, target.received)) == len(data), "all the bytes")
        writer.close()
    assert bytes(target.received[0]) == data
    assert link.up.held_back > 0  # the jitter would have reordered segments: it was held back


async def test_stall_holds_bytes_then_releases_them(target: Target) -> None:
    async with LinkEmulator(("127.0.0.1", target.port), up=Shape(latency=0.01)) as link:
        reader, writer = await round_trip(link.port)
        link.stall()
        data = pattern(50_000)
        writer.write(data)
        await until(lambda: link.up.received == 4 + len(data), "the bytes inside the link")
        assert link.up.delivered == 4 and bytes(target.received[0]) == b"ping"
        assert link.stalls == 1
        link.restore()
        async with asyncio.timeout(WAIT):
            assert await reader.readexactly(len(data)) == data  # there and back, in order
        assert link.up.delivered == link.down.delivered == 4 + len(data)
        assert link.up.lost == link.down.lost == 0
        writer.close()


async def test_cut_resets_connections_refuses_new_ones_and_restore_lets_them_in(
    target: Target,
) -> None:
    async with LinkEmulator(("127.0.0.1", target.port)) as link:
        reader, _ = await round_trip(link.port)
        link.stall()  # bytes caught inside the link by the cut are lost
        _, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await until(lambda: len(target.received) == 2, "the second connection at the target")
        writer.write(b"doomed")
        await until(lambda: link.up.received == 4 + 6, "the doomed bytes inside the link")
        link.cut()
        assert await ended(reader)
        await until(lambda: target.ended == 2, "both connections reset at the target")
        assert link.up.lost == 6 and b"doomed" not in b"".join(target.received)
        refused, _ = await asyncio.open_connection("127.0.0.1", link.port)
        assert await ended(refused)
        assert link.accepted == 3 and len(target.received) == 2  # it never reached the target
        link.restore()
        await round_trip(link.port, b"back")
        assert link.cuts == 1 and len(target.received) == 3


async def test_blackhole_cut_holds_new_connections_silent_until_it_ends(target: Target) -> None:
    async with LinkEmulator(("127.0.0.1", target.port), blackhole=True) as link:
        link.cut()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"into the void")
        await until(lambda: link.up.received == 13, "the bytes at the link")
        assert link.up.lost == 13 and target.received == []
        link.restore()
        assert await ended(reader)
        await round_trip(link.port)


async def test_scheduled_faults_recur(target: Target) -> None:
    faults = Faults(cut_every=0.05, cut_for=0.01, stall_every=0.03, stall_for=0.01)
    async with LinkEmulator(("127.0.0.1", target.port), faults=faults) as link:
        await until(lambda: link.cuts >= 3 and link.stalls >= 3, "three cuts and three stalls")
        link.faults = Faults()
        link.begin_faults()  # the schedule again, now empty: no more faults
        link.restore()
        await round_trip(link.port)


async def test_in_a_thread_of_its_own_for_blocking_clients(target: Target) -> None:
    link = LinkEmulator(("127.0.0.1", target.port)).start()
    try:
        def echoed(s: socket.socket) -> bytes:
            s.sendall(b"hello")
            return s.recv(5, socket.MSG_WAITALL)

        with socket.create_connection(("127.0.0.1", link.port), timeout=WAIT) as s:
            assert await asyncio.to_thread(echoed, s) == b"hello"
            link.cut()  # from this thread: done on the link's loop before it returns
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(s.recv, 1)
        link.restore()
        with socket.create_connection(("127.0.0.1", link.port), timeout=WAIT) as s:
            assert await asyncio.to_thread(echoed, s) == b"hello"
        assert link.cuts == 1 and link.accepted == 2
    finally:
        link.stop()


async def test_uplink_through_a_cut_link_loses_no_reading(tmp_path: Path, broker: Broker) -> None:
    outbox = open_outbox(tmp_path)
    sub = Subscriber(broker.port, "simkeeper/gw-test/telemetry")
    up, down = Shape(kbit=64, latency=0.05, jitter=0.01), Shape(kbit=256, latency=0.05)
    async with LinkEmulator(("127.0.0.1", broker.port), up=up, down=down) as link:
        settings = uplink_settings(link.port, batch_max_count=10)
        uplink = MqttUplink(settings, "gw-test", outbox, window=4)
        await uplink.start()
        ids: list[str] = []
        try:
            for cuts in range(1, 4):
                batch = fill(outbox, 300)
                ids += batch

                def mid_flow(mine: frozenset[str] = frozenset(batch)) -> bool:
                    arrived = {r["id"] for r in sub.readings()} & mine
                    return bool(arrived) and outbox.depth()[0] > 0

                await until(mid_flow, "the round under way")
                link.cut()  # on this loop: nothing moved since mid_flow() held
                seen = link.accepted
                await until(lambda: not uplink.ready, "the uplink to notice")

                def refused(before: int = seen) -> bool:
                    return link.accepted > before

                await until(refused, "an attempt, refused")
                assert link.cuts == cuts
                link.restore()
            await until(lambda: outbox.depth() == (0, 0), "the outbox to drain")
            await until(lambda: {r["id"] for r in sub.readings()} >= set(ids), "every reading")
        finally:
            await uplink.stop()
            sub.close()
    got = [r["id"] for r in sub.readings()]
    assert set(got) == set(ids)  # none lost, nothing else
    assert link.accepted > 3  # it came back after each cut


async def test_daemon_through_a_cut_link_loses_no_reading(tmp_path: Path, broker: Broker) -> None:
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    modem = tmp_path / "modem"
    shape = Shape(kbit=256, latency=0.075, jitter=0.02)
    async with (
        LinkEmulator(("127.0.0.1", broker.port), up=shape) as link,
        SimulatedModem("quectel", link=modem, boot_seconds=0.2, sim_busy_seconds=0.1),
    ):
        agent = Agent(tmp_path, link.port, str(modem))
        await agent.start()
        await online(broker.port)
        acked: list[str] = []
        try:
            for start in range(0, 600, 200):
                # Held by a stall, the round cannot arrive before the cut, which loses what
                # the agent has sent into the link by then. The stall begins with the link
                # empty: a connection's pipe stalled holding bytes reads no more, and the
                # agent's sending would not show before its keepalive gave up on the link.
                def stalled_empty() -> bool:
                    if link.up.received != link.up.delivered + link.up.lost:
                        return False
                    link.stall()  # on this loop, the link's: nothing moved since the check
                    return True

                await until(stalled_empty, "the link empty, then stalled")
                sent = link.up.received
                acked += await agent.publish(readings(start, 200))

                def sending(before: int = sent) -> bool:
                    return link.up.received > before

                await until(sending, "the agent sending into the link")
                link.cut(0.2)
            await until(lambda: {r["id"] for r in sub.readings()} >= set(acked), "every reading")
            assert await agent.stop() == 0
        finally:
            if agent.proc is not None:
                await agent.stop()
            sub.close()
    apps = {r["id"] for r in sub.readings() if r["topic"] != "agent/health"}
    assert apps == set(acked)
    assert link.cuts == 3 and link.up.lost > 0
