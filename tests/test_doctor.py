"""`simkeeper doctor` as a real process, and the signed `diagnose` command end to end.

- Without the agent, against one simulated modem on a pty and a real mosquitto: healthy (exit
  0), then each fault (SIM absent, PIN locked with another program on the port, denied with EMM
  cause 7, no network, a modem gone silent) and a TLS broker refusing the device certificate:
  each time exit 1 and the cause named in the right check.
- With the agent running: the doctor reads its runtime row and leaves the port alone; a signed
  `diagnose` is answered with the same checks on `cmd/result`; once the network refuses the SIM
  (EMM cause 7) and the agent suspends it, the doctor says the cause in words.
- Every reject cause of ../shared/corpus/reject_causes.md has its words.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.commands.diagnosis_network import signal_words
from agent.fleet.sign import make_envelope
from agent.sim.reject_advice import CME, MOBILITY, SESSION, advice
from agent.sim.rejects import classify_cme
from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker, Pki
from tests.test_daemon import DEVICE, SIMKEEPER, online, send_command, until_async
from tests.test_e2e_lifecycle import lifecycle_rig, operator_key

CORPUS = Path(__file__).parents[2] / "shared" / "corpus" / "reject_causes.md"


async def doctor(config: Path) -> tuple[int, dict[str, Any]]:
    """`simkeeper doctor --json`, off the loop (the simulator answers on it meanwhile)."""
    done = await asyncio.to_thread(
        subprocess.run, [*SIMKEEPER, "doctor", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=WAIT, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def found(report: dict[str, Any], area: str, name: str) -> dict[str, Any]:
    [one] = [c for c in report["checks"] if (c["area"], c["name"]) == (area, name)]
    return one


def failures(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["area"], c["name"]) for c in report["checks"] if c["status"] == "failure"]


def write_config(directory: Path, modem: str, uplink: str, extra: str = "",
                 name: str = "doctor.toml") -> Path:
    config = directory / name
    config.write_text(
        f'device_id = "{DEVICE}"\n[modem]\nport = "{modem}"\n[uplink]\n{uplink}'
        f'[store]\npath = "{directory / "state" / "simkeeper.db"}"\n'
        f'[ingest]\nsocket = "{directory / "ingest.sock"}"\n{extra}')
    return config


async def test_doctor_names_each_fault_without_the_agent(
        tmp_path: Path, broker: Broker, tls_broker: Broker, pki: Pki) -> None:
    link = tmp_path / "modem"
    _key, pin = operator_key(tmp_path)
    async with SimulatedModem("quectel", link=link, boot_seconds=0.2,
                              sim_busy_seconds=0.1) as sim:
        deadline = datetime.fromtimestamp(time.time() + 60 * 86400, UTC).isoformat()
        manifest = tmp_path / "sims.csv"
        manifest.write_text(f"iccid,deadline,apn\n{sim.state.sim.iccid},{deadline},soracom.io\n")
        extra = f'{pin}[lifecycle]\nmanifest = "{manifest}"\n'
        config = write_config(tmp_path, str(link), f"port = {broker.port}\n", extra)

        code, healthy = await doctor(config)
        assert (code, failures(healthy), healthy["mode"]) == (0, [], "probe"), healthy
        assert found(healthy, "network", "registration")["saw"].startswith("registered")
        assert found(healthy, "sim", "manifest")["status"] == "ok"
        assert found(healthy, "link", "broker")["status"] == "ok"

        sim.set_sim(state="absent")
        code, report = await doctor(config)
        assert (code, failures(report)) == (1, [("sim", "inserted")]), report
        assert "no SIM card" in found(report, "sim", "inserted")["saw"]

        sim.set_sim(state="pin-required")
        with link.open("rb") as tty:  # another program on the agent's port
            holder = await asyncio.create_subprocess_exec("sleep", str(WAIT), stdin=tty)
        try:
            code, report = await doctor(config)
        finally:
            holder.kill()
            await holder.wait()
        assert (code, failures(report)) == (1, [("modem", "port holders"), ("sim", "PIN")])
        assert f"sleep (pid {holder.pid})" in found(report, "modem", "port holders")["saw"]
        assert "locked with a PIN" in found(report, "sim", "PIN")["saw"]

        sim.set_sim(state="ready")
        sim.set_network("denied", reject_cause=7)
        code, report = await doctor(config)
        assert (code, failures(report)) == (1, [("network", "registration")]), report
        denied = found(report, "network", "registration")
        assert "EMM cause 7 (the network refuses data service to this SIM" in denied["saw"]
        assert denied["do"] == "check the SIM's status with the carrier"

        sim.set_network("searching")
        code, report = await doctor(config)
        assert (code, failures(report)) == (1, [("network", "registration")]), report
        assert "searching" in found(report, "network", "registration")["saw"]

        sim.set_network("roaming")  # the broker now refuses the device's certificate
        tls = (f'port = {tls_broker.port}\ntls = true\nca = "{pki.ca}"\n'
               f'cert = "{pki.rogue_cert}"\nkey = "{pki.rogue_key}"\n')
        code, report = await doctor(write_config(tmp_path, str(link), tls, extra, "tls.toml"))
        assert (code, failures(report)) == (1, [("link", "broker")]), report
        refused = found(report, "link", "broker")
        assert "does not trust this device's certificate" in refused["saw"]
        assert "install-cert" in refused["do"]

        sim.silence()
        code, report = await doctor(config)
        assert code == 1 and failures(report)[0] == ("modem", "present"), report
        assert "does not answer" in found(report, "modem", "present")["saw"]
        assert found(report, "network", "registration")["saw"].startswith("not checked")


async def test_doctor_reads_the_running_agent_and_diagnose_answers(
        tmp_path: Path, broker: Broker) -> None:
    key, pin = operator_key(tmp_path)
    async with lifecycle_rig(tmp_path, broker, extra=pin) as (agent, sim, _sub):
        await online(broker.port)

        async def sim_known() -> bool:
            status = await agent.status()
            return any(s["lifecycle"] and s["lifecycle"]["current"] for s in status["sims"]) \
                and status["modems"][0]["state"] == "ready"

        await until_async(sim_known, "the SIM and the modem in the runtime row")
        status = await agent.status()
        inits = sim.commands.count("ATE0")  # sent only when a modem is (re)initialised
        code, report = await doctor(agent.config)
        assert report["mode"] == "agent", report
        assert found(report, "modem", "present")["saw"].startswith(f"ready on {tmp_path}/modem")
        assert found(report, "modem", "port holders")["saw"].startswith(
            f"only the agent (pid {status['pid']})")
        row = status["modems"][0]["modem"]
        assert row["imei"] in found(report, "modem", "identity")["saw"]
        assert found(report, "agent", "running")["saw"].startswith(f"running (pid {status['pid']}")
        assert found(report, "link", "broker")["status"] == "ok"
        assert sim.commands.count("ATE0") == inits  # the doctor sent nothing to the modem
        assert code == (1 if failures(report) else 0)

        result = await send_command(broker.port, make_envelope(key, DEVICE, "diagnose"))
        assert result["status"] == "ok", result
        checks = result["detail"]["checks"]
        assert {(c["area"], c["name"]) for c in checks} == \
            {(c["area"], c["name"]) for c in report["checks"]}
        assert all(c["status"] in ("ok", "warning", "failure") and set(c) == {
            "area", "name", "status", "saw", "do"} for c in checks)
        assert found(result["detail"], "link", "broker")["saw"].startswith("round trip proven")
        assert found(result["detail"], "agent", "operator key")["status"] == "ok"
        assert row["imei"] in found(result["detail"], "modem", "identity")["saw"]

        sim.set_network("denied", reject_cause=7)  # the keeper suspends the SIM (network)

        async def suspended() -> bool:
            lifecycle = await agent.sim_state()
            return bool(lifecycle and lifecycle["suspension"])

        await until_async(suspended, "the network's suspension in the runtime row")
        code, report = await doctor(agent.config)
        assert code == 1 and ("sim", "suspension") in failures(report), report
        words = found(report, "sim", "suspension")
        assert "EMM cause 7 (the network refuses data service to this SIM" in words["saw"]
        assert words["do"] == "check the SIM's status with the carrier"


def _numbers(section: str) -> set[int]:
    """The numbers of the first column of a table of ``section`` (``8``, ``50 / 51``,
    ``126-131`` with an en dash, ``**133**``)."""
    out: set[int] = set()
    for line in section.splitlines():
        cell = line.split("|")[1].strip(" *") if line.startswith("| ") else ""
        if (span := re.fullmatch(r"(\d+)\s*[–/-]\s*(\d+)", cell)) is not None:
            out |= set(range(int(span[1]), int(span[2]) + 1))
        elif cell.isdigit():
            out.add(int(cell))
    return out


def test_every_reject_cause_of_the_corpus_has_its_words() -> None:
    if not CORPUS.exists():
        pytest.skip(f"{CORPUS} is not here")
    sections = re.split(r"^## ", CORPUS.read_text(), flags=re.M)
    nas, session, cme = (next(s for s in sections if s.startswith(n)) for n in ("1.", "2.", "3."))
    assert _numbers(nas) - set(MOBILITY) == set()
    assert _numbers(session) - set(SESSION) == set()
    # §3: every code rejects.classify_cme takes for a network refusal has words of its own
    # (the others are the SIM's own states: the SIM checks say those).
    refusals = {c for c in _numbers(cme) if classify_cme(c) is not None}
    assert refusals >= {14, 30, 103, 107, 127, 133, 149, 177}
    for code in refusals:
        reject = classify_cme(code)
        assert reject is not None and advice(reject)[0] != reject.reason, code
    assert set(CME) <= refusals | {515}


@pytest.mark.parametrize(("signal", "act", "words"), [
    ({"rsrp_dbm": -79.0, "rssi_dbm": None}, "lte", "excellent"),
    ({"rsrp_dbm": -90.0, "rssi_dbm": -60}, "lte-m", "good"),
    ({"rsrp_dbm": -100.0, "rssi_dbm": None}, "nb-iot", "fair"),
    ({"rsrp_dbm": -101.0, "rssi_dbm": None}, "lte", "poor"),
    ({"rsrp_dbm": -70.0, "rssi_dbm": -86}, "umts", "fair"),
    ({"rsrp_dbm": None, "rssi_dbm": -101}, "gsm", "poor"),
    ({"rsrp_dbm": None, "rssi_dbm": None}, None, "unknown"),
])
def test_signal_in_words(signal: dict[str, Any], act: str | None, words: str) -> None:
    said, status = signal_words({"rsrq_db": None, "sinr_db": None, **signal}, act)
    assert said.startswith(words)
    assert status == ("ok" if words in ("excellent", "good", "fair") else "warning")
