"""`simkeeper fleet simulate`: a small fleet of real daemons, each with its own simulated modem,
in this process against a real mosquitto. All online (retained status), a signed get-state
answered by each, a broker SIGKILL and restart on the same port and every agent back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.fleet.localbroker import LocalBroker
from agent.fleet.mqtt import FleetError
from agent.fleet.simulate import check_capacity, fleet_broker
from agent.fleet.simulate_fleet import Fleet, Options, device_id, iccid
from agent.fleet.simulate_report import Observer, Report, measure_storm
from tests.broker import Subscriber, until

N = 3


@pytest.fixture
async def fleet(mosquitto: str, tmp_path: Path) -> AsyncIterator[tuple[Fleet, LocalBroker,
                                                                        Observer]]:
    del mosquitto  # only its presence: LocalBroker finds the binary itself
    broker = fleet_broker(tmp_path)
    await broker.start_async()
    observer = Observer("127.0.0.1", broker.port, "simkeeper")
    observer.start()
    opts = Options(n=N, telemetry=0.0, wave=2, reconnect_max=4.0)
    fleet = Fleet(opts, tmp_path, "127.0.0.1", broker.port)
    try:
        yield fleet, broker, observer
    finally:
        await fleet.stop()
        await observer.close()
        broker.stop()


async def _retained_status(port: int) -> dict[str, str]:
    """What a newcomer sees: the retained ``status`` of every device."""
    sub = await asyncio.to_thread(Subscriber, port, "simkeeper/+/status")
    try:
        await until(lambda: len({m.topic for m in sub.messages if m.retain}) >= N,
                    "retained status of every device")
        return {m.topic.split("/")[1]: m.payload.decode() for m in sub.messages if m.retain}
    finally:
        await asyncio.to_thread(sub.close)


async def _get_state_everywhere(fleet: Fleet, observer: Observer) -> None:
    sent = [observer.send(fleet.operator_key, a.device_id) for a in fleet.agents]
    await asyncio.wait_for(asyncio.gather(*(f for _c, _s, f in sent)), 30)
    for (cid, _s, _f), agent in zip(sent, fleet.agents, strict=True):
        result = observer.results[cid]
        assert result["status"] == "ok", result
        detail = result["detail"]
        state = json.loads(detail) if isinstance(detail, str) else detail
        assert state["device_id"] == agent.device_id


async def test_small_fleet_end_to_end(fleet: tuple[Fleet, LocalBroker, Observer]) -> None:
    sim, broker, observer = fleet
    await sim.start()
    assert [a.device_id for a in sim.agents] == ["gw-00001", "gw-00002", "gw-00003"]
    assert await sim.wait_online(30)
    assert await sim.wait_modems(30)
    # each agent has its own directory, store, socket and modem (its own pty and SIM)
    assert len({a.modem.path for a in sim.agents}) == N
    assert len({str(a.daemon.cfg.store.path) for a in sim.agents}) == N
    iccids = {a.daemon.parts.modems.sessions[str(a.directory / "modem")].iccid for a in sim.agents}
    assert iccids == {iccid(i) for i in range(1, N + 1)}

    assert await _retained_status(broker.port) == dict.fromkeys(
        (device_id(i) for i in range(1, N + 1)), "online")
    await asyncio.wait_for(observer.ready.wait(), 30)
    await _get_state_everywhere(sim, observer)

    report = Report(N)
    await measure_storm(sim, broker, 0.5, report, timeout=30.0)
    assert report.storm_missing == 0 and len(report.storm) == N
    assert report.storm_attempts >= N  # each came back by connecting again
    assert await _retained_status(broker.port) == dict.fromkeys(
        (device_id(i) for i in range(1, N + 1)), "online")
    await asyncio.wait_for(observer.ready.wait(), 30)
    await _get_state_everywhere(sim, observer)


def test_refuses_a_fleet_that_cannot_fit() -> None:
    with pytest.raises(FleetError, match=r"needs about \d+ open files .* at most N="):
        check_capacity(10_000_000, 60.0)


def test_cli_refusal_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "simulate", "10000000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simkeeper fleet simulate: N=10000000 needs")
    assert main(["fleet", "simulate", "0"]) == 2
