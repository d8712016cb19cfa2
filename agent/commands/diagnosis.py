"""The diagnosis of ``simkeeper doctor`` and of the signed ``diagnose`` command: a list of checks,
each ``{"area", "name", "status": "ok"|"warning"|"failure", "saw", "do"}``, in words a field
technician acts on (``do`` null when nothing is to be done).

The modem, SIM and network checks (:mod:`agent.commands.diagnosis_modem`,
:mod:`agent.commands.diagnosis_network`) are made from the same facts whoever gathers them
(:class:`ModemFacts`, one per modem): the ``modem info`` object and the SIM keeper's summary
(agent.sim.summary), either as the running agent knows them (its runtime row, or inside the
daemon its snapshot: the port is never opened twice) or read by ``simkeeper doctor`` itself when
the agent is not running. They run once per modem; with several modems each of them carries
the modem's ``slot`` (``modem``, ``modem2``...); with one they are as they always were. The
link and agent checks look at the host (:mod:`agent.commands.diagnosis_host`). A check that
needs what an earlier one found missing says ``not checked`` (a warning): the failure is the
earlier one.

This module: the check's shape, its text form, and the facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.config import Config
from agent.core.modem_config import slot_name, slot_order
from drivers.modem import PdpContextInfo

Status = Literal["ok", "warning", "failure"]
Check = dict[str, Any]
Mode = Literal["agent", "probe"]
LABELS: dict[str, str] = {"ok": "ok", "warning": "WARN", "failure": "FAIL"}


def check(area: str, name: str, status: Status, saw: str, do: str | None = None) -> Check:
    return {"area": area, "name": name, "status": status, "saw": saw, "do": do}


def not_checked(area: str, name: str, why: str) -> Check:
    return check(area, name, "warning", f"not checked: {why}")


def worst(checks: list[Check]) -> Status:
    found = {c["status"] for c in checks}
    return "failure" if "failure" in found else "warning" if "warning" in found else "ok"


def render(checks: list[Check]) -> str:
    """One line a check: ``FAIL  network  registration: ... -> what to do``; with several
    modems, a modem's check names its slot: ``registration [modem2]: ...``."""
    return "\n".join(
        f"{LABELS[c['status']]:<5} {c['area']:<8} {c['name']}"
        + (f" [{c['slot']}]" if c.get("slot") else "") + f": {c['saw']}"
        + (f" -> {c['do']}" if c["do"] else "") for c in checks)


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(0, int(seconds))} s"
    days, rest = divmod(int(seconds), 86400)
    return f"{days} d {rest // 3600} h" if days else f"{rest // 3600} h {rest % 3600 // 60} min"


@dataclass(frozen=True, slots=True)
class AgentView:
    """What the running agent knows: its runtime row (``simkeeper status``) or, inside the
    daemon, its snapshot. ``sims``: the SIM keeper's summaries."""

    pid: int
    modems: list[dict[str, Any]]
    sims: list[dict[str, Any]]
    uplink: dict[str, Any] | None
    tasks: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModemFacts:
    """The modem and its SIM. ``mode`` ``agent``: from the running agent (``session``, its
    modem session's summary); ``probe``: read by the doctor (``error`` says why there is no
    ``info``; ``contexts`` the PDP contexts). ``lifecycle``: the keeper's summary of the SIM in
    the modem (in ``probe`` mode the last one the agent recorded, if any). ``slot``: the
    modem's SIM slot name (``modem``, ``modem2``...; agent.core.modem_config.slot_name)."""

    mode: Mode
    port: str | None
    info: dict[str, Any] | None = None
    session: dict[str, Any] | None = None
    error: str | None = None
    contexts: tuple[PdpContextInfo, ...] | None = None
    lifecycle: dict[str, Any] | None = None
    slot: str = "modem"


def from_agent(view: AgentView, cfg: Config) -> list[ModemFacts]:
    """The modem facts of the running agent, one per modem in slot order: its session's
    summary and the keeper's summary of the SIM in that slot. A configured port the agent has
    no session for yet is a modem it cannot open yet; no modem at all: one without a port."""
    rows: list[tuple[str, str | None, dict[str, Any] | None]] = [
        (m.get("slot") or slot_name(i), m["port"], m) for i, m in enumerate(view.modems)]
    known = {port for _slot, port, _session in rows}
    rows += [(slot_name(i), p, None) for i, p in enumerate(cfg.modem.ports) if p not in known]
    rows.sort(key=lambda row: slot_order(row[0]))
    current = [s for s in view.sims if s.get("current")]
    out = []
    for slot, port, session in rows or [("modem", None, None)]:
        info = session["modem"] if session else None
        iccid = info["sim"]["iccid"] if info else None
        lc = next((s for s in current if s.get("slot") == slot), None) or next(
            (s for s in current if iccid and s["iccid"] == iccid), None)
        out.append(ModemFacts("agent", port, info, session, lifecycle=lc, slot=slot))
    return out
