"""Usage metering: counter resets and restarts (property tests), kernel counters from a fake
sysfs, billing periods and their roll-over, plan caps and their actions."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.config import Threshold, UsageConfig, parse
from agent.core.store import Store
from agent.telemetry.events import Events
from agent.telemetry.outbox import EVENTS, USAGE, Outbox
from agent.usage.meter import Counters, UsageMeter, read_kernel
from agent.usage.period import billing_period

ICCID = "8981100000000000001"
OTHER = "8981100000000000002"
NOW = datetime(2026, 5, 10, 12, tzinfo=ZoneInfo("UTC")).timestamp()


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, path: Path, cfg: UsageConfig, clock: Clock) -> None:
        self.path, self.cfg, self.clock = path, cfg, clock
        self.open()

    def open(self) -> None:
        self.store = Store(self.path)
        self.outbox = Outbox(self.store, max_bytes=1 << 24, max_age=1e9, clock=self.clock)
        self.events = Events(self.outbox, clock=self.clock)
        self.meter = UsageMeter(self.store, self.outbox, self.events, self.cfg, clock=self.clock)

    def restart(self) -> None:
        self.store.close()
        self.open()

    def total(self, iccid: str = ICCID, source: str = "kernel") -> tuple[int, ...]:
        row = self.store.query(
            "SELECT TOTAL(tx_bytes), TOTAL(rx_bytes), TOTAL(tx_packets), TOTAL(rx_packets)"
            " FROM usage_period WHERE iccid = ? AND source = ?",
            (iccid, source),
        )[0]
        return tuple(int(v) for v in row)

    def events_of(self, kind: str) -> list[dict[str, object]]:
        return [
            json.loads(r.data)
            for r in self.outbox.next_batch(EVENTS, 10_000, 1 << 30)
            if r.topic == kind
        ]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "db", UsageConfig(), Clock())
    yield r
    r.store.close()


# -- property: resets and restarts never lose or double count --------------------------------

step = st.one_of(
    st.tuples(st.just("traffic"), st.lists(st.integers(0, 10**9), min_size=4, max_size=4)),
    st.tuples(st.just("observe"), st.just([])),
    st.tuples(st.just("observe"), st.just([])),  # observing twice in a row counts once
    st.tuples(st.just("reset"), st.just([])),  # interface recreated / reboot: new epoch
    st.tuples(st.just("silent-reset"), st.just([])),  # modem reboot: same epoch, seen at 0
    st.tuples(st.just("restart"), st.just([])),  # the agent restarts
    st.tuples(st.just("advance"), st.lists(st.integers(0, 40 * 86400), min_size=1, max_size=1)),
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(step, max_size=40))
def test_totals_never_decrease_and_equal_the_true_sum(steps: list[tuple[str, list[int]]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(Path(d) / "db", UsageConfig(), Clock())
        counter = [0, 0, 0, 0]
        seen = [0, 0, 0, 0]  # the counters at the meter's last reading
        true = [0, 0, 0, 0]
        lost = [0, 0, 0, 0]  # traffic after the last reading, gone with a reset: unknowable
        epoch = 0
        last = rig.total()

        def observe() -> None:
            nonlocal last, seen
            rig.meter.observe(ICCID, "kernel", Counters(*counter), epoch=str(epoch))
            now = rig.total()
            assert all(n >= old for n, old in zip(now, last, strict=True))
            last, seen = now, list(counter)

        for kind, args in steps:
            if kind == "traffic":
                counter = [c + a for c, a in zip(counter, args, strict=True)]
                true = [t + a for t, a in zip(true, args, strict=True)]
            elif kind == "observe":
                observe()
            elif kind == "reset":
                lost = [x + c - s for x, c, s in zip(lost, counter, seen, strict=True)]
                counter, seen, epoch = [0, 0, 0, 0], [0, 0, 0, 0], epoch + 1
            elif kind == "silent-reset":
                observe()  # a modem reboot is noticed: its counters read 0 first
                counter = [0, 0, 0, 0]
                observe()
            elif kind == "restart":
                rig.restart()
            else:
                rig.clock.now += args[0]
        observe()
        assert list(last) == [t - x for t, x in zip(true, lost, strict=True)]
        rig.store.close()


@settings(max_examples=40, deadline=None)
@given(
    readings=st.lists(
        st.tuples(st.integers(0, 10**12), st.integers(0, 10**12), st.booleans()), max_size=30
    )
)
def test_arbitrary_modem_readings_never_go_backwards(
    readings: list[tuple[int, int, bool]],
) -> None:
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(Path(d) / "db", UsageConfig(), Clock())
        last: tuple[int, ...] = (0, 0, 0, 0)
        prev: tuple[int, int] | None = None
        for sent, recv, restart in readings:
            if restart:
                rig.restart()
            rig.meter.observe(ICCID, "modem", Counters(sent, recv))
            now = rig.total(source="modem")
            assert all(n >= old for n, old in zip(now, last, strict=True))
            # the increase is the delta, or the whole value after a reset (lower reading)
            if prev is not None:
                expect_tx = sent - prev[0] if sent >= prev[0] else sent
                assert now[0] - last[0] == expect_tx
            last, prev = now, (sent, recv)
        rig.store.close()


# -- kernel counters -------------------------------------------------------------------------


def fake_sysfs(root: Path, ifname: str, values: tuple[int, ...], ifindex: int) -> None:
    stats = root / "sys/class/net" / ifname / "statistics"
    stats.mkdir(parents=True, exist_ok=True)
    for name, value in zip(
        ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"), values, strict=True
    ):
        (stats / name).write_text(f"{value}\n")
    (root / "sys/class/net" / ifname / "ifindex").write_text(f"{ifindex}\n")
    boot = root / "proc/sys/kernel/random"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "boot_id").write_text("b00t\n")


def test_kernel_counters_and_interface_recreated(rig: Rig, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert read_kernel("wwan0", root) is None
    fake_sysfs(root, "wwan0", (1000, 5000, 10, 20), ifindex=3)
    found = read_kernel("wwan0", root)
    assert found == (Counters(1000, 5000, 10, 20), "b00t/3")
    rig.meter.observe(ICCID, "kernel", found[0], epoch=found[1])
    fake_sysfs(root, "wwan0", (1500, 6000, 15, 30), ifindex=3)
    counters, epoch = read_kernel("wwan0", root) or (None, "")
    assert counters is not None
    rig.meter.observe(ICCID, "kernel", counters, epoch=epoch)
    assert rig.total() == (1500, 6000, 15, 30)
    # recreated: new ifindex, counters already past the old values -> still a reset
    fake_sysfs(root, "wwan0", (9000, 9000, 90, 90), ifindex=4)
    counters, epoch = read_kernel("wwan0", root) or (None, "")
    assert counters is not None
    rig.meter.observe(ICCID, "kernel", counters, epoch=epoch)
    assert rig.total() == (10500, 15000, 105, 120)
    (root / "sys/class/net/wwan0/statistics/tx_bytes").write_text("garbage")
    assert read_kernel("wwan0", root) is None
    with pytest.raises(ValueError, match="bad usage reading"):
        rig.meter.observe(ICCID, "kernel", Counters(-1, 0))
    with pytest.raises(ValueError, match="bad usage reading"):
        rig.meter.observe(ICCID, "wifi", Counters(1, 0))


def test_sim_swap_starts_the_new_sim_at_zero(rig: Rig) -> None:
    rig.meter.observe(ICCID, "kernel", Counters(1000, 1000))
    rig.meter.observe(OTHER + "F", "kernel", Counters(1500, 1200))  # padded ICCID, same SIM key
    assert rig.total(ICCID)[:2] == (1000, 1000)
    assert rig.total(OTHER)[:2] == (500, 200)
    assert rig.meter.sims == {"modem": OTHER}


# -- periods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "day", "tz", "start", "end"),
    [
        (
            "2026-05-10T12:00+00:00",
            1,
            "UTC",
            "2026-05-01T00:00:00+00:00",
            "2026-06-01T00:00:00+00:00",
        ),
        (
            "2026-05-10T12:00+00:00",
            15,
            "UTC",
            "2026-04-15T00:00:00+00:00",
            "2026-05-15T00:00:00+00:00",
        ),
        (
            "2026-01-03T00:00+00:00",
            5,
            "UTC",
            "2025-12-05T00:00:00+00:00",
            "2026-01-05T00:00:00+00:00",
        ),
        (
            "2026-12-20T00:00+00:00",
            5,
            "UTC",
            "2026-12-05T00:00:00+00:00",
            "2027-01-05T00:00:00+00:00",
        ),
        # 2026-05-31 16:00 UTC is already June 1st in Tokyo
        (
            "2026-05-31T16:00+00:00",
            1,
            "Asia/Tokyo",
            "2026-06-01T00:00:00+09:00",
            "2026-07-01T00:00:00+09:00",
        ),
        (
            "2026-03-08T12:00+00:00",
            8,
            "America/New_York",
            "2026-03-08T00:00:00-05:00",
            "2026-04-08T00:00:00-04:00",
        ),
    ],
)
def test_billing_period(when: str, day: int, tz: str, start: str, end: str) -> None:
    now = datetime.fromisoformat(when).timestamp()
    s, e = billing_period(now, day, ZoneInfo(tz))
    assert (s.isoformat(), e.isoformat()) == (start, end)
    assert s.timestamp() <= now < e.timestamp()


def test_period_roll_over_and_final_report(rig: Rig) -> None:
    rig.meter.observe(ICCID, "modem", Counters(100, 200))
    rig.meter.observe(ICCID, "kernel", Counters(150, 260, 3, 4), epoch="e")
    report = rig.meter.report(ICCID)
    assert report == {
        "iccid": ICCID,
        "period": {"start": "2026-05-01T00:00:00+00:00", "end": "2026-06-01T00:00:00+00:00"},
        "bytes_up": 100,
        "bytes_down": 200,
        "source": "modem",
        "billed_estimate": 300 + 7 * 52,
        "plan_bytes": None,
        "share_used": None,
        "counters": {
            "modem": {"bytes_up": 100, "bytes_down": 200, "packets_up": 0, "packets_down": 0},
            "kernel": {"bytes_up": 150, "bytes_down": 260, "packets_up": 3, "packets_down": 4},
        },
    }
    rig.clock.now = datetime(2026, 6, 2, tzinfo=ZoneInfo("UTC")).timestamp()
    rig.restart()
    rig.meter.observe(ICCID, "modem", Counters(130, 200))
    finals = [json.loads(r.data) for r in rig.outbox.next_batch(USAGE, 10, 1 << 20)]
    assert [f["period"]["start"] for f in finals] == ["2026-05-01T00:00:00+00:00"]
    assert finals[0]["bytes_up"] == 100
    june = rig.meter.report(ICCID)
    assert (june["period"]["start"], june["bytes_up"], june["bytes_down"]) == (
        "2026-06-01T00:00:00+00:00",
        30,
        0,
    )
    ids = rig.meter.publish()
    reports = [json.loads(r.data) for r in rig.outbox.next_batch(USAGE, 10, 1 << 20)]
    assert len(ids) == 1 and reports[-1]["bytes_up"] == 30
    assert rig.outbox.next_batch(USAGE, 10, 1 << 20)[-1].topic == "usage"


# -- caps ------------------------------------------------------------------------------------


def capped(tmp_path: Path) -> Rig:
    cfg = parse(
        'device_id = "g"\n[usage]\nplan_bytes = 10000\nheader_overhead_bytes = 0\n'
        'critical_topics = ["alarms"]\n'
        'thresholds = [{share = 0.5, action = "event"}, {share = 0.8, action = "throttle"},'
        ' {share = 1.0, action = "stop"}]\n'
        f'[[usage.plan]]\niccid = "{OTHER}"\nplan_bytes = 100000\n'
    ).usage
    return Rig(tmp_path / "db", cfg, Clock())


def test_caps_fire_once_per_threshold_then_act(tmp_path: Path) -> None:
    rig = capped(tmp_path)
    meter = rig.meter
    meter.observe(ICCID, "modem", Counters(2000, 2000))
    assert rig.events_of("usage-threshold") == []
    assert meter.allowed("x", 0) and meter.accepting() is None
    meter.observe(ICCID, "modem", Counters(3000, 2500))
    meter.observe(ICCID, "modem", Counters(3000, 2600))
    fired = rig.events_of("usage-threshold")
    assert [(e["threshold"], e["action"]) for e in fired] == [(0.5, "event")]
    meter.observe(ICCID, "modem", Counters(4000, 4100))
    assert not meter.allowed("sensors/x", 0)
    assert meter.allowed("sensors/x", 1) and meter.allowed("alarms/door", 0)
    assert not meter.allowed("alarmsx", 0)
    assert meter.accepting() is None
    meter.observe(ICCID, "modem", Counters(5000, 5000))
    reason = meter.accepting()
    assert reason is not None and reason.startswith(f"plan cap: SIM {ICCID} has used 100%")
    assert [e["threshold"] for e in rig.events_of("usage-threshold")] == [0.5, 0.8, 1.0]
    rig.restart()  # the cap holds across restarts, and nothing fires twice
    assert rig.meter.accepting() is not None
    rig.meter.observe(ICCID, "modem", Counters(6000, 6000))
    assert len(rig.events_of("usage-threshold")) == 3
    # a per-SIM plan, and an override by command
    rig.meter.observe(OTHER, "modem", Counters(6100, 6000))  # a swap: the other SIM is fresh
    assert rig.meter.report(OTHER)["bytes_up"] == 100
    assert rig.meter.accepting() is None and rig.meter.allowed("x", 0)
    rig.meter.set_plan(OTHER, 10)
    assert rig.meter.accepting() is not None
    rig.meter.set_plan(OTHER, None)
    assert rig.meter.report(OTHER)["plan_bytes"] == 100000
    # a new period lifts the cap
    rig.meter.observe(ICCID, "modem", Counters(6000, 6000))
    assert rig.meter.accepting() is not None
    rig.clock.now = datetime(2026, 6, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    assert rig.meter.accepting() is None and rig.meter.allowed("x", 0)
    rig.store.close()


def test_default_thresholds_and_no_plan_means_no_cap(rig: Rig) -> None:
    assert UsageConfig().thresholds == (Threshold(0.8, "event"), Threshold(1.0, "throttle"))
    rig.meter.observe(ICCID, "modem", Counters(10**12, 10**12))
    assert rig.meter.accepting() is None and rig.meter.allowed("x", -100)
    assert rig.events_of("usage-threshold") == []


def test_set_plan_order_moves_the_cycle_day_and_survives_restart(rig: Rig) -> None:
    rig.meter.observe(ICCID, "modem", Counters(10, 0))
    assert rig.meter.report(ICCID)["period"]["start"] == "2026-05-01T00:00:00+00:00"
    rig.meter.set_plan(ICCID, 1000, cycle_day=15)
    rig.restart()
    report = rig.meter.report(ICCID)
    assert report["period"] == {"start": "2026-04-15T00:00:00+00:00",
                                "end": "2026-05-15T00:00:00+00:00"}
    assert report["plan_bytes"] == 1000
    rig.meter.set_plan(ICCID, None)  # the plan back to config; the ordered cycle day stays
    assert rig.meter.report(ICCID)["period"]["start"] == "2026-04-15T00:00:00+00:00"
    with pytest.raises(ValueError, match="cycle_day"):
        rig.meter.set_plan(ICCID, 5, cycle_day=31)


def test_reports_for_the_runtime_row_come_from_memory(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtime row asks for every SIM's report each time it is written: no store reads,
    until usage, a plan or the period changes."""
    reads: list[str] = []
    real = rig.store.query

    def counted(sql: str, params: tuple[object, ...] = ()) -> list[object]:
        reads.append(sql)
        return real(sql, params)

    monkeypatch.setattr(rig.store, "query", counted)
    rig.meter.observe(ICCID, "kernel", Counters(1000, 2000, 10, 20), epoch="e")
    reads.clear()
    first = rig.meter.reports([ICCID, None])
    assert [r["bytes_up"] for r in first] == [1000]
    assert rig.meter.reports([ICCID]) == first and reads == []
    rig.meter.observe(ICCID, "kernel", Counters(5000, 2000, 30, 20), epoch="e")
    reads.clear()
    assert [r["bytes_up"] for r in rig.meter.reports([])] == [5000]  # the SIM in use
    assert reads == []
    rig.meter.set_plan(ICCID, 10**6)
    rig.meter.set_plan(OTHER, 10**7)
    reads.clear()
    mine, other = rig.meter.reports([OTHER, ICCID])
    assert (mine["iccid"], mine["plan_bytes"], other["plan_bytes"]) == (ICCID, 10**6, 10**7)
    assert reads  # the other SIM's report was read once ...
    reads.clear()
    assert rig.meter.reports([OTHER, ICCID]) == [mine, other] and reads == []  # ... then kept
    assert mine == rig.meter.report(ICCID)
    rig.clock.now += 40 * 86400  # a new period: nothing used in it yet
    reads.clear()
    (fresh,) = rig.meter.reports([ICCID])
    assert reads and fresh["bytes_up"] == 0 and fresh["period"] != mine["period"]


