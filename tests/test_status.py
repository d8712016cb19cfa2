"""`simkeeper status`: while the daemon runs, after a clean stop, after a SIGKILL, and with no
database at all; the ``--json`` fields the README documents."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.cli.status import render
from agent.core.store import Store
from tests.broker import Broker, until
from tests.test_daemon import SIMKEEPER, Agent, running

FIELDS = {
    "device_id", "running", "reason", "pid", "started_at", "heartbeat", "stopped_at", "sims",
    "modems", "uplink", "outbox", "decommissioned", "tasks",
}


async def test_status_while_running_and_after_stop(tmp_path: Path, broker: Broker) -> None:
    async with running(tmp_path, broker) as (agent, sim):
        status: dict[str, object] = {}

        async def modem_ready() -> bool:
            status.update(await agent.status())
            modems = status["modems"]
            return isinstance(modems, list) and modems[0]["state"] == "ready"

        await until_async(modem_ready, "status showing the modem ready")
        await until_async(lambda: _connected(agent), "status showing the uplink connected")
        await agent.publish([{"topic": "sensors/a", "data": 1}])
        done = await agent.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert set(status) == FIELDS
        assert status["running"] is True and status["reason"] is None
        assert status["decommissioned"] is None
        assert status["device_id"] == "gw-test"
        modem = status["modems"][0]
        assert modem["modem"]["imei"] == sim.personality.imei
        assert status["sims"][0]["iccid"] == sim.state.sim.iccid
        lifecycle = status["sims"][0]["lifecycle"]
        assert lifecycle["current"] is True
        assert lifecycle["state"] in ("awaiting-activation", "activating", "active")
        assert set(status["outbox"]) == {"count", "bytes", "streams", "drops"}
        text = await agent.cli("status")
        assert text.returncode == 0
        assert "running (pid" in text.stdout and sim.personality.imei in text.stdout

        assert await agent.stop() == 0
        done = await agent.cli("status", "--json")
        assert done.returncode == 1
        assert "not running: it stopped at" in done.stderr
        after = json.loads(done.stdout)
        assert after["running"] is False and after["stopped_at"] is not None
        assert after["uplink"]["state"] == "stopped"


async def _connected(agent: Agent) -> bool:
    uplink = (await agent.status())["uplink"]
    return bool(uplink and uplink["connected"])


async def until_async(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """``until`` for a coroutine check (each run is a `simkeeper status` process)."""
    for _ in range(60):
        if await check():
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"gave up waiting for {what}")


async def test_status_after_sigkill_says_the_process_is_gone(
    tmp_path: Path, broker: Broker
) -> None:
    async with running(tmp_path, broker) as (agent, _sim):
        await until(agent.database.exists, "database")
        await until_async(lambda: _has_runtime(agent), "runtime row")
        await agent.stop(signal.SIGKILL)
        done = await agent.cli("status")
        assert done.returncode == 1
        assert "is gone" in done.stderr


async def _has_runtime(agent: Agent) -> bool:
    done = await agent.cli("status", "--json")
    return done.returncode == 0


async def test_status_without_a_database(tmp_path: Path) -> None:
    agent = Agent(tmp_path, 1, str(tmp_path / "modem"))
    done = await agent.cli("status")
    assert done.returncode == 1
    assert "no database" in done.stderr and "never run" in done.stderr
    assert done.stdout == ""


async def test_status_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    agent = Agent(tmp_path, 1, str(tmp_path / "modem"))
    agent.config.write_text("device_id = 7\n")
    done = await agent.cli("status")
    assert done.returncode == 2
    assert "device_id" in done.stderr


async def test_status_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`simkeeper status | head -1`, with the reader gone before the first write: exit 0, no
    traceback."""
    agent = Agent(tmp_path, 1, str(tmp_path / "modem"))
    Store(agent.database).close()  # a database without a running agent: status prints it
    gone, write_end = os.pipe()
    os.close(gone)
    try:
        done = await asyncio.to_thread(
            subprocess.run, [*SIMKEEPER, "status", "--config", str(agent.config)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr  # 1: "not running", said on stderr


def test_the_text_view_says_unknown_never_none() -> None:
    unknown = {"registration": {"state": "not-registered", "act": None},
               "operator": {"name": None, "mcc_mnc": None}, "signal": {"rssi_dbm": None},
               "manufacturer": None, "model": None, "imei": None}
    text = render({
        "device_id": "gw", "running": False, "reason": "stopped", "decommissioned": None,
        "sims": [], "uplink": None, "tasks": {},
        "modems": [{"port": "/dev/ttyUSB2", "state": "ready", "detail": None, "modem": unknown}],
        "outbox": {"count": 0, "bytes": 0, "drops": {}},
    })
    assert "None" not in text
    assert "not-registered (-) on -, RSSI unknown" in text
