"""The ingest socket of `simkeeper run` as a process (simulated modem, real mosquitto): a bad
reading fails alone among pipelined lines, and idle clients holding every slot give way to a
producer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.broker import Broker, Subscriber, until
from tests.test_daemon import DEVICE, Agent, running
from tests.test_e2e_agent import first_arrivals


def line(topic: str, n: int) -> bytes:
    return json.dumps({"topic": topic, "data": {"n": n}}).encode() + b"\n"


async def pipeline(agent: Agent, lines: list[bytes]) -> list[dict[str, Any]]:
    """Write every line on one connection, then read one answer each."""
    reader, writer = await asyncio.open_unix_connection(str(agent.socket))
    try:
        writer.write(b"".join(lines))
        await writer.drain()
        return [json.loads(await reader.readline()) for _ in lines]
    finally:
        writer.close()


def arrived(sub: Subscriber, topic: str) -> list[int]:
    return [r["data"]["n"] for r in first_arrivals(sub) if r["topic"] == topic]


async def test_a_lone_surrogate_fails_alone_and_the_agent_lives_on(
    tmp_path: Path, broker: Broker
) -> None:
    """Two clients pipeline at once; one line of the first holds ``"\\ud800"`` (valid JSON, not
    UTF-8). That line alone is refused; every other one is acknowledged and arrives. Readings of a
    topic arrive in order, so the later ones arriving shows the bad one never will."""
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    try:
        async with running(tmp_path, broker) as (agent, _sim):
            mine = [line("sensors/a", n) for n in range(50)]
            mine[25] = b'{"topic": "sensors/a", "data": {"n": 25, "text": "\\ud800"}}\n'
            other = [line("sensors/b", n) for n in range(20)]
            mine_answers, other_answers = await asyncio.gather(
                pipeline(agent, mine), pipeline(agent, other)
            )
            bad = mine_answers.pop(25)
            assert bad["ok"] is False and "UTF-8" in bad["error"], bad
            assert all(a["ok"] for a in mine_answers + other_answers)
            ids = {a["id"] for a in mine_answers + other_answers}
            await until(lambda: ids <= {r["id"] for r in sub.readings()}, "every reading")
            assert arrived(sub, "sensors/a") == [n for n in range(50) if n != 25]
            assert arrived(sub, "sensors/b") == list(range(20))
            assert await agent.publish([{"topic": "sensors/c", "data": 1}])  # still serving
            assert (await agent.status())["running"] is True
            assert await agent.stop() == 0
    finally:
        sub.close()
    log = agent.log.read_text()
    assert "Traceback" not in log and "internal error" not in log


async def test_idle_clients_holding_every_slot_give_way(tmp_path: Path, broker: Broker) -> None:
    """max_clients = 4, four connected clients idle (each sent one reading): a fifth client
    still gets its lines committed; the idlest (the first) is told why and closed, the others
    keep their slots."""
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    try:
        async with running(tmp_path, broker, extra="max_clients = 4\n") as (agent, _sim):
            idle = []
            for n in range(4):  # one after the other: the first is the idlest
                reader, writer = await asyncio.open_unix_connection(str(agent.socket))
                writer.write(line("sensors/idle", n))
                assert json.loads(await reader.readline())["ok"]
                idle.append((reader, writer))
            answers = await pipeline(agent, [line("sensors/busy", n) for n in range(50)])
            assert all(a["ok"] for a in answers), answers
            first, first_writer = idle[0]
            assert json.loads(await first.readline()) == {
                "ok": False, "error": "evicted: all 4 client slots taken, this one the idlest"
            }
            assert await first.read() == b""
            first_writer.close()
            for n, (reader, writer) in enumerate(idle[1:], 4):  # the others were left alone
                writer.write(line("sensors/idle", n))
                assert json.loads(await reader.readline())["ok"]
                writer.close()
            await until(lambda: arrived(sub, "sensors/busy") == list(range(50))
                        and arrived(sub, "sensors/idle") == list(range(7)), "every reading")
            assert await agent.stop() == 0
    finally:
        sub.close()