def test_counters_alone_commit_at_most_every_save_interval(tmp_path: Path) -> None:
    rig = capped(tmp_path)
    meter = UsageMeter(rig.store, rig.outbox, rig.events, rig.cfg, clock=rig.clock,
                       save_interval=900)
    meter.observe(ICCID, "modem", Counters(1000, 1000))  # the first one commits
    assert rig.total(source="modem")[:2] == (1000, 1000)
    rig.clock.now += 60
    meter.observe(ICCID, "modem", Counters(1500, 1200))  # only counters moved: put off ...
    assert rig.total(source="modem")[:2] == (1000, 1000)
    (report,) = meter.reports([ICCID])  # ... but shown
    assert (report["bytes_up"], report["bytes_down"]) == (1500, 1200)
    meter.observe(ICCID, "modem", Counters(2600, 2500))  # crosses 50%: commits at once
    assert rig.total(source="modem")[:2] == (2600, 2500)
    assert [e["threshold"] for e in rig.events_of("usage-threshold")] == [0.5]
    rig.clock.now += 60
    meter.observe(ICCID, "modem", Counters(2700, 2600))
    assert rig.total(source="modem")[:2] == (2600, 2500)
    meter.publish()  # a report commits what was put off first
    assert rig.total(source="modem")[:2] == (2700, 2600)
    assert json.loads(rig.outbox.next_batch(USAGE, 10, 1 << 20)[-1].data)["bytes_up"] == 2700
    rig.clock.now += 60
    meter.observe(ICCID, "modem", Counters(2800, 2600))  # put off, then the agent dies
    assert rig.total(source="modem")[:2] == (2700, 2600)
    rig.restart()
    rig.meter.observe(ICCID, "modem", Counters(2900, 2700))  # nothing was lost
    assert rig.total(source="modem")[:2] == (2900, 2700)
    rig.clock.now += 900
    rig.meter.observe(ICCID, "modem", Counters(3000, 2700))
    assert rig.total(source="modem")[:2] == (3000, 2700)
