"""`simkeeper fleet dashboard` (issue 14, part 4): the fleet as a web page, most urgent first.

The order, the words and the bounded usage history are checked on crafted devices; the server
over HTTP (its CSP, a foreign Host refused, hostile JSON); and the page in a real headless
Chromium (tests/webdriver.py), as a person sees it: a real mosquitto, one real simulated agent
(`fleet simulate 1`, a process) and crafted devices covering every urgency class; the rows and
their order, a bar and a chart, the agent SIGKILLed and its row offline within seconds, and a
hostile device shown as text. SIMKEEPER_SCREENSHOT=PATH keeps a screenshot of that run (the
README's docs/dashboard.png).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.fleet import dashboard, watch
from agent.fleet.localbroker import end_process
from agent.fleet.mqtt import BrokerOptions, connect, stop
from tests.broker import WAIT, Broker, wait_until
from tests.webdriver import Browser, browser

SIMKEEPER = [sys.executable, "-m", "agent.cli"]
GB = 1_000_000_000
HOUR, DAY = 3600.0, 86400.0
HOSTILE = "<img src=x onerror=alert(1)>"
USED = {"gw-field-21": 1.2 * GB, "gw-import-02": 0.3 * GB, "gw-shed-05": 0.45 * GB,
        "gw-pier-09": 0.85 * GB}  # by the retained state's report
REPORTING = ("gw-field-21", "gw-import-02", "gw-pier-09")  # online: their reports come


def _period(now: float) -> dict[str, str]:
    """The crafted SIMs' billing period: 30 days from midnight (UTC) 18 days ago."""
    start = datetime.fromtimestamp(now - 18 * DAY, UTC).replace(hour=0, minute=0, second=0,
                                                                microsecond=0)
    return {"start": start.isoformat(), "end": (start + timedelta(days=30)).isoformat()}


def _sim(iccid: str, state: str = "active", **more: Any) -> dict[str, Any]:
    return {"iccid": iccid, "current": True, "state": state, "deadline": None,
            "activated_at": 1.7e9 if state == "active" else None, "suspension": None,
            "conformance": None, **more}


def _report(iccid: str, used: float, now: float, plan: int = GB) -> dict[str, Any]:
    return {"iccid": iccid, "period": _period(now), "bytes_up": int(used) // 4,
            "bytes_down": int(used) - int(used) // 4, "source": "modem",
            "billed_estimate": int(used), "plan_bytes": plan, "share_used": used / plan,
            "counters": {}}


