"""What the modem says unasked reaches the keeper at once: a registration URC (``+CEREG`` and
kin, with or without reject fields) makes it look at the network within seconds, not at its
next poll (an hour here, so only the URC can make it look); a storm of them is not a loop; a
modem reset is an event."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.sim.activation import tcp_probe
from agent.sim.network_watch import URC_GAP
from tests.test_keeper_harness import (
    echo_server,
    fast_backoff,
    rig,
    state_of,
    until,
    with_lifecycle,
)

HOUR_POLL = with_lifecycle(poll_interval=3600.0)


async def test_a_reject_urc_suspends_without_waiting_for_the_poll(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, lifecycle=HOUR_POLL, probe=tcp_probe(host, port, timeout=2),
            backoff=fast_backoff(probe=3600.0)) as r:
        await until(lambda: state_of(r.keeper) == "active", timeout=20.0, what="active")
        r.sim.set_network("denied", reject_cause=7)  # +CEREG: 3,"1A2B","01A2D0F3",7,0,7
        await until(lambda: state_of(r.keeper) == "suspended", timeout=20.0,
                    what="suspended by the URC, not the hourly poll")
        summary = r.keeper.summary()
        assert summary is not None
        assert summary["suspension"]["source"] == "network"
        assert "#7" in summary["suspension"]["reason"]
        await until(lambda: r.sim.state.radio == 4, what="radio off")
        assert r.events.kinds().count("network-reject") == 1


async def test_a_registration_change_is_looked_at_at_once(tmp_path: Path) -> None:
    """A URC without reject fields (``+CEREG: 2``: searching, then ``+CEREG: 5,...``: roaming
    again) makes the keeper read the registration too, each time."""
    async with echo_server() as (host, port), rig(
            tmp_path, lifecycle=HOUR_POLL, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active", timeout=20.0, what="active")
        for state in ("searching", "roaming"):
            reads = r.count("AT+CEREG?")
            r.sim.set_network(state)
            await until(lambda: r.count("AT+CEREG?") > reads, timeout=20.0,  # noqa: B023
                        what=f"the registration read again ({state})")
        assert state_of(r.keeper) == "active"
        assert "network-reject" not in r.events.kinds()


async def test_a_urc_storm_is_not_a_loop(tmp_path: Path) -> None:
    """200 registration URCs a second: the keeper looks at most once per URC_GAP seconds
    (counted against the storm's own measured length, so a slow machine only loosens it)."""
    async with echo_server() as (host, port), rig(
            tmp_path, lifecycle=HOUR_POLL, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active", timeout=20.0, what="active")
        loop = asyncio.get_running_loop()
        reads = r.count("AT+CEREG?")
        began = loop.time()
        r.sim.flood(200, 3.0)
        await until(lambda: not r.sim.flooding, timeout=60.0, what="the storm over")
        await until(lambda: r.count("AT+CEREG?") > reads, timeout=20.0, what="looked at")
        span = loop.time() - began
        looks = r.count("AT+CEREG?") - reads
        assert looks <= span / URC_GAP + 3, (looks, span)  # not once per URC
        assert state_of(r.keeper) == "active"


async def test_a_modem_reset_is_an_event(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, lifecycle=HOUR_POLL, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active", timeout=20.0, what="active")
        r.sim.reboot()
        await until(lambda: r.events.of("modem-reset"), timeout=20.0, what="modem-reset event")
        event = r.events.of("modem-reset")[0]
        assert event["cause"] == "spontaneous" and event["reason"] == "RDY"
        assert event["iccid"] == r.keeper.iccid
        assert "malfunction" not in r.events.kinds()  # one reset is not a malfunction
