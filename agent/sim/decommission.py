"""Decommission: the contract ended, the SIM goes back, and this gateway stops being itself.

The ``decommission`` order runs in two parts, in this order (:class:`Decommissioner`):

1. :meth:`Decommissioner.begin`, in the command handler: the ``decommission`` marker is
   persisted in the store (``meta`` key ``decommission``: when, device id, ICCID, the device
   certificate's SHA-256 fingerprint), the telemetry gate closes for good and local readings are
   refused, and the ``decommissioned`` event is committed. The handler returns, so the command's
   result is handed to the MQTT session right after.
2. :meth:`Decommissioner._finish`, a task: once the result was handed over (or 5 s passed), it
   waits (at most ``drain_timeout``) for the ``events`` stream to go up, publishes the final
   retained ``state`` (``decommissioned``, the SIM ``terminated``) and waits (at most 5 s) for
   its PUBACK, then stops the MQTT session for the reason ``decommissioned`` (``status`` shows
   the uplink ``stopped (decommissioned)``): the retained ``offline`` is published and its
   PUBACK awaited before the disconnect, and MQTT keeps a session's order, so the result, the
   event and the state are at the broker before the session is down. Only then are the
   identity keys wiped (:func:`wipe`) and the radio turned off (lifecycle ``terminated``,
   ``AT+CFUN=0``, held for whatever SIM is in the slot): on a gateway the session rides on
   that radio. The marker is completed with what was wiped.

A decommissioned agent refuses to start (:func:`check_start`, :class:`Decommissioned`: exit 1,
one line) until the gateway is **re-provisioned**, which means exactly: the device certificate
the config uses now (``[uplink] cert``, else ``device.pem`` beside the config in a provisioned
bundle) exists and its SHA-256 fingerprint (of the DER, as ``bundle.json``'s ``cert_sha256``)
differs from the one recorded at decommission. ``simkeeper provision device --force`` (or
``csr`` + ``install-cert``) always makes a new key and certificate, so it qualifies; editing the
config, restoring the same certificate or running without one does not. On such a start the
marker moves to ``decommission.history`` and a ``re-provisioned`` event is emitted; the records
of the returned SIM stay (its lifecycle stays ``terminated``).

A start refused with an unfinished marker (the agent was killed between the two parts) first
finishes what needs no modem or broker: the keys are wiped and the SIM's record is marked
``terminated``. :func:`preflight` is that check without the start (``simkeeper run
--preflight``, the unit's ``ExecCondition=``): a decommissioned gateway's unit is skipped, not
restarted.

**Keys the agent may not wipe.** Under the packaged unit the agent runs as ``simkeeper`` and the
identity is ``root:simkeeper`` (directory 0750, keys 0640): it can read the keys, not remove
them. What it cannot wipe it records in the marker (``not_wiped``) and asks root to wipe
(:func:`request_wipe`): the marker, as JSON, in ``wipe-requested`` beside the database (the
unit's ``StateDirectory=``). ``simkeeper-wipe.path`` sees the file and starts
``simkeeper-wipe.service`` (root, no network), which runs ``simkeeper wipe-identity``
(:mod:`agent.cli.wipe`): :func:`complete` as root, then the request is removed. The request
only triggers: what is wiped comes from root's config and the marker in the database, never
from the file, and nothing is wiped once the gateway was re-provisioned. When the agent can
wipe (run as root, or a bundle it owns) it does so itself and writes no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.core.config import Config
from agent.core.store import Store
from agent.core.trusted_time import TrustedClock, load_anchor
from agent.sim.identity import fingerprint, identity_cert, key_files, wipe
from agent.sim.keeper import KeeperError
from agent.sim.keepers import SimKeepers
from agent.sim.lifecycle import LifecycleError, LifecycleRepository
from agent.telemetry.events import Events
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

MARKER = "decommission"
HISTORY = "decommission.history"
WIPE_REQUEST = "wipe-requested"  # beside the database; packaging/simkeeper-wipe.path watches it
_RESULT_WAIT = 5.0
STOP_REASON = "decommissioned"  # the uplink's, in ``status``


class Decommissioned(Exception):
    """The agent refuses to start: the message is the one line to print."""


# -- the marker -------------------------------------------------------------------------------


def load_marker(store: Store) -> dict[str, Any] | None:
    rows = store.query("SELECT value FROM meta WHERE key = ?", (MARKER,))
    if not rows:
        return None
    try:
        marker = json.loads(rows[0][0])
    except ValueError:
        marker = None
    # An unreadable marker still means decommissioned: fail closed, never start by accident.
    return marker if isinstance(marker, dict) else {"at": None, "cert_sha256": None}


def _save(store: Store, key: str, value: Any) -> None:
    with store.transaction() as db:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   (key, json.dumps(value, sort_keys=True, separators=(",", ":"))))


def when(ts: Any) -> str:
    """A marker's time, ISO 8601 UTC (``an unknown time`` when it has none)."""
    if not isinstance(ts, int | float):
        return "an unknown time"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reprovisioned(marker: dict[str, Any], cfg: Config, config_path: Path | None) -> str | None:
    """The new certificate's fingerprint when the gateway was re-provisioned since ``marker``
    (module docstring), else None."""
    now_fp = fingerprint(identity_cert(cfg, config_path))
    return now_fp if now_fp is not None and now_fp != marker.get("cert_sha256") else None


