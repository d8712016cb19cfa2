"""``simkeeper demo``: the agent end to end on this machine, with a live view.

Everything runs here, in temporary files: a simulated modem (``drivers.simulator``) plays a
scenario on a real pty; a local mosquitto listens on a free loopback port; the real daemon
(:class:`agent.daemon.Daemon`, in this process) owns the modem, the outbox and the uplink; a
little app publishes sample readings through the ingest socket, as any app on a gateway would;
and a subscriber shows what reaches the broker. The view refreshes until Ctrl-C or SIGTERM (a
clean stop, exit 0) or ``--duration`` seconds.

The tour (``drivers/simulator/scenarios/demo.toml``) is over in about 85 s: each step shows as
it happens, in the modem lines, the lifecycle of each of the modem's two SIMs and the events the
agent sends up (``sms-received``, ``network-reject`` with its cause, ``sim-switch``,
``network-recovered``, ``modem-reset``). The modem is dual-SIM: the keeper hears the network's
permanent reject of the SIM in use from its ``+CEREG`` URC at once, switches to the standby SIM
(activating it), tries the first SIM again after the policy's dwell and recheck (the demo's are
seconds; a gateway's are minutes to hours) and switches back when the network takes it again.

``--pace`` plays it faster (the tests do): at ``--pace 0.4`` every time of the scenario (its
steps' times, the modem's boot and SIM-busy times), the probe interval and the switch policy's
times are 0.4 of theirs (no less than the config's minimums), so the tour is over in about 35 s,
its steps in the same order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli.errors import CliError
from agent.core import config
from agent.core.tasks import wait_event
from agent.daemon import Daemon
from agent.fleet.localbroker import BrokerError, LocalBroker
from agent.telemetry.batch import BatchError, decode_batch
from drivers.simulator import SimulatedModem, load_scenario
from drivers.simulator.scenario import Scenario

DEMO_SCENARIO = Path(__file__).resolve().parents[2] / "drivers/simulator/scenarios/demo.toml"
CLEAR = "\x1b[H\x1b[2J"
DEVICE = "demo-gw"
APP_TOPIC = "demo/room1"
EVENTS_SHOWN = 6
LAST_SHOWN = 4  # the latest messages at the broker
PROBE_INTERVAL = 6.0  # s: [lifecycle] network_probe_interval, so the tour's resumption shows
MIN_PROBE_INTERVAL = 1.0  # s: the least the config takes
MIN_DWELL = 10.0  # s: [modem.dual_sim] for the tour (module doc)
RECHECK, MIN_RECHECK = 15.0, 10.0
SWITCH_TIMEOUT, MIN_SWITCH_TIMEOUT = 15.0, 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, default=DEMO_SCENARIO,
                        help="simulator scenario (default: the demo tour)")
    parser.add_argument("--interval", type=float, default=2.0, help="refresh period, s (default 2)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (0: until Ctrl-C)")
    parser.add_argument("--pace", type=_pace, default=1.0,
                        help="play the scenario's times (and the demo's network probe) at this"
                        " fraction of their length, in (0, 1] (default 1: as written)")


def _pace(text: str) -> float:
    """``--pace``: a number in (0, 1]; 1 is the tour as a person sees it."""
    try:
        pace = float(text)
    except ValueError:
        pace = math.nan
    if not 0 < pace <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text!r}")
    return pace


def paced(scenario: Scenario, pace: float) -> Scenario:
    """``scenario`` played ``1 / pace`` times as fast: its steps' times and its timing section
    (the modem's boot and SIM-busy times) times ``pace``; a step's own durations stay."""
    if pace == 1:
        return scenario
    return dataclasses.replace(
        scenario,
        steps=tuple(dataclasses.replace(step, at=step.at * pace) for step in scenario.steps),
        timing={key: seconds * pace for key, seconds in scenario.timing.items()},
    )


def _dual_sim(tour: Scenario, pace: float) -> str:
    """``[modem.dual_sim]`` for a tour with a second SIM: its switches within the tour's
    minute (a gateway's defaults are minutes and hours), the primary tried again every
    :data:`RECHECK` seconds (no less than the config takes)."""
    if tour.sim2 is None:
        return ""
    return ("[modem.dual_sim]\nenabled = true\n"
            f"min_dwell = {MIN_DWELL * pace}\nrecheck = {max(MIN_RECHECK, RECHECK * pace)}\n"
            f"switch_timeout = {max(MIN_SWITCH_TIMEOUT, SWITCH_TIMEOUT * pace)}\n")


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(demo(args.scenario, args.interval, args.duration, sys.stdout, args.pace))
    except BrokerError as exc:
        raise CliError(1, str(exc)) from None
    return 0


class _Watcher:
    """Subscribes to the device's topics; counts what arrives (paho's own thread: a viewer).
    ``{prefix}/{device}/#`` takes in ``events`` too: those are kept apart, the last few."""

    def __init__(self, port: int, base: str) -> None:
        self.readings: Counter[str] = Counter()
        self.last: deque[str] = deque(maxlen=LAST_SHOWN)
        self.events: deque[str] = deque(maxlen=EVENTS_SHOWN)
        self.status = "-"
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self._client.on_connect = lambda c, *_: c.subscribe(f"{base}/#", qos=1)
        self._client.on_message = self._on_message
        self._client.connect_async("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic.split("/", 2)[-1]
        with self._lock:
            if name == "status":
                self.status = msg.payload.decode(errors="replace")
            elif name == "telemetry":
                with contextlib.suppress(BatchError):
                    for r in decode_batch(bytes(msg.payload))["readings"]:
                        self.readings[r["topic"]] += 1
                        self.last.append(f"{r['id']:>14}  {r['topic']:<13} "
                                         f"{json.dumps(r['data'])[:60]}")
            elif name == "events":
                with contextlib.suppress(BatchError):
                    for r in decode_batch(bytes(msg.payload))["readings"]:
                        self.events.append(_event_line(r))
            elif name not in ("state", "usage"):  # both shown above, from the daemon itself
                self.last.append(f"{name:>14}  {msg.payload[:70].decode(errors='replace')}")

    def view(self) -> list[str]:
        with self._lock:
            counts = ", ".join(f"{t}: {n}" for t, n in sorted(self.readings.items()))
            return [f"status {self.status}; readings {counts or 'none yet'}", *self.last]

    def recent_events(self) -> list[str]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self._client.disconnect()  # first: it ends paho's loop at once (else a 1 s wait)
        self._client.loop_stop()


# An event's fields the view leaves out: its kind, a switch's ICCIDs (the lines above show the
# SIMs) and the modem's slot (the demo has one modem); a SIM's ICCID shows as its last digits
_UNSHOWN = frozenset({"kind", "iccid", "from_iccid", "to_iccid", "slot"})


def _event_line(reading: dict[str, Any]) -> str:
    """``HH:MM:SS kind  from->to reason=... field=value ...`` of one event as it arrived at the
    broker: a transition's ``detail`` flattened, its reason first (a line is cut at 80)."""
    data = reading.get("data")
    fields = dict(data) if isinstance(data, dict) else {"data": data}
    ts = fields.pop("ts", None)
    stamp = time.strftime("%H:%M:%S", time.localtime(ts if isinstance(ts, int | float)
                                                     else reading.get("ts", time.time())))
    detail = fields.pop("detail", None)
    fields.update(detail if isinstance(detail, dict) else {"detail": detail})
    iccid = fields.get("iccid")
    words = [f"..{iccid[-4:]}"] if isinstance(iccid, str) else []
    if {"from", "to"} <= fields.keys():
        words.append(f"{fields.pop('from')}->{fields.pop('to')}")
    if {"from_slot", "to_slot"} <= fields.keys():  # a dual-SIM switch
        words.append(f"slot {fields.pop('from_slot')}->{fields.pop('to_slot')}")
    for k, v in sorted(fields.items(), key=lambda kv: kv[0] != "reason"):
        if k not in _UNSHOWN and v not in (None, {}, [], ""):
            words.append(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}")
    return f"{stamp} {reading.get('topic', '?')}  {' '.join(words)}"


async def _sample_app(path: Path) -> None:
    """A sensor app: one reading a second over the ingest socket, each answered."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        n = 0
        while True:
            temp = round(21 + 2 * math.sin(n / 10), 2)
            line = {"topic": APP_TOPIC, "data": {"temp_c": temp, "n": n}}
            writer.write(json.dumps(line).encode() + b"\n")
            await reader.readline()
            n += 1
            await asyncio.sleep(1)
    finally:
        writer.close()


async def demo(scenario: Path, interval: float, duration: float, out: TextIO,
               pace: float = 1.0) -> None:
    started = time.monotonic()
    probe = max(MIN_PROBE_INTERVAL, PROBE_INTERVAL * pace)
    with (tempfile.TemporaryDirectory(prefix="simkeeper-demo-") as tmp,
          LocalBroker(Path(tmp), ["persistence false"]) as broker):
        directory, port = Path(tmp), broker.port
        link = directory / "modem"
        tour = paced(load_scenario(scenario), pace)
        async with SimulatedModem(scenario=tour, link=link):
            cfg = config.parse(
                f'device_id = "{DEVICE}"\n[modem]\nport = "{link}"\ndata_path = "agent"\n'
                f"poll_interval = {interval}\n{_dual_sim(tour, pace)}[health]\ninterval = 30.0\n"
                f"[lifecycle]\nnetwork_probe_interval = {probe}\n"
                f"[uplink]\nport = {port}\nbatch_max_latency = 1.0\n"
                "rate_messages_per_minute = 600\n"  # a lively view; the default is 60
                f'[store]\npath = "{directory / "state/simkeeper.db"}"\n'
                f'[ingest]\nsocket = "{directory / "ingest.sock"}"\n'
            )
            daemon = Daemon(cfg)
            stop = asyncio.Event()
            agent = asyncio.create_task(daemon.run(stop))
            serving = asyncio.create_task(daemon.serving.wait())
            await asyncio.wait([agent, serving], return_when=asyncio.FIRST_COMPLETED)
            if agent.done():
                serving.cancel()
                await agent  # raises why it could not start
            watcher = _Watcher(port, f"{cfg.uplink.prefix}/{DEVICE}")
            app = asyncio.create_task(_sample_app(cfg.ingest.socket))
            quit_ = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, quit_.set)
            try:
                while not quit_.is_set() and (not duration
                                              or time.monotonic() - started < duration):
                    _draw(out, started, port, daemon, watcher)
                    await wait_event(quit_, interval)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
                app.cancel()
                await asyncio.gather(app, return_exceptions=True)
                watcher.close()
                stop.set()
                await agent


WIDTH = 80  # the view fits an 80x40 terminal


def _draw(out: TextIO, started: float, port: int, daemon: Daemon, watcher: _Watcher) -> None:
    elapsed = f"{time.monotonic() - started:5.1f}s"
    lines = [f"simkeeper demo: agent {DEVICE}, broker 127.0.0.1:{port}, t+{elapsed}"
             "  (Ctrl-C stops)", ""]
    parts = daemon.parts
    if parts is None:  # not started yet, or stopped
        return
    for session in parts.modems.sessions.values():
        lines.append(f"modem {session.port}: {session.state}"
                     + (f" ({session.detail})" if session.detail else ""))
        if session.info:
            lines += _modem_lines(session.info)
        for iccid in [session.iccid] if session.iccid else []:
            report = parts.usage.report(iccid)
            lines.append(f"usage: {report['bytes_up']} B up, {report['bytes_down']} B down"
                         f" ({report['source']}), billed estimate {report['billed_estimate']} B")
    for label, sim in _sims(parts.keepers.summaries()):
        lines += ["", *_lifecycle_lines(sim, label)]
    count, size = parts.outbox.depth()
    up = parts.uplinks.state()
    events = watcher.recent_events()
    lines += [
        "",
        f"outbox: {count} readings waiting ({size} B)",
        f"uplink: {up['kind']} {up['state']}, {up['readings_sent']} readings sent",
        "",
        f"events (last {EVENTS_SHOWN}):" if events else "events: none yet",
        *(f"  {e}" for e in events),
        "",
        "at the broker:",
        *watcher.view(),
        "",
        f"watch it yourself: mosquitto_sub -p {port} -t 'simkeeper/#' -v",
    ]
    text = "\n".join(line if len(line) <= WIDTH else line[: WIDTH - 1] + "~" for line in lines)
    out.write((CLEAR if out.isatty() else "\n") + text + "\n")
    out.flush()


def _v(value: Any) -> str:
    return "-" if value is None else str(value)


def _modem_lines(info: dict[str, Any]) -> list[str]:
    """The ``modem info`` object in four lines."""
    sim, reg, op, sig = info["sim"], info["registration"], info["operator"], info["signal"]
    cause = f", reject cause {reg['reject_cause']}" if reg["reject_cause"] is not None else ""
    return [
        f"  {_v(info['manufacturer'])} {_v(info['model'])} {_v(info['revision'])},"
        f" IMEI {_v(info['imei'])}, radio {_v(info['radio'])}",
        f"  SIM {sim['state']}, ICCID {_v(sim['iccid'])}, IMSI {_v(sim['imsi'])}",
        f"  {reg['state']} {_v(reg['act'])} on {_v(op['name'])} ({_v(op['mcc_mnc'])}),"
        f" TAC {_v(reg['tac'] or reg['lac'])} cell {_v(reg['cell_id'])}{cause}",
        f"  signal RSSI {_v(sig['rssi_dbm'])} dBm, RSRP {_v(sig['rsrp_dbm'])} dBm,"
        f" RSRQ {_v(sig['rsrq_db'])} dB, SINR {_v(sig['sinr_db'])} dB",
    ]


def _countdown(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    return f"{days}d {rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def _sims(summaries: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    """The SIMs in the modems, from the keepers (the SIM in use, and a dual-SIM modem's
    standby SIM), each with its label: its modem's slot when there are several, and its SIM
    slot in a dual-SIM modem."""
    current = [s for s in summaries if s["current"]]
    if not current:
        return [("", None)]
    by_iccid = {s["iccid"]: s for s in summaries}
    shown: list[tuple[str, dict[str, Any] | None]] = []
    for sim in current:
        modem = f"{sim['slot']} " if len(current) > 1 else ""
        dual = sim["dual_sim"]
        if dual is None:
            shown.append((modem.strip(), sim))
            continue
        shown.append((f"{modem}slot {dual['sim_slot']} (in use)", sim))
        standby = by_iccid.get(dual["standby_iccid"])
        if standby is not None:
            shown.append((f"{modem}slot {3 - dual['sim_slot']} (standby)", standby))
    return shown


def _lifecycle_lines(sim: dict[str, Any] | None, label: str = "") -> list[str]:
    """A SIM, from its keeper: state, deadline countdown, suspension, verdict."""
    title = f"SIM lifecycle, {label}:" if label else "SIM lifecycle:"
    if sim is None:
        return [f"{title} no SIM seen yet"]
    if sim["activated_at"] is not None:
        deadline = "activated " + time.strftime("%Y-%m-%d %H:%M",
                                                time.localtime(sim["activated_at"]))
    elif sim["deadline"] is None:
        deadline = "no activation deadline known"
    elif sim["time_left"] is not None and sim["time_left"] > 0:
        deadline = f"deadline in {_countdown(sim['time_left'])}"
    elif sim["trusted_time"] in (None, "none", "untrusted"):
        deadline = "deadline: no trusted time, treated as due"
    else:
        deadline = "deadline passed"
    lines = [f"{title} {sim['iccid']} {sim['state']}",
             f"  {deadline} (trusted time: {_v(sim['trusted_time'])})"]
    susp = sim["suspension"]
    if susp is None:
        lines.append("  suspension: none" + ("" if sim["telemetry_allowed"]
                                              else "; telemetry held"))
    else:
        until = (", until " + time.strftime("%H:%M:%S", time.localtime(susp["until"]))
                 if susp["until"] else "")
        lines.append(f"  suspension: {susp['scope']} by {susp['source']}{until}"
                     + (f" ({susp['reason']})" if susp["reason"] else "")
                     + ("" if sim["telemetry_allowed"] else "; telemetry held"))
    verdict = sim["conformance"]
    if verdict is None:
        lines.append("  conformance: not checked yet")
    else:
        why = "; ".join(f"{f['check']}: {f['reason']}" for f in verdict["failures"])
        lines.append(f"  conformance: {'conforming' if verdict['conforming'] else 'NOT conforming'}"
                     f" ({verdict['policy']}, {_v(verdict['terminal'])})"
                     + (f": {why}" if why else ""))
    activation = sim["activation"]
    if sim["activated_at"] is None and activation and activation["attempts"]:
        lines.append(f"  activation: {activation['attempts']} attempts"
                     + (f", last error: {activation['last_error']}"
                        if activation["last_error"] else ""))
    return lines
