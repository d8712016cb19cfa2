"""The dual-SIM switch policy's other reasons, on a keeper in this process and the simulated
Quectel (``AT+QDSIM``) on a real pty: the primary's plan cap (and back once it no longer
holds), no registration for ``no_registration`` seconds, a modem with one SIM slot, and the
switch persisted before its event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.core.config import LifecycleConfig
from agent.core.modem_config import DualSimConfig
from agent.core.store import Store
from agent.core.trusted_time import TrustedClock
from agent.sim.keeper import SimKeeper
from drivers.channel import AtChannel
from drivers.modem import Modem
from drivers.simulator import SimulatedModem
from tests.broker import until

A, B = "8981100005819480014", "8981200001234567898"


@asynccontextmanager
async def rig(
    tmp_path: Path, capped: Callable[[str], bool], *, personality: str = "quectel",
    poll: float = 0.2, **policy: Any,
) -> AsyncIterator[tuple[SimKeeper, SimulatedModem, list[Any]]]:
    async def probe() -> None:
        return None

    scenario: dict[str, Any] = {"sim": {"iccid": A}, "network": {"state": "home"}}
    if personality == "quectel":
        scenario["sim2"] = {"iccid": B, "imsi": "440101234567890"}
    events: list[Any] = []
    store = Store(tmp_path / "keeper.db")

    def emit(kind: str, **fields: Any) -> None:
        if kind == "sim-switch":  # persisted (queued to the store's writer) before emitted
            fields["note"] = store.get_meta("keeper.dual.modem")
        events.append((kind, fields))

    async with SimulatedModem(personality, scenario, link=tmp_path / "modem",
                              boot_seconds=0.1, sim_busy_seconds=0.05) as sim:
        channel = await AtChannel.open(str(tmp_path / "modem"), timeout=2.0)
        keeper = SimKeeper(store, emit, data_path="agent", probe=probe, register_poll=0.05,
                           lifecycle=LifecycleConfig(poll_interval=poll),
                           clock=TrustedClock(synchronised=lambda: True), capped=capped,
                           dual_sim=DualSimConfig(enabled=True, min_dwell=0, **policy))
        try:
            keeper.set_deadline(2_000_000_000, A)
            keeper.set_deadline(2_000_000_000, B)
            keeper.attach(channel, await Modem(channel).init())
            keeper.start()
            yield keeper, sim, events
        finally:
            await keeper.stop()
            await channel.close()
            store.close()


def _switches(events: list[Any]) -> list[dict[str, Any]]:
    return [f for kind, f in events if kind == "sim-switch"]


def _on(keeper: SimKeeper, iccid: str) -> bool:
    summary = keeper.summary()
    return keeper.iccid == iccid and summary is not None and summary["state"] == "active"


async def test_the_primary_plan_cap_switches_to_the_backup_and_back(tmp_path: Path) -> None:
    caps = {A: False}
    async with rig(tmp_path, lambda iccid: caps.get(iccid, False), recheck=10) as (
            keeper, sim, events):
        await until(lambda: _on(keeper, A) and len(_switches(events)) == 2, "A in use")
        caps[A] = True
        await until(lambda: _on(keeper, B), "the backup in use")
        away = _switches(events)[2]
        assert away["reason"] == "plan cap" and sim.active_slot == 2
        assert json.loads(away["note"])["reason"] == "plan cap"
        caps[A] = False  # a new period: the cap no longer holds
        await until(lambda: _on(keeper, A), "the primary in use again", timeout=30)
        assert _switches(events)[3]["errand"] == "probe" and sim.active_slot == 1
        await until(lambda: events[-1][0] == "sim-switch-settled", "the primary kept")


# The keeper's own rounds an hour apart (``[lifecycle] poll_interval``): the policy's times
# still fall due on time, the keeper waking for them.
HOUR = 3600.0


async def test_no_registration_switches_to_the_backup(tmp_path: Path) -> None:
    async with rig(tmp_path, lambda _iccid: False, no_registration=10, poll=HOUR) as (
            keeper, sim, events):
        await until(lambda: _on(keeper, A) and len(_switches(events)) == 2, "A in use")
        sim.set_network("searching", slot=1)
        await until(lambda: _on(keeper, B), "the backup in use", timeout=30)
        assert _switches(events)[2]["reason"] == "no registration"


async def test_a_modem_with_one_slot_is_left_alone(tmp_path: Path) -> None:
    async with rig(tmp_path, lambda _iccid: False, personality="simcom") as (
            keeper, sim, events):
        await until(lambda: _on(keeper, A), "A in use")
        await until(lambda: keeper.dual is not None and keeper.dual.supported is False,
                    "the modem asked for its slots")
        assert _switches(events) == [] and sim.active_slot == 1


async def test_the_primary_is_tried_again_at_recheck_between_rounds(tmp_path: Path) -> None:
    async with rig(tmp_path, lambda _iccid: False, recheck=10, poll=HOUR) as (
            keeper, sim, events):
        await until(lambda: _on(keeper, A) and len(_switches(events)) == 2, "A in use")
        sim.set_network("denied", reject_cause=7, slot=1)  # heard at once: the +CEREG URC
        await until(lambda: _on(keeper, B), "the backup in use")
        assert _switches(events)[2]["reason"] == "permanent network reject"
        sim.set_network("home", slot=1)
        await until(lambda: len(_switches(events)) == 4, "the primary tried again", timeout=30)
        assert _switches(events)[3]["errand"] == "probe" and sim.active_slot == 1
        await until(lambda: _on(keeper, A), "the primary resumed and active again")
        assert "sim-switch-settled" in [kind for kind, _ in events]