def crafted(now: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """A device of every urgency class: its retained status and state."""
    devices = {
        "gw-north-07": _sim("8981100005819480101", "awaiting-activation",
                            deadline=now + 5 * HOUR + 600),
        "gw-harbor-03": _sim("8981100005819480119", "awaiting-activation",
                             deadline=now + 2 * DAY + 3 * HOUR + 600),
        "gw-depot-12": _sim("8981100005819480127", "expired", deadline=now - 3 * DAY),
        "gw-field-21": _sim("8981100005819480135", suspension={
            "scope": "radio", "source": "operator", "until": None, "reason": "stolen",
            "since": now - DAY}),
        "gw-import-02": _sim("8981100005819480143", conformance={
            "conforming": False, "policy": "warn", "failures": [
                {"check": "tac", "reason": "TAC 35291108 is not on the list"}]}),
        "gw-shed-05": _sim("8981100005819480150"),
        "gw-pier-09": _sim("8981100005819480168"),
        "gw-retired-01": _sim("8981100005819480176", "terminated"),
    }
    out = {}
    for i, (name, sim) in enumerate(devices.items()):
        offline = name in ("gw-shed-05", "gw-retired-01")
        state = {"device_id": name, "ts": now - (2 * HOUR + 300 if offline else 5),
                 "sim": sim, "sims": [sim], "lifecycle": sim["state"],
                 "modems": [{"port": "/dev/ttyUSB2", "state": "ready", "modem": {
                     "signal": {"rssi_dbm": -60 - 4 * i, "rsrp_dbm": -85.0 - 4 * i},
                     "operator": {"name": "SORACOM", "mcc_mnc": "44010"}}}],
                 "usage": _report(sim["iccid"], USED[name], now) if name in USED else None,
                 "decommissioned": {"at": now - DAY, "iccid": sim["iccid"]}
                 if name == "gw-retired-01" else None}
        out[name] = ("offline" if offline else "online", state)
    return out


def _usage_batch(name: str, iccid: str, used: float, now: float) -> bytes:
    """Eight reports from the start of the period to now, growing to ``used``."""
    start = datetime.fromisoformat(_period(now)["start"]).timestamp()
    times = [start + (now - 1 - start) * k / 7 for k in range(8)]
    readings = [{"id": f"{name}-{k}", "ts": t, "topic": "usage",
                 "data": _report(iccid, used * (k / 7) ** 1.5, now)}
                for k, t in enumerate(times)]
    return json.dumps({"device_id": name, "batch_id": f"b-{name}", "readings": readings}).encode()


# -- the order, the words, the history --------------------------------------------------------


def test_rows_go_by_urgency() -> None:
    now = 2e9
    devices = []
    for name, (status, state) in crafted(now).items():
        dev = watch.Device(name, {"online": "yes", "offline": "no"}[status], state["sim"],
                           last_seen=state["ts"], sims=state["sims"],
                           decommissioned=state["decommissioned"] is not None)
        devices.append(dev)
    both = _sim("8981100005819480184", "awaiting-activation", deadline=now + 60,
                suspension={"scope": "data", "source": "network"})
    devices.append(watch.Device("gw-zz-both", "no", both, sims=[both]))  # deadline first
    devices.append(watch.Device("gw-aa-none", "no"))  # no state yet: offline, no SIM
    rows = dashboard.rows(devices, now)
    assert [(r["device"], r["urgency"]) for r in rows] == [
        ("gw-zz-both", "deadline"), ("gw-north-07", "deadline"), ("gw-harbor-03", "deadline"),
        ("gw-depot-12", "expired"), ("gw-field-21", "suspended"),
        ("gw-import-02", "non-conforming"), ("gw-aa-none", "offline"),
        ("gw-shed-05", "offline"), ("gw-pier-09", "ok"), ("gw-retired-01", "decommissioned")]
    cells = {r["device"]: r for r in rows}
    assert cells["gw-north-07"]["deadline"] == "5 hours 10 minutes left"
    assert cells["gw-harbor-03"]["deadline"] == "2 days 3 hours left"
    assert cells["gw-depot-12"]["deadline"] == "passed 3 days ago"
    assert cells["gw-pier-09"]["deadline"] == "activated"
    assert cells["gw-shed-05"]["last_seen"] == "2 hours 5 minutes ago"
    assert cells["gw-field-21"]["suspended"] == "radio (operator)"
    assert cells["gw-import-02"]["conformance"] == "not conforming: TAC 35291108 is not on the list"
    assert cells["gw-aa-none"]["iccid"] == "-"


def test_words() -> None:
    assert [dashboard.words(s) for s in (0, 1, 61, 3600, 7322, 90000, 2 * DAY + 300)] == [
        "0 seconds", "1 second", "1 minute 1 second", "1 hour", "2 hours 2 minutes",
        "1 day 1 hour", "2 days"]


def test_the_history_keeps_one_period_and_a_bounded_number_of_points() -> None:
    now = 2e9
    history = watch.History()
    period = _period(now)
    start = datetime.fromisoformat(period["start"]).timestamp()
    end = datetime.fromisoformat(period["end"]).timestamp()
    for k in range(10_000):  # a report every few minutes for the whole month
        history.add(start + (end - start) * k / 10_000, _report("1", k * 1000, now))
    points = history.points()
    assert len(points) == watch.POINTS
    assert points[-1][1] == 9_999_000 and history.report == _report("1", 9_999_000, now)
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in itertools.pairwise(points))
    history.add(start - 10, {**_report("1", 5, now), "period": _period(start - DAY)})
    assert len(history.points()) == watch.POINTS  # an older period's report is no point
    history.add(end + 10, {**_report("1", 7, now), "period": _period(end + DAY)})
    assert history.points() == [(end + 10, 7)]  # a new period starts the chart again


def _message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    return msg


@pytest.fixture
def served() -> Iterator[tuple[dashboard.Dashboard, watch.Watcher]]:
    """A dashboard on a free port over a watcher fed by hand (no broker)."""
    watcher = watch.Watcher(BrokerOptions())
    board = dashboard.Dashboard(watcher, ("127.0.0.1", 0), broker="test")
    thread = threading.Thread(target=board.serve_forever, daemon=True)
    thread.start()
    try:
        yield board, watcher
    finally:
        board.httpd.shutdown()
        board.close()
        thread.join(WAIT)


