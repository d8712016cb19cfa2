"""The unified-endpoint uplink against a local HTTP server that fails now and then."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.cli.status import read_status, render
from agent.core.config import parse
from agent.core.store import Store
from agent.core.tasks import Supervisor
from agent.telemetry.batch import decode_batch
from agent.telemetry.http import HttpUplink
from agent.telemetry.outbox import Outbox, Reading
from agent.telemetry.state import Snapshot, StateReporter
from agent.telemetry.uplinks import Uplinks
from tests.broker import Broker, fill, open_outbox, until, uplink_settings

TIMEOUT = 0.3  # the uplink's request timeout in these tests


@dataclass
class Request:
    n: int
    content_type: str
    body: bytes
    status: int | None  # None: no answer (hung up, or answered after the client's timeout)


class Endpoint(ThreadingHTTPServer):
    """Request n: n % 4 == 1 -> 500, n % 5 == 2 -> hang up, n % 7 == 3 -> too slow, else 200."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def verdict(self, n: int) -> int | None:
        if n % 4 == 1:
            return 500
        if n % 5 == 2 or n % 7 == 3:
            return None
        return 200


class _Handler(BaseHTTPRequestHandler):
    server: Endpoint
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            n = len(self.server.requests)
            status = self.server.verdict(n)
            self.server.requests.append(Request(n, self.headers["Content-Type"], body, status))
        if status is None and n % 5 == 2:
            self.close_connection = True
            return  # hang up without an answer
        if status is None:
            time.sleep(TIMEOUT * 3)  # the client has given up before this answer
            status = 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class RecordingOutbox:
    """The real outbox, noting each acknowledged id with how many requests had come by then."""

    def __init__(self, inner: Outbox, endpoint: Endpoint) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self.acked: list[tuple[str, int]] = []

    async def fetch(self, stream: str, max_count: int, max_bytes: int) -> list[Reading]:
        return await self.inner.fetch(stream, max_count, max_bytes)

    def depth(self, stream: str | None = None) -> tuple[int, int]:
        return self.inner.depth(stream)

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        return self.inner.add_listener(callback)

    def ack_soon(self, ids: Sequence[str]) -> None:
        with self.endpoint.lock:
            answered = len(self.endpoint.requests)
        self.acked += [(i, answered) for i in ids]
        self.inner.ack_soon(ids)


@pytest.mark.parametrize("compress", [False, True])
async def test_every_reading_delivered_and_acked_only_on_2xx(
    endpoint: Endpoint, tmp_path: Path, compress: bool
) -> None:
    inner = open_outbox(tmp_path)
    outbox = RecordingOutbox(inner, endpoint)
    settings = uplink_settings(
        1,
        kind="unified-endpoint",
        http_url=f"http://127.0.0.1:{endpoint.server_address[1]}/flux",
        reconnect_min=0.01,
        reconnect_max=0.1,
    )
    ids = fill(inner, 400)
    uplink = HttpUplink(settings, "gw-test", outbox, compress=compress, timeout=TIMEOUT)
    await uplink.start()
    try:
        await until(lambda: inner.depth() == (0, 0), "the outbox to drain")
    finally:
        await uplink.stop()
    with endpoint.lock:
        requests = list(endpoint.requests)
    assert {r.status for r in requests} >= {200, 500, None}  # the failures did happen
    delivered = [decode_batch(r.body) for r in requests if r.status == 200]
    got = [x["id"] for b in delivered for x in b["readings"]]
    assert set(got) == set(ids)
    # An id is acknowledged only after a request carrying it was answered 200.
    first_ok: dict[str, int] = {}
    for r in requests:
        if r.status == 200:
            for x in decode_batch(r.body)["readings"]:
                first_ok.setdefault(x["id"], r.n)
    assert all(first_ok[i] < answered for i, answered in outbox.acked)
    assert sorted(i for i, _ in outbox.acked) == sorted(ids)
    kinds = {r.content_type for r in requests}
    assert kinds == ({"application/octet-stream"} if compress else {"application/json"})


class Failing(Endpoint):
    """Answers every POST with ``status`` (a test changes it)."""

    status = 500

    def verdict(self, n: int) -> int | None:
        return self.status


async def test_status_shows_a_failing_endpoint(broker: Broker, tmp_path: Path) -> None:
    """MQTT up, every POST answered 500: the uplink is ``failing`` with the HTTP status, in the
    row ``simkeeper status`` reads, until a POST succeeds (issue 11, item 15)."""
    server = Failing()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    database = tmp_path / "simkeeper.db"
    url = f"http://127.0.0.1:{server.server_address[1]}/flux"
    cfg = parse(
        f'device_id = "gw-test"\n[uplink]\nkind = "unified-endpoint"\nhttp_url = "{url}"\n'
        f'port = {broker.port}\nreconnect_min = 0.1\nreconnect_max = 1\n'
        f'[store]\npath = "{database}"\n'
    )
    store = Store(database)
    outbox = Outbox(store, max_bytes=1 << 24, max_age=86400.0)
    uplinks = Uplinks(cfg, outbox, Supervisor(), on_command=lambda _: None, allow=lambda _: True)
    reporter = StateReporter(store, "gw-test", asyncio.Event(), publish=lambda _: None,
                             snapshot=lambda: Snapshot(modems=[], uplink=uplinks.state(),
                                                       sims=[], tasks={}), usage=list)

    def row() -> dict[str, Any]:
        return read_status(database, "gw-test")["uplink"] or {}

    await uplinks.start()
    reporting = asyncio.create_task(reporter.run())
    try:
        await until(lambda: row().get("state") == "connected", "the MQTT session")
        fill(outbox, 5)
        await until(lambda: row().get("state") == "failing", "the failing state")
        assert row()["http_status"] == 500
        assert row()["last_error"] == f"POST {url}: HTTP 500"
        text = render(read_status(database, "gw-test"))
        assert "unified-endpoint: failing over MQTT 5, last POST: HTTP 500" in text, text
        assert f": POST {url}: HTTP 500" in text
        server.status = 200
        await until(lambda: row().get("state") == "connected", "the endpoint's recovery")
        assert row()["http_status"] == 200
        await until(lambda: outbox.depth() == (0, 0), "the readings delivered")
    finally:
        reporting.cancel()
        await uplinks.stop()
        store.close()
        server.shutdown()
        server.server_close()
