"""``simkeeper fleet simulate N``: N complete agents in ONE process, against one broker.

Each agent is a real :class:`agent.daemon.Daemon` with its own directory (``config.toml``,
SQLite store, ingest socket), device id ``gw-00001``... and its own
:class:`drivers.simulator.SimulatedModem` on its own pty (personalities rotate: quectel,
simcom, ublox; each SIM has its own ICCID and IMSI). All of them share one asyncio loop, as the
agent core allows: nothing in it is global. The broker is the one given (``--broker``) or a
local mosquitto on a free loopback port; an operator key pair is made in the fleet directory
and pinned by every agent, so signed commands work (``fleet send --key DIR/operator.key``).
The agents and their fleet are in agent.fleet.simulate_fleet; the measurements and the report
in agent.fleet.simulate_report; the broker is an agent.fleet.localbroker.LocalBroker.

To fit a thousand agents on two cores the per-agent periods are long (modem, keeper and health
polls every ``poll`` seconds, usage reports hourly), agents start in waves (no thundering herd
of pty opens and connects), and each agent's sample app writes one reading every
``telemetry`` seconds through the ingest socket (0: none). RLIMIT_NOFILE is raised to its hard
limit; a fleet that cannot fit (file descriptors, ptys) is refused before anything starts.

``--report`` measures, then stops (or runs on until ``--duration``):

- steady phase: broker messages per second (mosquitto's ``$SYS/broker/publish/messages/...``
  and ``$SYS/broker/messages/...``, PUBLISH and all packets, received and sent; a wildcard
  subscriber's own count by topic), and the process's CPU;
- command round trip: signed ``get-state`` commands (agent.fleet.sign), publish to
  ``cmd/result``: a sample one at a time, then one to every device at once;
- connect storm (local broker only): SIGKILL the broker, keep it down ``down`` seconds, start
  it again on the same port and record when each agent's uplink is ready again; the spread
  (percentiles and a 1 s histogram) is the uplink's full-jitter backoff at work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from agent.fleet.localbroker import BrokerError, LocalBroker, mosquitto_binary
from agent.fleet.mqtt import FleetError
from agent.fleet.simulate_fleet import Fleet, Options, device_id
from agent.fleet.simulate_report import (
    Observer,
    Report,
    measure_commands,
    measure_steady,
    measure_storm,
    rss_mib,
    settle,
)

# Open files per agent: store (database, -wal, -shm, the read-only connection's database), the
# outbox's journal, ingest listener, MQTT socket and paho's wake-up socket pair, the modem's pty
# (master, and the slave the simulator holds), the agent's end of the pty. Measured before the
# journal: 14 per agent with the sample app (N = 1000).
FDS_PER_AGENT = 12
FDS_APP = 2  # an ingest connection while the sample app writes (both ends)
FDS_BASE = 128  # the interpreter, the operator's client, the broker pipe, slack


# -- capacity -----------------------------------------------------------------------------------


def raise_nofile() -> int:
    """RLIMIT_NOFILE's soft limit raised to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fds_per_agent(telemetry: float) -> int:
    return FDS_PER_AGENT + (FDS_APP if telemetry > 0 else 0)


