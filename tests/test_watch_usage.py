"""Usage in `fleet watch` (issue 11, item 13): one figure, the billed estimate the plan cap
counts, shown against the plan with its share; and the last report kept where a fresh
watcher reads it (the retained ``state``: ``usage`` reports are not retained).

The end-to-end test runs the daemon as a process with the simulated modem on a pty (its data
counters polled every second) and a real mosquitto.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from agent.fleet import watch
from agent.fleet.sign import make_envelope
from agent.telemetry.batch import decode_batch
from drivers.simulator import SimulatedModem
from tests.broker import Broker, Subscriber, until
from tests.test_daemon import DEVICE, send_command, until_async
from tests.test_decommission_state import fleet_watch_once
from tests.test_e2e_lifecycle import FAST, LifecycleAgent, operator_key

PLAN = 1_000_000
UP, DOWN = 150_000, 450_000  # 60% of the plan, under every default threshold


def test_usage_text_is_one_figure_against_the_plan() -> None:
    assert watch.usage_text(1_200_000, 1_000_000) == "1.2MB/1.0MB (120%)"
    assert watch.usage_text(501_500, 1_000_000) == "501.5kB/1.0MB (50%)"
    assert watch.usage_text(1_200_000, None) == "1.2MB"


def test_the_watch_row_takes_bytes_and_share_from_the_billed_estimate() -> None:
    """The operator's ``0B/1.0MB (1955%)``: payload bytes from the modem, the share from the
    billed estimate (kernel packets x header overhead). Now both come from the estimate."""
    report = {"iccid": "8981100005819480014", "bytes_up": 0, "bytes_down": 0,
              "billed_estimate": 19_552_000, "plan_bytes": PLAN, "share_used": 19.552}
    dev = watch.Device("gw-1", "yes", {"state": "active"}, report)
    assert watch.row(dev, 0.0)[5] == "19.6MB/1.0MB (1955%)"
    older = {"bytes_up": 1500, "bytes_down": 500_000, "plan_bytes": PLAN}  # no estimate
    assert watch.row(watch.Device("gw-2", usage=older), 0.0)[5] == "501.5kB/1.0MB (50%)"
    assert watch.row(watch.Device("gw-3"), 0.0)[5] == "-"


def _last_usage(messages: list[Any]) -> dict[str, Any] | None:
    """The newest usage report that counts the test's traffic (None before one does)."""
    found = [r["data"] for m in messages if m.topic.endswith("/usage")
             for r in decode_batch(m.payload)["readings"]]
    counted = [u for u in found if u["bytes_up"] == UP and u["bytes_down"] == DOWN]
    return counted[-1] if counted else None


async def test_fleet_watch_once_shows_the_last_usage_as_the_agent_counts_it(
    tmp_path: Path, broker: Broker
) -> None:
    key, pin = operator_key(tmp_path)
    agent = LifecycleAgent(tmp_path, broker.port, str(tmp_path / "modem"),
                           FAST.format(register_timeout=2) + pin
                           + f"[usage]\nplan_bytes = {PLAN}\n")
    agent.config.write_text(agent.config.read_text().replace(
        "[modem]\n", "[modem]\npoll_interval = 1\n", 1))
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/#")
    try:
        async with SimulatedModem("quectel", link=tmp_path / "modem", boot_seconds=0.2,
                                  sim_busy_seconds=0.1) as sim:
            await agent.start()
            await agent.wait_state(lambda s: s["state"] == "active", "activation")
            await until(lambda: sim.add_traffic(UP, DOWN), "traffic through an active context")

            async def reported() -> bool:  # each round: a signed report-usage, as an operator
                result = await send_command(broker.port,
                                            make_envelope(key, DEVICE, "report-usage"))
                assert result["status"] == "ok", result
                return _last_usage(sub.messages) is not None

            await until_async(reported, "a usage report counting the traffic")
            report = _last_usage(sub.messages)
            assert report is not None and report["billed_estimate"] == UP + DOWN

            def state_carries_it() -> bool:
                states = [json.loads(m.payload) for m in sub.on("state")]
                return bool(states) and states[-1].get("usage") == report

            await until(state_carries_it, "the retained state carrying the last report")
            row = await fleet_watch_once(broker.port)
            assert row[5] == "600.0kB/1.0MB (60%)", row
            assert row[5] == watch.usage_text(report["billed_estimate"], report["plan_bytes"])

            # The device says the same: the row is written with the state.
            async def status_agrees() -> bool:
                usage = (await agent.status())["sims"][0]["usage"]
                return bool(usage) and usage["billed_estimate"] == report["billed_estimate"]

            await until_async(status_agrees, "status showing the reported usage")
            text = (await agent.cli("status")).stdout
            assert (f"{UP} B up, {DOWN} B down (modem), billed estimate {UP + DOWN} B = 60% of"
                    f" the {PLAN} B plan") in text
    finally:
        if agent.proc is not None:
            await agent.stop(signal.SIGKILL)
        sub.close()
