"""Scenario steps: each timed step of a scenario file is one call on the running modem."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from drivers.simulator.scenario import ScenarioError, Step

if TYPE_CHECKING:
    from drivers.simulator.modem import SimulatedModem

log = logging.getLogger(__name__)


def run_step(sim: SimulatedModem, step: Step) -> None:
    p = dict(step.params)
    log.info("scenario step at %.1fs: %s %s", step.at, step.action, p)
    try:
        _dispatch(sim, step.action, p)
    except (ScenarioError, ValueError) as exc:  # validated at load; belt and braces
        log.warning("scenario step %s failed: %s", step.action, exc)


def _dispatch(sim: SimulatedModem, action: str, p: dict[str, Any]) -> None:
    if action == "network":
        sim.set_network(p.pop("state"), p.pop("reject_cause", None), **p)
    elif action == "signal":
        sim.set_signal(**p)
    elif action == "sim":
        sim.set_sim(**p)
    elif action == "radio":
        sim.set_radio(p["fun"])
    elif action == "traffic":
        sim.add_traffic(p.get("up", 0), p.get("down", 0))
    elif action == "traffic_rate":
        sim.set_traffic_rate(p.get("up_bps", 0.0), p.get("down_bps", 0.0))
    elif action == "temperature":
        sim.set_temperature(p["temperature_c"])
    elif action == "sms":
        sim.receive_sms(p["text"], p.get("sender", "+818000000000"))
    elif action == "urc":
        sim.emit_urc(p["text"])
    elif action == "reboot":
        sim.reboot()
    elif action == "silence":
        sim.silence(p.get("duration"))
    elif action == "slow":
        sim.set_reply_delay(p["delay"])
    elif action == "garbage":
        sim.inject_garbage(p.get("bytes", 16))
    elif action == "noise":
        sim.set_noise(p["probability"], inside=p.get("inside", False))
    elif action == "flood":
        sim.flood(p["rate"], p["duration"], p.get("text"))
    elif action == "vanish":
        sim.vanish(p.get("reappear_after"))
