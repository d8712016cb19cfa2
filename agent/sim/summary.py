"""One SIM as ``state`` and ``simkeeper status`` show it
(:meth:`agent.sim.keeper.SimKeeper.summary`)::

    {"iccid", "current", "state", "deadline", "activated_at", "time_left", "trusted_time",
     "suspension": {"scope", "source", "until", "reason", "since"} | null, "telemetry_allowed",
     "conformance": Verdict.to_json() | null, "terminal": {"list_version", "policy",
     "list_error", "malfunction", "malfunction_signals"}, "enforced": {"radio", "data_down",
     "why", "networkmanager_error", "listen_at", "listen_until"} | null, "activation":
     {"attempts", "last_attempt", "last_error", "next_delay"}, "alarms_sent": [...]}

``time_left`` is null once the SIM was activated (no deadline binds it any more); without trusted
time it is at most 0 (:meth:`agent.core.trusted_time.TrustedClock.time_left`). ``listen_at`` /
``listen_until`` (Unix seconds): the next listening window of a radio held off, or the end of the
one open now (:mod:`agent.sim.probation`); ``malfunction`` is a report (hangs and spontaneous
resets in the window), never a reason for the radio to be off.
"""

from __future__ import annotations

from typing import Any

from agent.core.trusted_time import TrustedClock
from agent.sim.conformance import Verdict
from agent.sim.lifecycle import SimRecord
from agent.sim.notes import SimNotes
from agent.sim.suspension import telemetry_allowed


def sim_summary(record: SimRecord, notes: SimNotes, clock: TrustedClock, *, current: bool,
                verdict: Verdict | None = None, terminal: dict[str, Any] | None = None,
                enforced: dict[str, Any] | None = None,
                next_delay: float | None = None) -> dict[str, Any]:
    susp = record.suspension
    return {
        "iccid": record.iccid, "current": current, "state": record.state,
        "deadline": record.deadline, "activated_at": record.activated_at,
        "time_left": (clock.time_left(record.deadline)
                      if record.activated_at is None else None),
        "trusted_time": clock.now().source,
        "suspension": None if susp is None else {
            "scope": susp.scope, "source": susp.source, "until": susp.until,
            "reason": susp.reason, "since": susp.since},
        "telemetry_allowed": telemetry_allowed(record.state, susp),
        "conformance": verdict.to_json() if verdict is not None else None,
        "terminal": terminal,
        "enforced": enforced,
        "activation": {
            "attempts": notes.attempts, "last_attempt": notes.last_attempt,
            "last_error": notes.last_error, "next_delay": next_delay},
        "alarms_sent": list(notes.alarms),
    }
