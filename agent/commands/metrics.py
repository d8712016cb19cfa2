"""The agent's Prometheus metrics (``[metrics]``, README "Metrics for Prometheus"): the
outbox, the uplink, each modem (label ``port``), each SIM (label ``iccid``), the commands'
results and the supervised parts, from the same snapshot as ``simkeeper status`` and the
retained ``state`` (agent.telemetry.state.Snapshot), the usage reports and the outbox's own
counts; written out by agent.telemetry.exposition.

Conventions (https://prometheus.io/docs/practices/naming/): every name starts ``simkeeper_``
and ends in its base unit (``_seconds``, ``_bytes``, ``_ratio``, ``_dbm``, ``_db``,
``_celsius``) or in what it counts (``_readings``); counters, and only counters, end
``_total``. A state is an enum as labels: one gauge series per possible state, 1 for the
current one and 0 for the others (the Python client's ``Enum``, OpenMetrics' StateSet), so
``simkeeper_sim_state{state="expired"} == 1`` alerts and a series never vanishes with a state
change. A value the agent does not know (no signal reading yet) has no sample: null is never a
made-up number.

Counters count since the agent started (Prometheus takes a restart as a counter reset), except
the outbox's drops, counted since the database was created.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from agent import __version__
from agent.commands.processor import CommandProcessor, Result
from agent.core.metrics_config import MetricsConfig
from agent.core.tasks import Work
from agent.sim.lifecycle import STATES
from agent.telemetry.exposition import Family, MetricsServer, keep_textfile, render
from agent.telemetry.outbox import Outbox
from agent.telemetry.reading import STREAMS
from agent.telemetry.state import Snapshot
from drivers.parsers.network import RegState

# The states and reasons each enum shows even when none is current (a new one is shown too):
MODEM_STATES = ("opening", "ready", "hung", "resetting", "lost", "stopped")  # modem.session
UPLINK_STATES = ("connecting", "connected", "failing", "stopped")  # telemetry.uplinks
REGISTRATION_STATES: tuple[str, ...] = get_args(RegState)
DROP_REASONS = ("max_age", "max_bytes")  # telemetry.outbox
RESULT_STATUSES = ("ok", "rejected", "failed")  # commands.processor
SIGNALS = (  # modem info "signal" key, metric, help
    ("rssi_dbm", "simkeeper_modem_rssi_dbm", "Received signal strength (RSSI, +CSQ), dBm."),
    ("rsrp_dbm", "simkeeper_modem_rsrp_dbm", "LTE reference signal received power, dBm."),
    ("rsrq_db", "simkeeper_modem_rsrq_db", "LTE reference signal received quality, dB."),
    ("sinr_db", "simkeeper_modem_sinr_db", "Signal to interference plus noise ratio, dB."),
)


class CountingProcessor(CommandProcessor):
    """The command processor, counting its answers by status (``results``), whichever way
    the command came (MQTT or SMS)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: Counter[str] = Counter()

    async def handle(self, payload: bytes, *, names: Collection[str] | None = None,
                     via: str = "MQTT") -> Result:
        answer = await super().handle(payload, names=names, via=via)
        self.results[answer["status"]] += 1
        return answer


@dataclass(frozen=True, slots=True)
class View:
    """Everything the metrics show, gathered at once."""

    device_id: str
    snapshot: Snapshot
    usage: list[dict[str, Any]]  # the usage report of each SIM (agent.usage.meter)
    outbox: Mapping[str, tuple[int, int]]  # stream: (readings, bytes) waiting
    drops: Mapping[str, tuple[int, int]]  # reason: (readings, bytes) dropped
    results: Mapping[str, int]  # command results by status


def _enum(family: Family, states: Iterable[str], current: str, **labels: str) -> None:
    for state in dict.fromkeys([*states, current]):
        family.add(int(state == current), **labels, state=state)


def families(view: View) -> list[Family]:
    """Every metric family of ``view``, in a fixed order."""
    return [
        *_agent(view),
        *_outbox(view),
        *_uplink(view.snapshot.uplink),
        *_modems(view.snapshot.modems),
        *_sims(view.snapshot.sims, view.usage),
    ]


def _agent(view: View) -> list[Family]:
    info = Family("simkeeper_info", "gauge", "The agent: its device id and version (always 1).")
    info.add(1, device_id=view.device_id, version=__version__)
    results = Family("simkeeper_command_results_total", "counter",
                     "Signed commands answered (MQTT and SMS), by result status.")
    for status in dict.fromkeys([*RESULT_STATUSES, *view.results]):
        results.add(view.results.get(status, 0), status=status)
    restarts = Family("simkeeper_task_restarts_total", "counter",
                      "Times a supervised part of the agent failed and was started again.")
    for name, task in view.snapshot.tasks.items():
        restarts.add(task["restarts"], task=name)
    return [info, results, restarts]


def _outbox(view: View) -> list[Family]:
    readings = Family("simkeeper_outbox_readings", "gauge",
                      "Readings waiting in the outbox to go up, by stream.")
    size = Family("simkeeper_outbox_bytes", "gauge",
                  "Bytes of the readings waiting in the outbox, by stream.")
    for stream in STREAMS:
        count, nbytes = view.outbox.get(stream, (0, 0))
        readings.add(count, stream=stream)
        size.add(nbytes, stream=stream)
    dropped = Family("simkeeper_outbox_dropped_readings_total", "counter",
                     "Readings the outbox dropped to keep its bounds (since the database was"
                     " created), by reason.")
    dropped_bytes = Family("simkeeper_outbox_dropped_bytes_total", "counter",
                           "Bytes of the readings the outbox dropped, by reason.")
    for reason in dict.fromkeys([*DROP_REASONS, *view.drops]):
        count, nbytes = view.drops.get(reason, (0, 0))
        dropped.add(count, reason=reason)
        dropped_bytes.add(nbytes, reason=reason)
    return [readings, size, dropped, dropped_bytes]


