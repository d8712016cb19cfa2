"""``simkeeper status [--config FILE] [--json]``: the agent's state, read from its database.

The database is opened read-only (``mode=ro``), so status never writes to the SD card or gets
in the daemon's way. The daemon keeps one ``runtime`` row (pid, start, heartbeat, modems,
uplink, usage) up to date; outbox depth and drops are read live. The agent counts as running
when that pid is alive, the row says it has not stopped, and its heartbeat is recent.

Exit 0 while the agent runs; 1 when there is no database or the agent is not running (the last
known state is still printed), 2 for a config it cannot read.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.cli.errors import CliError
from agent.core import config, runtime
from agent.core.runtime import STALE
from agent.telemetry import spool

MARKER = "decommission"  # agent.sim.decommission.MARKER (not imported: status stays light)
WIPE_REQUEST = "wipe-requested"  # agent.sim.decommission.WIPE_REQUEST, beside the database


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object (see README)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    path = cfg.store.path
    if not path.exists():
        raise CliError(1, f"no database at {path}: the agent has never run with this config")
    try:
        status = read_status(path, cfg.device_id)
    except sqlite3.Error as exc:
        raise CliError(1, f"cannot read {path}: {exc}") from None
    requested = (path.parent / WIPE_REQUEST).exists()
    print(json.dumps(status) if args.json else render(status, wipe_requested=requested))
    if not status["running"]:
        raise CliError(1, f"the agent is not running: {status['reason']}")
    return 0



def read_status(path: Path, device_id: str, now: float | None = None) -> dict[str, Any]:
    """The ``--json`` object (fields in the README)."""
    now = time.time() if now is None else now
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = runtime.read(db)
        waiting = spool.waiting(db, spool.journal_of(path))
        depth = {s: {"count": c, "bytes": b} for s, (c, b) in sorted(waiting.items())}
        drops = {
            r: {"count": c, "bytes": b}
            for r, c, b in db.execute("SELECT reason, count, bytes FROM outbox_drops")
        }
        marker = db.execute("SELECT value FROM meta WHERE key = ?", (MARKER,)).fetchone()
    finally:
        db.close()
    running, reason = _liveness(row.pid, row.heartbeat, row.stopped_at, now)
    return {
        "device_id": device_id,
        "running": running,
        "reason": reason,
        "pid": row.pid,
        "started_at": row.started_at,
        "heartbeat": row.heartbeat,
        "stopped_at": row.stopped_at,
        "sims": _sims(row.modems, row.usage, row.sims),
        "modems": row.modems,
        "uplink": row.uplink,
        "tasks": row.tasks,
        "decommissioned": _decommissioned(marker[0]) if marker else None,
        "outbox": {
            "count": sum(d["count"] for d in depth.values()),
            "bytes": sum(d["bytes"] for d in depth.values()),
            "streams": depth,
            "drops": drops,
        },
    }


def _liveness(
    pid: int | None, heartbeat: float | None, stopped: float | None, now: float
) -> tuple[bool, str | None]:
    if pid is None or heartbeat is None:
        return False, "it has never run with this database"
    if stopped is not None:
        return False, f"it stopped at {_when(stopped)}"
    if not _alive(pid):
        return False, f"process {pid} is gone (killed? last heartbeat {_when(heartbeat)})"
    if now - heartbeat > STALE:
        return False, f"process {pid} has not written a heartbeat since {_when(heartbeat)}"
    return True, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's (the daemon runs as its own user)
    return True


def _decommissioned(value: str) -> dict[str, Any]:
    """The decommission marker (agent.sim.decommission): when, which SIM, whether the identity
    keys are gone (the marker completed and nothing left unwiped) and which are not."""
    try:
        marker = json.loads(value)
    except ValueError:
        marker = None
    if not isinstance(marker, dict):  # unreadable: still decommissioned (the agent fails closed)
        marker = {}
    at, iccid = marker.get("at"), marker.get("iccid")
    not_wiped = marker.get("not_wiped")
    not_wiped = sorted(not_wiped) if isinstance(not_wiped, dict | list) else []
    return {
        "at": at if isinstance(at, int | float) else None,
        "iccid": iccid if isinstance(iccid, str) else None,
        "wiped": marker.get("completed_at") is not None and not not_wiped,
        "not_wiped": not_wiped,
    }


def _sims(modems: list[dict[str, Any]], usage: list[dict[str, Any]],
          keeper: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every SIM known (to the keeper, in a modem, or metered): its lifecycle summary
    (agent.sim.summary) and its usage report."""
    reports = {u["iccid"]: u for u in usage}
    kept = {k["iccid"]: k for k in keeper}
    in_modems = [m["modem"]["sim"]["iccid"] for m in modems if m.get("modem")]
    iccids = sorted({i for i in in_modems if i} | reports.keys() | kept.keys())
    return [{"iccid": i, "lifecycle": kept.get(i), "usage": reports.get(i)} for i in iccids]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def render(status: dict[str, Any], *, wipe_requested: bool = False) -> str:
    rows = [("device", status["device_id"])]
    if status["running"]:
        since = _when(status["started_at"])
        rows.append(("agent", f"running (pid {status['pid']}, since {since})"))
    else:
        rows.append(("agent", f"not running: {status['reason']}"))
    if (gone := status["decommissioned"]) is not None:
        rows.append(("", _decommission_line(gone, wipe_requested)))
    for sim in status["sims"]:
        rows.append(("sim", f"{sim['iccid']}: {_lifecycle(sim['lifecycle'])}"))
        rows.append(("", f"usage: {_usage(sim['usage'])}"))
    for m in status["modems"]:
        detail = f" ({m['detail']})" if m["detail"] else ""
        slot = f" ({m['slot']})" if m.get("slot", "modem") != "modem" else ""
        rows.append(("modem", f"{m['port']}{slot}: {m['state']}{detail}"))
        if info := m["modem"]:
            reg, op, sig = info["registration"], info["operator"], info["signal"]
            rssi = "unknown" if sig["rssi_dbm"] is None else f"{sig['rssi_dbm']} dBm"
            rows.append((
                "",
                f"{_or_dash(info['manufacturer'])} {_or_dash(info['model'])},"
                f" IMEI {_or_dash(info['imei'])}, {_or_dash(reg['state'])}"
                f" ({_or_dash(reg['act'])}) on {op['name'] or op['mcc_mnc'] or '-'}, RSSI {rssi}",
            ))
    if not status["modems"]:
        rows.append(("modem", "none"))
    if up := status["uplink"]:
        why = f" ({up['stop_reason']})" if up.get("stop_reason") else ""
        http = f", last POST: HTTP {up['http_status']}" if up.get("http_status") else ""
        speaks = f" over {up['protocol']}" if up.get("protocol") else ""
        rows.append(("uplink", f"{up['kind']}: {up['state']}{why}{speaks}{http},"
                               f" {up['readings_sent']} readings sent"))
        if up.get("last_error"):
            rows.append(("", f"last error {_when(up['last_error_at'])}: {up['last_error']}"))
    box = status["outbox"]
    dropped = sum(d["count"] for d in box["drops"].values())
    waiting = f"{box['count']} readings waiting ({box['bytes']} B)"
    rows.append(("outbox", f"{waiting}, {dropped} dropped"))
    for name, task in status["tasks"].items():
        if task["restarts"]:
            rows.append(("task", f"{name}: restarted {task['restarts']} time(s), last error at"
                                 f" {_when(task['last_error_at'])}: {task['last_error']}"))
    return "\n".join(f"{label:<10} {text}" for label, text in rows)


