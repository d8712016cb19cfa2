"""`simkeeper demo` runs the whole path (simulated modem, local mosquitto, the agent, a sample
app) and shows the modem, the outbox, the uplink and what reached the broker."""

from __future__ import annotations

import subprocess
import sys

from drivers.simulator import PERSONALITIES


def test_demo_shows_the_whole_path(mosquitto: str) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--duration", "4",
                           "--interval", "1"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert PERSONALITIES["quectel"].imei in done.stdout
    assert "NTT DOCOMO" in done.stdout
    last = done.stdout.rsplit("simkeeper demo:", 1)[-1]
    assert "uplink: mqtt connected" in last
    assert "outbox:" in last
    assert "demo/room1" in last.split("at the broker:")[1]  # the sample app's readings arrived
    assert "Traceback" not in done.stderr


def test_demo_without_mosquitto_says_what_to_install(tmp_path: str) -> None:
    code = ("import shutil, os, sys; from agent import demo; shutil.which = lambda _: None;"
            " os.access = lambda *_: False; from agent.cli import main;"
            " sys.exit(main(['demo', '--duration', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "mosquitto not found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
