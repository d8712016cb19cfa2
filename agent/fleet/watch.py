"""``fleet watch``: the fleet as a table, from retained ``status`` and ``state`` and the
``usage`` reports as they come.

Columns: device, online, SIM state (``decommissioned`` once the state says so), activation
deadline countdown, suspension, usage against plan, last seen. The ``state`` shape grows with
the agent, so it is read defensively: the SIM summary is the first of ``sims[0]``,
``lifecycle``, ``sim`` that is an object with a ``state``. Usage reports are not retained: a
fresh watcher reads the last one from the state's ``usage``, then each new report. Usage is one
figure, the billed estimate the plan cap counts, shown against the plan with its share of it
(:func:`usage_text`).

For ``fleet dashboard`` each device also keeps every SIM its state names, its first modem's
signal and operator, and a :class:`History` per SIM: its last report and its usage over the
billing period, bounded. The subscription is made again on every (re)connection.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt

from agent.fleet.mqtt import BrokerOptions, connect, stop
from agent.telemetry.batch import BatchError, decode_batch

COLUMNS = ("DEVICE", "ONLINE", "SIM", "DEADLINE", "SUSPENDED", "USAGE", "LAST SEEN")
POINTS = 120  # usage points kept per SIM: the latest in each 1/120 of its period (6 h of a month)


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (JSON from a device may hold NaN)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def used_and_plan(report: dict[str, Any]) -> tuple[float, float | None]:
    """A ``usage`` report's one figure, the billed estimate the plan cap counts (bytes up and
    down from an agent without one), and its plan (None: no plan)."""
    used = finite(report.get("billed_estimate"))
    if used is None:
        used = sum(v for v in map(finite, (report.get("bytes_up"), report.get("bytes_down")))
                   if v is not None)
    plan = finite(report.get("plan_bytes"))
    return used, plan if plan else None


class History:
    """One SIM's usage for the dashboard: its newest report, and its newest billing period's
    (time, bytes) points, at most :data:`POINTS` (a later report replaces an earlier one in
    the same 1/POINTS of the period), so memory stays bounded however often reports come."""

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None
        self.start = self.end = 0.0
        self._made = -math.inf  # when the kept report was made
        self._points: dict[int, tuple[float, float]] = {}

    def add(self, ts: float, report: dict[str, Any]) -> None:
        if ts >= self._made:
            self.report, self._made = report, ts
        period: Any = report.get("period")
        try:
            start, end = (datetime.fromisoformat(period[k]).timestamp() for k in ("start", "end"))
        except (KeyError, TypeError, ValueError):
            return
        if end <= start or start < self.start or not start <= ts < end:
            return  # no period, an older one's, or a report made outside its own
        if start > self.start:
            self.start, self.end, self._points = start, end, {}
        slot = int((ts - start) * POINTS / (end - start))
        if ts >= self._points.get(slot, (-math.inf, 0.0))[0]:
            self._points[slot] = (ts, used_and_plan(report)[0])

    def points(self) -> list[tuple[float, float]]:
        return sorted(self._points.values())


@dataclass
class Device:
    name: str
    online: str = "?"
    sim: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    last_seen: float | None = None
    decommissioned: bool = False
    sims: list[dict[str, Any]] = field(default_factory=list)  # every SIM the state names
    modem: dict[str, Any] | None = None  # the first modem's info: signal, operator
    history: dict[str, History] = field(default_factory=dict)  # by ICCID


def _sim(state: Any) -> dict[str, Any] | None:
    if not isinstance(state, dict):
        return None
    sims = state.get("sims")
    for cand in ((sims[0] if isinstance(sims, list) and sims else None),
                 state.get("lifecycle"), state.get("sim")):
        if isinstance(cand, dict) and "state" in cand:
            return cand
    return None


def _objects(items: Any) -> list[dict[str, Any]]:
    """The objects of a JSON list (none when it is not one)."""
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _duration(seconds: float) -> str:
    sign, s = ("-" if seconds < 0 else ""), abs(int(seconds))
    if s >= 86400:
        return f"{sign}{s // 86400}d{s % 86400 // 3600}h"
    if s >= 3600:
        return f"{sign}{s // 3600}h{s % 3600 // 60}m"
    return f"{sign}{s // 60}m{s % 60}s"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}TB"


def usage_text(used: float, plan: float | None) -> str:
    """``1.2MB/1.0MB (120%)``: bytes used against the plan, the share from the same two
    figures; ``1.2MB`` without a plan."""
    if not plan:
        return _bytes(used)
    return f"{_bytes(used)}/{_bytes(plan)} ({used / plan:.0%})"


def usage_cell(report: dict[str, Any] | None) -> str:
    """A ``usage`` report's one figure against its plan (:func:`used_and_plan`)."""
    return usage_text(*used_and_plan(report)) if report else "-"


