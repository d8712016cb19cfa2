"""``simkeeper doctor [--config FILE] [--json]``: what is wrong with this gateway, and what to do.

Every modem is checked: each configured port (``[modem] port``, one or a list), or for
``"auto"`` each one the agent found (each AT port udev knows, when the agent is not running).
With the agent running (its runtime row, :func:`agent.cli.status.read_status`) the doctor never
opens a modem's port, which the agent owns: the modem, SIM and network facts are the agent's
(each modem session's last poll, its SIM keeper's summary). Without it, the doctor opens the
ports itself, as ``modem info`` does, reads the modems and closes them. Either way it makes its
own round trip to the broker and looks at the host. The checks: :mod:`agent.commands.diagnosis`.

Exit 0 when no check fails (warnings allowed), 1 when one does, 2 for a config it cannot read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from agent.cli.errors import CliError
from agent.cli.modem import PING_TIMEOUT
from agent.cli.status import read_status
from agent.commands.diagnosis import AgentView, ModemFacts, from_agent, render, worst
from agent.commands.diagnosis_host import agent_checks, holders_checks, link_checks, round_trip
from agent.commands.diagnosis_modem import every_modem
from agent.core import config
from agent.core.modem_config import slot_name
from agent.core.trusted_time import Source, ntp_synchronised
from drivers.channel import AtChannel
from drivers.errors import CommandTimeout, ModemError
from drivers.hotplug import classify
from drivers.modem import Modem


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object {device_id, mode,"
                        " status, checks} (default: one line a check)")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    report = asyncio.run(diagnose(cfg, config.resolve_path(args.config)))
    print(json.dumps(report) if args.json else _text(report))
    return 1 if report["status"] == "failure" else 0


async def diagnose(cfg: config.Config, config_path: Path) -> dict[str, Any]:
    """``{"device_id", "mode": "agent"|"probe", "status", "checks"}``: ``mode`` says where the
    modem facts came from, the running agent or the doctor's own probe of the ports. Every
    modem is checked; with several, each modem's checks carry its ``slot``."""
    status = _status(cfg)
    trip = asyncio.create_task(round_trip(cfg))
    known = [s["lifecycle"] for s in status["sims"] if s["lifecycle"]] if status else []
    view: AgentView | None = None
    if status is not None and status["running"]:
        view = AgentView(status["pid"], status["modems"], known, status["uplink"],
                         status["tasks"])
        facts = from_agent(view, cfg)
        holders = holders_checks((f.port for f in facts), view.pid)
    else:
        ports: list[str | None] = [*_ports(cfg)] or [None]
        holders = holders_checks(ports, None)  # before the doctor holds them itself
        facts = list(await asyncio.gather(*(_probe(cfg, port, slot_name(i), known)
                                            for i, port in enumerate(ports))))
    clock: Source | None = "ntp" if ntp_synchronised() else None  # else the agent's source
    if clock is None and view is not None:
        clock = next((f.lifecycle["trusted_time"] for f in facts
                      if f.lifecycle and f.lifecycle.get("trusted_time")), None)
    why = status["reason"] if status else f"no database at {cfg.store.path}"
    checks = [*every_modem(cfg, facts, holders), await trip, *link_checks(cfg, view, clock),
              *agent_checks(cfg, view, why, status["outbox"] if status else None, config_path)]
    return {"device_id": cfg.device_id, "mode": facts[0].mode, "status": worst(checks),
            "checks": checks}


def _status(cfg: config.Config) -> dict[str, Any] | None:
    """``status --json``'s object; None without a readable database (the store check says
    why)."""
    if not cfg.store.path.exists():
        return None
    try:
        return read_status(cfg.store.path, cfg.device_id)
    except sqlite3.Error:
        return None


def _ports(cfg: config.Config) -> list[str]:
    """The configured ports; for ``"auto"`` every AT port udev knows (as hotplug finds them),
    none when there is none."""
    if cfg.modem.ports:
        return list(cfg.modem.ports)
    try:
        import pyudev

        devices = pyudev.Context().list_devices(subsystem="tty")
        return [m.path for d in devices if (m := classify(dict(d.properties))) is not None]
    except Exception:  # no pyudev, no udev in a container: the same as nothing found
        return []


async def _probe(cfg: config.Config, port: str | None, slot: str,
                 known: list[dict[str, Any]]) -> ModemFacts:
    """The modem on ``port`` (in slot ``slot``) read by the doctor; ``known``: the SIM
    keeper's last summaries."""
    if port is None:
        return ModemFacts("probe", None, slot=slot)
    try:
        chan = await AtChannel.open(port, baudrate=cfg.modem.baud, recover=False)
    except ModemError as exc:
        return ModemFacts("probe", port, error=str(exc), slot=slot)
    try:
        if not await _answers(chan):
            return ModemFacts("probe", port, error=f"the modem on {port} does not answer AT"
                              " commands", slot=slot)
        modem = Modem(chan)
        await modem.init()
        info = await modem.info()
        try:
            contexts = await modem.pdp_contexts()
        except ModemError:
            contexts = None
    except ModemError as exc:
        return ModemFacts("probe", port, error=f"the modem on {port} failed: {exc}", slot=slot)
    finally:
        await chan.close()
    iccid = info["sim"]["iccid"]
    lifecycle = next((s for s in known if iccid and s["iccid"] == iccid), None)
    return ModemFacts("probe", port, info, contexts=contexts, lifecycle=lifecycle, slot=slot)


async def _answers(chan: AtChannel) -> bool:
    for _attempt in range(2):
        try:
            await chan.command("AT", timeout=PING_TIMEOUT)
        except CommandTimeout:
            continue
        except ModemError:
            pass  # it answered, if oddly: a modem is there
        return True
    return False


def _text(report: dict[str, Any]) -> str:
    checks = report["checks"]
    several = any(c.get("slot") for c in checks)
    source = (f"modem facts from the running agent ({'their ports' if several else 'its port'}"
              " left alone)" if report["mode"] == "agent" else "the agent is not running: the"
              f" doctor read the {'modems' if several else 'modem'} itself")
    failed = sum(c["status"] == "failure" for c in checks)
    warned = sum(c["status"] == "warning" for c in checks)
    return (f"simkeeper doctor: {report['device_id']}, {source}\n{render(checks)}\n"
            f"{failed} failure(s), {warned} warning(s)")