def refusal(marker: dict[str, Any]) -> str:
    """The one line a decommissioned gateway's start is refused with."""
    return (f"decommissioned at {when(marker.get('at'))}; re-provision this gateway (simkeeper"
            " provision device ... --force) to use it again")


def preflight(store: Store, cfg: Config, config_path: Path | None) -> dict[str, Any] | None:
    """May the agent start? Raise :class:`Decommissioned` while the marker holds and the
    gateway was not re-provisioned, after finishing what an interrupted decommission left
    (:func:`complete`; what cannot be wiped is requested from root). The marker when the
    gateway was re-provisioned (left in place: :func:`check_start` moves it), else None."""
    marker = load_marker(store)
    if marker is None:
        return None
    if reprovisioned(marker, cfg, config_path) is not None:
        return marker
    if marker.get("completed_at") is None or marker.get("not_wiped"):
        _finish_offline(store, cfg, config_path, marker)
    raise Decommissioned(refusal(marker))


def check_start(store: Store, cfg: Config, config_path: Path | None) -> dict[str, Any] | None:
    """Before anything starts: raise :class:`Decommissioned` while the marker holds and the
    gateway was not re-provisioned (:func:`preflight`); the marker just cleared by a
    re-provisioning, else None."""
    marker = preflight(store, cfg, config_path)
    if marker is None:
        return None
    now_fp = reprovisioned(marker, cfg, config_path) or "?"
    history = _history(store)
    history.append({**marker, "reprovisioned_at": time.time(), "new_cert_sha256": now_fp})
    with store.transaction() as db:  # one transaction: moved, never lost nor doubled
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   (HISTORY, json.dumps(history, sort_keys=True, separators=(",", ":"))))
        db.execute("DELETE FROM meta WHERE key = ?", (MARKER,))
    with contextlib.suppress(OSError):  # a request left from the old identity is void now
        wipe_request_path(cfg).unlink()
    log.warning("re-provisioned since the decommission at %s (new certificate %s):"
                " starting", when(marker.get("at")), now_fp[:16])
    return marker


def _history(store: Store) -> list[Any]:
    rows = store.query("SELECT value FROM meta WHERE key = ?", (HISTORY,))
    try:
        value = json.loads(rows[0][0]) if rows else []
    except ValueError:
        value = []
    return value if isinstance(value, list) else []


def complete(store: Store, cfg: Config, config_path: Path | None,
             marker: dict[str, Any]) -> dict[str, str]:
    """What a decommission leaves to do without modem or broker: wipe the identity's keys
    (:func:`key_files` of this config), mark the SIM ``terminated``, complete the marker in the
    store. The keys not wiped, ``{path: why}`` (empty when all are gone). Used by a refused
    start (as the agent) and by ``simkeeper wipe-identity`` (as root)."""
    wiped, failed = wipe(key_files(cfg, config_path))
    iccid = marker.get("iccid")
    if isinstance(iccid, str):
        repo = LifecycleRepository(store)
        clock = TrustedClock(anchor=load_anchor(store))
        try:
            lc = repo.open(iccid, emit=lambda _e: None, clock=clock.now)
            if lc.can("decommission"):
                lc.decommission()
        except LifecycleError as exc:
            log.error("SIM %s: not marked terminated: %s", iccid, exc)
    marker.update(completed_at=marker.get("completed_at") or time.time(),
                  wiped=sorted(set(marker.get("wiped") or []) | set(wiped)), not_wiped=failed)
    _save(store, MARKER, marker)
    return failed


def _finish_offline(store: Store, cfg: Config, config_path: Path | None,
                    marker: dict[str, Any]) -> None:
    """What an interrupted decommission left, done without modem or broker; what the agent
    may not wipe is requested from root."""
    failed = complete(store, cfg, config_path, marker)
    if failed:
        _report_not_wiped(failed, request_wipe(cfg, marker))


def _report_not_wiped(failed: dict[str, str], request: Path | None) -> None:
    why = "; ".join(f"{p}: {w}" for p, w in failed.items())
    if request is not None:
        log.warning("identity keys not wiped by the agent (%s): wipe requested from root"
                    " (simkeeper-wipe.path) in %s", why, request)
    else:
        log.error("identity keys not wiped: %s", why)