def row(dev: Device, now: float) -> tuple[str, ...]:
    sim = dev.sim or {}
    deadline = finite(sim.get("deadline"))
    countdown = ("-" if sim.get("activated_at") or deadline is None
                 else _duration(deadline - now))
    susp = sim.get("suspension")
    suspended = susp.get("scope", "yes") if isinstance(susp, dict) else "-"
    seen = "-" if dev.last_seen is None else _duration(now - dev.last_seen) + " ago"
    state = "decommissioned" if dev.decommissioned else sim.get("state")
    return (dev.name, dev.online, "-" if state is None else str(state), countdown,
            str(suspended), usage_cell(dev.usage), seen)


def render(devices: Iterable[Device], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = [COLUMNS, *(row(d, now) for d in sorted(devices, key=lambda d: d.name))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


class Watcher:
    """Keeps :attr:`devices` up to date from the broker (paho's thread; read under ``lock``)."""

    def __init__(self, opts: BrokerOptions, *, devices: Iterable[str] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self._named = tuple(devices)  # subscribed by exact topic: RabbitMQ 3.x serves retained
        # messages only so; none named: every device, by wildcard
        self.devices: dict[str, Device] = {}
        self.lock = threading.Lock()
        self.last_message = time.monotonic()
        self.subscribed = threading.Event()
        self.connected = False  # to the broker, now (paho reconnects by itself)
        self._clock = clock
        self._client: mqtt.Client | None = None

    def _attach(self, client: mqtt.Client) -> None:
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a: self.subscribed.set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        self.connected = True  # a session without its subscriptions: subscribe each time
        client.subscribe([(self.opts.topic(d, t), 1) for d in self._named or ("+",)
                          for t in ("status", "state", "usage")])

    def _on_disconnect(self, *_a: Any) -> None:
        self.connected = False

    def start(self) -> None:
        self._client = connect(self.opts, self._attach)

    def stop(self) -> None:
        if self._client is not None:
            stop(self._client)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3:
            return
        device, kind, payload = parts[1], parts[2], bytes(msg.payload)
        with self.lock:
            self.last_message = time.monotonic()
            dev = self.devices.setdefault(device, Device(device))
            if kind == "status":
                dev.online = {"online": "yes", "offline": "no"}.get(
                    payload.decode("utf-8", "replace").strip(), "?")
            elif kind == "state":
                try:
                    state = json.loads(payload)
                except ValueError:
                    return
                dev.sim = _sim(state) or dev.sim
                state = state if isinstance(state, dict) else {}
                dev.decommissioned = isinstance(state.get("decommissioned"), dict)
                dev.last_seen = finite(state.get("ts")) or self._clock()
                dev.sims = _objects(state.get("sims"))
                dev.modem = next((m["modem"] for m in _objects(state.get("modems"))
                                  if isinstance(m.get("modem"), dict)), None)
                if isinstance(usage := state.get("usage"), dict):
                    dev.usage = usage
                    self._record(dev, dev.last_seen, usage)
            elif kind == "usage":
                self._usage(dev, payload)

    def _usage(self, dev: Device, payload: bytes) -> None:
        try:
            readings = decode_batch(payload)["readings"]
        except BatchError:
            return
        made: list[tuple[float | None, dict[str, Any]]] = []  # (when, report)
        for reading in readings:
            data = reading.get("data") if isinstance(reading, dict) else None
            if isinstance(data, dict) and "bytes_up" in data:
                made.append((finite(reading.get("ts")), data))
        reports = [d for _ts, d in made]
        current = (dev.sim or {}).get("iccid")  # a batch may hold an old SIM's report too
        dev.usage = next((d for d in reversed(reports) if d.get("iccid") == current),
                         reports[-1] if reports else dev.usage)
        dev.last_seen = self._clock()
        for ts, report in made:
            self._record(dev, finite(ts) or dev.last_seen, report)

    @staticmethod
    def _record(dev: Device, ts: float, report: dict[str, Any]) -> None:
        iccid = report.get("iccid")
        if isinstance(iccid, str):
            dev.history.setdefault(iccid, History()).add(ts, report)

    def snapshot(self) -> str:
        with self.lock:
            return render(list(self.devices.values()), self._clock())

    def settle(self, quiet: float = 0.3, limit: float = 5.0) -> None:
        """Wait for the retained messages: until each named device's status and state came
        (a device never seen may have none: ``limit``), or with none named until ``quiet``
        seconds pass without one."""
        end = time.monotonic() + limit
        self.subscribed.wait(limit)
        while time.monotonic() < end:
            with self.lock:
                idle = time.monotonic() - self.last_message
                known = [self.devices.get(d) for d in self._named]
            if self._named and all(d and d.online != "?" and d.last_seen for d in known):
                return
            if not self._named and idle >= quiet:
                return
            time.sleep(0.05 if self._named else min(quiet - idle, 0.05) + 0.01)
