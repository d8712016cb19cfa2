"""Prometheus metrics (``[metrics]``): the exposition rendered from a snapshot and read back by
Prometheus's own parser (``prometheus_client``; ``promtool check metrics`` too where Debian's
``prometheus`` package is installed), the naming conventions, hostile label values, the
textfile replaced atomically, the HTTP server's answers, and a real agent (simulated modem,
mosquitto) whose textfile and ``/metrics`` agree with ``simkeeper status --json``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client.parser import text_string_to_metric_families

from agent.commands.metrics import View, families
from agent.core.config import ConfigError, parse
from agent.fleet.localbroker import free_port
from agent.fleet.sign import make_envelope
from agent.telemetry.exposition import MetricsServer, render, write_textfile
from agent.telemetry.state import Snapshot
from tests.broker import WAIT, Broker, until
from tests.test_daemon import DEVICE, online, running, send_command, until_async

HOSTILE_PORT = '/dev/serial/by-id/usb-"Quectel"\\EC25\nif02'
ICCID = "8981100000000000001"
UNITS = ("_seconds", "_bytes", "_ratio", "_dbm", "_db", "_celsius", "_readings")
UNITLESS = ("_state", "_info", "simkeeper_sim_current")  # enums, info, a 0/1 flag
LAST = "# TYPE simkeeper_sim_plan_used_ratio gauge\n"  # the last family's header
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def modem(port: str = HOSTILE_PORT, polled: bool = True) -> dict[str, Any]:
    info = {"registration": {"state": "roaming"}, "signal": {
        "rssi_dbm": -71, "ber": 0, "rsrp_dbm": -98.5, "rsrq_db": -11.0, "sinr_db": None}}
    return {"port": port, "state": "ready" if polled else "opening", "since": 1.0,
            "detail": None, "temperature_c": 41.5 if polled else None, "reopens": 2,
            "modem": info if polled else None}


def view(**changes: Any) -> View:
    sims = [
        {"iccid": ICCID, "current": True, "state": "awaiting-activation", "deadline": 1.9e9,
         "activated_at": None, "time_left": 86400.5},
        {"iccid": "8981100000000000002", "current": False, "state": "active",
         "deadline": 1.8e9, "activated_at": 1.7e9, "time_left": None},
    ]
    uplink = {"kind": "mqtt", "state": "connected", "connect_attempts": 3,
              "readings_sent": 120, "batches_sent": 7}
    tasks = {"modem " + HOSTILE_PORT: {"restarts": 1}, "state": {"restarts": 0}}
    usage = [{"iccid": ICCID, "bytes_up": 1000, "bytes_down": 2500, "billed_estimate": 4000,
              "plan_bytes": 10_000, "share_used": 0.4}]
    return View(**{"device_id": "gw-0001", "usage": usage, "outbox": {"telemetry": (5, 640)},
                   "snapshot": Snapshot(modems=[modem()], uplink=uplink, sims=sims, tasks=tasks),
                   "drops": {"max_bytes": (2, 90)}, "results": {"ok": 4, "rejected": 1},
                   **changes})


def series(text: str) -> Series:
    """Every sample of the exposition, parsed by Prometheus's client library."""
    found: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in found, f"duplicate series {key}"
            found[key] = s.value
    return found


def at(found: Series, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def check_conventions(text: str) -> None:
    """Names, types, units, HELP for every family, enums summing to 1, no duplicates."""
    assert text.endswith("\n")
    series(text)
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        assert family.type in ("gauge", "counter"), family.name
        assert f"# HELP {family.name}" in text and f"# TYPE {family.name}" in text
        enums: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            assert re.fullmatch(r"simkeeper_[a-z0-9_]+", s.name), s.name
            assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", k) for k in s.labels), s.labels
            if family.type == "counter":
                assert s.name == family.name + "_total", s.name
            else:
                assert not s.name.endswith("_total"), s.name
                assert s.name.endswith(UNITS + UNITLESS), f"{s.name}: no unit"
            if s.name.endswith("_state"):
                rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "state"))
                enums[rest] = enums.get(rest, 0) + s.value
        assert all(total == 1 for total in enums.values()), (family.name, enums)


# -- rendering ---------------------------------------------------------------------------------


