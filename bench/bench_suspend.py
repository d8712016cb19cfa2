"""Suspend latency: from a ``radio`` suspension order to the simulator seeing ``AT+CFUN=4``.

Two paths, everything in this process on one asyncio loop, the simulated modem (Quectel) on a
real pty, ``RUNS`` times each after the SIM is active (each run is resumed, and re-activated,
before the next):

- API: ``keeper.suspend("radio")`` on a :class:`agent.sim.keeper.SimKeeper` attached to the modem
  (goal of issue 3: <= 1 s);
- MQTT, for information: a signed ``suspend`` envelope published to a local mosquitto, through
  the whole daemon (:class:`agent.daemon.Daemon`: uplink, command processor, keeper).

The time of arrival is stamped when the simulator's line reader takes the command. Median and
p90 are printed; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

RUNS = int(os.environ.get("BENCH_SUSPEND_RUNS", "20"))
DEVICE = "gw-bench"


class Stamped(list[str]):
    """``SimulatedModem.commands`` with the arrival time of each line."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, line: str) -> None:
        self.at.append(time.perf_counter())
        super().append(line)

    def first(self, command: str, since: int) -> float | None:
        for i in range(since, len(self)):
            if self[i].upper() == command:
                return self.at[i]
        return None


async def _until(cond: Callable[[], Any], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError("gave up waiting")
        await asyncio.sleep(0.002)


async def _arrival(commands: Stamped, since: int) -> float:
    await _until(lambda: commands.first("AT+CFUN=4", since) is not None)
    found = commands.first("AT+CFUN=4", since)
    assert found is not None
    return found


def _figures(name: str, samples: list[float]) -> None:
    if not samples:
        print(f"{name}: no sample")
        return
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    print(f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms,"
          f" max {ms[-1]:.1f} ms (goal <= 1000 ms)", flush=True)


# -- the Python API ------------------------------------------------------------------------------


async def _api(root: Path) -> list[float]:
    from agent.core.config import LifecycleConfig
    from agent.core.store import Store
    from agent.core.trusted_time import TrustedClock
    from agent.sim.keeper import SimKeeper
    from drivers.channel import AtChannel
    from drivers.modem import Modem
    from drivers.simulator import SimulatedModem

    async def probe() -> None:  # the round trip is not what is measured here
        return None

    sim = SimulatedModem("quectel", boot_seconds=0.2, sim_busy_seconds=0.05)
    sim.commands = commands = Stamped()
    await sim.start()
    channel = await AtChannel.open(sim.path, timeout=2.0)
    store = Store(root / "api.db")
    keeper = SimKeeper(store, lambda *_a, **_k: None, lifecycle=LifecycleConfig(poll_interval=60),
                       clock=TrustedClock(synchronised=lambda: True), probe=probe,
                       register_poll=0.05)
    samples: list[float] = []
    try:
        profile = await Modem(channel).init()
        keeper.attach(channel, profile)
        keeper.start()

        def state() -> str | None:
            summary = keeper.summary()
            return None if summary is None else str(summary["state"])

        await _until(lambda: state() == "active")
        for _ in range(RUNS):
            since = len(commands)
            t0 = time.perf_counter()
            keeper.suspend("radio", reason="bench")
            samples.append(await _arrival(commands, since) - t0)
            await _until(lambda: sim.state.radio == 4)
            keeper.resume("bench")
            await _until(lambda: state() == "active" and sim.state.radio == 1)
    finally:
        await keeper.stop()
        await channel.close()
        store.close()
        await sim.close()
    return samples


# -- a signed command over MQTT, through the daemon ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _mosquitto(root: Path) -> Any:
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if binary is None:
        raise RuntimeError("mosquitto is not installed")
    port = _free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def _daemon(root: Path, port: int, modem: str, pub: Path) -> AsyncIterator[Any]:
    from agent.core.config import parse
    from agent.daemon import Daemon

    cfg = parse(
        f'device_id = "{DEVICE}"\n[modem]\nport = "{modem}"\ndata_path = "agent"\n'
        f'interface = "sk-bench-none"\n'
        f"[uplink]\nport = {port}\nreconnect_min = 0.1\nreconnect_max = 1.0\n"
        f'[store]\npath = "{root / "daemon.db"}"\n[ingest]\nsocket = "{root / "in.sock"}"\n'
        f'[commands]\noperator_key = "{pub}"\n'
        "[lifecycle]\npoll_interval = 60\nretry_base = 0.2\nretry_min = 0.1\n"
        "retry_urgent = 0.5\nretry_cap = 1\n")
    daemon = Daemon(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await _until(lambda: daemon.serving.is_set() and daemon.parts.uplinks.ready)
        yield daemon
    finally:
        stop.set()
        await task


async def _mqtt(root: Path) -> list[float]:
    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.fleet.sign import make_envelope
    from drivers.simulator import SimulatedModem

    key = Ed25519PrivateKey.generate()
    pub = root / "operator.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                  PublicFormat.SubjectPublicKeyInfo))
    samples: list[float] = []
    with _mosquitto(root) as port:
        link = root / "modem"
        async with SimulatedModem("quectel", link=link, boot_seconds=0.2,
                                  sim_busy_seconds=0.05) as sim:
            sim.commands = commands = Stamped()
            async with _daemon(root, port, str(link), pub) as daemon:
                client = mqtt.Client(CallbackAPIVersion.VERSION2)
                client.connect("127.0.0.1", port)
                client.loop_start()
                try:
                    def state() -> str | None:
                        summary = daemon.parts.keeper.summary()
                        return None if summary is None else str(summary["state"])

                    await _until(lambda: state() == "active")
                    topic = f"simkeeper/{DEVICE}/cmd"
                    for _ in range(RUNS):
                        order = make_envelope(key, DEVICE, "suspend", {"scope": "radio"})
                        payload = json.dumps(order)
                        since = len(commands)
                        t0 = time.perf_counter()
                        client.publish(topic, payload, qos=1)
                        samples.append(await _arrival(commands, since) - t0)
                        await _until(lambda: sim.state.radio == 4)
                        client.publish(topic, json.dumps(make_envelope(key, DEVICE, "resume")),
                                       qos=1)
                        await _until(lambda: state() == "active" and sim.state.radio == 1)
                finally:
                    client.loop_stop()
                    client.disconnect()
    return samples


def main() -> None:
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-suspend-") as tmp:
        root = Path(tmp)
        _figures("API keeper.suspend('radio') -> AT+CFUN=4", asyncio.run(_api(root)))
        try:
            samples = asyncio.run(_mqtt(root))
        except RuntimeError as exc:
            print(f"MQTT: skipped: {exc}")
            return
        _figures("MQTT signed suspend (publish) -> AT+CFUN=4", samples)


if __name__ == "__main__":
    main()
