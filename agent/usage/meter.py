"""Usage metering: bytes per SIM (ICCID) and billing period, plan caps.

Inputs are cumulative counters of each modem slot (``modem``, ``modem2``...: a gateway may
have several modems, each with its SIM) from two sources, the modem's and the kernel's
(:mod:`agent.usage.counters`, where each slot's last raw values are kept). Both reset at times;
the meter adds only deltas: a value lower than the last one, or a new ``epoch`` (the kernel's
boot id and interface index; a modem session counter), is a reset and counts in full. So totals
never go backwards, and a reading seen twice counts once, across restarts too.

Deltas go to the slot's SIM in use (:attr:`UsageMeter.sims`; meta ``usage.sim`` for slot
``modem``, ``usage.sim.<slot>`` for the others) and to its current billing period
(``cycle_day`` at midnight in ``timezone``). A SIM new to a slot becomes its SIM in use (a
swap): the slot's readings put off (below) are committed first, to the SIM leaving. A SIM seen
in another slot moves there (swapped between modems): its old slot has no SIM in use until it
reports one; each slot counting its own counters, nothing counts twice or is lost. The estimate
of billed bytes is payload plus packets x ``header_overhead_bytes`` (the carrier counts about
50-54 bytes of headers per packet); the payload comes from the modem's counters when it has
them, else the kernel's, and packets always from the kernel.

Plans: ``[[usage.plan]]`` per ICCID, else ``[usage] plan_bytes``, overridden by
:meth:`UsageMeter.set_plan` (the ``set-plan`` command). Thresholds and the actions they put in
force per SIM: :mod:`agent.usage.caps`; the gates :meth:`UsageMeter.allowed` and
:meth:`UsageMeter.accepting` hold readings only when every SIM in use is capped,
:meth:`UsageMeter.cap` tells one SIM's action.

An SD card wears out under a write a minute: when only the counters moved (no threshold crossed,
no new period, no reset, no new SIM), :meth:`UsageMeter.observe` commits at most every
``save_interval`` seconds per slot and source and keeps the newer figures in memory meanwhile
(the reports show them; :meth:`UsageMeter.publish` commits them first). Nothing is lost by a
crash in between: the counters are cumulative, so the next reading after a restart counts what
was not committed; only a crash and a counter reset together lose the uncommitted part.

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
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from agent.core.config import UsageConfig, canonical_iccid
from agent.core.readings import PRIORITY_MAX
from agent.core.store import Store
from agent.telemetry.events import Events
from agent.telemetry.outbox import USAGE, Outbox, compact_json
from agent.usage.caps import Caps, Query, cap_of, fire
from agent.usage.counters import SLOT, SOURCES, Counters, count, counter_row, read_kernel
from agent.usage.period import billing_period, period_end

__all__ = ["SAVE_INTERVAL", "SLOT", "Counters", "UsageMeter", "read_kernel"]

SAVE_INTERVAL = 900.0  # the daemon's save_interval: usage commits at most this often when idle
_SIM_KEY = "usage.sim"


def _cycle_key(iccid: str) -> str:
    return f"usage.cycle_day.{iccid}"


def _sim_key(slot: str) -> str:
    """The meta key of a slot's SIM in use."""
    return _SIM_KEY if slot == SLOT else f"{_SIM_KEY}.{slot}"


