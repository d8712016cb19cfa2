"""Durable ingest: readings/s through the real Unix socket with many pipelining clients
(goal >= 5,000/s on 2 cores), and raw outbox add throughput by batch size."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from agent.core.store import Store
from agent.telemetry.ingest import IngestServer
from agent.telemetry.outbox import TELEMETRY, Outbox

CLIENTS_PER_PROCESS = 8
CLIENT_PROCESSES = 2
READINGS_PER_CLIENT = 5000


def _agent(db: Path, path: Path, ready: MpEvent, stop: MpEvent) -> None:
    async def serve() -> None:
        store = Store(db)
        server = IngestServer(Outbox(store, max_bytes=1 << 30, max_age=1e9), path)
        await server.start()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await server.close()
        store.close()

    asyncio.run(serve())


async def _client(path: Path, n: int) -> int:
    reader, writer = await asyncio.open_unix_connection(path)

    async def send() -> None:
        for start in range(0, READINGS_PER_CLIENT, 100):
            writer.write(
                b"".join(
                    b'{"topic":"bench/c%d","data":{"seq":%d,"temp":21.5}}\n' % (n, i)
                    for i in range(start, start + 100)
                )
            )
            await writer.drain()

    sender = asyncio.create_task(send())
    ok = 0
    for _ in range(READINGS_PER_CLIENT):
        ok += (await reader.readline()).startswith(b'{"ok":true')
    await sender
    writer.close()
    return ok


def _clients(path: Path, base: int, results: multiprocessing.Queue[int]) -> None:
    async def run() -> int:
        counts = await asyncio.gather(
            *(_client(path, base + i) for i in range(CLIENTS_PER_PROCESS))
        )
        return sum(counts)

    results.put(asyncio.run(run()))


def socket_ingest(directory: Path) -> None:
    db, path = directory / "ingest.db", directory / "ingest.sock"
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    agent = multiprocessing.Process(target=_agent, args=(db, path, ready, stop))
    agent.start()
    ready.wait(30)
    results: multiprocessing.Queue[int] = multiprocessing.Queue()
    clients = [
        multiprocessing.Process(target=_clients, args=(path, p * CLIENTS_PER_PROCESS, results))
        for p in range(CLIENT_PROCESSES)
    ]
    started = time.perf_counter()
    for c in clients:
        c.start()
    acked = sum(results.get() for _ in clients)
    elapsed = time.perf_counter() - started
    for c in clients:
        c.join()
    stop.set()
    agent.join()
    store = Store(db)
    stored = Outbox(store, max_bytes=1 << 30, max_age=1e9).depth(TELEMETRY)[0]
    store.close()
    total = CLIENTS_PER_PROCESS * CLIENT_PROCESSES * READINGS_PER_CLIENT
    print(
        f"durable ingest via socket: {acked / elapsed:,.0f} readings/s"
        f" ({acked}/{total} acked, {stored} stored, {CLIENT_PROCESSES * CLIENTS_PER_PROCESS}"
        f" pipelining clients, {elapsed:.2f} s, {os.cpu_count()} cpus)"
    )


def outbox_add(directory: Path) -> None:
    for batch in (1, 10, 100, 500):
        store = Store(directory / f"add{batch}.db")
        outbox = Outbox(store, max_bytes=1 << 30, max_age=1e9)
        items = [
            (TELEMETRY, "bench/t", f'{{"seq":{i},"temp":21.5}}', 1.7e9, 0) for i in range(batch)
        ]
        count = max(2000, batch * 20)
        started = time.perf_counter()
        for _ in range(count // batch):
            outbox.add(items)
        elapsed = time.perf_counter() - started
        print(
            f"outbox add, {batch:>3} per commit: {count / elapsed:>9,.0f} readings/s"
            f" ({count // batch / elapsed:,.0f} commits/s, synchronous=FULL)"
        )
        store.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="skb", dir=os.environ.get("BENCH_DIR")) as d:
        outbox_add(Path(d))
        socket_ingest(Path(d))


if __name__ == "__main__":
    main()
