"""A full disk heals: a real small filesystem (tmpfs, mounted by the test) under the store.

Delivered readings whose removal the full disk refuses are never sent again, their removal is
retried with backoff (after the store's reserve is given back), new readings are refused with a
clear answer and committed ones kept, the outbox leaves ``min_free_bytes`` free, and once
there is room again everything drains. The daemon, as a process, neither dies nor restarts its
parts in a loop meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from agent.core.store import Store, StoreFull
from agent.telemetry.outbox import TELEMETRY, Outbox
from tests.broker import Broker, Relay, Subscriber, until, wait_until
from tests.test_daemon import DEVICE, Agent, running, until_async

ITEM = (TELEMETRY, "sensors/a", '{"n":%d,"pad":"%s"}', 1_750_000_000.0, 0)


def item(n: int, pad: int = 100) -> tuple[str, str, str, float, int]:
    stream, topic, data, ts, priority = ITEM
    return stream, topic, data % (n, "x" * pad), ts, priority


@contextlib.contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``directory`` (a real filesystem that fills up)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CI runs as root)")
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem with one file; returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 512):  # then the last partial chunk
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler


def test_a_delete_refused_by_a_full_disk_is_retried_and_never_resent(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "4m") as disk:
        store = Store(disk / "db")
        outbox = Outbox(store, max_bytes=1 << 30, max_age=1e9, journal_bytes=0)  # the table
        ids = outbox.add([item(n) for n in range(50)])
        filler = fill(disk)
        with pytest.raises(StoreFull):
            outbox.add([item(99, pad=20_000)])
        reserve = disk / "db-reserve"
        assert reserve.exists()
        outbox.ack(ids[:10])  # the disk is full: the reserve goes, the delete goes through
        assert not reserve.exists()
        assert outbox.depth()[0] == 40
        fill(disk)  # full again, and no reserve left: the delete waits for room ...
        outbox.ack_soon(ids[10:20])
        assert [r.id for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)] == ids[20:]  # ... not
        assert outbox.depth()[0] == 40  # sent again meanwhile, still on disk
        filler.unlink()
        wait_until(lambda: outbox.depth()[0] == 30, what="the retried delete")
        assert store.query("SELECT COUNT(*) FROM outbox") == [(30,)]
        wait_until(reserve.exists, what="the reserve taken again")
        outbox.close()
        store.close()


def test_the_outbox_leaves_min_free_bytes_free(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        store = Store(disk / "db")
        floor = 4 << 20
        drops: list[tuple[int, int, str]] = []
        outbox = Outbox(store, max_bytes=1 << 30, max_age=1e9, min_free_bytes=floor,
                        on_drop=lambda *a: drops.append(a))
        ids: list[str] = []
        for n in range(400):  # about 4 MB of readings: more than the room above the floor
            ids += outbox.add([item(n, pad=10_000)])
        assert drops, "nothing was dropped: the test did not reach the floor"
        stat = os.statvfs(disk)
        assert stat.f_bavail * stat.f_frsize > floor - (1 << 20)  # the WAL's own 1 MiB
        kept = [r.id for r in outbox.next_batch(TELEMETRY, 1000, 1 << 30)]
        assert kept == ids[-len(kept):]  # the newest kept, the oldest dropped
        assert outbox.drops()["max_bytes"][0] == len(ids) - len(kept)
        outbox.close()
        store.close()


async def test_the_daemon_on_a_full_disk_heals_without_a_resend_storm(
    tmp_path: Path, broker: Broker
) -> None:
    """Readings wait during an outage (moved into the table: a small journal), the disk fills,
    the link comes back: each reading arrives once, new ones are refused with a clear answer
    meanwhile, the agent's parts do not fail in a loop, and with room again it drains."""
    extra = "[outbox]\nmin_free_bytes = 0\njournal_bytes = 4096\n"
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    link = Relay(broker.port)  # the agent's way to the broker; the subscriber stays connected
    with small_disk(tmp_path / "state", "16m") as disk:
        async with running(tmp_path, cast(Broker, link), extra=extra) as (agent, _sim):
            link.paused = True
            link.sever()
            ids = await agent.publish([{"topic": "sensors/a", "data": {"n": n, "pad": "x" * 200}}
                                       for n in range(200)])
            filler = fill(disk)
            refused = await refusals(agent, 5)
            assert all("store full" in str(r["error"]) for r in refused), refused
            link.paused = False
            await until(lambda: set(ids) <= {r["id"] for r in sub.readings()}, "every reading")
            filler.unlink()
            (marker,) = await agent.publish([{"topic": "sensors/a", "data": {"n": "marker"}}])
            await until(lambda: marker in {r["id"] for r in sub.readings()}, "the marker")
            sent = [r["id"] for r in sub.readings() if r["id"] in ids]
            assert len(sent) == len(ids), f"{len(sent) - len(ids)} duplicates"
            await until_async(lambda: drained(agent), "the outbox drained")
            status = await agent.status()
            assert status["running"] is True
            assert all(t["restarts"] == 0 for t in status["tasks"].values()), status["tasks"]
            assert await agent.stop() == 0
    sub.close()
    link.close()
    assert "Traceback" not in agent.log.read_text()


async def refusals(agent: Agent, n: int) -> list[dict[str, Any]]:
    """Answers to ``n`` readings of 4 KB on one connection."""
    reader, writer = await asyncio.open_unix_connection(str(agent.socket))
    try:
        lines = (json.dumps({"topic": "sensors/a", "data": {"n": i, "pad": "y" * 4000}})
                 for i in range(n))
        writer.write(b"".join(line.encode() + b"\n" for line in lines))
        await writer.drain()
        return [json.loads(await reader.readline()) for _ in range(n)]
    finally:
        writer.close()


async def drained(agent: Agent) -> bool:
    return bool((await agent.status())["outbox"]["count"] == 0)