def test_rendered_from_a_snapshot_and_read_back_by_prometheus() -> None:
    text = render(families(view()))
    check_conventions(text)
    found = series(text)
    port = {"port": HOSTILE_PORT}  # quotes, a backslash and a newline come back unchanged
    signals = ("rssi_dbm", "rsrp_dbm", "rsrq_db", "sinr_db")  # SINR unknown: no sample
    assert [at(found, f"simkeeper_modem_{s}", **port) for s in signals] == [-71, -98.5, -11, None]
    assert at(found, "simkeeper_modem_temperature_celsius", **port) == 41.5
    assert at(found, "simkeeper_modem_reopens_total", **port) == 2
    assert at(found, "simkeeper_modem_state", **port, state="ready") == 1
    assert at(found, "simkeeper_modem_state", **port, state="hung") == 0
    assert at(found, "simkeeper_modem_registration_state", **port, state="roaming") == 1
    assert at(found, "simkeeper_task_restarts_total", task="modem " + HOSTILE_PORT) == 1
    assert at(found, "simkeeper_sim_state", iccid=ICCID, state="awaiting-activation") == 1
    assert at(found, "simkeeper_sim_state", iccid=ICCID, state="expired") == 0
    assert at(found, "simkeeper_sim_current", iccid=ICCID) == 1
    assert at(found, "simkeeper_sim_activation_time_left_seconds", iccid=ICCID) == 86400.5
    assert at(found, "simkeeper_sim_activation_deadline_timestamp_seconds", iccid=ICCID) == 1.9e9
    activated = "8981100000000000002"  # no deadline binds it any more
    assert at(found, "simkeeper_sim_activation_time_left_seconds", iccid=activated) is None
    assert at(found, "simkeeper_sim_state", iccid=activated, state="active") == 1
    assert at(found, "simkeeper_sim_usage_bytes", iccid=ICCID, direction="down") == 2500
    assert at(found, "simkeeper_sim_usage_billed_bytes", iccid=ICCID) == 4000
    assert at(found, "simkeeper_sim_plan_bytes", iccid=ICCID) == 10_000
    assert at(found, "simkeeper_sim_plan_used_ratio", iccid=ICCID) == 0.4
    assert [at(found, "simkeeper_outbox_readings", stream=s) for s in ("telemetry", "events")] \
        == [5, 0]
    assert at(found, "simkeeper_outbox_bytes", stream="telemetry") == 640
    assert at(found, "simkeeper_outbox_dropped_readings_total", reason="max_bytes") == 2
    assert at(found, "simkeeper_outbox_dropped_readings_total", reason="max_age") == 0
    assert at(found, "simkeeper_uplink_state", kind="mqtt", state="connected") == 1
    assert at(found, "simkeeper_uplink_connect_attempts_total") == 3
    assert at(found, "simkeeper_uplink_readings_sent_total") == 120
    assert [at(found, "simkeeper_command_results_total", status=s)
            for s in ("ok", "rejected", "failed")] == [4, 1, 0]
    assert at(found, "simkeeper_info", device_id="gw-0001", version="0.1.0") == 1


