"""``fleet dashboard``: the fleet as a web page, from the retained ``state`` and ``status`` and
the ``usage`` reports of every device (a :class:`agent.fleet.watch.Watcher`).

One row per gateway and SIM, the most urgent first (:data:`URGENCY`, :func:`rows`): the time
left to each deadline in words, usage against plan as a bar (the billed estimate over the plan,
as ``fleet watch`` shows it), signal, last seen, and the SIM's usage over its billing period.
The server is the standard library's, on the operator's machine: ``/`` is one static page
(``dashboard.html``: inline CSS and JS, no framework, nothing fetched from elsewhere) that
polls ``/api/devices`` every 2 s and builds its DOM with ``textContent`` only, since every
name in it comes from the network. The page's Content-Security-Policy admits only its own
inline script and style (by hash), and a request naming a host other than an address,
``localhost`` or the ``--listen`` host is refused (DNS rebinding).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from agent.fleet.mqtt import BrokerOptions, FleetError
from agent.fleet.watch import Device, Watcher, finite, usage_cell, used_and_plan

# The order of the rows: a SIM awaiting activation before its deadline (nearest first), one
# whose deadline passed, suspended, a non-conforming terminal, a gateway offline, the rest;
# decommissioned gateways and terminated SIMs last. A row takes the first class it fits;
# within a class, rows go by device and ICCID.
URGENCY = ("deadline", "expired", "suspended", "non-conforming", "offline", "ok",
           "decommissioned")
POLL = 2.0  # seconds between the page's requests (written into the page)

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def words(seconds: float) -> str:
    """A duration in its largest unit and the next: ``2 days 4 hours``, ``1 minute``."""
    left = max(0, int(seconds))
    i = next(i for i, (_n, size) in enumerate(_UNITS) if left >= size or size == 1)
    big, rest = divmod(left, _UNITS[i][1])
    shown = [(big, _UNITS[i][0])]
    if i + 1 < len(_UNITS) and (small := rest // _UNITS[i + 1][1]):
        shown.append((small, _UNITS[i + 1][0]))
    return " ".join(f"{n} {name}{'' if n == 1 else 's'}" for n, name in shown)


def urgency(dev: Device, sim: dict[str, Any], now: float) -> str:
    state = sim.get("state")
    if dev.decommissioned or state == "terminated":
        return "decommissioned"
    deadline = finite(sim.get("deadline"))
    if deadline is not None and not sim.get("activated_at"):
        return "deadline" if deadline > now and state != "expired" else "expired"
    if state == "expired":
        return "expired"
    if isinstance(sim.get("suspension"), dict):
        return "suspended"
    conformance = sim.get("conformance")
    if isinstance(conformance, dict) and conformance.get("conforming") is False:
        return "non-conforming"
    return "offline" if dev.online == "no" else "ok"


def _deadline(sim: dict[str, Any], now: float) -> str:
    deadline = finite(sim.get("deadline"))
    if sim.get("activated_at"):
        return "activated"
    if deadline is None:
        return "-"
    return (f"{words(deadline - now)} left" if deadline > now
            else f"passed {words(now - deadline)} ago")


def _signal(modem: dict[str, Any] | None) -> str:
    signal = modem.get("signal") if modem else None
    signal = signal if isinstance(signal, dict) else {}
    rsrp, rssi = finite(signal.get("rsrp_dbm")), finite(signal.get("rssi_dbm"))
    text = (f"{rsrp:.0f} dBm RSRP" if rsrp is not None
            else f"{rssi:.0f} dBm RSSI" if rssi is not None else "-")
    operator = (modem or {}).get("operator")
    name = operator.get("name") if isinstance(operator, dict) else None
    return f"{text} · {name}" if isinstance(name, str) and name else text


def _suspended(sim: dict[str, Any]) -> str:
    susp = sim.get("suspension")
    if not isinstance(susp, dict):
        return "-"
    return f"{susp.get('scope', 'yes')} ({susp.get('source', '?')})"


def _conformance(sim: dict[str, Any]) -> str:
    verdict = sim.get("conformance")
    if not isinstance(verdict, dict):
        return "-"
    if verdict.get("conforming") is not False:
        return "conforming"
    failures = verdict.get("failures")
    first = failures[0] if isinstance(failures, list) and failures else None
    reason = first.get("reason") if isinstance(first, dict) else None
    return f"not conforming: {reason}" if isinstance(reason, str) else "not conforming"


def _row(dev: Device, sim: dict[str, Any], now: float) -> dict[str, Any]:
    iccid = sim.get("iccid")
    iccid = iccid if isinstance(iccid, str) else None
    current = bool(sim.get("current", True))
    history = dev.history.get(iccid) if iccid else None
    report = history.report if history else None
    used, plan = used_and_plan(report) if report else (0.0, None)
    chart = None
    if history and history.points():
        chart = {"start": history.start, "end": history.end, "plan": plan,
                 "points": [list(p) for p in history.points()]}
    state = "decommissioned" if dev.decommissioned else sim.get("state")
    return {
        "urgency": urgency(dev, sim, now), "device": dev.name, "iccid": iccid or "-",
        "current": current,
        "online": {"yes": "online", "no": "offline"}.get(dev.online, "?"),
        "state": state if isinstance(state, str) else "-",
        "deadline_at": finite(sim.get("deadline")), "deadline": _deadline(sim, now),
        "suspended": _suspended(sim), "conformance": _conformance(sim),
        "usage": usage_cell(report), "share": used / plan if plan else None,
        "signal": _signal(dev.modem) if current else "-",
        "last_seen": "-" if dev.last_seen is None
        else f"{words(now - dev.last_seen)} ago", "chart": chart,
    }


def rows(devices: Iterable[Device], now: float) -> list[dict[str, Any]]:
    """One row per gateway and SIM its state names (one without a SIM for a gateway whose
    state names none), in the order of :data:`URGENCY`."""
    out = [_row(dev, sim, now) for dev in devices
           for sim in (dev.sims or ([dev.sim] if dev.sim else [{}]))]

    def key(r: dict[str, Any]) -> tuple[int, float, str, str]:
        soon = r["deadline_at"] if r["urgency"] == "deadline" else 0.0
        return URGENCY.index(r["urgency"]), soon, r["device"], r["iccid"]

    return sorted(out, key=key)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` to listen on (PORT 0: any free port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _page() -> tuple[bytes, str]:
    """The page, and its Content-Security-Policy: its own inline script and style only."""
    html = resources.files("agent.fleet").joinpath("dashboard.html").read_text("utf-8")
    html = html.replace("__POLL_MS__", str(int(POLL * 1000)))

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
                        for m in re.findall(f"<{tag}>(.*?)</{tag}>", html, re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')};"
           " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


class Dashboard:
    """The page and ``/api/devices`` on ``listen``, from ``watcher``'s devices."""

    def __init__(self, watcher: Watcher, listen: tuple[str, int], *, broker: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        self.watcher, self.broker, self._clock = watcher, broker, clock
        self.page, self.csp = _page()
        host, port = listen
        self.hosts = {"localhost", host.lower()}
        try:
            self.httpd = _Server(listen, _Handler, ipv6=":" in host)
        except OSError as exc:
            raise FleetError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.httpd.dashboard = self

    @property
    def url(self) -> str:
        host, port = str(self.httpd.server_address[0]), self.httpd.server_address[1]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def view(self) -> dict[str, Any]:
        now = self._clock()
        with self.watcher.lock:
            devices = list(self.watcher.devices.values())
            return {"now": now, "broker": self.broker, "connected": self.watcher.connected,
                    "devices": len(devices), "rows": rows(devices, now)}

    def host_ok(self, header: str | None) -> bool:
        """Whether a request's Host may see the fleet: an address, or a name we listen as."""
        if header is None:
            return True
        name = urlsplit(f"//{header}").hostname or ""
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return name in self.hosts
        return True

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.5)

    def close(self) -> None:
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    dashboard: Dashboard

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 ipv6: bool) -> None:
        self.address_family = socket.AF_INET6 if ipv6 else socket.AF_INET
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        board = self.server.dashboard
        path = urlsplit(self.path).path
        if not board.host_ok(self.headers.get("Host")):
            self._send(403, b"this host name is not one the dashboard listens as\n",
                       "text/plain")
        elif path == "/":
            self._send(200, board.page, "text/html", {"Content-Security-Policy": board.csp})
        elif path == "/api/devices":
            self._send(200, json.dumps(board.view(), allow_nan=False).encode(),
                       "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, kind: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": f"{kind}; charset=utf-8",
                            "Content-Length": str(len(body)), "Cache-Control": "no-store",
                            "X-Content-Type-Options": "nosniff",
                            "Referrer-Policy": "no-referrer", **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the page asks every 2 s."""


def serve(opts: BrokerOptions, listen: tuple[str, int], *, devices: Iterable[str] = (),
          say: Callable[[str], None] = print) -> None:
    """Watch the fleet (``devices`` by name, or every device) and serve its page until
    interrupted (Ctrl-C)."""
    watcher = Watcher(opts, devices=devices)
    dashboard = Dashboard(watcher, listen, broker=f"{opts.host}:{opts.port}")
    try:
        watcher.start()
        say(f"simkeeper fleet dashboard: {dashboard.url} (Ctrl-C stops)")
        dashboard.serve_forever()
    finally:
        watcher.stop()
        dashboard.close()
