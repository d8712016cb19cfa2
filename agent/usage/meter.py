"""Usage metering: bytes per SIM (ICCID) and billing period, plan caps.

Inputs are cumulative counters from two sources: the modem's (``sent``, ``recv`` from the
driver's data counters) and the kernel's for the data interface
(``/sys/class/net/<if>/statistics``). Both reset at times. The meter keeps the last raw value
per source in the database and adds only deltas: a value lower than the last one, or a new
``epoch`` (the kernel's boot id and interface index; a modem session counter), is a reset and
counts in full. So totals never go backwards, and a reading seen twice counts once, across
restarts too.

Deltas go to the SIM in use and to its current billing period (``cycle_day`` at midnight in
``timezone``). The estimate of billed bytes is payload plus packets x
``header_overhead_bytes`` (the carrier counts about 50-54 bytes of headers per packet); the
payload comes from the modem's counters when it has them, else the kernel's, and packets
always from the kernel.

Plans: ``[[usage.plan]]`` per ICCID, else ``[usage] plan_bytes``, overridden by
:meth:`UsageMeter.set_plan` (the ``set-plan`` command). Each threshold fires one
``usage-threshold`` event per SIM and period; the most severe action crossed applies until
the period ends: ``throttle`` holds readings that are not critical (:meth:`allowed`), ``stop``
also refuses new readings (:meth:`accepting`, an ingest gate).

An SD card wears out under a write a minute: when only the counters moved (no threshold crossed,
no new period, no reset), :meth:`UsageMeter.observe` commits at most every ``save_interval``
seconds per source and keeps the newer figures in memory meanwhile (the reports show them;
:meth:`UsageMeter.publish` commits them first). Nothing is lost by a crash in between: the
counters are cumulative, so the next reading after a restart counts what was not committed;
only a crash and a counter reset together lose the uncommitted part.

:meth:`UsageMeter.observe`, :meth:`UsageMeter.set_plan` and :meth:`UsageMeter.publish` commit:
from the event loop, call them through ``await store.run(...)``. :meth:`UsageMeter.reports`
answers from memory (kept fresh by those three), for the runtime row written every few seconds;
:attr:`UsageMeter.reported` holds each SIM's last report sent, for the retained ``state``.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent.core.config import UsageConfig, canonical_iccid
from agent.core.readings import PRIORITY_MAX
from agent.core.store import Store
from agent.telemetry.events import Events
from agent.telemetry.outbox import USAGE, Outbox, compact_json
from agent.usage.period import billing_period, period_end

SOURCES = ("modem", "kernel")
SAVE_INTERVAL = 900.0  # the daemon's save_interval: usage commits at most this often when idle
SEVERITY = {"event": 0, "throttle": 1, "stop": 2}
_KERNEL_FILES = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")

Query = Callable[[str, Sequence[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters as a source reports them (packets: kernel only)."""

    tx_bytes: int
    rx_bytes: int
    tx_packets: int = 0
    rx_packets: int = 0


