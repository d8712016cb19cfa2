"""The SIM lifecycle: one state table (h11's ``_state.py`` shape), one :class:`Lifecycle` per
ICCID.

Every change goes through :data:`TRANSITIONS`; a pair not in it raises
:class:`InvalidTransition` and changes nothing. A transition is persisted (``persist`` hook,
e.g. :meth:`LifecycleRepository.save`) before it is emitted (``emit`` hook, e.g. the
:class:`agent.telemetry.events.Events` adapter :func:`events_emitter`); if persisting raises,
nothing changed and nothing is emitted. On the event loop both are queued on the store's writer
thread, the record first, so the record commits before its event (:mod:`agent.core.store`).

``awaiting-activation`` means "not in service, the agent should bring it up": a new SIM, one
whose activation attempt failed, and one just resumed (a resume re-runs the connection steps).
The deadline only expires a SIM that was never activated (``activated_at`` is None), and only
when the trusted lower bound of time is past it (:mod:`agent.core.trusted_time`); so does a
suspension's ``until``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from agent.core.store import Store
from agent.core.trusted_time import TrustedNow
from agent.sim.rejects import Reject

log = logging.getLogger(__name__)

State = Literal[
    "awaiting-activation", "activating", "active", "suspended", "expired", "terminated",
]
Event = Literal[
    "deadline-set", "deadline-passed", "activation-started", "activation-succeeded",
    "activation-failed", "suspend", "resume", "network-reject", "network-recovered",
    "sim-swapped", "decommission",
]
Scope = Literal["telemetry", "data", "radio"]
SuspensionSource = Literal["operator", "network"]
Readings = Literal["keep", "refuse"]  # what a suspension does to local apps' readings

STATES: tuple[State, ...] = get_args(State)
EVENTS: tuple[Event, ...] = get_args(Event)
SCOPES: tuple[Scope, ...] = get_args(Scope)  # narrowest first

_AWAITING: State = "awaiting-activation"

TRANSITIONS: Mapping[tuple[State, Event], State] = {
    ("awaiting-activation", "deadline-set"): "awaiting-activation",
    ("awaiting-activation", "deadline-passed"): "expired",
    ("awaiting-activation", "activation-started"): "activating",
    ("awaiting-activation", "suspend"): "suspended",
    ("awaiting-activation", "network-reject"): "suspended",
    ("awaiting-activation", "sim-swapped"): "awaiting-activation",
    ("awaiting-activation", "decommission"): "terminated",
    ("activating", "deadline-set"): "activating",
    ("activating", "activation-succeeded"): "active",
    ("activating", "activation-failed"): "awaiting-activation",
    ("activating", "suspend"): "suspended",
    ("activating", "network-reject"): "suspended",
    ("activating", "sim-swapped"): "awaiting-activation",
    ("activating", "decommission"): "terminated",
    ("active", "deadline-set"): "active",
    ("active", "suspend"): "suspended",
    ("active", "network-reject"): "suspended",
    ("active", "sim-swapped"): "active",
    ("active", "decommission"): "terminated",
    ("suspended", "deadline-set"): "suspended",
    ("suspended", "suspend"): "suspended",
    ("suspended", "resume"): "awaiting-activation",
    ("suspended", "network-reject"): "suspended",
    ("suspended", "network-recovered"): "awaiting-activation",
    ("suspended", "sim-swapped"): "suspended",
    ("suspended", "decommission"): "terminated",
    ("expired", "deadline-set"): "awaiting-activation",
    ("expired", "sim-swapped"): "expired",
    ("expired", "decommission"): "terminated",
}


class LifecycleError(Exception):
    """A lifecycle order or record that cannot be carried out or read; the message says why."""


class InvalidTransition(LifecycleError):
    def __init__(self, iccid: str, state: State, event: Event, why: str = "") -> None:
        self.state = state
        self.event = event
        super().__init__(why or f"SIM {iccid}: {event!r} is not allowed in state {state!r}")


@dataclass(frozen=True, slots=True)
class Suspension:
    scope: Scope
    source: SuspensionSource
    until: float | None = None
    reason: str = ""
    since: float | None = None
    readings: Readings = "keep"  # "refuse": the order asked the ingest socket to refuse them


@dataclass(frozen=True, slots=True)
class SimRecord:
    """What is persisted per ICCID."""

    iccid: str
    state: State = _AWAITING
    deadline: float | None = None
    activated_at: float | None = None
    suspension: Suspension | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SimRecord:
        try:
            raw = json.loads(text)
            susp = raw.pop("suspension")
            record = cls(**raw, suspension=None if susp is None else Suspension(**susp))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise LifecycleError(f"unreadable lifecycle record: {exc}") from None
        susp = record.suspension
        times = (record.deadline, record.activated_at,
                 *((susp.until, susp.since) if susp is not None else ()))
        if (record.state not in STATES or not isinstance(record.iccid, str)
                or any(t is not None and not isinstance(t, int | float) for t in times)
                or (susp is not None and (susp.scope not in SCOPES
                                          or susp.source not in get_args(SuspensionSource)
                                          or susp.readings not in get_args(Readings)))):
            raise LifecycleError(f"unreadable lifecycle record: {text[:200]!r}")
        return record


Persist = Callable[[SimRecord], None]
Emit = Callable[[dict[str, Any]], None]
Clock = Callable[[], TrustedNow]


def _finite(value: float | None, what: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite Unix time, got {value!r}")


class Lifecycle:
    def __init__(self, record: SimRecord, *, persist: Persist, emit: Emit, clock: Clock) -> None:
        self._record = record
        self._persist = persist
        self._emit = emit
        self._clock = clock

    @property
    def record(self) -> SimRecord:
        return self._record

    @property
    def iccid(self) -> str:
        return self._record.iccid

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def suspension(self) -> Suspension | None:
        return self._record.suspension

    def can(self, event: Event) -> bool:
        return (self._record.state, event) in TRANSITIONS

    def _fire(self, event: Event, detail: dict[str, Any], **changes: Any) -> None:
        before = self._record
        target = TRANSITIONS.get((before.state, event))
        if target is None:
            raise InvalidTransition(before.iccid, before.state, event)
        now = self._clock()
        if target != "suspended":
            changes["suspension"] = None
        if target == "active" and before.activated_at is None:
            changes["activated_at"] = now.ts if now.ts is not None else now.lower_bound
        after = replace(before, state=target, **changes)
        self._persist(after)
        self._record = after
        try:
            self._emit({"kind": event, "iccid": after.iccid, "from": before.state,
                        "to": target, "ts": now.ts, "detail": detail})
        except Exception:
            log.exception("SIM %s: %s persisted but not emitted", after.iccid, event)

    # -- orders and observations -------------------------------------------------------------

    def set_deadline(self, deadline: float) -> None:
        """The activation deadline (factory manifest or ``set-activation-deadline``). An
        expired SIM only takes a deadline that is not provably past."""
        _finite(deadline, "deadline")
        if self.state == "expired" and self._clock().lower_bound >= deadline:
            raise InvalidTransition(self.iccid, self.state, "deadline-set",
                                    f"SIM {self.iccid}: new deadline has already passed")
        self._fire("deadline-set", {"deadline": deadline}, deadline=deadline)
        self.tick()

    def start_activation(self) -> None:
        self._fire("activation-started", {})

    def activation_succeeded(self) -> None:
        self._fire("activation-succeeded", {})

    def activation_failed(self, reason: str) -> None:
        self._fire("activation-failed", {"reason": reason})
        self.tick()

    def suspend(self, scope: Scope, until: float | None = None, reason: str = "",
                source: SuspensionSource = "operator", readings: Readings = "keep") -> None:
        """An operator order (``source="operator"``) or a network barring (``"network"``).
        A new operator order replaces the current suspension; a network barring while an
        operator order holds keeps the order and only widens its scope. ``readings``: local
        apps' readings are kept (and go up after the resume) or, at the order's word, refused."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        _finite(until, "until")
        now = self._clock()
        if until is not None and now.lower_bound >= until:
            raise ValueError(f"SIM {self.iccid}: suspension end {until} has already passed")
        new = Suspension(scope, source, until, reason, now.ts, readings)
        held = self.suspension
        if source == "network" and held is not None:
            new = (replace(new, since=held.since) if held.source == "network"
                   else replace(held, scope=max(held.scope, scope, key=SCOPES.index)))
        event: Event = "suspend" if source == "operator" else "network-reject"
        self._fire(event, {"scope": new.scope, "source": new.source, "until": new.until,
                           "reason": reason, "readings": new.readings}, suspension=new)

    def resume(self, reason: str = "order") -> None:
        """Lift any suspension (operator order, or its ``until`` passing)."""
        self._fire("resume", {"reason": reason})

    def decommission(self) -> None:
        self._fire("decommission", {})

    def on_reject(self, reject: Reject) -> bool:
        """A classified network refusal; only a permanent one is a transition (True)."""
        if reject.kind != "permanent":
            return False
        scope: Scope = "radio" if reject.layer == "mobility" else "data"
        self.suspend(scope, None, f"{reject.origin} #{reject.code}: {reject.reason}", "network")
        return True

    def on_recovered(self) -> None:
        """The network accepted the SIM again: lifts a network suspension, never an order."""
        held = self.suspension
        if held is not None and held.source == "operator":
            raise InvalidTransition(
                self.iccid, self.state, "network-recovered",
                f"SIM {self.iccid}: an operator suspension is lifted only by a resume order")
        self._fire("network-recovered", {})

    def on_swap(self, new: Lifecycle) -> None:
        """This SIM left the slot for ``new``. An operator suspension binds the device, so it
        follows onto the new SIM unless that one already carries an operator order."""
        self.tick()  # an order whose end has passed is not carried
        self._fire("sim-swapped", {"new_iccid": new.iccid})
        held = self.suspension
        if (held is not None and held.source == "operator" and new.can("suspend")
                and (new.suspension is None or new.suspension.source != "operator")):
            new.suspend(held.scope, held.until, held.reason or f"carried from {self.iccid}")

    def tick(self) -> None:
        """Apply what trusted time decides: a suspension's ``until`` passing resumes; the
        deadline passing expires a SIM never activated. Call it on every clock update."""
        now = self._clock()
        held = self.suspension
        if held is not None and held.until is not None and now.lower_bound >= held.until:
            self.resume("suspension ended")
        record = self._record
        if (record.state == _AWAITING and record.activated_at is None
                and record.deadline is not None and now.lower_bound >= record.deadline):
            self._fire("deadline-passed", {"deadline": record.deadline})