def check_capacity(n: int, telemetry: float) -> int:
    """Raise the open-files limit and refuse (FleetError, one line) a fleet that cannot fit."""
    limit = raise_nofile()
    per = fds_per_agent(telemetry)
    need = FDS_BASE + n * per
    if need > limit:
        fits = max(0, (limit - FDS_BASE) // per)
        raise FleetError(
            f"N={n} needs about {need} open files ({per} per agent) but RLIMIT_NOFILE allows"
            f" {limit}: at most N={fits} fits (raise the hard limit: ulimit -Hn, LimitNOFILE=)")
    try:
        pty_max = int(Path("/proc/sys/kernel/pty/max").read_text())
        pty_used = int(Path("/proc/sys/kernel/pty/nr").read_text())
    except (OSError, ValueError):
        return limit
    if pty_used + n > pty_max:
        raise FleetError(f"N={n} simulated modems need {n} ptys but only {pty_max - pty_used} of"
                         f" {pty_max} are free (kernel.pty.max)")
    return limit


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


# -- the broker ---------------------------------------------------------------------------------


def fleet_broker(directory: Path) -> LocalBroker:
    """mosquitto on a free loopback port, its config and log in ``directory``; ``$SYS`` every
    second. It inherits our raised RLIMIT_NOFILE."""
    return LocalBroker(directory, ["persistence false", "sys_interval 1", "set_tcp_nodelay true",
                                   "max_queued_messages 10000"],
                       binary=mosquitto_binary(", or give --broker HOST:PORT"),
                       log=directory / "mosquitto.log")


# -- the command --------------------------------------------------------------------------------


def _quiet_agents() -> None:
    """A thousand agents each warning that the broker went away is noise: unless more was asked
    (--log-level INFO), only their errors are shown."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        for name in ("agent", "drivers"):
            logging.getLogger(name).setLevel(logging.ERROR)


def simulate(opts: Options) -> int:
    if opts.n < 1:
        raise FleetError("N must be at least 1")
    check_capacity(opts.n, opts.telemetry)
    _quiet_agents()
    base = opts.directory
    try:
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
            return asyncio.run(_main(opts, base))
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        with tempfile.TemporaryDirectory(prefix="simkeeper-fleet-", dir=shm) as tmp:
            return asyncio.run(_main(opts, Path(tmp)))
    except BrokerError as exc:  # the local mosquitto: not installed, or it would not start
        raise FleetError(str(exc)) from None


async def _main(opts: Options, root: Path) -> int:
    out = opts.out
    loop = asyncio.get_running_loop()
    started = loop.time()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    broker: LocalBroker | None = None
    observer: Observer | None = None
    fleet: Fleet | None = None
    try:
        if opts.broker is None:
            broker = fleet_broker(root)
            await broker.start_async()
            host, port = "127.0.0.1", broker.port
        else:
            host, port = opts.broker
        observer = Observer(host, port, opts.prefix)
        observer.start()
        fleet = Fleet(opts, root, host, port)
        print(f"simkeeper fleet simulate: {opts.n} agents in {root}, broker {host}:{port}"
              f"{' (local mosquitto)' if broker else ''}", file=out, flush=True)
        try:
            report = await _run(opts, fleet, observer, broker, stop)
        except _Stopped:
            return 0
        print("\n".join(report.lines() if opts.report else report.lines()[:1]), file=out,
              flush=True)
        if opts.duration or not opts.report:
            print(f"running (Ctrl-C stops); try: simkeeper fleet send {device_id(1)} get-state"
                  f" --key {fleet.operator_key_path} --broker {host}:{port}", file=out,
                  flush=True)
            left = opts.duration - (loop.time() - started) if opts.duration else None
            if left is None or left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), left)
        return 1 if report.storm_missing else 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if fleet is not None:
            await fleet.stop()
        if observer is not None:
            await observer.close()
        if broker is not None:
            broker.stop()


async def _run(opts: Options, fleet: Fleet, observer: Observer, broker: LocalBroker | None,
               stop: asyncio.Event) -> Report:
    loop = asyncio.get_running_loop()
    out = opts.out
    t0 = loop.time()
    report = Report(opts.n)
    fds_before = open_files()

    def progress(count: int) -> None:
        if count % 250 == 0 or count == opts.n:
            print(f"  {count}/{opts.n} agents started ({loop.time() - t0:.1f} s)", file=out,
                  flush=True)

    await _stoppable(fleet.start(progress), stop)
    await _stoppable(fleet.wait_online(max(60.0, opts.n / 10)), stop)
    await _stoppable(fleet.wait_modems(max(60.0, opts.n / 10)), stop)
    report.started_s = loop.time() - t0
    report.online = sum(a.online for a in fleet.agents)
    report.modems_ready = sum(a.modem_ready for a in fleet.agents)
    report.fds = open_files()
    report.fds_fleet = report.fds - fds_before
    report.threads = threading.active_count()
    report.rss_mib = rss_mib()
    if not opts.report:
        return report
    await _stoppable(observer.ready.wait(), stop)
    report.settle_s = await _stoppable(settle(observer, opts.n), stop)
    await _stoppable(measure_steady(observer, opts.steady, report), stop)
    await _stoppable(measure_commands(fleet, observer, opts.sample, report), stop)
    if broker is None:
        report.storm_skipped = "the broker was given with --broker: not ours to kill"
    else:
        await _stoppable(measure_storm(fleet, broker, opts.down, report), stop)
    return report


class _Stopped(Exception):
    pass


async def _stoppable(work: Any, stop: asyncio.Event) -> Any:
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Stopped
    return task.result()