def _get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_server_serves_the_page_and_the_rows_and_refuses_a_foreign_host(
        served: tuple[dashboard.Dashboard, watch.Watcher]) -> None:
    board, watcher = served
    hostile = {"ts": math.nan, "sims": [{"iccid": HOSTILE, "state": "active", "deadline":
                                         math.inf, "current": "yes"}, 7, None],
               "modems": [{"modem": {"signal": {"rsrp_dbm": math.nan},
                                     "operator": {"name": HOSTILE}}}], "usage": {
                   "iccid": HOSTILE, "billed_estimate": math.nan, "period": "x"}}
    for topic, payload in ((f"simkeeper/{HOSTILE}/state", json.dumps(hostile).encode()),
                           (f"simkeeper/{HOSTILE}/status", b"online"),
                           (f"simkeeper/{HOSTILE}/usage", b'{"device_id": "x", "batch_id": "b",'
                            b' "readings": [{"id": "1", "ts": 1e400, "topic": "usage",'
                            b' "data": {"bytes_up": "x", "iccid": []}}]}'),
                           ("simkeeper/gw-1/state", b"\xff not json")):
        watcher._on_message(None, None, _message(topic, payload))  # type: ignore[arg-type]
    status, headers, body = _get(board.url + "api/devices")
    assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
    view = json.loads(body)
    assert [(r["device"], r["iccid"], r["urgency"], r["signal"]) for r in view["rows"]] == [
        (HOSTILE, HOSTILE, "ok", f"- · {HOSTILE}"), ("gw-1", "-", "ok", "-")]

    status, headers, page = _get(board.url)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    script = re.search(rb"<script>(.*?)</script>", page, re.S)
    assert script is not None and b"innerHTML" not in script[1]
    digest = base64.b64encode(hashlib.sha256(script[1]).digest()).decode()
    assert f"script-src 'sha256-{digest}';" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]

    port = board.httpd.server_address[1]
    assert _get(board.url + "api/devices", f"localhost:{port}")[0] == 200
    assert _get(board.url + "api/devices", f"evil.example:{port}")[0] == 403  # DNS rebinding
    assert _get(board.url + "nothing")[0] == 404


def test_cli_refuses_a_bad_listen_address_and_a_busy_port(broker: Broker) -> None:
    bad = subprocess.run([*SIMKEEPER, "fleet", "dashboard", "--listen", "8080"],
                         capture_output=True, text=True, timeout=WAIT, check=False)
    assert bad.returncode == 2 and "expected HOST:PORT, got '8080'" in bad.stderr
    with dashboard.Dashboard(watch.Watcher(BrokerOptions()), ("127.0.0.1", 0)).httpd as busy:
        taken = f"127.0.0.1:{busy.server_address[1]}"
        run = subprocess.run([*SIMKEEPER, "fleet", "dashboard", "--listen", taken, "--broker",
                              f"127.0.0.1:{broker.port}"], capture_output=True, text=True,
                             timeout=WAIT, check=False)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [
        f"simkeeper fleet dashboard: cannot listen on {taken}: Address already in use"]


# -- the page in a browser ---------------------------------------------------------------------


def _table(page: Browser) -> list[dict[str, str]]:
    """Each row of the table as a person reads it: its cells' rendered text by column."""
    rows = page.run("return [...document.querySelectorAll('#fleet tbody tr')].map(tr =>"
                    " Object.fromEntries([...tr.cells].map(td => [td.dataset.col,"
                    " td.innerText.trim()])));")
    return list(rows)


def _column(page: Browser, col: str) -> list[str]:
    return [row.get(col, "") for row in _table(page)]


def _process(argv: list[str], log: Path, *, stdout: int | None = None) -> subprocess.Popen[str]:
    """``simkeeper ARGV``: its stderr (and stdout, unless piped) in ``log``."""
    with log.open("w") as out:
        return subprocess.Popen([*SIMKEEPER, *argv], stdout=stdout or out, stderr=out, text=True)


ORDER = ["gw-north-07", "gw-harbor-03", "gw-depot-12", "gw-field-21", "gw-import-02",
         "gw-shed-05", "gw-00001", "gw-pier-09", "gw-retired-01"]
WHY = ["deadline", "deadline", "deadline passed", "suspended", "not conforming", "offline",
       "ok", "ok", "decommissioned"]


