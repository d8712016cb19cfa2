"""The modem simulator: a virtual cellular modem speaking AT on a real pty.

A product feature (``simkeeper simulate-modem`` lets users try the agent without hardware)
and the fixture the rest of the test suite stands on::

    async with SimulatedModem(personality="quectel", scenario="flaky.toml") as sim:
        port = serial.serial_for_url(sim.path)
        sim.set_network("denied", reject_cause=7)
"""

from drivers.simulator.modem import SimulatedModem
from drivers.simulator.personalities import PERSONALITIES, Personality
from drivers.simulator.scenario import Scenario, ScenarioError, load_scenario, parse_scenario

__all__ = [
    "PERSONALITIES",
    "Personality",
    "Scenario",
    "ScenarioError",
    "SimulatedModem",
    "load_scenario",
    "parse_scenario",
]
