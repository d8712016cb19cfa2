"""Local ingestion over a real Unix socket: the protocol, hostile clients, group commit, the
socket's life, `simkeeper publish`, and the agent SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.store import Store
from agent.telemetry.ingest import IngestError, IngestServer, parse_line
from agent.telemetry.outbox import TELEMETRY, Outbox
from tests.broker import until

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_750_000_000.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="sk", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def store(short_dir: Path) -> Iterator[Store]:
    s = Store(short_dir / "db")
    yield s
    s.close()


@pytest.fixture
def outbox(store: Store) -> Outbox:
    return Outbox(store, max_bytes=1 << 24, max_age=86400)


async def serve(outbox: Outbox, path: Path, **kw: Any) -> IngestServer:
    kw.setdefault("clock", lambda: NOW)
    server = IngestServer(outbox, path, **kw)
    await server.start()
    return server


@pytest.fixture
async def server(outbox: Outbox, short_dir: Path) -> AsyncIterator[IngestServer]:
    s = await serve(outbox, short_dir / "run" / "ingest.sock", max_line=4096)
    yield s
    await s.close()


async def exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Pipeline every line, then read one answer per non-blank line."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"".join(lines))
    await writer.drain()
    answers = [json.loads(await reader.readline()) for line in lines if line.strip()]
    writer.close()
    return answers


async def test_answers_in_order_after_commit(server: IngestServer, outbox: Outbox) -> None:
    lines = [
        b'{"topic": "sensors/room1", "data": {"t": 21.5}}\n',
        b'{"topic": "sensors/room1", "data": [1, 2], "ts": 1700000000.5, "priority": 3}\r\n',
        b"\n",
        b'{"topic": "a", "data": "x"}\n',
    ]
    answers = await exchange(server.path, lines)
    assert [a["ok"] for a in answers] == [True, True, True]
    stored = outbox.next_batch(TELEMETRY, 10, 1 << 20)
    assert [r.id for r in stored] == [a["id"] for a in answers]
    assert [(r.topic, r.data, r.ts, r.priority) for r in stored] == [
        ("sensors/room1", '{"t":21.5}', NOW, 0),
        ("sensors/room1", "[1,2]", 1700000000.5, 3),
        ("a", '"x"', NOW, 0),
    ]


BAD = [
    (b"not json", "not JSON"),
    (b"\xff\xfe\x00garbage\x00", "not UTF-8 text"),
    (b"[1, 2]", "not an object"),
    (b'"text"', "not an object"),
    (b'{"topic": "a", "data": 1, "extra": 2}', "unknown field 'extra'"),
    (b'{"data": 1}', "bad topic: expected a string"),
    (b'{"topic": "", "data": 1}', "bad topic: expected 1-128"),
    (b'{"topic": "' + b"a" * 129 + b'", "data": 1}', "bad topic: expected 1-128"),
    (b'{"topic": "a/+/b", "data": 1}', "bad topic: only A-Z"),
    (b'{"topic": "a/#", "data": 1}', "bad topic: only A-Z"),
    (b'{"topic": "a b", "data": 1}', "bad topic: only A-Z"),
    (b'{"topic": "/a", "data": 1}', "bad topic: no leading"),
    (b'{"topic": "a/", "data": 1}', "bad topic: no leading"),
    (b'{"topic": "a//b", "data": 1}', "bad topic: no leading"),
    (b'{"topic": "a"}', "missing data"),
    (b'{"topic": "a", "data": 1, "ts": "now"}', "bad ts"),
    (b'{"topic": "a", "data": 1, "ts": true}', "bad ts"),
    (b'{"topic": "a", "data": 1, "ts": -5}', "bad ts"),
    (b'{"topic": "a", "data": 1, "ts": 1700000000000}', "not milliseconds"),
    (b'{"topic": "a", "data": 1, "priority": 1.5}', "bad priority"),
    (b'{"topic": "a", "data": 1, "priority": 101}', "bad priority"),
    (b'{"topic": "a", "data": NaN}', "not JSON: NaN is not JSON"),
    (b'{"topic": "a", "data": 1e999}', "not JSON: number out of range"),
    (b'{"topic": "a", "data": ' + b"[" * 1500 + b"]" * 1500 + b"}", "not JSON"),
]


async def test_bad_lines_get_their_reason_in_order(server: IngestServer, outbox: Outbox) -> None:
    good = b'{"topic": "ok", "data": 1}\n'
    lines = [good]
    for line, _ in BAD:
        lines += [line + b"\n", good]
    answers = await exchange(server.path, lines)
    assert all(a["ok"] for a in answers[::2])
    for answer, (_, why) in zip(answers[1::2], BAD, strict=True):
        assert answer["ok"] is False
        assert why in answer["error"], (why, answer)
    assert outbox.depth(TELEMETRY)[0] == len(BAD) + 1


def test_parse_line_never_raises_on_random_bytes() -> None:
    rng = __import__("random").Random(7)
    for _ in range(2000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        assert isinstance(parse_line(blob, NOW), str | tuple)


async def test_oversize_line_is_answered_and_skipped(server: IngestServer, outbox: Outbox) -> None:
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(b'{"topic": "a", "data": "' + b"x" * 9000)
    await writer.drain()
    first = json.loads(await reader.readline())  # answered before the line even ends
    assert first == {"ok": False, "error": "too large: a line may hold at most 4096 bytes"}
    for _ in range(50):  # the rest of the line is skipped, not buffered
        writer.write(b"y" * 10_000)
    writer.write(b'"}\n{"topic": "a", "data": 2}\n' + b"z" * 5000 + b"\n")
    await writer.drain()
    assert json.loads(await reader.readline())["ok"] is True
    assert "too large" in json.loads(await reader.readline())["error"]
    assert all(len(c._buf) <= 4096 for c in server.clients)
    writer.close()
    assert outbox.depth(TELEMETRY)[0] == 1


async def test_many_clients_are_group_committed(
    server: IngestServer, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines that arrive while a commit is under way go together in the next commits (at most
    ``max_batch`` a commit), not one commit each. The first commit is held on the store's
    thread until every other line has arrived, so the count does not depend on timing."""
    commits: list[int] = []
    held, release = threading.Event(), threading.Event()
    real = outbox.add

    def counting(items: Any) -> list[str]:
        commits.append(len(items))
        if len(commits) == 1:
            held.set()
            release.wait(timeout=60)
        return real(items)

    monkeypatch.setattr(outbox, "add", counting)

    async def client(n: int) -> list[dict[str, Any]]:
        lines = [json.dumps({"topic": f"c/{n}", "data": i}).encode() + b"\n" for i in range(50)]
        return await exchange(server.path, lines)

    clients = asyncio.gather(*(client(n) for n in range(20)))
    try:
        await until(held.is_set, "the first commit under way")
        await until(lambda: commits[0] + len(server._queue) == 1000,
                    "every other line queued behind it")
    finally:
        release.set()
    results = await clients
    ids = [a["id"] for answers in results for a in answers]
    assert len(ids) == len(set(ids)) == 1000
    assert sum(commits) == 1000
    assert len(commits) == 1 + -(-(1000 - commits[0]) // 512)  # max_batch lines a commit
    for n in range(20):  # order kept per client (and so per topic)
        batch = [r for r in outbox.next_batch(TELEMETRY, 2000, 1 << 30) if r.topic == f"c/{n}"]
        assert [json.loads(r.data) for r in batch] == list(range(50))


async def test_max_clients(outbox: Outbox, short_dir: Path) -> None:
    server = await serve(outbox, short_dir / "s.sock", max_clients=2)
    first = await asyncio.open_unix_connection(server.path)
    second = await asyncio.open_unix_connection(server.path)
    reader, _ = await asyncio.open_unix_connection(server.path)
    assert json.loads(await reader.readline()) == {"ok": False, "error": "too many clients (max 2)"}
    assert await reader.read() == b""
    first[1].close()
    await first[1].wait_closed()
    for _ in range(1000):  # until the server has noticed the first one left
        answer = (await exchange(server.path, [b'{"topic": "a", "data": 1}\n']))[0]
        if answer["ok"]:
            break
    assert answer["ok"]
    second[1].close()
    await server.close()


async def test_idle_and_slow_clients_are_disconnected(outbox: Outbox, short_dir: Path) -> None:
    server = await serve(outbox, short_dir / "s.sock", client_timeout=0.2)
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(b'{"topic": "a", "da')  # a line that never ends
    assert await asyncio.wait_for(reader.read(), 30) == b""
    idle_reader, _ = await asyncio.open_unix_connection(server.path)
    assert await asyncio.wait_for(idle_reader.read(), 30) == b""
    assert (await exchange(server.path, [b'{"topic": "a", "data": 1}\n']))[0]["ok"]
    await server.close()


async def test_client_that_never_reads_is_paused_then_dropped(
    outbox: Outbox, short_dir: Path
) -> None:
    server = await serve(outbox, short_dir / "s.sock", client_timeout=0.5)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(server.path))
    sock.setblocking(False)
    line = b'{"topic": "a", "data": 1}\n'
    while True:  # write, never read, until the server stops reading from us
        try:
            sock.send(line * 100)
        except BlockingIOError:
            break
        await asyncio.sleep(0)
    assert (await exchange(server.path, [line]))[0]["ok"]  # everyone else is still served
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(1000):  # then it is disconnected (no timing asserted, only the outcome)
            with contextlib.suppress(BlockingIOError):
                sock.send(line)
            await asyncio.sleep(0.05)
    sock.close()
    await server.close()