def test_the_page_in_a_browser(broker: Broker, tmp_path: Path) -> None:
    now = datetime.now(UTC).timestamp()
    publishers = [connect(BrokerOptions(port=broker.port), lambda _c: None)]
    agent = dash = None

    def publish(topic: str, payload: bytes | str, retain: bool = True) -> None:
        publishers[-1].publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    try:
        for name, (status, state) in crafted(now).items():
            publish(f"simkeeper/{name}/status", status)
            publish(f"simkeeper/{name}/state", json.dumps(state))
        agent = _process(["fleet", "simulate", "1", "--broker", f"127.0.0.1:{broker.port}",
                          "--telemetry", "0", "--dir", str(tmp_path / "fleet")],
                         tmp_path / "simulate.log")
        dash = _process(["fleet", "dashboard", "--broker", f"127.0.0.1:{broker.port}",
                         "--listen", "127.0.0.1:0"], tmp_path / "dashboard.log",
                        stdout=subprocess.PIPE)
        assert dash.stdout is not None
        line = dash.stdout.readline()
        url = re.search(r"http://\S+", line)
        assert url, f"{line!r}; {(tmp_path / 'dashboard.log').read_text()}"
        with browser(tmp_path) as page:
            page.get(url[0])
            wait_until(lambda: _column(page, "device") == ORDER
                       and _column(page, "online")[ORDER.index("gw-00001")] == "online",
                       what="every device's row, the simulated agent online")
            rows = _table(page)
            assert [r["why"] for r in rows] == WHY
            cells = {r["device"]: r for r in rows}
            assert re.fullmatch(r"5 hours \d+ minutes left", cells["gw-north-07"]["deadline"])
            assert re.fullmatch(r"2 days 3 hours left", cells["gw-harbor-03"]["deadline"])
            assert cells["gw-depot-12"]["deadline"] == "passed 3 days ago"
            assert cells["gw-shed-05"]["online"] == "offline"
            assert re.fullmatch(r"2 hours \d+ minutes ago", cells["gw-shed-05"]["last_seen"])
            assert cells["gw-field-21"]["suspended"] == "radio (operator)"
            assert cells["gw-pier-09"]["usage"] == "850.0MB/1.0GB (85%)"
            assert re.fullmatch(r"-\d+ dBm RSRP · .+", cells["gw-00001"]["signal"])
            bar = page.run("const b = document.querySelector("
                           "'tr[data-device=\"gw-pier-09\"] .bar');"
                           " return [b.className, b.firstChild.style.width];")
            assert bar == ["bar warn", "85%"]
            summary = page.find("#summary")
            assert page.displayed(summary[0])
            assert page.text(summary[0]).startswith("9 SIMs on 9 gateways, most urgent first")

            # Usage reports as they come: each SIM's chart over its billing period.
            script = ("return Object.fromEntries([...document.querySelectorAll('#fleet tr')]"
                      ".filter(tr => tr.querySelector('svg.chart')).map(tr => [tr.dataset.device,"
                      " tr.querySelector('polyline').getAttribute('points').split(' ').length]));")

            def charts() -> dict[str, int]:  # points in each crafted device's chart
                return {k: v for k, v in page.run(script).items() if k in USED}

            # from the state's report alone: the period's start and one point
            assert charts() == dict.fromkeys(USED, 2)
            for name in REPORTING:
                iccid = crafted(now)[name][1]["sim"]["iccid"]
                publish(f"simkeeper/{name}/usage", _usage_batch(name, iccid, USED[name], now),
                        retain=False)
            wait_until(lambda: {name: n >= 9 for name, n in charts().items()} == {
                name: name in REPORTING for name in USED}, what="a chart of 8 more reports each")

            # The agent dies: the broker publishes its will; the page shows it within seconds.
            agent.kill()
            agent.wait(WAIT)
            moved = [*ORDER[:5], "gw-00001", "gw-shed-05", *ORDER[7:]]
            wait_until(lambda: _column(page, "device") == moved, what="gw-00001 offline")
            row = _table(page)[5]
            assert (row["why"], row["online"]) == ("offline", "offline")
            page.fit()
            if shot := os.environ.get("SIMKEEPER_SCREENSHOT"):
                Path(shot).write_bytes(page.screenshot())

            # A device whose names are markup: shown as text, nothing of it runs.
            hostile = crafted(now)["gw-pier-09"][1]
            hostile["modems"][0]["modem"]["operator"]["name"] = "<script>alert(2)</script>"
            publish(f"simkeeper/{HOSTILE}/status", "online")
            publish(f"simkeeper/{HOSTILE}/state", json.dumps(hostile))
            wait_until(lambda: HOSTILE in _column(page, "device"), what="the hostile device")
            cell = next(r for r in _table(page) if r["device"] == HOSTILE)
            assert cell["signal"].endswith("· <script>alert(2)</script>")
            assert page.run("return document.querySelectorAll('#fleet img, #fleet script')"
                            ".length;") == 0
            assert page.alert() is None

            # The broker goes away and comes back (without its retained messages): the page
            # says so, and the dashboard subscribes again.
            broker.kill()
            wait_until(lambda: "not connected, reconnecting" in page.text(summary[0]),
                       what="the page saying the broker is lost")
            broker.start()
            publishers.append(connect(BrokerOptions(port=broker.port), lambda _c: None))
            publish("simkeeper/gw-00001/status", "online")
            wait_until(lambda: "updated" in page.text(summary[0]) and next(
                r["online"] for r in _table(page) if r["device"] == "gw-00001") == "online",
                       what="gw-00001 online again")
    finally:
        for proc in (agent, dash):
            end_process(proc, signal.SIGINT)
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
        for client in publishers:
            stop(client)
