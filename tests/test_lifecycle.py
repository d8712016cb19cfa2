from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.store import Store
from agent.core.trusted_time import TrustedNow
from agent.sim.lifecycle import (
    EVENTS,
    STATES,
    TRANSITIONS,
    InvalidTransition,
    Lifecycle,
    LifecycleError,
    LifecycleRepository,
    SimRecord,
    events_emitter,
)
from agent.sim.rejects import classify_mobility, classify_session

ICCID = "8981100005819510018"
OTHER = "8981100005819510026"
T0 = 1_750_000_000.0
DAY = 86400.0


class Harness:
    """Hooks that log persist and emit calls in one list, and a settable trusted time."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.now = TrustedNow(T0, "ntp", T0)
        self.fail_persist = False

    def persist(self, record: SimRecord) -> None:
        if self.fail_persist:
            raise OSError("disk gone")
        self.log.append(("persist", record))

    def emit(self, event: dict[str, Any]) -> None:
        self.log.append(("emit", event))

    def lifecycle(self, record: SimRecord | None = None) -> Lifecycle:
        return Lifecycle(record or SimRecord(ICCID), persist=self.persist, emit=self.emit,
                         clock=lambda: self.now)

    def untrusted(self, lower_bound: float) -> None:
        self.now = TrustedNow(None, None, lower_bound)

    def at(self, ts: float) -> None:
        self.now = TrustedNow(ts, "ntp", ts)

    def events(self) -> list[tuple[str, str, str]]:
        return [(e["kind"], e["from"], e["to"]) for what, e in self.log if what == "emit"]


def state(sim: Lifecycle) -> str:
    """The state, unnarrowed: mypy would keep the first assert's literal across calls."""
    return sim.state


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_table_is_closed_and_terminated_is_final() -> None:
    assert all(s in STATES and e in EVENTS and t in STATES for (s, e), t in TRANSITIONS.items())
    assert not [key for key in TRANSITIONS if key[0] == "terminated"]
    assert all(TRANSITIONS[(s, "decommission")] == "terminated" for s in STATES
               if s != "terminated")


def test_every_state_is_reachable_from_a_new_sim() -> None:
    seen, todo = {"awaiting-activation"}, ["awaiting-activation"]
    while todo:
        state = todo.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src == state and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    assert seen == set(STATES)


def test_activation_happy_path(h: Harness) -> None:
    sim = h.lifecycle()
    sim.set_deadline(T0 + 30 * DAY)
    sim.start_activation()
    sim.activation_succeeded()
    assert state(sim) == "active"
    assert sim.record.activated_at == T0
    assert h.events() == [
        ("deadline-set", "awaiting-activation", "awaiting-activation"),
        ("activation-started", "awaiting-activation", "activating"),
        ("activation-succeeded", "activating", "active"),
    ]
    emitted = [e for what, e in h.log if what == "emit"]
    assert emitted[0] == {"kind": "deadline-set", "iccid": ICCID, "from": "awaiting-activation",
                          "to": "awaiting-activation", "ts": T0,
                          "detail": {"deadline": T0 + 30 * DAY}}


def test_a_transition_not_in_the_table_is_refused_without_effect(h: Harness) -> None:
    sim = h.lifecycle()
    with pytest.raises(InvalidTransition, match=r"activation-succeeded.*awaiting-activation"):
        sim.activation_succeeded()
    with pytest.raises(InvalidTransition):
        sim.resume()
    assert sim.record == SimRecord(ICCID)
    assert h.log == []


def test_failed_persist_changes_nothing_and_emits_nothing(h: Harness) -> None:
    sim = h.lifecycle()
    h.fail_persist = True
    with pytest.raises(OSError):
        sim.suspend("radio")
    assert state(sim) == "awaiting-activation" and sim.suspension is None
    assert h.log == []


