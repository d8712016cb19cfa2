"""After a decommission, what the fleet and the device say (issue 11, item 12): the final
retained ``state`` (decommissioned, the SIM terminated) goes up before the uplink stops, so a
fresh ``fleet watch --once`` shows the gateway ``decommissioned``; ``simkeeper status`` on the
device shows the uplink ``stopped (decommissioned)``, not ``connecting``.

The daemon runs as a process in a fake provisioned bundle (tests.test_decommission), with the
simulated modem on a pty and a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agent.core.store import Store
from agent.fleet.sign import make_envelope
from agent.telemetry.state import Snapshot, StateReporter
from tests.broker import WAIT, Broker, Message, Pki, until
from tests.test_daemon import DEVICE, SIMKEEPER, send_command, until_async
from tests.test_decommission import bundle
from tests.test_e2e_lifecycle import LifecycleAgent, lifecycle_rig, operator_key


async def fleet_watch_once(port: int) -> list[str]:
    """`simkeeper fleet watch --once` as an operator runs it: a fresh process, a fresh
    subscription (only what is retained); this device's row, split in cells."""
    proc = await asyncio.create_subprocess_exec(
        *SIMKEEPER, "fleet", "watch", "--once", "--broker", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    rows = [line.split("  ") for line in out.decode().splitlines()]
    mine = [[cell.strip() for cell in r if cell.strip()] for r in rows if r[0] == DEVICE]
    assert len(mine) == 1, out.decode()
    return mine[0]


def _decommissioned_state(m: Message) -> bool:
    return m.topic.endswith("/state") and json.loads(m.payload).get("decommissioned") is not None


async def _uplink_line(agent: LifecycleAgent) -> str:
    text = (await agent.cli("status")).stdout
    return next((line for line in text.splitlines() if line.startswith("uplink")), "")


async def test_decommission_publishes_its_final_state_and_status_says_why_stopped(
    tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    gen, _request = bundle(tmp_path, pki)
    key, pin = operator_key(gen)
    async with lifecycle_rig(gen, broker, extra=pin) as (agent, sim, sub):
        await agent.wait_state(lambda s: s["state"] == "active", "activation")
        iccid = (await agent.sim_state() or {})["iccid"]
        result = await send_command(broker.port, make_envelope(key, DEVICE, "decommission"))
        assert result["status"] == "ok", result
        await until(lambda: sim.state.radio == 0, "the decommission done (AT+CFUN=0)")
        assert not (gen / "device.key").exists()

        # The final state went up before the session ended (the retained offline).
        messages = list(sub.messages)
        final = next(i for i, m in enumerate(messages) if _decommissioned_state(m))
        offline = next(i for i, m in enumerate(messages)
                       if m.topic.endswith("/status") and m.payload == b"offline")
        assert final < offline
        state = json.loads(messages[final].payload)
        assert state["lifecycle"] == "terminated" and state["sim"]["state"] == "terminated"
        assert state["decommissioned"]["iccid"] == iccid and state["decommissioned"]["at"] > 0

        # A fresh watcher, after the fact, sees only what is retained.
        row = await fleet_watch_once(broker.port)
        assert row[:3] == [DEVICE, "no", "decommissioned"], row

        # The device: the uplink was stopped on purpose, and says why (the row follows within
        # a tick of the state reporter).
        async def says_why() -> bool:
            return "stopped (decommissioned)" in await _uplink_line(agent)

        await until_async(says_why, "status: uplink stopped (decommissioned)")
        assert (await agent.status())["uplink"]["stop_reason"] == "decommissioned"
        assert await agent.stop() == 0
        # The agent's last row (a clean stop) keeps the reason.
        assert "mqtt: stopped (decommissioned) over MQTT 5," in await _uplink_line(agent)


async def test_state_shows_a_decommission_under_way_and_the_last_usage(tmp_path: Path) -> None:
    """The retained ``state`` as the reporter builds it: the SIM being returned is terminated
    from the moment the decommission begins, and the current SIM's last usage report rides
    along; both are part of what a change republishes."""
    sim = {"iccid": "8981100005819480014", "current": True, "state": "active",
           "suspension": None, "conformance": None}
    old = {**sim, "iccid": "8981100005819480022", "current": False, "state": "terminated"}
    report = {"iccid": sim["iccid"], "billed_estimate": 600_000, "plan_bytes": 1_000_000}
    snap = Snapshot(modems=[], uplink={"state": "connected", "readings_sent": 0},
                    sims=[sim, old], tasks={})
    changed = asyncio.Event()
    published: list[dict[str, Any]] = []
    store = Store(tmp_path / "db")
    try:
        reporter = StateReporter(store, DEVICE, changed, snapshot=lambda: snap, usage=list,
                                 publish=published.append)
        before = reporter.state()
        assert before["lifecycle"] == "active" and before["decommissioned"] is None
        assert before["usage"] is None
        running = asyncio.create_task(reporter.run())
        try:
            await until(lambda: len(published) == 1, "the first state")
            snap = Snapshot(modems=[], uplink=snap.uplink, sims=[sim, old], tasks={},
                            usage={sim["iccid"]: report},
                            decommissioned={"at": 1.0, "iccid": sim["iccid"], "wiped": []})
            changed.set()
            await until(lambda: len(published) == 2, "the state republished")
        finally:
            running.cancel()
    finally:
        store.close()
    after = published[-1]
    assert after["decommissioned"] == {"at": 1.0, "iccid": sim["iccid"]}
    assert after["lifecycle"] == "terminated" and after["sim"]["state"] == "terminated"
    assert [s["state"] for s in after["sims"]] == ["terminated", "terminated"]
    assert after["usage"] == report
    assert sim["state"] == "active"  # the keeper's summary itself is left alone
