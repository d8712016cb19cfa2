"""Local ingestion over a real Unix socket: the protocol, hostile clients, group commit (a bad
reading fails alone), the client slots (the idlest gives way), the socket's life,
`simkeeper publish`, and the agent SIGKILLed mid-stream."""

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
from agent.telemetry.ingest import IngestError, IngestServer
from agent.telemetry.line import parse_line
from agent.telemetry.outbox import TELEMETRY, Item, Outbox
from tests.broker import WAIT, until

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


def hold_first_commit(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[list[Item]], threading.Event, threading.Event]:
    """Record the items of every ``outbox.add`` call, and hold the first one on the store's
    thread (``held`` set) until ``release`` is set: what arrives meanwhile queues behind it."""
    calls: list[list[Item]] = []
    held, release = threading.Event(), threading.Event()
    real = outbox.add

    def add(items: list[Item]) -> list[str]:
        calls.append(list(items))
        if len(calls) == 1:
            held.set()
            release.wait(timeout=WAIT)
        return real(items)

    monkeypatch.setattr(outbox, "add", add)
    return calls, held, release


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


async def test_a_half_closed_client_gets_every_answer(server: IngestServer, outbox: Outbox) -> None:
    """``printf ... | socat - UNIX-CONNECT:...``: the client shuts its sending half down right
    after its lines (the last without a newline); every line is answered, then EOF."""
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(b'{"topic": "a", "data": 1}\n{"topic": "a/#", "data": 2}\n'
                 b'{"topic": "a", "data": 3}')
    writer.write_eof()
    answers = [json.loads(line) for line in (await reader.read()).splitlines()]
    writer.close()
    assert [a["ok"] for a in answers] == [True, False, True]
    assert [r.id for r in outbox.next_batch(TELEMETRY, 10, 1 << 20)] == [
        answers[0]["id"], answers[2]["id"]]


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
    calls, held, release = hold_first_commit(outbox, monkeypatch)

    async def client(n: int) -> list[dict[str, Any]]:
        lines = [json.dumps({"topic": f"c/{n}", "data": i}).encode() + b"\n" for i in range(50)]
        return await exchange(server.path, lines)

    clients = asyncio.gather(*(client(n) for n in range(20)))
    try:
        await until(held.is_set, "the first commit under way")
        await until(lambda: len(calls[0]) + len(server._queue) == 1000,
                    "every other line queued behind it")
    finally:
        release.set()
    results = await clients
    commits = [len(items) for items in calls]
    ids = [a["id"] for answers in results for a in answers]
    assert len(ids) == len(set(ids)) == 1000
    assert sum(commits) == 1000
    assert len(commits) == 1 + -(-(1000 - commits[0]) // 512)  # max_batch lines a commit
    for n in range(20):  # order kept per client (and so per topic)
        batch = [r for r in outbox.next_batch(TELEMETRY, 2000, 1 << 30) if r.topic == f"c/{n}"]
        assert [json.loads(r.data) for r in batch] == list(range(50))


@pytest.mark.parametrize("checked", [True, False], ids=["checked-alone", "refused-as-a-group"])
async def test_a_lone_surrogate_fails_only_its_own_line(
    server: IngestServer, outbox: Outbox, monkeypatch: pytest.MonkeyPatch, checked: bool
) -> None:
    """``"\\ud800"`` is valid JSON but not UTF-8 text. Its line alone is refused, saying so;
    every other line of its client and of another one, committed in the same group, is
    committed. The outbox checks each line before it is grouped; without that check
    (``refused-as-a-group``), the outbox refuses the group and its lines go again one by one.
    The first commit is held until every line has arrived, so the grouping is not left to
    timing."""
    calls, held, release = hold_first_commit(outbox, monkeypatch)
    if not checked:
        monkeypatch.setattr(outbox, "check", lambda items: None)
    mine = [b'{"topic": "c/a", "data": %d}\n' % i for i in range(50)]
    mine[25] = b'{"topic": "c/a", "data": {"text": "bad \\ud800 text"}}\n'
    other = [b'{"topic": "c/b", "data": %d}\n' % i for i in range(20)]
    clients = asyncio.gather(exchange(server.path, mine), exchange(server.path, other))
    try:
        await until(held.is_set, "the first commit under way")
        queued = 70 if not checked else 69
        await until(lambda: len(calls[0]) + len(server._queue) == queued, "every line queued")
    finally:
        release.set()
    mine_answers, other_answers = await clients
    bad = mine_answers.pop(25)
    assert bad["ok"] is False and "not valid UTF-8 text" in bad["error"], bad
    assert "\ud800" not in bad["error"]
    assert all(a["ok"] for a in mine_answers + other_answers)
    stored = {r.id: r.data for r in outbox.next_batch(TELEMETRY, 100, 1 << 20)}
    assert len(stored) == 69
    assert [stored[a["id"]] for a in mine_answers] == [str(i) for i in range(50) if i != 25]
    assert [stored[a["id"]] for a in other_answers] == [str(i) for i in range(20)]
    grouped = [items for items in calls if any("\ud800" in item[2] for item in items)]
    if checked:
        assert grouped == []
    else:  # it went to the outbox with others, then each line of that group alone
        group = grouped[0]
        first = calls.index(group) + 1
        assert len(group) > 1 and calls[first : first + len(group)] == [[i] for i in group]


async def test_full_server_evicts_the_idlest_idle_client(
    outbox: Outbox, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_clients 3. A client inside a line or owed an answer keeps its slot, even when it is
    the idlest; an idle one gives it to a newcomer, told why; when none is idle, the newcomer is
    refused. Answers stay owed while the first commit is held."""
    server = await serve(outbox, short_dir / "s.sock", max_clients=3)
    _, held, release = hold_first_commit(outbox, monkeypatch)
    line = b'{"topic": "a", "data": 1}\n'
    evicted = {"ok": False, "error": "evicted: all 3 client slots taken, this one the idlest"}
    try:
        owed_r, owed_w = await asyncio.open_unix_connection(server.path)
        owed_w.write(line)
        await until(held.is_set, "the first commit under way")
        half_r, half_w = await asyncio.open_unix_connection(server.path)
        half_w.write(b'{"topic": "a",')
        await until(lambda: any(c._buf for c in server.clients), "half a line in")
        idle_r, _ = await asyncio.open_unix_connection(server.path)
        await until(lambda: len(server.clients) == 3, "three clients in")
        new_r, new_w = await asyncio.open_unix_connection(server.path)
        assert json.loads(await idle_r.readline()) == evicted
        assert await idle_r.read() == b""
        new_w.write(line)
        await until(lambda: len(server._queue) == 1, "the newcomer's line queued")
        refused, _ = await asyncio.open_unix_connection(server.path)
        assert json.loads(await refused.readline()) == {
            "ok": False, "error": "too many clients (max 3)"
        }
        assert await refused.read() == b""
    finally:
        release.set()
    assert json.loads(await owed_r.readline())["ok"]
    assert json.loads(await new_r.readline())["ok"]
    half_w.write(b' "data": 2}\n')
    assert json.loads(await half_r.readline())["ok"]
    # All three idle now: the one whose last line is oldest gives way.
    assert (await exchange(server.path, [line]))[0]["ok"]
    assert json.loads(await owed_r.readline()) == evicted
    assert await owed_r.read() == b""
    for writer in (half_w, new_w):
        writer.close()
    await server.close()
    assert outbox.depth(TELEMETRY)[0] == 4


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


async def test_store_full_fails_the_lines_it_hits(
    server: IngestServer, store: Store, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    line = b'{"topic": "a", "data": "' + b"x" * 900 + b'"}\n'
    assert (await exchange(server.path, [line]))[0]["ok"]

    def limit(pages: int | None) -> None:  # on the writer's connection, its thread
        with store.transaction() as db:
            pages = pages or db.execute("PRAGMA page_count").fetchone()[0] + 1
            db.execute(f"PRAGMA max_page_count = {pages}")

    await store.run(limit, None)
    answers: list[dict[str, Any]] = []
    while all(a["ok"] for a in answers):  # readings the outbox still holds outside SQLite pass
        assert len(answers) < 20_000, "the store never filled up"
        answers += await exchange(server.path, [line] * 50)
    assert {a["error"][:10] for a in answers if not a["ok"]} == {"store full"}
    assert not [r for r in caplog.records if r.name.startswith("agent.telemetry.ingest")]
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


STORED = textwrap.dedent(
    """
    import asyncio, json, sys
    from agent.core.store import Store
    from agent.telemetry.outbox import TELEMETRY, Outbox

    outbox = Outbox(Store(sys.argv[1]), max_bytes=1 << 30, max_age=1e9)
    readings = asyncio.run(outbox.fetch(TELEMETRY, 1 << 20, 1 << 40))
    print(json.dumps([r.id for r in readings]))
    """
)


def stored_ids(db: Path) -> set[str]:
    """The ids the outbox holds, as an agent starting again on ``db`` finds them."""
    done = subprocess.run([sys.executable, "-c", STORED, str(db)], capture_output=True,
                          check=True, cwd=ROOT, timeout=WAIT)
    return set(json.loads(done.stdout))


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
        store.close()
        assert set(acked) <= stored_ids(db)
    assert len(acked) == len(set(acked))
