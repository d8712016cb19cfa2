"""``simkeeper publish [--config FILE] [--priority N] TOPIC [JSON]``: hand one reading to the
running agent over its ingestion socket and print the reading's id once it is committed.

JSON is read from stdin when omitted. Exit 1 when the agent refuses (its reason on stderr) or
is not running; exit 2 for bad usage (invalid JSON or topic, unreadable config).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from agent.cli.errors import CliError
from agent.core import config
from agent.core.readings import topic_problem

ANSWER_TIMEOUT = 30.0  # a commit waits behind the others in flight; a few ms is normal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)
    parser.add_argument("--priority", type=int, help="higher is kept longer and sent first")
    parser.add_argument("topic", metavar="TOPIC", help="e.g. sensors/room1")
    parser.add_argument("json", metavar="JSON", nargs="?", help="the data (default: stdin)")


def run(args: argparse.Namespace) -> int:
    if problem := topic_problem(args.topic):
        raise CliError(2, f"bad topic {args.topic!r}: {problem}")
    text = sys.stdin.read() if args.json is None else args.json
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(2, f"JSON argument is not valid JSON: {exc}") from None
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    reading: dict[str, Any] = {"topic": args.topic, "data": data}
    if args.priority is not None:
        reading["priority"] = args.priority
    line = json.dumps(reading, separators=(",", ":"), ensure_ascii=False) + "\n"
    try:
        answer = _exchange(cfg.ingest.socket, line.encode())
    except OSError as exc:
        raise CliError(1, _why(exc, cfg.ingest.socket)) from None
    if answer.get("ok") is True:
        print(answer.get("id"))
        return 0
    raise CliError(1, f"refused by the agent: {answer.get('error')}")



def _exchange(path: Path, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(str(path))
        sock.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionResetError("the agent closed the connection without answering")
            reply += chunk
    try:
        answer = json.loads(reply)
    except ValueError:
        raise ConnectionResetError(f"unexpected answer from the agent: {reply[:80]!r}") from None
    return answer if isinstance(answer, dict) else {"ok": False, "error": repr(answer)}


def _why(exc: OSError, path: Path) -> str:
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return f"the agent is not running (nothing listens on {path})"
    if isinstance(exc, PermissionError):
        return f"permission denied on {path} (is this user in the [ingest] group?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from the agent within {ANSWER_TIMEOUT:g} s"
    return f"{path}: {exc.strerror or exc}"
