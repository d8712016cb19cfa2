"""The world around a simulated modem, set from a scenario and changed at run time (tests,
scenario steps): the SIM cards in its slots, the network each card meets, signal, radio,
traffic, temperature. Every change goes through the engine, so URCs follow as the modem would
send them. :class:`drivers.simulator.modem.SimulatedModem` is these controls on a pty.
"""

from __future__ import annotations

from typing import Any

from drivers.simulator import sms
from drivers.simulator.engine import Engine
from drivers.simulator.personalities import Personality
from drivers.simulator.scenario import (
    NETWORK_FIELDS,
    SIGNAL_FIELDS,
    SIM_FIELDS,
    TEMPERATURE_FIELDS,
    Scenario,
    ScenarioError,
    check_fields,
)
from drivers.simulator.state import ModemState, SimSlot, second_slot


def _assign(obj: object, values: dict[str, Any]) -> None:
    for key, value in values.items():
        setattr(obj, key, value)


def _check_slots(sc: Scenario, personality: Personality) -> None:
    """A scenario that uses a second SIM slot needs a personality that has one."""
    if personality.sim_slots > 1:
        return
    uses = (
        ("sim2", sc.sim2 is not None),
        ("network2", bool(sc.network2)),
        ("active_slot", sc.active_slot != 1),
        ("steps", any(step.params.get("slot", 1) != 1 for step in sc.steps)),
    )
    for key, used in uses:
        if used:
            raise ScenarioError(f"{key}: the {personality.key} personality has one SIM slot")


class Controls:
    """Scenario set-up and run-time changes; the simulated modem provides the attributes."""

    state: ModemState
    engine: Engine
    personality: Personality

    def _apply_initial(self, sc: Scenario) -> None:
        _check_slots(sc, self.personality)
        st = self.state
        first = st.slots[0]
        for obj, values in ((first.sim, sc.sim), (first.network, sc.network),
                            (st.signal, sc.signal)):
            _assign(obj, values)
        if self.personality.sim_slots > 1:
            second = second_slot(first.network)
            if sc.sim2 is not None:
                second.sim.state = "ready"  # a card described is a card inserted
                _assign(second.sim, sc.sim2)
            _assign(second.network, sc.network2)
            st.slots.append(second)
        st.active_slot = sc.active_slot
        st.traffic.up_bps = float(sc.traffic.get("up_bps", 0.0))
        st.traffic.down_bps = float(sc.traffic.get("down_bps", 0.0))
        if sc.apn is not None:
            st.apn = sc.apn
        if sc.temperature_c is not None:
            st.temperature_c = sc.temperature_c
        self.engine.power_on(radio=sc.radio)
        for msg in sc.sms:
            sms.receive(self.engine, msg.get("sender", "+818000000000"), msg["text"], notify=False)

    def _slot(self, slot: int | None) -> SimSlot:
        """The holder ``slot`` (1-based), the active one for None."""
        slots = self.state.slots
        number = self.state.active_slot if slot is None else slot
        if not 1 <= number <= len(slots):
            raise ValueError(f"slot: the {self.personality.key} personality has SIM slots "
                             f"1 to {len(slots)}, not {slot!r}")
        return slots[number - 1]

    @property
    def active_slot(self) -> int:
        """The SIM slot in use (1-based). The vendor's slot command (Quectel ``AT+QDSIM``)
        changes it; like the module's NV setting, it survives reboots."""
        return self.state.active_slot

    def set_network(self, state: str, reject_cause: int | None = None, *,
                    slot: int | None = None, **fields: Any) -> None:
        """Change the network as the card in ``slot`` (default: the active one) meets it:
        ``set_network("denied", reject_cause=7)``."""
        network = self._slot(slot).network
        values = check_fields({"state": state, **fields}, NETWORK_FIELDS, "network")
        if reject_cause is not None:
            check_fields({"reject_cause": reject_cause}, NETWORK_FIELDS, "network")
        _assign(network, values)
        network.reject_cause = reject_cause
        self.engine.sync()

    def set_signal(self, **fields: int) -> None:
        _assign(self.state.signal, check_fields(fields, SIGNAL_FIELDS, "signal"))

    def set_temperature(self, temperature_c: int) -> None:
        """The module's temperature (°C), as its vendor's temperature command reports it."""
        values = check_fields({"temperature_c": temperature_c}, TEMPERATURE_FIELDS, "temperature")
        self.state.temperature_c = values["temperature_c"]

    def set_sim(self, *, slot: int | None = None, **fields: str) -> None:
        """Insert, remove, lock or swap the card in ``slot`` (default: the active one);
        ``iccid=``/``imsi=`` give a new card. The modem reads a change in its active slot at
        once (``+CPIN``), a card in the other slot when it switches to it."""
        sim = self._slot(slot).sim
        values = check_fields(fields, SIM_FIELDS, "sim")
        swapped = any(k in values and values[k] != getattr(sim, k) for k in ("iccid", "imsi"))
        _assign(sim, values)
        if "state" in values or swapped:
            sim.lock = "none"
            sim.pin_attempts = 3
            if sim is self.state.sim:
                self.engine.read_sim()
        self.engine.sync()

    def set_radio(self, fun: int) -> None:
        if fun not in (0, 1, 4):
            raise ValueError("fun: must be 0, 1 or 4")
        self.state.radio = fun
        self.engine.sync()

    def add_traffic(self, up: int, down: int) -> bool:
        """Bytes through the data path; False (nothing counted) without an active context."""
        return self.engine.add_traffic(up, down)

    def set_traffic_rate(self, up_bps: float = 0.0, down_bps: float = 0.0) -> None:
        self.engine.traffic()
        self.state.traffic.up_bps, self.state.traffic.down_bps = float(up_bps), float(down_bps)