def read_kernel(interface: str, root: Path = Path("/")) -> tuple[Counters, str] | None:
    """The kernel's counters of ``interface`` and their epoch (boot id and interface index:
    either changing means the counters restarted), or None when the interface is absent."""
    base = root / "sys/class/net" / interface
    try:
        values = [int((base / "statistics" / name).read_text()) for name in _KERNEL_FILES]
        ifindex = (base / "ifindex").read_text().strip()
    except (OSError, ValueError):
        return None
    try:
        boot = (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return Counters(*values), f"{boot}/{ifindex}"


def _cycle_key(iccid: str) -> str:
    return f"usage.cycle_day.{iccid}"


@dataclass(frozen=True, slots=True)
class _Cap:
    """The action in force for the current SIM until ``until`` (end of its period)."""

    action: str | None
    until: float
    reason: str


class UsageMeter:
    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        events: Events,
        cfg: UsageConfig,
        *,
        clock: Callable[[], float] = time.time,
        save_interval: float = 0.0,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._save_interval = save_interval
        self._saved: dict[str, float] = {}  # source: when its counters were last committed
        # source: the newest reading not committed yet (iccid, counters, epoch)
        self._pending: dict[str, tuple[str, Counters, str]] = {}
        self._events = events
        self._cfg = cfg
        self._tz = ZoneInfo(cfg.timezone)
        self._plans = {plan.iccid: plan for plan in cfg.plan}
        self._clock = clock
        self._cap = _Cap(None, 0.0, "")
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}  # iccid: (valid until, report)
        self._generation = 0  # bumped by every change of the cache
        self._cache_lock = threading.Lock()
        rows = store.query("SELECT value FROM meta WHERE key = 'usage.sim'")
        self.sim: str | None = rows[0][0] if rows else None
        # iccid: its last report queued on ``usage``, else as of the start (replaced, never
        # changed in place: the loop reads it while publish() runs in the store's thread)
        self.reported: dict[str, dict[str, Any]] = {}
        if self.sim is not None:
            with store.transaction() as db:
                self._evaluate(_query(db), self.sim, clock())
            self.reported = {self.sim: self.report(self.sim)}

    # -- counting ------------------------------------------------------------------------------

    def observe(self, iccid: str, source: str, counters: Counters, *, epoch: str = "",
                save: bool = False) -> None:
        """Account one reading of cumulative counters for the SIM in use (committed at once
        when ``save``, else as the module doc says)."""
        values = dataclasses.astuple(counters)
        if source not in SOURCES or any(not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"bad usage reading from {source!r}: {counters}")
        iccid = canonical_iccid(iccid)
        now = self._clock()
        start, _ = self.period(iccid, now)
        may_wait = (not save and not self._store.in_transaction()
                    and now - self._saved.get(source, -math.inf) < self._save_interval)
        try:
            with self._store.transaction() as db:
                row = db.execute(
                    "SELECT epoch, tx_bytes, rx_bytes, tx_packets, rx_packets FROM usage_counter"
                    " WHERE source = ?",
                    (source,),
                ).fetchone()
                if row is not None and row == (epoch, *values) and iccid == self.sim:
                    return  # nothing moved: no write (the SD card thanks us)
                fresh = row is None or row[0] != epoch
                _count(db, (iccid, start.isoformat(), source), epoch, values,
                       values if fresh else row[1:])
                counted = db.total_changes
                self._close_previous(db, iccid, start, now)
                if iccid != self.sim:
                    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('usage.sim', ?)",
                               (iccid,))
                self._evaluate(_query(db), iccid, now)
                if may_wait and not fresh and iccid == self.sim and db.total_changes == counted:
                    raise _Later(self._report(_query(db), iccid, now))
                self._store.after_commit(lambda: self._committed(source, now))
        except _Later as later:  # rolled back: kept in memory until the next save
            self._pending[source] = (iccid, counters, epoch)
            self._remember(iccid, later.report)
        self.sim = iccid

    def _committed(self, source: str, now: float) -> None:
        self._saved[source] = now
        self._pending.pop(source, None)

    def _close_previous(self, db: Any, iccid: str, start: datetime, now: float) -> None:
        """On the first reading of a new period, publish the final report of the last one."""
        key = f"usage.period.{iccid}"
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] != start.isoformat():
            ended = datetime.fromisoformat(row[0]).timestamp()
            self._publish([self._report(_query(db), iccid, ended)], now)
        if row is None or row[0] != start.isoformat():
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, start.isoformat())
            )

    def period(self, iccid: str, now: float) -> tuple[datetime, datetime]:
        """The billing period: the cycle day set by order (``set_plan``), else the SIM's plan
        in config, else ``[usage] cycle_day``."""
        ordered = self._store.query("SELECT value FROM meta WHERE key = ?", (_cycle_key(iccid),))
        plan = self._plans.get(iccid)
        if ordered:
            cycle_day = int(ordered[0][0])
        else:
            cycle_day = plan.cycle_day if plan and plan.cycle_day else self._cfg.cycle_day
        return billing_period(now, cycle_day, self._tz)

    def set_plan(self, iccid: str, plan_bytes: int | None, cycle_day: int | None = None) -> None:
        """Override a SIM's plan (None: back to config) and, when given, its billing cycle day
        (1-28); persisted; re-checks its caps."""
        iccid = canonical_iccid(iccid)
        if cycle_day is not None and not 1 <= cycle_day <= 28:
            raise ValueError(f"cycle_day must be 1-28, not {cycle_day}")
        with self._store.transaction() as db:
            if plan_bytes is None:
                db.execute("DELETE FROM usage_plan WHERE iccid = ?", (iccid,))
            else:
                db.execute("INSERT OR REPLACE INTO usage_plan VALUES (?, ?)", (iccid, plan_bytes))
            if cycle_day is not None:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           (_cycle_key(iccid), str(cycle_day)))
            if iccid == self.sim:
                self._evaluate(_query(db), iccid, self._clock())
            else:
                self._store.after_commit(lambda: self._remember(iccid, None))

    # -- reporting -----------------------------------------------------------------------------

    def report(self, iccid: str, now: float | None = None) -> dict[str, Any]:
        """The ``usage`` report of ``iccid`` for the period holding ``now``."""
        return self._report(self._store.query, canonical_iccid(iccid), now or self._clock())

    def reports(self, iccids: Iterable[str | None]) -> list[dict[str, Any]]:
        """The current report of each of ``iccids`` and of the SIM in use, by ICCID, from
        memory: a SIM's report is read from the store once, then refreshed when its usage or
        plan changes (:meth:`observe`, :meth:`set_plan`, :meth:`publish`) or its period ends.
        Cheap enough for every runtime row; the reports are shared: do not modify them."""
        now = self._clock()
        wanted = {canonical_iccid(i) for i in iccids if i} | ({self.sim} if self.sim else set())
        out = []
        for iccid in sorted(wanted):
            with self._cache_lock:
                cached, generation = self._cache.get(iccid), self._generation
            if cached is None or now >= cached[0]:
                report = self._report(self._store.query, iccid, now)
                cached = (period_end(report), report)
                with self._cache_lock:  # unless a fresher one came meanwhile
                    if self._generation == generation:
                        self._cache[iccid] = cached
            out.append(cached[1])
        return out

    def _remember(self, iccid: str, report: dict[str, Any] | None) -> None:
        """After a commit: the SIM's current report (None: read it again when asked)."""
        with self._cache_lock:
            self._generation += 1
            if report is None:
                self._cache.pop(iccid, None)
            else:
                self._cache[iccid] = (period_end(report), report)

    def publish(self) -> list[str]:
        """Queue a ``usage`` report for each SIM with usage in its current period (and the SIM
        in use); returns the reading ids."""
        for source, (iccid, counters, epoch) in list(self._pending.items()):
            self.observe(iccid, source, counters, epoch=epoch, save=True)
        now = self._clock()
        iccids = {row[0] for row in self._store.query("SELECT DISTINCT iccid FROM usage_period")}
        fresh = {iccid: self.report(iccid, now)
                 for iccid in sorted(iccids | ({self.sim} if self.sim else set()))}
        reports = [r for iccid, r in fresh.items() if r["counters"] or iccid == self.sim]
        ids = self._publish(reports, now)
        for iccid, report in fresh.items():
            self._remember(iccid, report)
        self.reported = {**self.reported, **{r["iccid"]: r for r in reports}}
        return ids

    def _publish(self, reports: list[dict[str, Any]], now: float) -> list[str]:
        return self._outbox.add(
            [(USAGE, USAGE, compact_json(r), now, PRIORITY_MAX) for r in reports]
        )

    def _report(self, query: Query, iccid: str, now: float) -> dict[str, Any]:
        start, end = self.period(iccid, now)
        counters = {
            source: {"bytes_up": tx, "bytes_down": rx, "packets_up": txp, "packets_down": rxp}
            for source, tx, rx, txp, rxp in query(
                "SELECT source, tx_bytes, rx_bytes, tx_packets, rx_packets FROM usage_period"
                " WHERE iccid = ? AND period = ?",
                (iccid, start.isoformat()),
            )
        }
        source = "modem" if "modem" in counters else "kernel"
        chosen = counters.get(source, {"bytes_up": 0, "bytes_down": 0})
        kernel = counters.get("kernel", {})
        packets = kernel.get("packets_up", 0) + kernel.get("packets_down", 0)
        billed = (
            chosen["bytes_up"] + chosen["bytes_down"] + packets * self._cfg.header_overhead_bytes
        )
        plan = self._plan_bytes(query, iccid)
        return {
            "iccid": iccid,
            "period": {"start": start.isoformat(), "end": end.isoformat()},
            "bytes_up": chosen["bytes_up"],
            "bytes_down": chosen["bytes_down"],
            "source": source,
            "billed_estimate": billed,
            "plan_bytes": plan,
            "share_used": round(billed / plan, 4) if plan else None,
            "counters": counters,
        }

    def _plan_bytes(self, query: Query, iccid: str) -> int | None:
        rows = query("SELECT plan_bytes FROM usage_plan WHERE iccid = ?", (iccid,))
        if rows:
            return int(rows[0][0])
        plan = self._plans.get(iccid)
        return plan.plan_bytes if plan else self._cfg.plan_bytes

    # -- caps ----------------------------------------------------------------------------------

    def _evaluate(self, query: Query, iccid: str, now: float) -> None:
        """Fire thresholds not yet fired this period (inside the caller's transaction) and
        set the action in force."""
        report = self._report(query, iccid, now)
        self._store.after_commit(lambda: self._remember(iccid, report))
        plan, billed = report["plan_bytes"], report["billed_estimate"]
        crossed = [t for t in self._cfg.thresholds if plan and billed >= t.share * plan]
        period = report["period"]["start"]
        fired = {
            row[0]
            for row in query(
                "SELECT share FROM usage_alert WHERE iccid = ? AND period = ?", (iccid, period)
            )
        }
        for threshold in crossed:
            if threshold.share in fired:
                continue
            query(
                "INSERT INTO usage_alert (iccid, period, share) VALUES (?, ?, ?)",
                (iccid, period, threshold.share),
            )
            self._events.emit(
                "usage-threshold",
                iccid=iccid,
                period=report["period"],
                threshold=threshold.share,
                action=threshold.action,
                billed_estimate=billed,
                plan_bytes=plan,
            )
        until = period_end(report)
        if not crossed:
            self._cap = _Cap(None, until, "")
            return
        worst = max(crossed, key=lambda t: SEVERITY[t.action])
        reason = (
            f"plan cap: SIM {iccid} has used {report['share_used']:.0%} of its {plan} bytes;"
            f" readings refused until {report['period']['end']}"
        )
        self._cap = _Cap(worst.action, until, reason)

    def _action(self) -> _Cap:
        if self._clock() >= self._cap.until:  # a new period starts with nothing used
            self._cap = _Cap(None, self._cap.until, "")
        return self._cap

    def allowed(self, topic: str, priority: int) -> bool:
        """May the uplink send this reading now? Under ``throttle`` or ``stop``, only critical
        ones: priority >= ``throttle_min_priority`` or a topic in ``critical_topics``."""
        if self._action().action not in ("throttle", "stop"):
            return True
        return priority >= self._cfg.throttle_min_priority or any(
            topic == t or topic.startswith(f"{t}/") for t in self._cfg.critical_topics
        )

    def accepting(self) -> str | None:
        """The ingest gate: None, or why new readings are refused (``stop`` reached)."""
        cap = self._action()
        return cap.reason if cap.action == "stop" else None