def test_failed_emit_keeps_the_persisted_transition(h: Harness,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("outbox full")

    sim = Lifecycle(SimRecord(ICCID), persist=h.persist, emit=broken, clock=lambda: h.now)
    sim.suspend("data")
    assert state(sim) == "suspended"
    assert "persisted but not emitted" in caplog.text


def test_deadline_expires_only_on_trusted_lower_bound(h: Harness) -> None:
    sim = h.lifecycle()
    sim.set_deadline(T0 + DAY)
    h.untrusted(T0 - 100 * DAY)  # 1970 boot: no trusted time, old floor
    sim.tick()
    assert state(sim) == "awaiting-activation"
    h.untrusted(T0 + DAY)  # even the lower bound is past it
    sim.tick()
    assert state(sim) == "expired"
    assert h.events()[-1] == ("deadline-passed", "awaiting-activation", "expired")


def test_failed_activation_after_the_deadline_expires(h: Harness) -> None:
    sim = h.lifecycle()
    sim.set_deadline(T0 + 60)
    sim.start_activation()
    h.at(T0 + 61)
    sim.tick()
    assert state(sim) == "activating"  # an attempt in flight may still succeed
    sim.activation_failed("no round trip")
    assert state(sim) == "expired"


def test_a_deadline_already_past_expires_at_once(h: Harness) -> None:
    sim = h.lifecycle()
    sim.set_deadline(T0 - 1)
    assert state(sim) == "expired"
    with pytest.raises(InvalidTransition, match="already passed"):
        sim.set_deadline(T0 - 1)
    sim.set_deadline(T0 + DAY)  # an extension revives it
    assert state(sim) == "awaiting-activation"


def test_an_activated_sim_never_expires(h: Harness) -> None:
    sim = h.lifecycle()
    sim.set_deadline(T0 + 60)
    sim.start_activation()
    sim.activation_succeeded()
    sim.suspend("telemetry")
    sim.resume()
    h.at(T0 + DAY)
    sim.tick()
    assert state(sim) == "awaiting-activation"  # the agent brings it up again


def test_suspension_until_resumes_when_trusted_time_passes_it(h: Harness) -> None:
    sim = h.lifecycle()
    sim.suspend("radio", until=T0 + 3600, reason="maintenance")
    assert sim.suspension is not None and sim.suspension.since == T0
    h.untrusted(T0 + 10)  # no trusted time: stays suspended
    sim.tick()
    assert state(sim) == "suspended"
    h.at(T0 + 3600)
    sim.tick()
    assert state(sim) == "awaiting-activation" and sim.suspension is None
    assert h.log[-1][1]["detail"] == {"reason": "suspension ended"}


def test_suspension_until_in_the_past_is_refused(h: Harness) -> None:
    with pytest.raises(ValueError, match="already passed"):
        h.lifecycle().suspend("data", until=T0 - 1)
    with pytest.raises(ValueError, match="scope"):
        h.lifecycle().suspend("everything")  # type: ignore[arg-type]


def test_permanent_reject_suspends_and_recovery_lifts_it(h: Harness) -> None:
    sim = h.lifecycle()
    assert not sim.on_reject(classify_mobility(22))
    assert h.log == []
    assert sim.on_reject(classify_mobility(7))
    held = sim.suspension
    assert held is not None and (held.scope, held.source) == ("radio", "network")
    assert "#7" in held.reason
    sim.on_recovered()
    assert state(sim) == "awaiting-activation"


def test_session_barring_suspends_data_only(h: Harness) -> None:
    sim = h.lifecycle()
    sim.on_reject(classify_session(8))
    assert sim.suspension is not None and sim.suspension.scope == "data"


def test_network_cannot_lift_an_operator_order(h: Harness) -> None:
    sim = h.lifecycle()
    sim.suspend("telemetry", reason="unpaid")
    sim.on_reject(classify_mobility(3))
    held = sim.suspension
    assert held is not None
    assert (held.source, held.scope, held.reason) == ("operator", "radio", "unpaid")
    with pytest.raises(InvalidTransition, match="resume order"):
        sim.on_recovered()
    sim.resume()
    assert state(sim) == "awaiting-activation"


def test_swap_records_the_old_sim_and_carries_an_operator_order(h: Harness) -> None:
    old = h.lifecycle()
    old.suspend("radio", reason="stop emission")
    new = h.lifecycle(SimRecord(OTHER))
    old.on_swap(new)
    assert old.state == "suspended"
    assert new.suspension is not None and new.suspension.reason == "stop emission"
    kinds = [(e["kind"], e["iccid"]) for what, e in h.log if what == "emit"]
    assert kinds[-2:] == [("sim-swapped", ICCID), ("suspend", OTHER)]


def test_swap_does_not_carry_a_network_barring(h: Harness) -> None:
    old = h.lifecycle()
    old.on_reject(classify_mobility(8))
    new = h.lifecycle(SimRecord(OTHER))
    old.on_swap(new)
    assert new.state == "awaiting-activation"


def test_swap_interrupts_an_activation(h: Harness) -> None:
    sim = h.lifecycle()
    sim.start_activation()
    sim.on_swap(h.lifecycle(SimRecord(OTHER)))
    assert state(sim) == "awaiting-activation"


def test_terminated_refuses_everything(h: Harness) -> None:
    sim = h.lifecycle()
    sim.decommission()
    for call in (sim.resume, sim.start_activation, sim.decommission, sim.on_recovered,
                 lambda: sim.suspend("radio"), lambda: sim.set_deadline(T0 + DAY)):
        with pytest.raises(InvalidTransition):
            call()
    assert state(sim) == "terminated"


def test_events_emitter_adapts_events_emit() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    emit = events_emitter(lambda kind, **fields: calls.append((kind, fields)))
    emit({"kind": "suspend", "iccid": ICCID, "from": "active", "to": "suspended", "ts": 1.0,
          "detail": {}})
    assert calls == [("suspend", {"iccid": ICCID, "from": "active", "to": "suspended",
                                  "ts": 1.0, "detail": {}})]


def test_suspension_survives_a_restart(tmp_path: Path, h: Harness) -> None:
    store = Store(tmp_path / "db.sqlite")
    repo = LifecycleRepository(store)
    sim = repo.open(ICCID, emit=h.emit, clock=lambda: h.now)
    sim.set_deadline(T0 + DAY)
    sim.suspend("radio", until=T0 + 3600, reason="order 42")
    repo.open(OTHER, emit=h.emit, clock=lambda: h.now).start_activation()
    store.close()

    store = Store(tmp_path / "db.sqlite")
    repo = LifecycleRepository(store)
    again = repo.open(ICCID, emit=h.emit, clock=lambda: h.now)
    assert again.record == sim.record
    assert [r.iccid for r in repo.all()] == [ICCID, OTHER]
    assert repo.load("8981100005819510034") is None
    h.at(T0 + 3600)
    again.tick()
    assert repo.load(ICCID) == again.record and again.state == "awaiting-activation"
    store.close()


@pytest.mark.parametrize("value", [
    "{", "[]", '{"iccid": "1"}', '{"iccid": "1", "state": "gone", "suspension": null}',
    '{"iccid": "1", "state": "active", "deadline": "soon", "suspension": null}',
    '{"iccid": "1", "state": "suspended", "suspension": {"scope": "all", "source": "operator"}}',
])
def test_unreadable_record_is_a_clear_error(tmp_path: Path, value: str) -> None:
    store = Store(tmp_path / "db.sqlite")
    with store.transaction() as db:
        db.execute("INSERT INTO meta VALUES (?, ?)", (f"lifecycle.{ICCID}", value))
    with pytest.raises(LifecycleError, match="unreadable lifecycle record"):
        LifecycleRepository(store).load(ICCID)
    store.close()


_ACTIONS = st.sampled_from([
    "set_deadline_future", "set_deadline_past", "start", "succeed", "fail", "suspend",
    "suspend_until", "resume", "decommission", "reject_permanent", "reject_temporary",
    "recovered", "swap", "tick", "time_passes", "time_lost",
])


def _act(sim: Lifecycle, h: Harness, action: str) -> None:
    now = h.now.lower_bound
    calls: dict[str, Callable[[], object]] = {
        "set_deadline_future": lambda: sim.set_deadline(now + DAY),
        "set_deadline_past": lambda: sim.set_deadline(now - DAY),
        "start": sim.start_activation,
        "succeed": sim.activation_succeeded,
        "fail": lambda: sim.activation_failed("timeout"),
        "suspend": lambda: sim.suspend("data"),
        "suspend_until": lambda: sim.suspend("radio", until=now + 60),
        "resume": sim.resume,
        "decommission": sim.decommission,
        "reject_permanent": lambda: sim.on_reject(classify_mobility(8)),
        "reject_temporary": lambda: sim.on_reject(classify_mobility(22)),
        "recovered": sim.on_recovered,
        "swap": lambda: sim.on_swap(h.lifecycle(SimRecord(OTHER))),
        "tick": sim.tick,
        "time_passes": lambda: h.at(now + 3600),
        "time_lost": lambda: h.untrusted(now),
    }
    calls[action]()


@settings(max_examples=300)
@given(st.lists(_ACTIONS, max_size=30))
def test_random_sequences_follow_the_table(actions: list[str]) -> None:
    h = Harness()
    sim = h.lifecycle()
    for action in actions:
        before, mark = sim.record, len(h.log)
        try:
            _act(sim, h, action)
        except InvalidTransition:
            assert sim.record == before
            assert h.log[mark:] == []
            continue
        assert sim.state in STATES
        new = [(what, item) for what, item in h.log[mark:]
               if (item.iccid if isinstance(item, SimRecord) else item["iccid"]) == ICCID]
        # strictly alternating: each transition persisted, then emitted exactly once
        assert len(new) % 2 == 0
        state = before.state
        for (p_kind, record), (e_kind, event) in zip(new[::2], new[1::2], strict=True):
            assert (p_kind, e_kind) == ("persist", "emit")
            assert TRANSITIONS[(state, event["kind"])] == event["to"] == record.state
            assert event["from"] == state
            state = record.state
        assert state == sim.state
        assert (sim.suspension is not None) == (sim.state == "suspended")
