"""`simkeeper doctor` and the signed `diagnose` on a gateway with two modems: every modem is
checked, each modem's checks labelled with its slot (`modem`, `modem2`), the link and agent
checks once.

- With the agent running (two simulated modems on ptys, a real mosquitto): the doctor reads
  both modems from the runtime row; `diagnose` answers the same checks; a network refusal of
  the second modem's SIM is a failure of `modem2`'s checks only.
- Without the agent, `[modem] port` a list of two ports: the doctor probes both, and a SIM
  pulled from the second modem fails `modem2`'s `inserted` check only.
"""

from __future__ import annotations

import asyncio
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from agent.fleet.sign import make_envelope
from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker
from tests.test_daemon import DEVICE, SIMKEEPER, online, send_command, until_async
from tests.test_doctor import doctor
from tests.test_multi_modem import IMSI, A, B, two_modems

SLOTS = ("modem", "modem2")
ICCIDS = {"modem": A, "modem2": B}


def of(report: dict[str, Any], area: str, name: str, slot: str | None) -> dict[str, Any]:
    [one] = [c for c in report["checks"]
             if (c["area"], c["name"], c.get("slot")) == (area, name, slot)]
    return one


def failed(report: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(c["area"], c["name"], c.get("slot")) for c in report["checks"]
            if c["status"] == "failure"]


def assert_every_modem_checked(report: dict[str, Any], ports: dict[str, str]) -> None:
    """The modem, SIM and network checks once per slot, the same names for each; the link and
    agent checks once, without a slot."""
    checks = report["checks"]
    per_slot = {s: [(c["area"], c["name"]) for c in checks if c.get("slot") == s]
                for s in SLOTS}
    assert per_slot["modem"] == per_slot["modem2"], per_slot
    assert {area for area, _name in per_slot["modem"]} == {"modem", "sim", "network"}
    assert {c["area"] for c in checks if "slot" not in c} == {"link", "agent"}
    assert {c.get("slot") for c in checks} == {*SLOTS, None}
    for slot in SLOTS:
        assert of(report, "sim", "ICCID", slot)["saw"] == ICCIDS[slot]
        assert ports[slot] in of(report, "modem", "present", slot)["saw"]


async def test_doctor_and_diagnose_check_both_modems_of_the_running_agent(
        tmp_path: Path, broker: Broker) -> None:
    async with two_modems(tmp_path, broker) as (agent, sims, key):
        await online(broker.port)

        async def both_known() -> bool:
            status = await agent.status()
            current = {s["lifecycle"]["slot"] for s in status["sims"]
                       if s["lifecycle"] and s["lifecycle"]["current"]}
            return current == set(SLOTS) and len(status["modems"]) == 2 and all(
                m["state"] == "ready" and m["modem"] for m in status["modems"])

        await until_async(both_known, "both modems ready and both SIMs in the runtime row")
        status = await agent.status()
        ports = {m["slot"]: m["port"] for m in status["modems"]}
        inits = {i: s.commands.count("ATE0") for i, s in sims.items()}
        code, report = await doctor(agent.config)
        assert report["mode"] == "agent", report
        assert_every_modem_checked(report, ports)
        for slot in SLOTS:
            assert of(report, "modem", "port holders", slot)["saw"].startswith(
                f"only the agent (pid {status['pid']}) holds {ports[slot]}")
        assert of(report, "link", "broker", None)["status"] == "ok"
        assert {i: s.commands.count("ATE0") for i, s in sims.items()} == inits  # ports untouched
        assert code == (1 if failed(report) else 0)

        text = await asyncio.to_thread(
            subprocess.run, [*SIMKEEPER, "doctor", "--config", str(agent.config)],
            capture_output=True, text=True, timeout=WAIT, check=False)
        assert f"ICCID [modem2]: {B}" in text.stdout and f"ICCID [modem]: {A}" in text.stdout
        assert "\nok    link     broker: " in text.stdout

        result = await send_command(broker.port, make_envelope(key, DEVICE, "diagnose"))
        assert result["status"] == "ok", result
        answer = result["detail"]
        assert_every_modem_checked(answer, ports)
        assert [(c["area"], c["name"], c.get("slot")) for c in answer["checks"]] == \
            [(c["area"], c["name"], c.get("slot")) for c in report["checks"]]
        assert of(answer, "link", "broker", None)["saw"].startswith("round trip proven")

        sims[B].set_network("denied", reject_cause=7)  # B's keeper suspends B (network)

        async def b_suspended() -> bool:
            status = await agent.status()
            return any(s["iccid"] == B and s["lifecycle"] and s["lifecycle"]["suspension"]
                       for s in status["sims"])

        await until_async(b_suspended, "B's suspension by the network in the runtime row")
        code, report = await doctor(agent.config)
        assert code == 1, report
        assert ("sim", "suspension", "modem2") in failed(report), report
        assert not [f for f in failed(report) if f[2] == "modem"], report
        assert "EMM cause 7" in of(report, "sim", "suspension", "modem2")["saw"]
        assert of(report, "sim", "suspension", "modem")["status"] == "ok"


async def test_doctor_probes_every_configured_port(tmp_path: Path, broker: Broker) -> None:
    links = {slot: tmp_path / f"tty-{slot}" for slot in SLOTS}
    config = tmp_path / "doctor.toml"
    ports = ", ".join(f'"{links[s]}"' for s in SLOTS)
    config.write_text(
        f'device_id = "{DEVICE}"\n[modem]\nport = [{ports}]\ndata_path = "agent"\n'
        f"[uplink]\nport = {broker.port}\n"
        f'[store]\npath = "{tmp_path / "state" / "simkeeper.db"}"\n'
        f'[ingest]\nsocket = "{tmp_path / "ingest.sock"}"\n')
    async with AsyncExitStack() as stack:
        sims = {slot: await stack.enter_async_context(SimulatedModem(
            "quectel", {"sim": {"iccid": ICCIDS[slot], "imsi": IMSI[ICCIDS[slot]]}},
            link=links[slot], boot_seconds=0.2, sim_busy_seconds=0.1)) for slot in SLOTS}

        code, report = await doctor(config)
        assert (code, failed(report), report["mode"]) == (0, [], "probe"), report
        assert_every_modem_checked(report, {s: str(links[s]) for s in SLOTS})
        for slot in SLOTS:
            assert of(report, "network", "registration", slot)["saw"].startswith("registered")
            assert "read by the doctor" in of(report, "modem", "present", slot)["saw"]

        sims["modem2"].set_sim(state="absent")
        code, report = await doctor(config)
        assert (code, failed(report)) == (1, [("sim", "inserted", "modem2")]), report
        assert "no SIM card" in of(report, "sim", "inserted", "modem2")["saw"]
        assert of(report, "sim", "inserted", "modem")["status"] == "ok"
