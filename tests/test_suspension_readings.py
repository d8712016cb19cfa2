"""A suspension keeps readings (issue 12, part 4; DESIGN.md "Suspension and readings"): apps'
readings are accepted during it, wait in the outbox across a SIGKILL and a restart, and go up
once after the resume; an order saying ``"readings": "refuse"`` has the ingest socket refuse
them for as long as it holds."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from agent.fleet.sign import make_envelope
from tests.broker import Broker, Subscriber, until
from tests.test_daemon import DEVICE, online, retained_state, running, send_command, until_async
from tests.test_e2e_lifecycle import operator_key


async def _suspension(port: int) -> dict[str, object] | None:
    state = await retained_state(port)
    return state["suspension"]  # type: ignore[no-any-return]


async def test_readings_sent_while_suspended_go_up_once_after_the_resume(
        tmp_path: Path, broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    telemetry = Subscriber(broker.port, f"simkeeper/{DEVICE}/telemetry")
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, _sim):
            await online(broker.port)
            order = make_envelope(key, DEVICE, "suspend", {"scope": "telemetry"})
            assert (await send_command(broker.port, order))["status"] == "ok"
            await until_async(lambda: _held(broker.port), "the suspension in state")
            before = await agent.publish([{"topic": "t", "data": n} for n in range(20)])

            async def waiting(n: int) -> bool:
                return (await agent.status())["outbox"]["streams"].get(
                    "telemetry", {}).get("count", 0) >= n

            await until_async(lambda: waiting(20), "the readings held in the outbox")
            await agent.stop(signal.SIGKILL)
            await agent.start()
            await online(broker.port)
            assert await _held(broker.port)  # still suspended after the restart
            after = await agent.publish([{"topic": "t", "data": n} for n in range(10)])
            await until_async(lambda: waiting(30), "all thirty held")
            sent = {r["id"] for r in telemetry.readings()}
            assert not sent & {*before, *after}  # held: none went up while suspended
            resume = make_envelope(key, DEVICE, "resume")
            assert (await send_command(broker.port, resume))["status"] == "ok"
            await until(lambda: {r["id"] for r in telemetry.readings()} >= {*before, *after},
                        "every reading, after the resume")
            got = [r["id"] for r in telemetry.readings() if r["id"] in {*before, *after}]
            assert len(got) == len(set(got)) == 30  # once each
    finally:
        telemetry.close()


async def _held(port: int) -> bool:
    suspension = await _suspension(port)
    return suspension is not None and suspension.get("scope") == "telemetry"


async def test_an_order_may_ask_for_readings_to_be_refused(tmp_path: Path,
                                                          broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    async with running(tmp_path, broker, extra=extra) as (agent, _sim):
        await online(broker.port)
        order = make_envelope(key, DEVICE, "suspend", {"scope": "telemetry",
                                                       "readings": "refuse"})
        result = await send_command(broker.port, order)
        assert result["status"] == "ok" and "readings: refuse" in result["detail"]
        reader, writer = await asyncio.open_unix_connection(str(agent.socket))
        writer.write(b'{"topic": "t", "data": 1}\n')
        answer = json.loads(await reader.readline())
        writer.close()
        assert not answer["ok"] and "suspended by operator order" in answer["error"]
        resume = make_envelope(key, DEVICE, "resume")
        assert (await send_command(broker.port, resume))["status"] == "ok"
        assert await agent.publish([{"topic": "t", "data": 2}])  # accepted again
