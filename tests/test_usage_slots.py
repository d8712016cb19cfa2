"""Usage metering of several modems, each with its SIM, on real SQLite files: each slot's
counters on their own (resets, epochs, restarts), the data of a one-modem gateway carried on,
a SIM moved between slots, and the plan-cap gates over every SIM in use."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.config import UsageConfig
from agent.core.store import Store
from agent.telemetry.outbox import USAGE
from agent.usage.meter import Counters, UsageMeter
from tests.test_usage import ICCID, OTHER, Clock, Rig, capped

THIRD = "8981100000000000003"
SECOND = "modem2"


def rows(store: Store) -> dict[str, tuple[object, ...]]:
    """The ``usage_counter`` rows: the last raw counters by row key."""
    return {r[0]: tuple(r[1:]) for r in store.query(
        "SELECT source, epoch, tx_bytes, rx_bytes, tx_packets, rx_packets FROM usage_counter")}


def sim_keys(store: Store) -> dict[str, str]:
    return dict(store.query("SELECT key, value FROM meta WHERE key LIKE 'usage.sim%'"))


def published(rig: Rig) -> list[dict[str, object]]:
    return [json.loads(r.data) for r in rig.outbox.next_batch(USAGE, 100, 1 << 20)]


# -- counting: each slot on its own ----------------------------------------------------------


def test_two_slots_count_the_same_source_on_their_own(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", UsageConfig(), Clock())
    meter = rig.meter
    meter.observe(ICCID, "modem", Counters(1000, 2000), epoch="a1")
    meter.observe(OTHER, "modem", Counters(50_000, 60_000), epoch="b1", slot=SECOND)
    meter.observe(ICCID, "modem", Counters(1500, 2100), epoch="a1")
    meter.observe(OTHER, "modem", Counters(50_300, 60_000), epoch="b1", slot=SECOND)
    assert rig.total(ICCID, "modem")[:2] == (1500, 2100)
    assert rig.total(OTHER, "modem")[:2] == (50_300, 60_000)
    # the second modem restarts (its counters read lower): counted in full, for its SIM only
    meter.observe(OTHER, "modem", Counters(100, 10), epoch="b1", slot=SECOND)
    meter.observe(ICCID, "modem", Counters(1600, 2100), epoch="a1")
    assert rig.total(ICCID, "modem")[:2] == (1600, 2100)
    assert rig.total(OTHER, "modem")[:2] == (50_400, 60_010)
    # a new epoch in the first slot is a reset there, not in the second
    meter.observe(ICCID, "modem", Counters(40, 0), epoch="a2")
    meter.observe(OTHER, "modem", Counters(150, 10), epoch="b1", slot=SECOND)
    assert rig.total(ICCID, "modem")[:2] == (1640, 2100)
    assert rig.total(OTHER, "modem")[:2] == (50_450, 60_010)
    # the kernel's counters of each slot, too
    meter.observe(ICCID, "kernel", Counters(10, 20, 1, 2), epoch="k")
    meter.observe(OTHER, "kernel", Counters(30, 40, 3, 4), epoch="k", slot=SECOND)
    assert rows(rig.store) == {
        "modem": ("a2", 40, 0, 0, 0),
        "modem@modem2": ("b1", 150, 10, 0, 0),
        "kernel": ("k", 10, 20, 1, 2),
        "kernel@modem2": ("k", 30, 40, 3, 4),
    }
    assert meter.sims == {"modem": ICCID, SECOND: OTHER}
    assert sim_keys(rig.store) == {"usage.sim": ICCID, "usage.sim.modem2": OTHER}
    # the reports stay by SIM and source
    assert meter.report(OTHER)["counters"]["modem"]["bytes_up"] == 50_450
    assert set(meter.report(OTHER)["counters"]) == {"modem", "kernel"}
    with pytest.raises(ValueError, match="bad usage reading"):
        meter.observe(ICCID, "modem", Counters(1, 1), slot="modem@x")
    with pytest.raises(ValueError, match="bad usage reading"):
        meter.observe(ICCID, "modem", Counters(1, 1), slot="")
    rig.store.close()


def test_a_restart_keeps_every_slots_sim_and_counters(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "db", UsageConfig(), Clock())
    rig.meter.observe(ICCID, "modem", Counters(1000, 1000))
    rig.meter.observe(OTHER, "modem", Counters(7000, 7000), slot=SECOND)
    rig.restart()
    assert rig.meter.sims == {"modem": ICCID, SECOND: OTHER}
    assert set(rig.meter.reported) == {ICCID, OTHER}
    assert [r["iccid"] for r in rig.meter.reports([])] == [ICCID, OTHER]
    rig.meter.observe(ICCID, "modem", Counters(1100, 1000))  # deltas, not the whole values
    rig.meter.observe(OTHER, "modem", Counters(7000, 7500), slot=SECOND)
    assert rig.total(ICCID, "modem")[:2] == (1100, 1000)
    assert rig.total(OTHER, "modem")[:2] == (7000, 7500)
    rig.meter.publish()
    assert {(r["iccid"], r["bytes_up"]) for r in published(rig)} == {(ICCID, 1100), (OTHER, 7000)}
    rig.store.close()


def test_a_one_modem_gateways_data_carries_on(tmp_path: Path) -> None:
    """A store as the meter of one modem left it: counters keyed by plain source, the SIM in
    use in meta ``usage.sim``."""
    path = tmp_path / "db"
    store = Store(path)
    with store.transaction() as db:
        db.execute("INSERT INTO usage_counter VALUES ('modem', 'imei', 4000, 3000, 0, 0)")
        db.execute("INSERT INTO usage_counter VALUES ('kernel', 'b/3', 4100, 3100, 40, 30)")
        for source, values in (("modem", (4000, 3000, 0, 0)), ("kernel", (4100, 3100, 40, 30))):
            db.execute("INSERT INTO usage_period VALUES (?, '2026-05-01T00:00:00+00:00', ?,"
                       " ?, ?, ?, ?)", (ICCID, source, *values))
        db.execute("INSERT INTO meta VALUES ('usage.sim', ?)", (ICCID,))
        db.execute("INSERT INTO meta VALUES (?, '2026-05-01T00:00:00+00:00')",
                   (f"usage.period.{ICCID}",))
    store.close()
    rig = Rig(path, UsageConfig(), Clock())
    assert rig.meter.sims == {"modem": ICCID}
    assert rig.meter.reported[ICCID]["bytes_up"] == 4000
    # the daemon's first modem goes on in slot "modem" (the default) with the same rows
    rig.meter.observe(ICCID, "modem", Counters(4500, 3000), epoch="imei")
    rig.meter.observe(ICCID, "kernel", Counters(4700, 3100, 50, 30), epoch="b/3", slot="modem")
    assert rig.total(ICCID, "modem") == (4500, 3000, 0, 0)
    assert rig.total(ICCID, "kernel") == (4700, 3100, 50, 30)
    assert set(rows(rig.store)) == {"modem", "kernel"}
    assert sim_keys(rig.store) == {"usage.sim": ICCID}
    assert published(rig) == []  # same period: no final report
    rig.store.close()


# -- a SIM moved between slots ---------------------------------------------------------------


def test_sims_swapped_between_modems_count_once_each(tmp_path: Path) -> None:
    rig = capped(tmp_path)
    meter = UsageMeter(rig.store, rig.outbox, rig.events, rig.cfg, clock=rig.clock,
                       save_interval=900)
    meter.observe(ICCID, "modem", Counters(1000, 0))
    meter.observe(OTHER, "modem", Counters(5000, 0), slot=SECOND)
    rig.clock.now += 60
    meter.observe(ICCID, "modem", Counters(1200, 0))  # put off (only counters moved)
    assert rig.total(ICCID, "modem")[0] == 1000
    # the SIMs swap modems: each slot's counters go on, each now for the other SIM
    meter.observe(ICCID, "modem", Counters(5300, 0), slot=SECOND)
    assert meter.sims == {SECOND: ICCID}  # the first slot has no SIM in use until it reports
    assert sim_keys(rig.store) == {"usage.sim.modem2": ICCID}
    meter.observe(OTHER, "modem", Counters(1250, 0))
    assert meter.sims == {"modem": OTHER, SECOND: ICCID}
    # ICCID: 1000 + 200 (put off in the first modem, still its own) + 300 in the second
    assert rig.total(ICCID, "modem")[0] == 1500
    assert rig.total(OTHER, "modem")[0] == 5050  # 5000 + 50 in the first modem
    rig.clock.now += 60
    meter.observe(ICCID, "modem", Counters(5400, 0), slot=SECOND)  # put off
    meter.publish()  # commits it, to ICCID: no slot changes hands
    assert rig.total(ICCID, "modem")[0] == 1600
    assert meter.sims == {"modem": OTHER, SECOND: ICCID}
    rig.restart()
    assert rig.meter.sims == {"modem": OTHER, SECOND: ICCID}
    rig.meter.observe(ICCID, "modem", Counters(5400, 0), slot=SECOND)  # seen: counts nothing
    assert (rig.total(ICCID, "modem")[0], rig.total(OTHER, "modem")[0]) == (1600, 5050)
    rig.store.close()


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(
    st.sampled_from(["traffic", "observe", "reset", "restart", "swap"]),
    st.sampled_from([0, 1]), st.integers(0, 10**6)), max_size=40))
def test_two_slots_never_lose_or_double_count(steps: list[tuple[str, int, int]]) -> None:
    """Traffic through each modem counts once for the SIM in it when read; a reset loses only
    what came after the last reading; SIMs swapped between modems keep their own totals."""
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(Path(d) / "db", UsageConfig(), Clock())
        slots = ("modem", SECOND)
        sims = [ICCID, OTHER]
        counter, seen, epoch = [0, 0], [0, 0], [0, 0]
        true = {ICCID: 0, OTHER: 0}  # bytes read through a modem while the SIM was in it

        def observe(i: int) -> None:
            rig.meter.observe(sims[i], "modem", Counters(counter[i], 0), epoch=str(epoch[i]),
                              slot=slots[i])
            true[sims[i]] += counter[i] - seen[i]
            seen[i] = counter[i]

        for kind, i, n in steps:
            if kind == "traffic":
                counter[i] += n
            elif kind == "observe":
                observe(i)
            elif kind == "reset":
                counter[i], seen[i], epoch[i] = 0, 0, epoch[i] + 1
            elif kind == "restart":
                rig.restart()
            else:  # the traffic so far is read before the SIMs change modems
                observe(0)
                observe(1)
                sims.reverse()
        observe(0)
        observe(1)
        assert {s: rig.total(s, "modem")[0] for s in true} == true
        rig.store.close()


# -- caps: the gates over every SIM in use ---------------------------------------------------


def test_readings_are_held_only_when_every_sim_in_use_is_capped(tmp_path: Path) -> None:
    rig = capped(tmp_path)  # ICCID: 10000 bytes; OTHER: 100000
    meter = rig.meter
    meter.observe(ICCID, "modem", Counters(6000, 4000))  # 100%: stop
    assert meter.cap(ICCID) == "stop" and meter.accepting() is not None
    meter.observe(OTHER, "modem", Counters(100, 100), slot=SECOND)  # the second SIM is fine
    assert (meter.cap(ICCID), meter.cap(OTHER)) == ("stop", None)
    assert meter.accepting() is None and meter.allowed("sensors/x", 0)
    meter.observe(OTHER, "modem", Counters(50_000, 10_000), slot=SECOND)  # 60%: an event
    assert meter.cap(OTHER) == "event" and meter.allowed("sensors/x", 0)
    meter.observe(OTHER, "modem", Counters(50_000, 40_000), slot=SECOND)  # 90%: throttle
    assert meter.cap(OTHER) == "throttle"
    assert not meter.allowed("sensors/x", 0) and meter.allowed("alarms/door", 0)
    assert meter.accepting() is None  # the least severe action applies: throttle
    meter.observe(OTHER, "modem", Counters(60_000, 40_000), slot=SECOND)  # 100%: stop too
    reason = meter.accepting()
    assert reason is not None and f"SIM {ICCID}" in reason and f"SIM {OTHER}" in reason
    assert [(e["iccid"], e["threshold"]) for e in rig.events_of("usage-threshold")] == [
        (ICCID, 0.5), (ICCID, 0.8), (ICCID, 1.0), (OTHER, 0.5), (OTHER, 0.8), (OTHER, 1.0)]
    rig.restart()  # both caps hold across a restart
    assert rig.meter.accepting() is not None
    assert (rig.meter.cap(ICCID), rig.meter.cap(OTHER)) == ("stop", "stop")
    rig.meter.set_plan(OTHER, 10**7)  # in use in the second slot: re-evaluated at once
    assert rig.meter.cap(OTHER) is None and rig.meter.accepting() is None
    # a SIM out of use: its cap from its report, and no gate of its own any more
    rig.meter.observe(THIRD, "modem", Counters(6000, 4000))  # a swap in the first modem
    assert rig.meter.sims == {"modem": THIRD, SECOND: OTHER}
    rig.meter.set_plan(ICCID, 10**9)
    assert rig.meter.cap(ICCID) is None
    rig.meter.set_plan(ICCID, None)
    assert rig.meter.cap(ICCID) == "stop"
    assert rig.meter.cap("8981100000000000099") is None  # never seen
    # a new period lifts every cap
    rig.meter.set_plan(OTHER, None)
    assert rig.meter.cap(OTHER) == "stop"
    rig.clock.now = datetime(2026, 6, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    assert rig.meter.cap(OTHER) is None and rig.meter.accepting() is None
    rig.store.close()
