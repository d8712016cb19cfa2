"""Network-side refusals: a permanent reject suspends the SIM (source network), stops attach
attempts and probes rarely, recovering when the network takes the SIM back; a temporary reject
only backs off, jittered, never in a storm."""

from __future__ import annotations

import itertools
from pathlib import Path

from agent.sim.activation import tcp_probe
from tests.test_keeper_harness import (
    attempt_starts,
    echo_server,
    fast_backoff,
    rig,
    state_of,
    timed,
    until,
)


async def test_permanent_reject_suspends_and_probes_rarely(tmp_path: Path) -> None:
    async with rig(tmp_path, start=False, backoff=fast_backoff(probe=3600.0)) as r:
        r.sim.set_network("denied", reject_cause=7)
        r.keeper.start()
        await until(lambda: state_of(r.keeper) == "suspended", what="suspended")
        summary = r.keeper.summary()
        assert summary is not None
        assert summary["suspension"]["source"] == "network"
        assert summary["suspension"]["scope"] == "radio"
        assert "#7" in summary["suspension"]["reason"]
        await until(lambda: r.sim.state.radio == 4, what="attach attempts stopped")
        assert r.backoff.probes and min(r.backoff.probes) >= 0.9 * 3600.0
        assert summary["activation"]["next_delay"] >= 0.9 * 3600.0
        ons = r.count("AT+CFUN=1")
        for _ in range(3):  # more rounds: no probe before its time
            r.keeper._kick()
            await until(lambda: not r.keeper._dirty)
        assert r.count("AT+CFUN=1") == ons
        assert not r.keeper.telemetry_allowed()
        assert r.keeper.accepting() is None  # readings wait in the outbox for the SIM
        kinds = r.events.kinds()
        assert "network-reject" in kinds and "activation-failed" not in kinds


async def test_a_barred_sim_recovers_when_the_network_accepts_it(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, start=False, probe=tcp_probe(host, port, timeout=2),
            backoff=fast_backoff(probe=0.3)) as r:
        r.sim.set_network("denied", reject_cause=8)
        r.keeper.start()
        await until(lambda: state_of(r.keeper) == "suspended")
        await until(lambda: len(r.backoff.probes) >= 3, what="a few rare probes")
        assert state_of(r.keeper) == "suspended"
        r.sim.set_network("roaming")
        await until(lambda: state_of(r.keeper) == "active", what="recovered and activated")
        assert "network-recovered" in r.events.kinds()
        assert r.sim.state.radio == 1


async def test_permanent_reject_of_an_active_sim(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.sim.set_network("denied", reject_cause=3)
        r.keeper._kick()
        await until(lambda: state_of(r.keeper) == "suspended", what="barred while active")
        await until(lambda: r.sim.state.radio == 4)


async def test_temporary_reject_backs_off_with_jitter(tmp_path: Path) -> None:
    """The real gaps between attempts, as the modem saw them, never below the minimum: neither
    the kick of the attach nor a flood of URCs (each one wakes the keeper) cuts a pause."""
    backoff = fast_backoff(base=0.1, cap=0.3, min_delay=0.08, urgent_cap=0.15)
    async with rig(tmp_path, start=False, backoff=backoff) as r:
        log = timed(r.sim)
        r.sim.set_network("denied", reject_cause=22)  # congestion
        r.sim.flood(100, 60, text="+CTZV: +36")  # time zone URCs: the keeper looks again
        r.keeper.start()
        await until(lambda: len(attempt_starts(log)) >= 6, what="six attempts")
        starts = attempt_starts(log)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= backoff.min_delay, gaps  # never closer than min_delay
        assert r.sim.flooding and r.count("AT+CCLK?") >= 2  # the URCs did wake it meanwhile
        assert state_of(r.keeper) in ("awaiting-activation", "activating")
        assert r.count("AT+CFUN=4") == 0  # not treated as barring
        assert len(set(r.backoff.delays)) > 1  # jittered
        failed = r.events.of("activation-failed")
        assert failed and "congestion" in failed[0]["detail"]["reason"]
        assert "network-reject" not in r.events.kinds()


async def test_an_order_ends_a_backoff_pause(tmp_path: Path) -> None:
    """New work (the ``activate`` order) may end a pause the backoff chose (30 s here)."""
    backoff = fast_backoff(base=30.0, cap=30.0, min_delay=30.0, urgent_cap=30.0)
    async with rig(tmp_path, start=False, backoff=backoff) as r:
        log = timed(r.sim)
        r.sim.set_network("denied", reject_cause=22)
        r.keeper.start()
        await until(lambda: len(r.backoff.delays) == 1, what="first attempt failed")
        r.keeper.activate()
        await until(lambda: len(attempt_starts(log)) == 2, what="tried at once")


async def test_a_reject_cause_only_in_ceer_is_read(tmp_path: Path) -> None:
    async with rig(tmp_path, start=False) as r:
        r.sim.set_network("denied", reject_cause=6)
        await r.channel.command("AT+CEREG=2")  # no reject fields: +CEER has to tell
        r.keeper.start()
        await until(lambda: state_of(r.keeper) == "suspended")
        summary = r.keeper.summary()
        assert summary is not None and "#6" in summary["suspension"]["reason"]
