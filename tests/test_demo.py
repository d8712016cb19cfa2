"""`simkeeper demo` runs the whole path (simulated modem, local mosquitto, the agent, a sample
app) and shows the modem, the SIM lifecycle, the outbox, the uplink, the events and what reached
the broker; run to the end of its tour, it shows each step as it happens."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli.demo import DEMO_SCENARIO, paced
from drivers.simulator import PERSONALITIES, load_scenario
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
    # (with one SIM seen "SIM lifecycle:", with both "SIM lifecycle, slot 1 (in use):")
    lifecycle = next(i for i, line in enumerate(lines) if line.startswith("SIM lifecycle"))
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


# The tour of drivers/simulator/scenarios/demo.toml, as the view shows it: each step's first line.
BACKUP = str((load_scenario(DEMO_SCENARIO).sim2 or {})["iccid"])
TOUR: dict[str, Callable[[str], bool]] = {
    "standby": lambda line: line.startswith(f"SIM lifecycle, slot 2 (standby): {BACKUP}"),
    "sms": lambda line: "sms-received" in line and "Hello from the operator" in line,
    "reject": lambda line: "network-reject" in line and "->suspended" in line and "#7" in line,
    "suspended": lambda line: "suspension: radio by network (emm #7" in line,
    "switch": lambda line: ("sim-switch " in line and "slot 1->2" in line
                            and "permanent network reject" in line),
    "backup active": lambda line: ("activation-succeeded" in line
                                   and f"..{BACKUP[-4:]}" in line),
    "resumed": lambda line: "network-recovered" in line and "->awaiting-activation" in line,
    "back": lambda line: "sim-switch-settled" in line and "usable again" in line,
    "reset": lambda line: "modem-reset" in line and "RDY" in line,
}


def _lines(stream: queue.Queue[str | None], proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        stream.put(line)
    stream.put(None)


# The tour at 0.4 of its pace (`--pace`): its steps in the same order, each still several of the
# view's 1 s refreshes apart (the gaps between them, now 4 s and more, are what the order needs).
PACE = 0.4
TOUR_DEADLINE = 240.0  # s: the tour is over about 35 s after the start; a loaded machine


@pytest.mark.timeout(TOUR_DEADLINE + 120)
def test_demo_shows_its_tour_as_it_happens(mosquitto: str, tmp_path: Path) -> None:
    """Headless, to the end of the tour (at ``PACE``): both SIMs, the SMS, the network's reject
    (EMM #7) of the SIM in use and the suspension it causes, the switch to the backup SIM and its
    activation, the first SIM's resumption and the switch back, the modem reset, each shown in
    that order while the demo runs; then SIGTERM stops it cleanly."""
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "demo", "--interval", "1",
                                 "--pace", str(PACE), "--duration", str(TOUR_DEADLINE + 60)],
                                stdout=subprocess.PIPE, stderr=err, text=True)
        stream: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_lines, args=(stream, proc), daemon=True).start()
        seen: dict[str, int] = {}
        deadline = time.monotonic() + TOUR_DEADLINE
        try:
            n = 0
            while len(seen) < len(TOUR):
                try:
                    line = stream.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    pytest.fail(f"the tour not shown within {TOUR_DEADLINE:g} s: only {seen}")
                assert line is not None, f"the demo ended before the tour did: {seen}"
                n += 1
                seen.update({step: n for step, shows in TOUR.items()
                             if step not in seen and shows(line)})
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        errors = err.read()
    assert seen["sms"] < seen["reject"] < seen["switch"] < seen["backup active"], seen
    assert seen["switch"] < seen["resumed"] < seen["reset"], seen
    assert seen["switch"] < seen["back"] < seen["reset"], seen
    assert seen["suspended"] < seen["resumed"], seen
    assert "Traceback" not in errors, errors


def test_pace_plays_the_scenario_faster_in_the_same_order() -> None:
    tour = load_scenario(DEMO_SCENARIO)
    fast = paced(tour, PACE)
    assert [(s.action, s.params) for s in fast.steps] == [(s.action, s.params) for s in tour.steps]
    assert [s.at for s in fast.steps] == pytest.approx([s.at * PACE for s in tour.steps])
    assert fast.timing == pytest.approx({k: v * PACE for k, v in tour.timing.items()})
    assert tour.timing and paced(tour, 1) is tour
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--pace", "0"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--pace: must be a number in (0, 1]" in done.stderr