def _or_dash(value: object) -> str:
    """A value for the text view: ``-`` where it is unknown, never Python's ``None``."""
    return "-" if value is None else str(value)


def _decommission_line(gone: dict[str, Any], requested: bool) -> str:
    at = _when(gone["at"]) if gone["at"] is not None else "an unknown time"
    sim = f" (SIM {gone['iccid']})" if gone["iccid"] else ""
    text = f"decommissioned at {at}{sim}: "
    if gone["wiped"]:
        return text + "identity keys wiped"
    if not gone["not_wiped"]:
        return text + "identity keys not wiped yet (decommission under way)"
    then = "waiting for simkeeper-wipe (root)" if requested else \
        "run `simkeeper wipe-identity` as root"
    return text + f"identity keys NOT wiped: {', '.join(gone['not_wiped'])}; {then}"


def _usage(report: dict[str, Any] | None) -> str:
    if not report:
        return "no usage yet"
    text = (f"{report['bytes_up']} B up, {report['bytes_down']} B down ({report['source']}),"
            f" billed estimate {report['billed_estimate']} B")
    if report["share_used"] is not None:  # of the billed estimate, as the plan cap counts
        text += f" = {report['share_used']:.0%} of the {report['plan_bytes']} B plan"
    return text


def _lifecycle(sim: dict[str, Any] | None) -> str:
    """``active``, ``suspended (radio, by network: ...)``, deadline and conformance, one line."""
    if not sim:
        return "lifecycle unknown"
    slot = sim.get("slot")
    where = " (in the modem)" if slot in (None, "modem") else f" (in {slot})"
    text = str(sim["state"]) + (where if sim["current"] else "")
    if susp := sim["suspension"]:
        why = f": {susp['reason']}" if susp["reason"] else ""
        text += f", suspended ({susp['scope']}, by {susp['source']}{why})"
    if sim["deadline"] is not None and sim["activated_at"] is None:
        text += f", activation deadline {_when(sim['deadline'])}"
        if sim["time_left"] is not None:
            text += f" ({_duration(sim['time_left'])} left)"
    if (verdict := sim["conformance"]) is not None:
        text += ", terminal conforms" if verdict.get("conforming") else \
            ", terminal does NOT conform"
    return text


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "none"
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"
