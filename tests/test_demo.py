"""`simkeeper demo` runs end to end against the simulated modem and shows what it reads."""

from __future__ import annotations

import subprocess
import sys

from drivers.simulator import PERSONALITIES


def test_demo_shows_the_modem() -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--duration", "4",
                           "--interval", "1"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert PERSONALITIES["quectel"].imei in done.stdout
    assert "NTT DOCOMO" in done.stdout
    assert "Traceback" not in done.stderr