# -- the wipe request (root wipes what the agent may not) -----------------------------------


def wipe_request_path(cfg: Config) -> Path:
    """``wipe-requested`` beside the database (the unit's ``StateDirectory=``)."""
    return cfg.store.path.parent / WIPE_REQUEST


def request_wipe(cfg: Config, marker: dict[str, Any]) -> Path | None:
    """Write the marker to :func:`wipe_request_path` (atomically: a path unit reacts to its
    appearance); its path, None when it could not be written (logged)."""
    path = wipe_request_path(cfg)
    tmp = path.with_name(f".{WIPE_REQUEST}.tmp")
    data = json.dumps(marker, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot request the wipe from root: %s: %s", path, exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return None
    return path


# -- the order, in a running daemon -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plant:
    """What the decommission acts on: the parts the daemon built, ``gates_changed`` (readings
    and telemetry are refused from now on), ``publish_state`` (the retained ``state`` now;
    whether its PUBACK came, within a bound) and ``stop_uplinks`` (given why; the retained
    ``offline``)."""

    cfg: Config
    config_path: Path | None
    store: Store
    outbox: Outbox
    events: Events
    keepers: SimKeepers
    gates_changed: Callable[[], None]
    publish_state: Callable[[], Awaitable[bool]]
    stop_uplinks: Callable[[str], Awaitable[None]]


class Decommissioner:
    def __init__(self, plant: Plant, *, drain_timeout: float = 10.0,
                 now: Callable[[], float] | None = None) -> None:
        self._plant = plant
        self._drain_timeout = drain_timeout
        self._now = now or time.time
        self.marker: dict[str, Any] | None = None
        self._result = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()  # the second part is over (tests wait for it)

    @property
    def active(self) -> bool:
        return self.marker is not None

    def accepting(self) -> str | None:
        """An ingest gate: local readings are refused once decommissioned."""
        if self.marker is None:
            return None
        return "decommissioned: this gateway's SIM was returned; readings are not accepted"

    def note_result(self) -> None:
        """A command result was handed to the MQTT session."""
        self._result.set()

    def begin(self) -> str:
        """Part one (module docstring); the result's detail. Raises KeeperError when it is
        under way already."""
        p = self._plant
        if self.marker is not None:
            raise KeeperError(f"already decommissioned at {when(self.marker.get('at'))}")
        cert = identity_cert(p.cfg, p.config_path)
        iccid = p.keepers.iccid
        marker = {"at": self._now(), "device_id": p.cfg.device_id, "iccid": iccid,
                  "cert": None if cert is None else str(cert), "cert_sha256": fingerprint(cert),
                  "completed_at": None, "wiped": [], "not_wiped": {}}
        _save(p.store, MARKER, marker)
        self.marker = marker
        p.gates_changed()
        message = ("decommissioned: uplink stopped, identity keys wiped, radio off;"
                   " return the SIM")
        try:
            p.events.emit("decommissioned", iccid=iccid, cert_sha256=marker["cert_sha256"],
                          message=message)
        except Exception:
            log.exception("decommissioned event not emitted")
        self._result.clear()
        self._task = asyncio.get_running_loop().create_task(self._finish(), name="decommission")
        log.warning("decommissioning %s: the result goes first, then the uplink stops, the"
                    " keys are wiped and the radio goes off", p.cfg.device_id)
        return message

    async def _finish(self) -> None:
        p = self._plant
        marker = self.marker
        assert marker is not None
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RESULT_WAIT):
                    await self._result.wait()
            loop = asyncio.get_running_loop()
            end = loop.time() + self._drain_timeout
            # The outbox tells no one of acks: a short, bounded poll.
            while p.outbox.depth("events")[0] and loop.time() < end:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            if not await p.publish_state():
                log.warning("the final state (decommissioned) was not acknowledged by the"
                            " broker before the uplink stopped")
            await p.stop_uplinks(STOP_REASON)
            paths = key_files(p.cfg, p.config_path)
            wiped, failed = await loop.run_in_executor(None, wipe, paths)
            with contextlib.suppress(KeeperError, LifecycleError):
                p.keepers.decommission(announce=False)
            p.keepers.retire()
            marker.update(completed_at=self._now(), wiped=wiped, not_wiped=failed)
            await p.store.run(_save, p.store, MARKER, marker)
            if failed:
                # Saved first: root's wipe completes the marker as stored, never overwritten.
                request = await loop.run_in_executor(None, request_wipe, p.cfg, dict(marker))
                _report_not_wiped(failed, request)
                with contextlib.suppress(Exception):
                    p.events.emit("decommission-incomplete", not_wiped=failed,
                                  wipe_requested=request is not None)
            else:
                log.warning("decommissioned: %d key file(s) wiped, radio off", len(wiped))
        finally:
            self.done.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