async def test_gate_refuses_with_its_reason(outbox: Outbox, short_dir: Path) -> None:
    reason: list[str | None] = ["telemetry suspended by order 17"]
    server = await serve(outbox, short_dir / "s.sock", gates=[lambda: None, lambda: reason[0]])
    line = b'{"topic": "a", "data": 1}\n'
    assert await exchange(server.path, [line]) == [
        {"ok": False, "error": "telemetry suspended by order 17"}
    ]
    reason[0] = None
    assert (await exchange(server.path, [line]))[0]["ok"]
    assert outbox.depth(TELEMETRY)[0] == 1
    await server.close()


async def test_store_full_is_an_answer(server: IngestServer, store: Store, outbox: Outbox) -> None:
    line = b'{"topic": "a", "data": "' + b"x" * 900 + b'"}\n'
    assert (await exchange(server.path, [line]))[0]["ok"]

    def limit(pages: int | None) -> None:  # on the writer's connection, its thread
        with store.transaction() as db:
            pages = pages or db.execute("PRAGMA page_count").fetchone()[0] + 1
            db.execute(f"PRAGMA max_page_count = {pages}")

    await store.run(limit, None)
    answers = await exchange(server.path, [line] * 20)
    assert any("store full" in a.get("error", "") for a in answers)
    await store.run(limit, 1000000)
    assert (await exchange(server.path, [line]))[0]["ok"]


