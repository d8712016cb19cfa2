"""`simkeeper demo` runs the whole path (simulated modem, local mosquitto, the agent, a sample
app) and shows the modem, the SIM lifecycle, the outbox, the uplink, the events and what reached
the broker."""

from __future__ import annotations

import subprocess
import sys

import pytest

from drivers.simulator import PERSONALITIES
from drivers.simulator.state import Sim


@pytest.fixture(scope="module")
def demo_run(mosquitto: str) -> subprocess.CompletedProcess[str]:
    """One demo run, looked at by the tests below."""
    return subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--duration", "5",
                           "--interval", "1"], capture_output=True, text=True, timeout=60,
                          check=False)


def test_demo_shows_the_whole_path(demo_run: subprocess.CompletedProcess[str]) -> None:
    done = demo_run
    assert done.returncode == 0, done.stderr
    assert PERSONALITIES["quectel"].imei in done.stdout
    assert "NTT DOCOMO" in done.stdout
    last = done.stdout.rsplit("simkeeper demo:", 1)[-1]
    assert "uplink: mqtt connected" in last
    assert "outbox:" in last
    assert "demo/room1" in last.split("at the broker:")[1]  # the sample app's readings arrived
    assert "Traceback" not in done.stderr


def test_demo_shows_the_sim_lifecycle(demo_run: subprocess.CompletedProcess[str]) -> None:
    done = demo_run
    assert done.returncode == 0, done.stderr
    last = done.stdout.rsplit("simkeeper demo:", 1)[-1]
    lines = last.splitlines()
    # The SIM in the slot as the keeper sees it: state, deadline, suspension, conformance.
    lifecycle = next(i for i, line in enumerate(lines) if line.startswith("SIM lifecycle:"))
    assert Sim().iccid in lines[lifecycle]
    assert lines[lifecycle].split()[-1] in ("active", "awaiting-activation", "activating")
    block = "\n".join(lines[lifecycle + 1 : lifecycle + 5])
    assert "trusted time:" in block
    assert "suspension: none" in block
    assert "conformance:" in block
    assert "activation-succeeded" in last.split("events")[1].split("at the broker:")[0]
    assert len(lines) <= 40 and max(len(line) for line in lines) <= 80  # an 80x40 terminal


def test_demo_without_mosquitto_says_what_to_install(tmp_path: str) -> None:
    code = ("import shutil, os, sys; from agent.cli import demo; shutil.which = lambda _: None;"
            " os.access = lambda *_: False; from agent.cli import main;"
            " sys.exit(main(['demo', '--duration', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "mosquitto not found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
