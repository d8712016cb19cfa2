"""Plan caps: the action a SIM's usage puts in force, and the gates it sets on readings.

Each threshold (``[usage] thresholds``: a share of the plan and an action) fires one
``usage-threshold`` event per SIM and period (:func:`fire`, recorded in ``usage_alert``); the most
severe action crossed applies to that SIM until its period ends (:func:`cap_of`): ``throttle``
holds readings that are not critical (:meth:`Caps.allowed`), ``stop`` also refuses new readings
(:meth:`Caps.accepting`, an ingest gate).

With several modems, readings go up over whichever link the gateway uses: the gates hold them
only when every SIM in use is under that action, so they apply the least severe action among
the SIMs in use (with one SIM, that SIM's). :class:`Caps` keeps the action of each SIM
evaluated; it is replaced, never changed in place (the event loop reads it while the store's
thread evaluates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.core.config import Threshold, UsageConfig
from agent.telemetry.events import Events
from agent.usage.period import period_end

SEVERITY = {"event": 0, "throttle": 1, "stop": 2}

def _rank(action: str | None) -> int:
    return -1 if action is None else SEVERITY[action]


Query = Callable[[str, Sequence[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class Cap:
    """The action in force for a SIM until ``until`` (the end of its period)."""

    action: str | None
    until: float
    reason: str

    def at(self, now: float) -> str | None:
        """The action in force at ``now``: a new period starts with nothing used."""
        return self.action if now < self.until else None


def _crossed(report: dict[str, Any], thresholds: Iterable[Threshold]) -> list[Threshold]:
    plan, billed = report["plan_bytes"], report["billed_estimate"]
    return [t for t in thresholds if plan and billed >= t.share * plan]


def cap_of(report: dict[str, Any], thresholds: Iterable[Threshold]) -> Cap:
    """The cap a SIM's ``usage`` report puts in force: the most severe action crossed."""
    crossed = _crossed(report, thresholds)
    until = period_end(report)
    if not crossed:
        return Cap(None, until, "")
    worst = max(crossed, key=lambda t: SEVERITY[t.action])
    reason = (
        f"plan cap: SIM {report['iccid']} has used {report['share_used']:.0%} of its"
        f" {report['plan_bytes']} bytes; readings refused until {report['period']['end']}"
    )
    return Cap(worst.action, until, reason)


def fire(query: Query, events: Events, report: dict[str, Any],
         thresholds: Iterable[Threshold]) -> None:
    """Fire the thresholds the SIM's report crossed and not yet fired this period (inside the
    caller's transaction: ``query`` runs in it)."""
    iccid, period = report["iccid"], report["period"]["start"]
    fired = {
        row[0]
        for row in query(
            "SELECT share FROM usage_alert WHERE iccid = ? AND period = ?", (iccid, period)
        )
    }
    for threshold in _crossed(report, thresholds):
        if threshold.share in fired:
            continue
        query(
            "INSERT INTO usage_alert (iccid, period, share) VALUES (?, ?, ?)",
            (iccid, period, threshold.share),
        )
        events.emit(
            "usage-threshold",
            iccid=iccid,
            period=report["period"],
            threshold=threshold.share,
            action=threshold.action,
            billed_estimate=report["billed_estimate"],
            plan_bytes=report["plan_bytes"],
        )


class Caps:
    """The cap of each SIM evaluated, and the gates over the SIMs in use."""

    def __init__(self, cfg: UsageConfig, clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self._clock = clock
        self._caps: dict[str, Cap] = {}  # iccid: its cap as last evaluated

    def set(self, iccid: str, cap: Cap | None) -> None:
        """Record a SIM's cap (None: forget it, not known any more)."""
        caps = {k: v for k, v in self._caps.items() if k != iccid}
        self._caps = caps if cap is None else {**caps, iccid: cap}

    def get(self, iccid: str) -> Cap | None:
        """The SIM's cap as last evaluated, or None when it was not."""
        return self._caps.get(iccid)

    def _least(self, in_use: Iterable[str]) -> tuple[str | None, list[Cap]]:
        """The least severe action in force among the SIMs ``in_use``, and their caps (a SIM
        not evaluated counts as under none)."""
        now, caps = self._clock(), self._caps
        held = [caps.get(iccid) for iccid in sorted(set(in_use))]
        known = [cap for cap in held if cap is not None]
        if not held or len(known) < len(held):
            return None, []
        return min((cap.at(now) for cap in known), key=_rank), known

    def allowed(self, in_use: Iterable[str], topic: str, priority: int) -> bool:
        """May the uplink send this reading now? Under ``throttle`` or ``stop``, only critical
        ones: priority >= ``throttle_min_priority`` or a topic in ``critical_topics``."""
        if self._least(in_use)[0] not in ("throttle", "stop"):
            return True
        return priority >= self._cfg.throttle_min_priority or any(
            topic == t or topic.startswith(f"{t}/") for t in self._cfg.critical_topics
        )

    def accepting(self, in_use: Iterable[str]) -> str | None:
        """The ingest gate: None, or why new readings are refused (``stop`` reached by every
        SIM in use)."""
        action, caps = self._least(in_use)
        return "; ".join(c.reason for c in caps) if action == "stop" else None