async def test_socket_mode_group_stale_and_live(outbox: Outbox, short_dir: Path) -> None:
    path = short_dir / "run" / "x.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead agent's socket file
    group = grp.getgrgid(os.getgid()).gr_name
    server = await serve(outbox, path, group=group)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == os.getgid()
    with pytest.raises(IngestError, match="another agent is already listening"):
        await serve(outbox, path)
    assert (await exchange(path, [b'{"topic": "a", "data": 1}\n']))[0]["ok"]
    await server.close()
    assert not path.exists()
    path.write_text("precious")
    with pytest.raises(IngestError, match="exists and is not a socket"):
        await serve(outbox, path)
    assert path.read_text() == "precious"
    with pytest.raises(IngestError, match=r"ingest\.group: no group named"):
        await serve(outbox, short_dir / "y.sock", group="no-such-group-xyz")
    assert not (short_dir / "y.sock").exists()


async def test_close_answers_what_was_queued(
    outbox: Outbox, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve(outbox, short_dir / "s.sock", linger=0.2)
    reader, writer = await asyncio.open_unix_connection(server.path)
    queued = asyncio.Event()
    submit = server.submit

    def spy(*args: Any) -> None:
        submit(*args)
        queued.set()

    monkeypatch.setattr(server, "submit", spy)
    writer.write(b'{"topic": "a", "data": 1}\n')
    await writer.drain()
    await queued.wait()  # queued, not yet committed (linger 0.2 s)
    await server.close()
    assert json.loads(await reader.readline())["ok"]
    assert outbox.depth(TELEMETRY)[0] == 1


# -- simkeeper publish ---------------------------------------------------------------------


async def publish(cfg: Path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "publish", "--config", str(cfg), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_publish_command(outbox: Outbox, short_dir: Path) -> None:
    path = short_dir / "p.sock"
    cfg = short_dir / "config.toml"
    cfg.write_text(f'device_id = "gw-1"\n[ingest]\nsocket = "{path}"\n')
    code, out, err = await publish(cfg, "sensors/x", '{"a": 1}')
    assert (code, out) == (1, "")
    assert err.strip() == f"simkeeper publish: the agent is not running (nothing listens on {path})"
    refusal: list[str | None] = [None]
    server = await serve(outbox, path, gates=[lambda: refusal[0]])
    code, out, err = await publish(cfg, "sensors/x", '{"a": 1}', "--priority", "5")
    assert (code, err) == (0, "")
    (stored,) = outbox.next_batch(TELEMETRY, 10, 1 << 20)
    assert out.strip() == stored.id and stored.data == '{"a":1}' and stored.priority == 5
    code, out, err = await publish(cfg, "sensors/y", stdin=b'[1, "two"]\n')
    assert code == 0 and outbox.depth(TELEMETRY)[0] == 2
    refusal[0] = "plan cap reached"
    code, out, err = await publish(cfg, "sensors/x", "1")
    assert (code, err.strip()) == (1, "simkeeper publish: refused by the agent: plan cap reached")
    code, _, err = await publish(cfg, "sensors/x", "{nope")
    assert code == 2 and err.startswith("simkeeper publish: JSON argument is not valid JSON")
    code, _, err = await publish(cfg, "sensors/#", "1")
    assert code == 2 and "bad topic" in err
    code, _, err = await publish(cfg, "a", "1", "--priority", "x")
    assert code == 2
    (short_dir / "bad.toml").write_text("device_id = 5\n")
    code, _, err = await publish(short_dir / "bad.toml", "a", "1")
    assert code == 2 and "device_id: expected" in err
    assert "Traceback" not in err
    await server.close()


# -- the agent SIGKILLed mid-stream ----------------------------------------------------------

AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agent.telemetry.ingest import IngestServer
    from agent.telemetry.outbox import Outbox
    from agent.core.store import Store

    async def main():
        store = Store(sys.argv[1])
        server = IngestServer(Outbox(store, max_bytes=1 << 30, max_age=1e9), Path(sys.argv[2]))
        await server.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_sigkill_mid_stream_loses_no_acked_reading(short_dir: Path) -> None:
    db, path = short_dir / "agent.db", short_dir / "agent.sock"
    acked: list[str] = []
    for round_ in range(3):
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT, str(db), str(path)], stdout=subprocess.PIPE, cwd=ROOT
        )
        assert agent.stdout is not None and agent.stdout.readline() == b"ready\n"
        clients = []
        for n in range(4):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            sock.sendall(b"".join(b'{"topic": "k/%d", "data": %d}\n' % (n, i) for i in range(3000)))
            clients.append(sock.makefile("rb"))
        answers = 0
        while answers < 500 * (round_ + 1):  # kill at a different point each round
            answer = json.loads(clients[answers % 4].readline())
            assert answer["ok"], answer
            acked.append(answer["id"])
            answers += 1
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        for f in clients:  # answers already sent before the kill are acks too
            for line in f:
                acked.append(json.loads(line)["id"])
        store = Store(db)
        assert store.integrity_check() == "ok"
        prefix = store.query("SELECT value FROM meta WHERE key = 'outbox.id_prefix'")[0][0]
        present = {f"{prefix}-{seq}" for (seq,) in store.query("SELECT seq FROM outbox")}
        assert set(acked) <= present
        store.close()
    assert len(acked) == len(set(acked))
