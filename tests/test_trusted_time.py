from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.core.store import Store
from agent.core.trusted_time import (
    EARLIEST,
    Anchor,
    TrustedClock,
    load_anchor,
    ntp_synchronised,
    save_anchor,
)

T0 = 1_750_000_000.0  # 2025-06-15


class Machine:
    """A gateway's clocks: a wall clock that may jump, a monotonic clock, NTP state, a boot."""

    def __init__(self) -> None:
        self.wall = 0.0  # booted in 1970
        self.mono = 5.0
        self.synced = False
        self.boot = "boot-1"
        self.persisted: list[Anchor] = []

    def clock(self, anchor: Anchor | None = None) -> TrustedClock:
        return TrustedClock(anchor=anchor, persist=self.persisted.append,
                            synchronised=lambda: self.synced, wall=lambda: self.wall,
                            mono=lambda: self.mono, boot=self.boot)

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_nothing_trusted_on_a_1970_boot() -> None:
    now = Machine().clock().now()
    assert (now.ts, now.source, now.lower_bound) == (None, None, EARLIEST)


def test_unsynchronised_system_clock_is_ignored_even_when_plausible() -> None:
    machine = Machine()
    machine.wall = T0
    assert machine.clock().now().ts is None


def test_ntp_is_trusted_and_persisted_sparingly() -> None:
    machine = Machine()
    machine.wall, machine.synced = T0, True
    clock = machine.clock()
    assert clock.now().source == "ntp"
    assert clock.now().ts == T0
    assert len(machine.persisted) == 1
    machine.tick(599)
    clock.now()
    assert len(machine.persisted) == 1
    machine.tick(2)
    clock.now()
    assert [a.ts for a in machine.persisted] == [T0, T0 + 601]


def test_synchronised_but_1970_clock_is_not_trusted() -> None:
    machine = Machine()
    machine.synced = True
    assert machine.clock().now().ts is None


def test_floor_carries_on_with_monotonic_time_after_ntp_is_lost() -> None:
    machine = Machine()
    machine.wall, machine.synced = T0, True
    clock = machine.clock()
    clock.now()
    machine.synced = False
    machine.mono += 100
    machine.wall = 0  # the clock was reset
    now = clock.now()
    assert (now.ts, now.source) == (T0 + 100, "floor")


def test_ntp_stepping_backwards_does_not_move_time_back() -> None:
    machine = Machine()
    machine.wall, machine.synced = T0, True
    clock = machine.clock()
    clock.now()
    machine.tick(10)
    machine.wall -= 3600
    assert clock.now().ts == T0 + 10


def test_restart_in_the_same_boot_keeps_exact_time() -> None:
    machine = Machine()
    machine.wall, machine.synced = T0, True
    machine.clock().now()
    machine.synced = False
    machine.mono += 50
    now = machine.clock(machine.persisted[-1]).now()
    assert (now.ts, now.source, now.lower_bound) == (T0 + 50, "floor", T0 + 50)


def test_after_a_reboot_the_floor_is_only_a_lower_bound() -> None:
    machine = Machine()
    machine.wall, machine.synced = T0, True
    machine.clock().now()
    machine.boot, machine.mono, machine.wall, machine.synced = "boot-2", 30.0, 0.0, False
    now = machine.clock(machine.persisted[-1]).now()
    assert now.ts is None and now.source is None
    assert now.lower_bound == T0 + 30


def test_unknown_boot_id_never_advances_an_old_floor() -> None:
    machine = Machine()
    machine.boot = ""
    machine.wall, machine.synced = T0, True
    clock = machine.clock()
    clock.now()
    machine.synced = False
    machine.mono += 40
    assert clock.now().ts == T0 + 40  # anchored in this process: exact
    machine.mono = 5000.0  # a reboot nobody can detect
    now = machine.clock(machine.persisted[-1]).now()
    assert (now.ts, now.lower_bound) == (None, T0)


def test_network_time_is_trusted_when_plausible() -> None:
    machine = Machine()
    clock = machine.clock()
    jst = timezone(timedelta(hours=9))
    assert not clock.observe_network(datetime(1980, 1, 6, tzinfo=UTC))
    assert clock.now().ts is None
    assert clock.observe_network(datetime(2025, 6, 15, 12, 0, tzinfo=jst))
    machine.mono += 7
    now = clock.now()
    expected = datetime(2025, 6, 15, 12, 0, tzinfo=jst).timestamp() + 7
    assert (now.ts, now.source) == (expected, "network")
    assert machine.persisted[-1].ts == expected - 7
    assert not clock.observe_network(datetime(2025, 6, 15, 2, 0, tzinfo=UTC))  # behind floor


def test_time_left_treats_missing_time_as_near() -> None:
    machine = Machine()
    clock = machine.clock()
    assert clock.time_left(None) is None
    assert clock.time_left(T0 + 30 * 86400) == 0.0
    assert clock.time_left(EARLIEST - 10) == -10.0  # provably passed even without a source
    machine.wall, machine.synced = T0, True
    assert clock.time_left(T0 + 86400) == 86400


def test_anchor_round_trips_through_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        assert load_anchor(store) is None
        save_anchor(store, Anchor(T0, 12.5, "boot-1"))
        assert load_anchor(store) == Anchor(T0, 12.5, "boot-1")
        with store.transaction() as db:
            db.execute("UPDATE meta SET value = '[1, \"x\"' WHERE key = 'trusted_time.anchor'")
        assert load_anchor(store) is None
    finally:
        store.close()


def test_ntp_probe_answers_a_bool() -> None:
    assert isinstance(ntp_synchronised(), bool)


_STEP = st.one_of(
    st.tuples(st.just("wait"), st.floats(0, 1e6)),
    st.tuples(st.just("jump"), st.floats(-1e9, 1e9)),
    st.tuples(st.just("sync"), st.booleans()),
    st.tuples(st.just("network"), st.floats(0, 3e9)),
    st.tuples(st.just("restart"), st.booleans()),  # True: a reboot
)


@given(st.lists(_STEP, max_size=40))
def test_time_never_goes_backwards(steps: list[tuple[str, float | bool]]) -> None:
    machine = Machine()
    clock = machine.clock()
    last = clock.now()
    for action, arg in steps:
        if action == "wait":
            machine.tick(float(arg))
        elif action == "jump":
            machine.wall = max(0.0, machine.wall + float(arg))
        elif action == "sync":
            machine.synced = bool(arg)
        elif action == "network":
            clock.observe_network(datetime.fromtimestamp(float(arg), UTC))
        else:
            anchor = machine.persisted[-1] if machine.persisted else None
            if arg:
                machine.boot += "'"
                machine.mono = 1.0
            clock = machine.clock(anchor)
            now = clock.now()
            assert anchor is None or now.lower_bound >= anchor.ts
            last = now
            continue
        now = clock.now()
        assert now.lower_bound >= last.lower_bound
        if now.ts is not None:
            assert now.lower_bound == now.ts
            assert last.ts is None or now.ts >= last.ts
        last = now