class _Later(Exception):
    """Raised inside :meth:`UsageMeter.observe`'s transaction to roll it back: only counters
    moved, and the last commit is recent."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("usage commit put off")
        self.report = report


def _count(db: Any, key: tuple[str, str, str], epoch: str, values: tuple[int, ...],
           last: tuple[int, ...]) -> None:
    """Add what the counters moved since ``last`` (a counter lower than before restarted:
    counted in full) to the SIM's period ``key`` (iccid, period, source)."""
    deltas = [v if v < old or last is values else v - old for v, old in zip(values, last,
                                                                         strict=True)]
    db.execute(
        "INSERT OR REPLACE INTO usage_counter"
        " (source, epoch, tx_bytes, rx_bytes, tx_packets, rx_packets) VALUES (?, ?, ?, ?, ?, ?)",
        (key[2], epoch, *values),
    )
    db.execute(
        "INSERT INTO usage_period (iccid, period, source, tx_bytes, rx_bytes, tx_packets,"
        " rx_packets) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (iccid, period, source) DO UPDATE"
        " SET tx_bytes = tx_bytes + excluded.tx_bytes, rx_bytes = rx_bytes + excluded.rx_bytes,"
        " tx_packets = tx_packets + excluded.tx_packets,"
        " rx_packets = rx_packets + excluded.rx_packets",
        (*key, *deltas),
    )


def _query(db: Any) -> Query:
    return lambda sql, params: db.execute(sql, params).fetchall()
