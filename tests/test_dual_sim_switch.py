"""A dual-SIM modem end to end (issue 13): one simulated Quectel with two SIM slots
(``AT+QDSIM``) on a pty, the agent as a real process with ``[modem.dual_sim]``, a real
mosquitto.

- the standby SIM is read once, then the primary is used;
- a permanent reject of the primary switches to the backup (which is activated), and the
  primary is tried again and kept once the network takes it back, every switch an event, in
  order, while readings keep being accepted;
- a standby SIM nearing its deadline is activated by a brief switch and the modem goes back;
  every SIM's state and the slot in use survive SIGKILL and restart.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drivers.simulator import SimulatedModem
from tests.broker import Broker, Subscriber, until
from tests.test_daemon import online, until_async
from tests.test_e2e_lifecycle import LifecycleAgent, lifecycle_rig

A, B = "8981100005819480014", "8981200001234567898"
POLICY = """
[modem.dual_sim]
enabled = true
no_registration = 10
min_dwell = 0
recheck = 10
switch_timeout = 20
standby_lead = {lead}
"""


@asynccontextmanager
async def dual_sim(tmp_path: Path, broker: Broker, *, b_deadline_days: float,
                   lead: float = 86400) -> AsyncIterator[
                       tuple[LifecycleAgent, SimulatedModem, Subscriber]]:
    now = datetime.now(UTC).timestamp()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("iccid,deadline,apn,plan_bytes\n" + "".join(
        f"{i},{datetime.fromtimestamp(now + days * 86400, UTC):%Y-%m-%dT%H:%M:%SZ},"
        "soracom.io,\n" for i, days in ((A, 30), (B, b_deadline_days))))
    scenario = {"sim": {"iccid": A, "imsi": "295050912345678"}, "network": {"state": "home"},
                "sim2": {"iccid": B, "imsi": "440101234567890"},
                "network2": {"state": "home", "mcc": "440", "mnc": "51"}}
    async with lifecycle_rig(tmp_path, broker, scenario=scenario,
                             extra=f'manifest = "{manifest}"\n' + POLICY.format(lead=lead)) as rig:
        yield rig


def switches(sub: Subscriber) -> list[dict[str, Any]]:
    """The sim-switch events (and settlements) that reached the broker, once each, in order."""
    seen: set[str] = set()
    out = []
    for r in sub.readings("events"):
        if r["topic"] in ("sim-switch", "sim-switch-settled") and r["id"] not in seen:
            seen.add(r["id"])
            out.append(r["data"])
    return out


async def _current(agent: LifecycleAgent) -> dict[str, Any] | None:
    return await agent.sim_state()


async def _until_current(agent: LifecycleAgent, iccid: str, state: str, what: str) -> None:
    async def there() -> bool:
        sim = await _current(agent)
        return sim is not None and sim["iccid"] == iccid and sim["state"] == state

    await until_async(there, what, timeout=60)


def _lifecycle(status: dict[str, Any], iccid: str) -> dict[str, Any]:
    return next(s["lifecycle"] for s in status["sims"] if s["iccid"] == iccid)


async def test_a_permanent_reject_switches_to_the_backup_and_back(tmp_path: Path,
                                                                   broker: Broker) -> None:
    async with dual_sim(tmp_path, broker, b_deadline_days=30) as (agent, sim, sub):
        await online(broker.port)
        await _until_current(agent, A, "active", "the primary SIM active")
        await until(lambda: [s.get("errand") for s in switches(sub)] == [
            "inventory", "inventory-done"], "the standby SIM read once, then the primary")
        assert switches(sub)[0]["to_iccid"] == B and switches(sub)[1]["to_iccid"] == A
        assert sim.active_slot == 1

        sent = await agent.publish([{"topic": "t", "data": {"i": i}} for i in range(5)])
        sim.set_network("denied", reject_cause=7, slot=1)  # EMM #7: permanent
        await _until_current(agent, B, "active", "the backup SIM in use, activated")
        assert sim.active_slot == 2
        # readings go on being accepted on the backup's link
        sent += await agent.publish([{"topic": "t", "data": {"i": i}} for i in range(5, 10)])
        away = switches(sub)[2]
        assert (away["from_slot"], away["to_slot"], away["reason"]) == (
            1, 2, "permanent network reject")

        sim.set_network("home", slot=1)  # the network takes the primary back
        await _until_current(agent, A, "active", "the primary SIM in use again")
        await until(lambda: switches(sub)[-1].get("reason") == "the primary SIM is usable again",
                    "the primary kept")
        assert sim.active_slot == 1
        steps = [(s.get("to_slot"), s.get("errand"), s["reason"]) for s in switches(sub)]
        assert steps[2] == (2, None, "permanent network reject"), steps
        assert steps[-2:] == [(1, "probe", "try the primary SIM again"),
                              (None, None, "the primary SIM is usable again")], steps
        # a try before the network took it back went back to the backup: nothing else
        assert set(steps[3:-2]) <= {(1, "probe", "try the primary SIM again"),
                                    (2, None, "the primary SIM is still unusable")}, steps
        await until(lambda: {r["id"] for r in sub.readings("telemetry")} >= set(sent),
                    "every reading delivered")


async def test_a_standby_sim_is_activated_before_its_deadline(tmp_path: Path,
                                                              broker: Broker) -> None:
    # B's deadline is a day away, inside the two days' lead: activated by a brief switch.
    async with dual_sim(tmp_path, broker, b_deadline_days=1,
                        lead=2 * 86400) as (agent, sim, sub):
        await online(broker.port)
        await until(lambda: any(s.get("reason") == "standby SIM activated"
                                for s in switches(sub)), "the standby activation done")
        await _until_current(agent, A, "active", "the primary in use again")
        status = await agent.status()
        assert _lifecycle(status, B)["state"] == "active"
        assert _lifecycle(status, A)["state"] == "active"
        errands = [s.get("errand") for s in switches(sub)]
        assert errands[-2:] == ["activate", None], errands
        assert {r["data"]["iccid"] for r in sub.readings("events")
                if r["data"].get("to") == "active"} == {A, B}
        # A restart keeps it all: the modem's slot, both SIMs active, no switch again.
        before = len(switches(sub))
        await agent.stop(signal.SIGKILL)
        await agent.start()
        await _until_current(agent, A, "active", "the primary read again after the restart")

        async def looked() -> bool:  # a dual-SIM step ran since the restart (it reports)
            sim_now = await _current(agent)
            return bool(sim_now and sim_now.get("dual_sim"))

        await until_async(looked, "the switch policy's first look after the restart")
        status = await agent.status()
        assert _lifecycle(status, B)["state"] == "active"
        assert sim.active_slot == 1
        assert len(switches(sub)) == before
