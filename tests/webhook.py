"""A Flux incoming webhook stand-in: an HTTP server that refuses while ``failing``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class Webhook(ThreadingHTTPServer):
    """Answers 503 while ``failing``; records every body it accepted."""

    def __init__(self) -> None:
        self.failing = True
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/flux"

    def reading_ids(self) -> set[str]:
        with self.lock:
            return {r["id"] for b in self.accepted for r in b["readings"]}


class _Handler(BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            failing = self.server.failing
            if failing:
                self.server.refused += 1
            else:
                self.server.accepted.append(json.loads(body))
        self.send_response(503 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    server = Webhook()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