def events_emitter(emit: Callable[..., Any]) -> Emit:
    """Adapt :meth:`agent.telemetry.events.Events.emit` (``kind`` positional, fields as
    keywords). With no trusted ``ts`` the event keeps the one ``Events`` stamps (its JSON needs
    a number)."""
    def adapted(event: dict[str, Any]) -> None:
        emit(event["kind"], **{k: v for k, v in event.items()
                               if k != "kind" and not (k == "ts" and v is None)})

    return adapted


class LifecycleRepository:
    """Lifecycle records in the store's ``meta`` table (key ``lifecycle.<iccid>``, a JSON
    value): no schema change needed; the records of every SIM ever seen are kept."""

    _PREFIX = "lifecycle."

    def __init__(self, store: Store) -> None:
        self._store = store

    def save(self, record: SimRecord) -> None:
        """Persist ``record`` (:meth:`Store.put_meta`: from the event loop it is queued on the
        store's writer thread, ahead of the transition's event, and read back at once; a failed
        write is logged and the next transition saves the whole record again)."""
        self._store.put_meta({self._PREFIX + record.iccid: record.to_json()},
                             what=f"lifecycle record of SIM {record.iccid} ({record.state})")

    def load(self, iccid: str) -> SimRecord | None:
        """The record, None when the SIM was never seen; an unreadable one raises
        :class:`LifecycleError` (a suspension must never be silently forgotten)."""
        value = self._store.get_meta(self._PREFIX + iccid)
        return SimRecord.from_json(value) if value is not None else None

    def all(self) -> list[SimRecord]:
        return [SimRecord.from_json(value)
                for value in self._store.meta_items(self._PREFIX).values()]

    def open(self, iccid: str, *, emit: Emit, clock: Clock) -> Lifecycle:
        """The lifecycle of ``iccid`` as persisted, or a new ``awaiting-activation`` one (not
        persisted until its first transition, e.g. :meth:`Lifecycle.set_deadline`)."""
        record = self.load(iccid) or SimRecord(iccid)
        return Lifecycle(record, persist=self.save, emit=emit, clock=clock)