def _uplink(up: Mapping[str, Any]) -> list[Family]:
    state = Family("simkeeper_uplink_state", "gauge",
                   "The uplink's state (1 for the current one): connecting, connected, failing"
                   " (the Unified Endpoint's last POST failed), stopped.")
    _enum(state, UPLINK_STATES, up["state"], kind=up["kind"])
    attempts = Family("simkeeper_uplink_connect_attempts_total", "counter",
                      "MQTT connection attempts since the agent started (reconnects: all but"
                      " the first).")
    attempts.add(up["connect_attempts"])
    sent = Family("simkeeper_uplink_readings_sent_total", "counter",
                  "Readings delivered (PUBACK or a 2xx), since the agent started.")
    sent.add(up["readings_sent"])
    batches = Family("simkeeper_uplink_batches_sent_total", "counter",
                     "Batches delivered, since the agent started.")
    batches.add(up["batches_sent"])
    return [state, attempts, sent, batches]


def _modems(modems: list[dict[str, Any]]) -> list[Family]:
    state = Family("simkeeper_modem_state", "gauge",
                   "Each modem session's state (1 for the current one).")
    registration = Family("simkeeper_modem_registration_state", "gauge",
                          "Each modem's network registration as of its last poll (1 for the"
                          " current one).")
    signals = [(key, Family(name, "gauge", text)) for key, name, text in SIGNALS]
    temperature = Family("simkeeper_modem_temperature_celsius", "gauge",
                         "The module's hottest sensor as of the last poll, where it reports"
                         " one.")
    reopens = Family("simkeeper_modem_reopens_total", "counter",
                     "Times the modem's port was opened again after it closed or vanished.")
    for m in modems:
        port = m["port"]
        _enum(state, MODEM_STATES, m["state"], port=port)
        reopens.add(m["reopens"], port=port)
        temperature.add(m["temperature_c"], port=port)
        if (info := m["modem"]) is None:
            continue  # not polled yet
        if reg := info["registration"]["state"]:
            _enum(registration, REGISTRATION_STATES, reg, port=port)
        for key, family in signals:
            family.add(info["signal"][key], port=port)
    return [state, registration, *(f for _, f in signals), temperature, reopens]


def _sims(sims: list[dict[str, Any]], usage: list[dict[str, Any]]) -> list[Family]:
    state = Family("simkeeper_sim_state", "gauge",
                   "Each SIM's lifecycle state as the SIM keeper holds it (1 for the current"
                   " one).")
    current = Family("simkeeper_sim_current", "gauge", "1 for the SIM in the modem, else 0.")
    deadline = Family("simkeeper_sim_activation_deadline_timestamp_seconds", "gauge",
                      "A SIM's activation deadline, Unix time, until it is activated.")
    left = Family("simkeeper_sim_activation_time_left_seconds", "gauge",
                  "Seconds to a SIM's activation deadline by trusted time, until it is"
                  " activated; at most 0 without trusted time.")
    for sim in sims:
        iccid = sim["iccid"]
        _enum(state, STATES, sim["state"], iccid=iccid)
        current.add(int(sim["current"]), iccid=iccid)
        if sim["activated_at"] is None:
            deadline.add(sim["deadline"], iccid=iccid)
            left.add(sim["time_left"], iccid=iccid)
    used = Family("simkeeper_sim_usage_bytes", "gauge",
                  "Bytes the SIM moved in its current billing period, by direction.")
    billed = Family("simkeeper_sim_usage_billed_bytes", "gauge",
                    "The billed estimate of the current period: bytes plus packet headers.")
    plan = Family("simkeeper_sim_plan_bytes", "gauge", "The SIM's plan cap per period, bytes.")
    share = Family("simkeeper_sim_plan_used_ratio", "gauge",
                   "The share of the plan used this period (billed estimate / plan), as the"
                   " plan cap counts it.")
    for report in usage:
        iccid = report["iccid"]
        used.add(report["bytes_up"], iccid=iccid, direction="up")
        used.add(report["bytes_down"], iccid=iccid, direction="down")
        billed.add(report["billed_estimate"], iccid=iccid)
        plan.add(report["plan_bytes"], iccid=iccid)
        share.add(report["share_used"], iccid=iccid)
    return [state, current, deadline, left, used, billed, plan, share]


class Metrics:
    """The metrics of a running agent and the parts that write them out (each only where
    ``[metrics]`` asks for it)."""

    def __init__(self, cfg: MetricsConfig, device_id: str, *, snapshot: Callable[[], Snapshot],
                 usage: Callable[[], list[dict[str, Any]]], outbox: Outbox,
                 results: Mapping[str, int]) -> None:
        self._cfg = cfg
        self._device_id = device_id
        self._snapshot = snapshot
        self._usage = usage
        self._outbox = outbox
        self._results = results

    def view(self) -> View:
        return View(self._device_id, self._snapshot(), self._usage(),
                    {s: self._outbox.depth(s) for s in STREAMS}, self._outbox.drops(),
                    dict(self._results))

    def text(self) -> str:
        """The exposition, as of now."""
        return render(families(self.view()))

    def parts(self) -> dict[str, Work]:
        """The supervised parts ``[metrics]`` asks for, by name: the textfile, the server."""
        cfg = self._cfg
        parts: dict[str, Work] = {}
        if (path := cfg.textfile) is not None:
            parts["metrics textfile"] = lambda: keep_textfile(path, cfg.interval, self.text)
        if (address := cfg.address) is not None:
            parts["metrics http"] = MetricsServer(*address, self.text).serve
        return parts