def test_unknown_values_have_no_sample_and_new_states_still_show() -> None:
    snap = view().snapshot
    uplink = {**snap.uplink, "state": "a-state-added-later"}
    text = render(families(view(snapshot=Snapshot(
        modems=[modem("/dev/ttyUSB2", polled=False)], uplink=uplink, sims=[], tasks={}))))
    check_conventions(text)
    found = series(text)
    names = {name for name, _ in found}  # the modem is not polled yet:
    assert not names & {"simkeeper_modem_registration_state", "simkeeper_modem_rssi_dbm",
                        "simkeeper_modem_temperature_celsius"}
    assert at(found, "simkeeper_modem_state", port="/dev/ttyUSB2", state="opening") == 1
    assert at(found, "simkeeper_uplink_state", kind="mqtt", state="a-state-added-later") == 1
    assert at(found, "simkeeper_uplink_state", kind="mqtt", state="connected") == 0


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian's prometheus package)")
def test_promtool_accepts_the_exposition() -> None:
    done = subprocess.run(["promtool", "check", "metrics"], input=render(families(view())),
                          capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the textfile and the server -----------------------------------------------------------


def test_the_textfile_is_replaced_whole_never_seen_in_part(tmp_path: Path) -> None:
    path = tmp_path / "simkeeper.prom"
    small, large = render(families(view())), render(families(view(usage=[
        {"iccid": f"89811000000000{i:05d}", "bytes_up": i, "bytes_down": i,
         "billed_estimate": i, "plan_bytes": None, "share_used": None} for i in range(300)])))
    write_textfile(path, small)
    stop = threading.Event()

    def writer() -> None:  # large, small, large, ... until the reader has seen enough
        for i in itertools.count(1):
            if stop.is_set():
                return
            write_textfile(path, large if i % 2 else small)

    thread = threading.Thread(target=writer)
    thread.start()
    changes, partial, last = 0, 0, small
    try:
        deadline = time.monotonic() + WAIT  # a hang guard only
        while changes < 200 and time.monotonic() < deadline:
            text = path.read_text()
            if text not in (small, large):
                partial += 1
            elif text != last:
                changes, last = changes + 1, text
    finally:
        stop.set()
        thread.join()
    assert partial == 0
    assert changes == 200, "the reader saw the file change while it read"
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["simkeeper.prom"]


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """One raw request; (status line, headers, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, body


async def test_the_server_answers_metrics_and_nothing_else() -> None:
    text = render(families(view()))
    server = MetricsServer("127.0.0.1", 0, lambda: text, timeout=1.0, max_clients=2)
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.bound is not None, "the server listening")
        assert server.bound is not None
        port = server.bound[1]
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert body.decode() == text and int(headers["Content-Length"]) == len(body)
        status, headers, body = await http(port, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b""
        assert (await http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        status, headers, _ = await http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
        assert (await http(port, huge))[0].startswith("HTTP/1.1 431")
        # Two clients that say nothing hold both places until their time is up; meanwhile a
        # third is closed at once, and once they are dropped the next one is served.
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await until(lambda: len(server.clients) == 2, "both silent clients accepted")
        assert (await http(port, b""))[0] == ""
        for reader, writer in silent:
            assert await asyncio.wait_for(reader.read(), WAIT) == b""  # dropped
            writer.close()
        status, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body.decode() == text
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_metrics_config_keys_and_refusals() -> None:
    metrics = parse('device_id = "g"\n[metrics]\ntextfile = "/run/simkeeper/simkeeper.prom"\n'
                    'interval = 15\nlisten = "[::1]:9101"\n').metrics
    assert (metrics.textfile, metrics.interval, metrics.address) == (
        Path("/run/simkeeper/simkeeper.prom"), 15, ("::1", 9101))
    assert parse('device_id = "g"').metrics.address is None
    remote = 'device_id = "g"\n[metrics]\nlisten = "0.0.0.0:9101"\n'
    with pytest.raises(ConfigError, match=r"metrics\.listen: 0\.0\.0\.0 is not a loopback"):
        parse(remote)
    assert parse(remote + "allow_remote = true\n").metrics.address == ("0.0.0.0", 9101)
    for bad, key in (('listen = "gateway.local:9101"', "listen"), ('listen = "1.2.3:80"', "listen"),
                     ('listen = "127.0.0.1:0"', "listen"), ('textfile = "/run/m.txt"', "textfile"),
                     ("interval = 0.5", "interval")):
        with pytest.raises(ConfigError, match=rf"^metrics\.{key}: expected"):
            parse(f'device_id = "g"\n[metrics]\n{bad}\n')


# -- a real agent ------------------------------------------------------------------------------


class Watcher:
    """Reads the textfile over and over while the agent rewrites it: every read must be a whole
    exposition; counts the versions (inodes) it saw."""

    def __init__(self, path: Path) -> None:
        self.path, self.reads, self.last = path, 0, ""
        self.inodes: set[int] = set()
        self.partial: list[str] = []

    async def run(self) -> None:
        while True:
            try:
                inode = os.stat(self.path).st_ino
                text = self.path.read_text()
            except FileNotFoundError:
                await asyncio.sleep(0.01)
                continue
            self.reads += 1
            self.inodes.add(inode)
            if not (text.startswith("# HELP simkeeper_info ") and text.endswith(LAST)):
                self.partial.append(text)
            elif text != self.last:
                series(text)  # parses whole
                self.last = text
            await asyncio.sleep(0.002)


async def scrape(port: int) -> str:
    status, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK", status
    return body.decode()


def disagreements(text: str, status: dict[str, Any], *, sent: bool = True) -> list[str]:
    """Where the metrics and ``simkeeper status --json`` differ. ``sent``: the readings sent
    too (the runtime row has them late while they flow: agent.telemetry.state)."""
    found = series(text)
    want: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def expect(value: float, name: str, **labels: str) -> None:
        want[(name, tuple(sorted(labels.items())))] = value

    for m in status["modems"]:
        expect(1, "simkeeper_modem_state", port=m["port"], state=m["state"])
        if info := m["modem"]:
            expect(1, "simkeeper_modem_registration_state", port=m["port"],
                   state=info["registration"]["state"])
            for key, unit in (("rssi", "dbm"), ("rsrp", "dbm"), ("rsrq", "db"), ("sinr", "db")):
                if (value := info["signal"][f"{key}_{unit}"]) is not None:
                    expect(value, f"simkeeper_modem_{key}_{unit}", port=m["port"])
    for sim in status["sims"]:
        if lifecycle := sim["lifecycle"]:
            expect(1, "simkeeper_sim_state", iccid=sim["iccid"], state=lifecycle["state"])
    up = status["uplink"]
    expect(1, "simkeeper_uplink_state", kind=up["kind"], state=up["state"])
    if sent:
        expect(up["readings_sent"], "simkeeper_uplink_readings_sent_total")
    depth = sum(v for (name, _), v in found.items() if name == "simkeeper_outbox_readings")
    wrong = [f"{k}: metrics {found.get(k)}, status {v}" for k, v in want.items()
             if found.get(k) != v]
    if depth != status["outbox"]["count"]:
        wrong.append(f"outbox: metrics {depth}, status {status['outbox']['count']}")
    return wrong


async def test_a_running_agent_writes_and_serves_what_status_shows(tmp_path: Path,
                                                                   broker: Broker) -> None:
    key, pub = Ed25519PrivateKey.generate(), tmp_path / "operator.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    textfile, port = tmp_path / "node-exporter" / "simkeeper.prom", free_port()
    textfile.parent.mkdir()
    extra = (f'[commands]\noperator_key = "{pub}"\n'
             f'[metrics]\ntextfile = "{textfile}"\ninterval = 1\nlisten = "127.0.0.1:{port}"\n')
    watcher = Watcher(textfile)
    watching = asyncio.create_task(watcher.run())
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, _sim):
            await online(broker.port)
            status: dict[str, Any] = {}
            text = ""

            async def agreed(what: Any, sent: bool) -> bool:
                nonlocal status, text
                status, text = await agent.status(), await scrape(port)
                return bool(what(status)) and not disagreements(text, status, sent=sent)

            async def agree(what: Any, why: str, *, sent: bool = False) -> None:
                try:
                    await until_async(lambda: agreed(what, sent), why)
                except AssertionError:
                    wrong = disagreements(text, status, sent=sent)
                    raise AssertionError(f"{why}: {wrong}") from None

            # The modem polled (signal, registration), the SIM read: the same in both.
            await agree(lambda s: s["modems"][0]["modem"] and s["sims"]
                        and s["sims"][0]["lifecycle"], "modem and SIM in both")
            check_conventions(text)
            found = series(text)
            link = status["modems"][0]["port"]
            assert at(found, "simkeeper_modem_rssi_dbm", port=link) is not None
            lifecycle = status["sims"][0]["lifecycle"]
            assert at(found, "simkeeper_sim_state", iccid=status["sims"][0]["iccid"],
                      state=lifecycle["state"]) == 1
            # Readings sent and command results are counted.
            sent = at(found, "simkeeper_uplink_readings_sent_total")
            assert sent is not None
            await agent.publish([{"topic": "t", "data": i} for i in range(5)])
            await until_async(lambda: _counted(port, "simkeeper_uplink_readings_sent_total",
                                               sent + 5), "5 readings sent")
            unsigned = {"id": "c-0", "device_id": DEVICE, "name": "get-state", "args": {}}
            assert (await send_command(broker.port, unsigned))["status"] == "rejected"
            signed = make_envelope(key, DEVICE, "get-state", cid="c-1")
            assert (await send_command(broker.port, signed))["status"] == "ok"
            found = series(await scrape(port))
            assert [at(found, "simkeeper_command_results_total", status=s)
                    for s in ("ok", "rejected", "failed")] == [1, 1, 0]
            # The broker gone: readings wait in the outbox, the uplink reconnects, and the
            # runtime row, written at the uplink's change, has the readings sent till then.
            attempts = at(found, "simkeeper_uplink_connect_attempts_total")
            assert attempts is not None
            broker.kill()
            await agent.publish([{"topic": "t", "data": i} for i in range(3)])
            await agree(lambda s: s["outbox"]["count"] >= 3
                        and s["uplink"]["state"] == "connecting", "readings waiting", sent=True)
            assert status["uplink"]["readings_sent"] >= sent + 5
            await until_async(lambda: _counted(port, "simkeeper_uplink_connect_attempts_total",
                                               attempts + 1), "a reconnect counted")
            # Other paths are not found; the textfile holds the same families.
            assert (await http(port, b"GET /other HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
            await until(lambda: len(watcher.inodes) >= 3, "the textfile rewritten")
            assert _families(textfile.read_text()) == _families(await scrape(port))
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert watcher.reads > len(watcher.inodes) and watcher.partial == []


def _families(text: str) -> list[tuple[str, str]]:
    return [(f.name, f.type) for f in text_string_to_metric_families(text)]


async def _counted(port: int, name: str, least: float) -> bool:
    now = at(series(await scrape(port)), name)
    return now is not None and now >= least
