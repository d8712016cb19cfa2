"""The SIM keeper end to end: the simulator on a real pty, real SQLite, a loopback echo server.

Activation (stale APN replaced, context active, round trip -> active), failing activation with
backoff and the deadline alarms, expiry, time wiring, SIM swap, decommission.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.core.store import Store
from agent.sim.activation import tcp_probe
from agent.sim.alarms import PASSED
from agent.sim.keeper import KeeperError, SimKeeper
from tests.test_keeper_harness import (
    DAY,
    T0,
    Events,
    Wall,
    echo_server,
    fast_backoff,
    make_keeper,
    refused_probe,
    rig,
    state_of,
    until,
    with_lifecycle,
)

ICCID = "8981100005819480014"  # the simulator's SIM (Quectel prints it F-padded)
OTHER = "8981100005819480022"


async def test_activation_end_to_end_replaces_a_stale_apn(tmp_path: Path) -> None:
    manifest = tmp_path / "sims.csv"
    manifest.write_text(f"iccid,deadline,apn\n{ICCID}F,{T0 + 30 * DAY:.0f},soracom.io\n")
    async with echo_server() as (host, port), rig(
            tmp_path, scenario={"apn": "stale.example"}, probe=tcp_probe(host, port, timeout=2),
            lifecycle=with_lifecycle(manifest=manifest, apn="other.example")) as r:
        await until(lambda: state_of(r.keeper) == "active",
                    what="active")
        ctx = r.sim.state.pdp[1]
        assert ctx.apn == "soracom.io"  # the manifest's APN beats the configured default
        assert ctx.active
        assert 'AT+CGDCONT=1,"IP","soracom.io"' in r.sim.commands
        assert r.count("AT+CGACT=0,1") == 1  # the stale context went down before the change
        summary = r.keeper.summary()
        assert summary is not None
        assert summary["iccid"] == ICCID
        assert summary["deadline"] == T0 + 30 * DAY
        assert T0 <= summary["activated_at"] < T0 + 60
        assert summary["activation"]["attempts"] == 1
        assert summary["activation"]["last_error"] is None
        kinds = r.events.kinds()
        wanted = ("deadline-set", "activation-started", "activation-succeeded")
        assert [k for k in kinds if k in wanted] == list(wanted)
        assert r.events.of("apn-replaced") == [
            {"iccid": ICCID, "old": "stale.example", "new": "soracom.io"}]
        assert "AT+CTZU=1" in r.sim.commands  # trusted-time wiring at set-up
        assert "AT+CCLK?" in r.sim.commands
        assert r.keeper.telemetry_allowed() and r.keeper.accepting() is None


async def test_failing_activation_backs_off_alarms_at_thresholds_then_expires(
        tmp_path: Path) -> None:
    wall = Wall(T0)
    deadline = T0 + 8 * DAY
    async with rig(tmp_path, wall=wall, probe=refused_probe()) as r:
        await until(lambda: r.keeper.iccid == ICCID)
        r.keeper.set_deadline(deadline)
        await until(lambda: len(r.backoff.delays) >= 3, what="three failed attempts")
        assert r.events.of("deadline-alarm") == []
        assert all(0.02 <= d <= 0.2 for d in r.backoff.delays)
        failed = r.events.of("activation-failed")
        assert failed and "no round trip" in failed[0]["detail"]["reason"]

        for left, threshold in ((6 * DAY, 7 * DAY), (12 * 3600, DAY), (1800, 3600.0)):
            wall.now = deadline - left
            await until(lambda t=threshold: [a["threshold"] for a in r.events.of(
                "deadline-alarm")][-1:] == [t], what=f"alarm {threshold}")
        wall.now = deadline + 1
        await until(lambda: state_of(r.keeper) == "expired", what="expired")
        await until(lambda: r.sim.state.radio == 4, what="radio quiet after expiry")
        attempts = r.keeper.summary()["activation"]["attempts"]
        r.keeper._kick()  # a few more rounds: nothing is tried any more
        await until(lambda: r.count("AT+CFUN?") >= 3 + r.count("AT+CFUN=4"))
        wall.now = deadline + DAY
        r.keeper._kick()
        await until(lambda: not r.keeper._dirty)
        assert r.keeper.summary()["activation"]["attempts"] == attempts
        alarms = [a["threshold"] for a in r.events.of("deadline-alarm")]
        assert alarms == [7 * DAY, DAY, 3600.0, PASSED]  # each once, expiry once
        assert r.keeper.summary()["alarms_sent"] == alarms
        assert r.events.kinds().count("deadline-passed") == 1


async def test_alarms_are_not_sent_again_after_a_restart(tmp_path: Path) -> None:
    wall = Wall(T0)
    deadline = T0 + 3600.0 * 20  # within a day: the 7-day alarm is subsumed, one alarm
    store = Store(tmp_path / "simkeeper.db")
    try:
        async with rig(tmp_path, wall=wall, store=store, probe=refused_probe()) as r:
            await until(lambda: r.keeper.iccid == ICCID)
            r.keeper.set_deadline(deadline)
            await until(lambda: r.events.of("deadline-alarm"))
            assert [a["threshold"] for a in r.events.of("deadline-alarm")] == [DAY]
        async with rig(tmp_path, wall=wall, store=store, probe=refused_probe()) as r:
            await until(lambda: len(r.backoff.delays) >= 2)
            assert r.events.of("deadline-alarm") == []
    finally:
        store.close()


async def test_without_trusted_time_the_deadline_counts_as_near(tmp_path: Path) -> None:
    wall = Wall(0.0)  # a 1970 boot clock, not synchronised
    async with rig(tmp_path, wall=wall, synchronised=False, start=False,
                   probe=refused_probe(), backoff=fast_backoff(cap=0.5)) as r:
        # the modem's clock was never set by the network either: 1980
        r.sim.state.clock_offset = 315_532_800.0 - time.time()
        r.keeper.start()
        await until(lambda: r.keeper.iccid == ICCID)
        r.keeper.set_deadline(T0 + 300 * DAY)  # far away, but nobody can tell
        await until(lambda: len(r.backoff.delays) >= 6)
        assert r.keeper.clock.now().ts is None
        assert max(r.backoff.delays) <= 0.06  # the urgent ceiling, not the 0.5 s cap
        assert r.events.of("deadline-alarm") == []  # no false alarm either
        assert r.keeper.summary()["state"] in ("awaiting-activation", "activating")


async def test_network_time_feeds_the_trusted_clock(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, wall=Wall(0.0), synchronised=False,
            probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: r.keeper.clock.now().source == "network", what="network time")
        assert abs((r.keeper.clock.now().ts or 0) - time.time()) < 120
        assert r.keeper.summary()["trusted_time"] == "network"


async def test_sim_swap_opens_a_new_lifecycle_and_activates_it(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.sim.set_sim(iccid=OTHER)
        await until(lambda: r.keeper.iccid == OTHER, what="swap seen")
        swapped = r.events.of("sim-swapped")
        assert [(e["iccid"], e["detail"]["new_iccid"]) for e in swapped] == [(ICCID, OTHER)]
        await until(lambda: state_of(r.keeper) == "active", what="new SIM active")
        assert r.keeper.summary(ICCID)["state"] == "active"  # the old SIM's record is kept
        assert [s["iccid"] for s in r.keeper.summaries()] == [OTHER, ICCID]


async def test_f_padding_and_vendor_shapes_never_make_a_swap(tmp_path: Path) -> None:
    """Quectel prints the ICCID F-padded, u-blox without padding: the same SIM, across a
    restart on another modem, from a store that recorded it padded."""
    store = Store(tmp_path / "simkeeper.db")
    try:
        from agent.sim.notes import KeeperStore

        KeeperStore(store).put("iccid.modem", ICCID.lower() + "f")
        async with echo_server() as (host, port):
            for personality in ("quectel", "ublox"):
                async with rig(tmp_path, personality=personality, store=store,
                               probe=tcp_probe(host, port, timeout=2)) as r:
                    await until(lambda: state_of(r.keeper) == "active")
                    assert r.keeper.iccid == ICCID
                    assert r.events.of("sim-swapped") == []
    finally:
        store.close()


async def test_swap_at_boot_is_detected_from_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    try:
        async with echo_server() as (host, port):
            async with rig(tmp_path, store=store, probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: state_of(r.keeper) == "active")
            async with rig(tmp_path, store=store, scenario={"sim": {"iccid": OTHER}},
                           probe=tcp_probe(host, port, timeout=2)) as r:
                await until(lambda: r.keeper.iccid == OTHER)
                assert [e["iccid"] for e in r.events.of("sim-swapped")] == [ICCID]
    finally:
        store.close()


async def test_decommission_turns_the_radio_off_and_asks_for_the_sim(tmp_path: Path) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2)) as r:
        await until(lambda: state_of(r.keeper) == "active")
        r.keeper.decommission()
        await until(lambda: r.sim.state.radio == 0, what="radio off")
        assert r.keeper.summary()["state"] == "terminated"
        assert r.events.of("decommissioned") == [
            {"iccid": ICCID, "message": "decommissioned: return the SIM"}]
        assert not r.keeper.telemetry_allowed()
        assert "decommissioned" in (r.keeper.accepting() or "")


async def test_orders_need_a_sim(tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    try:
        keeper = make_keeper(store, Events(), Wall(), fast_backoff())
        assert isinstance(keeper, SimKeeper)
        assert keeper.summary() is None and keeper.telemetry_allowed()
        with pytest.raises(KeeperError, match="no SIM"):
            keeper.suspend("radio")
    finally:
        store.close()


async def test_restart_mid_attempt_after_the_deadline_expires_without_trying(
        tmp_path: Path) -> None:
    from agent.sim.lifecycle import LifecycleRepository, SimRecord

    store = Store(tmp_path / "simkeeper.db")
    try:
        LifecycleRepository(store).save(SimRecord(ICCID, "activating", deadline=T0 - 10))
        async with rig(tmp_path, store=store, probe=refused_probe()) as r:
            await until(lambda: state_of(r.keeper) == "expired")
            await until(lambda: bool(r.events.of("deadline-alarm")))  # later in the same round
            assert r.count("AT+CGACT=1,1") == 0 and r.backoff.delays == []
            assert [a["threshold"] for a in r.events.of("deadline-alarm")] == [PASSED]
    finally:
        store.close()