def _load_sims(store: Store) -> dict[str, str]:
    """Each slot's SIM in use, as persisted."""
    return {SLOT if key == _SIM_KEY else key.removeprefix(f"{_SIM_KEY}."): iccid
            for key, iccid in store.meta_items(_SIM_KEY).items()
            if key == _SIM_KEY or key.startswith(f"{_SIM_KEY}.")}


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
        # (slot, source): when its counters were last committed
        self._saved: dict[tuple[str, str], float] = {}
        # (slot, source): the newest reading not committed yet (iccid, counters, epoch)
        self._pending: dict[tuple[str, str], tuple[str, Counters, str]] = {}
        self._events = events
        self._cfg = cfg
        self._tz = ZoneInfo(cfg.timezone)
        self._plans = {plan.iccid: plan for plan in cfg.plan}
        self._clock = clock
        self._caps = Caps(cfg, clock)
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}  # iccid: (valid until, report)
        self._generation = 0  # bumped by every change of the cache
        self._cache_lock = threading.Lock()
        # slot: its SIM in use (replaced, never changed in place: the loop reads it)
        self.sims: dict[str, str] = _load_sims(store)
        # iccid: its last report queued on ``usage``, else as of the start (replaced, never
        # changed in place: the loop reads it while publish() runs in the store's thread)
        self.reported: dict[str, dict[str, Any]] = {}
        in_use = sorted(self._in_use())
        if in_use:
            with store.transaction() as db:
                for iccid in in_use:
                    self._evaluate(_query(db), iccid, clock())
            self.reported = {iccid: self.report(iccid) for iccid in in_use}

    def _in_use(self) -> set[str]:
        """The SIMs in use, in any slot."""
        return set(self.sims.values())

    # -- counting ------------------------------------------------------------------------------

    def observe(self, iccid: str, source: str, counters: Counters, *, epoch: str = "",
                save: bool = False, slot: str = SLOT) -> None:
        """Account one reading of cumulative counters from the modem in ``slot``, whose SIM is
        ``iccid`` (committed at once when ``save``, else as the module doc says)."""
        values = dataclasses.astuple(counters)
        if (source not in SOURCES or not slot or "@" in slot
                or any(not isinstance(v, int) or v < 0 for v in values)):
            raise ValueError(f"bad usage reading from {source!r} of {slot!r}: {counters}")
        iccid = canonical_iccid(iccid)
        if iccid != self.sims.get(slot):
            self._flush(slot)  # what the SIM leaving used, not committed yet, is its own
        self._account(iccid, (slot, source), counters, epoch, save=save, claim=True)

    def _account(self, iccid: str, key: tuple[str, str], counters: Counters, epoch: str, *,
                 save: bool, claim: bool) -> None:
        """Count a reading of ``key`` (slot, source) for ``iccid``; when ``claim``, the SIM
        becomes the slot's SIM in use (else: a reading put off, committed to its SIM)."""
        slot, source = key
        row_key, values = counter_row(slot, source), dataclasses.astuple(counters)
        now = self._clock()
        start, _ = self.period(iccid, now)
        in_use = iccid == self.sims.get(slot)
        may_wait = (not save and in_use and not self._store.in_transaction()
                    and now - self._saved.get(key, -math.inf) < self._save_interval)
        try:
            with self._store.transaction() as db:
                row = db.execute(
                    "SELECT epoch, tx_bytes, rx_bytes, tx_packets, rx_packets FROM usage_counter"
                    " WHERE source = ?",
                    (row_key,),
                ).fetchone()
                if row is not None and row == (epoch, *values) and in_use:
                    return  # nothing moved: no write (the SD card thanks us)
                fresh = row is None or row[0] != epoch
                count(db, row_key, (iccid, start.isoformat(), source), epoch=epoch, values=values,
                      last=values if fresh else row[1:])
                counted = db.total_changes
                self._close_previous(db, iccid, start, now)
                if claim and not in_use:
                    self._claim(db, slot, iccid)
                self._evaluate(_query(db), iccid, now)
                if may_wait and not fresh and db.total_changes == counted:
                    raise _Later(self._report(_query(db), iccid, now))
                self._store.after_commit(lambda: self._committed(key, now))
        except _Later as later:  # rolled back: kept in memory until the next save
            self._pending[key] = (iccid, counters, epoch)
            self._remember(iccid, later.report)
        if claim and not in_use:
            self.sims = {**{s: i for s, i in self.sims.items() if i != iccid}, slot: iccid}

    def _claim(self, db: Any, slot: str, iccid: str) -> None:
        """Persist ``iccid`` as the slot's SIM in use, and no more in any other slot."""
        for other, sim in self.sims.items():
            if sim == iccid and other != slot:
                db.execute("DELETE FROM meta WHERE key = ?", (_sim_key(other),))
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   (_sim_key(slot), iccid))

    def _flush(self, slot: str | None = None) -> None:
        """Commit the readings put off (of ``slot``, else all), each to the SIM it was read
        for."""
        for key, (iccid, counters, epoch) in list(self._pending.items()):
            if slot in (None, key[0]):
                self._account(iccid, key, counters, epoch, save=True, claim=False)

    def _committed(self, key: tuple[str, str], now: float) -> None:
        self._saved[key] = now
        self._pending.pop(key, None)

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
        (1-28); persisted; re-checks its caps when it is in use in any slot."""
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
            if iccid in self._in_use():
                self._evaluate(_query(db), iccid, self._clock())
            else:  # its cap, if known, is stale: cap() reads it from its report again
                self._store.after_commit(lambda: self._forget(iccid))

    # -- reporting -----------------------------------------------------------------------------

    def report(self, iccid: str, now: float | None = None) -> dict[str, Any]:
        """The ``usage`` report of ``iccid`` for the period holding ``now``."""
        return self._report(self._store.query, canonical_iccid(iccid), now or self._clock())

    def reports(self, iccids: Iterable[str | None]) -> list[dict[str, Any]]:
        """The current report of each of ``iccids`` and of every SIM in use, by ICCID, from
        memory: a SIM's report is read from the store once, then refreshed when its usage or
        plan changes (:meth:`observe`, :meth:`set_plan`, :meth:`publish`) or its period ends.
        Cheap enough for every runtime row; the reports are shared: do not modify them."""
        now = self._clock()
        wanted = {canonical_iccid(i) for i in iccids if i} | self._in_use()
        return [self._cached(iccid, now) for iccid in sorted(wanted)]

    def _cached(self, iccid: str, now: float) -> dict[str, Any]:
        with self._cache_lock:
            cached, generation = self._cache.get(iccid), self._generation
        if cached is None or now >= cached[0]:
            report = self._report(self._store.query, iccid, now)
            cached = (period_end(report), report)
            with self._cache_lock:  # unless a fresher one came meanwhile
                if self._generation == generation:
                    self._cache[iccid] = cached
        return cached[1]

    def _remember(self, iccid: str, report: dict[str, Any] | None) -> None:
        """After a commit: the SIM's current report (None: read it again when asked)."""
        with self._cache_lock:
            self._generation += 1
            if report is None:
                self._cache.pop(iccid, None)
            else:
                self._cache[iccid] = (period_end(report), report)

    def _forget(self, iccid: str) -> None:
        self._remember(iccid, None)
        self._caps.set(iccid, None)

    def publish(self, only: Iterable[str] | None = None) -> list[str]:
        """Queue a ``usage`` report for each SIM with usage in its current period (and each
        SIM in use), or for the SIMs ``only`` names; returns the reading ids."""
        self._flush()
        now = self._clock()
        in_use = self._in_use()
        if only is not None:
            iccids = {canonical_iccid(i) for i in only}
            in_use = iccids
        else:
            iccids = {row[0] for row in
                      self._store.query("SELECT DISTINCT iccid FROM usage_period")}
        fresh = {iccid: self.report(iccid, now) for iccid in sorted(iccids | in_use)}
        reports = [r for iccid, r in fresh.items() if r["counters"] or iccid in in_use]
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

    # -- caps (agent.usage.caps) -----------------------------------------------------------------

    def _evaluate(self, query: Query, iccid: str, now: float) -> None:
        """Fire the SIM's thresholds not yet fired this period (inside the caller's
        transaction) and set its cap."""
        report = self._report(query, iccid, now)
        self._store.after_commit(lambda: self._remember(iccid, report))
        fire(query, self._events, report, self._cfg.thresholds)
        self._caps.set(iccid, cap_of(report, self._cfg.thresholds))

    def cap(self, iccid: str) -> str | None:
        """The action in force for the SIM: None, ``event``, ``throttle`` or ``stop`` (as last
        evaluated, else from its report: nothing fires)."""
        iccid = canonical_iccid(iccid)
        now = self._clock()
        known = self._caps.get(iccid) or cap_of(self._cached(iccid, now), self._cfg.thresholds)
        return known.at(now)

    def allowed(self, topic: str, priority: int) -> bool:
        """May the uplink send this reading now? Under ``throttle`` or ``stop`` on every SIM
        in use, only critical ones (:meth:`agent.usage.caps.Caps.allowed`)."""
        return self._caps.allowed(self.sims.values(), topic, priority)

    def accepting(self) -> str | None:
        """The ingest gate: None, or why new readings are refused (``stop`` reached by every
        SIM in use)."""
        return self._caps.accepting(self.sims.values())


class _Later(Exception):
    """Raised inside :meth:`UsageMeter.observe`'s transaction to roll it back: only counters
    moved, and the last commit is recent."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("usage commit put off")
        self.report = report


def _query(db: Any) -> Query:
    return lambda sql, params: db.execute(sql, params).fetchall()
