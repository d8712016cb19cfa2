"""Bad input on the gateway's own disk: a clear one-line error, no traceback, nothing lost.

- hostile config files: `simkeeper run` and `simkeeper status` exit 2 naming the problem;
- a corrupted conformance list or signature: the daemon runs on with the last good list (or
  none) and `simkeeper status` says why the file was refused;
- a truncated or garbage database: exit 1 with one line, and the file is left as it was, for
  inspection (never replaced).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.core.store import Store
from tests.broker import WAIT, Broker
from tests.test_daemon import SIMKEEPER
from tests.test_e2e_lifecycle import lifecycle_rig, operator_key
from tests.test_keeper_conformance import ec25
from tests.test_keeper_harness import sign

GOOD = 'device_id = "gw-bad"\n[store]\npath = "{db}"\n[ingest]\nsocket = "{sock}"\n'


def simkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIMKEEPER, *args], capture_output=True, text=True, timeout=WAIT,
                          check=False)


def assert_one_line(done: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def _deep(path: Path) -> None:
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")


def _huge(path: Path) -> None:  # 8 MB, the last line unterminated
    path.write_text('device_id = "gw"\n' + "# padding\n" * 400_000 + 'x = "' + "a" * 4_000_000)


HOSTILE: dict[str, tuple[Any, tuple[str, ...]]] = {
    "binary": (lambda p: p.write_bytes(b"\x00\xff\xfe\x89PNG\r\n\x1a\n" + os.urandom(512)),
               ("not UTF-8",)),
    "huge": (_huge, ("not valid TOML",)),
    "deep": (_deep, ("not valid TOML",)),
    "wrong-type": (lambda p: p.write_text('device_id = 7\n[uplink]\nport = "x"\n'),
                   ("device_id", "expected")),
    "wrong-table": (lambda p: p.write_text('device_id = "gw"\nmodem = 3\n'), ("modem",)),
    "unknown-key": (lambda p: p.write_text('device_id = "gw"\n[uplink]\nprot = 1883\n'),
                    ("uplink.prot", "unknown key")),
    "directory": (lambda p: p.mkdir(), ("Is a directory",)),
    "unreadable": (lambda p: (p.write_text('device_id = "gw"\n'), p.chmod(0)),
                   ("Permission denied",)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_config_exits_2_in_one_line(tmp_path: Path, case: str) -> None:
    if case == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file")
    make, words = HOSTILE[case]
    config = tmp_path / "agent.toml"
    make(config)
    for command in ("run", "status"):
        assert_one_line(simkeeper(command, "--config", str(config)), 2, *words)


# -- the conformance list -----------------------------------------------------------------------


async def _terminal(agent: Any) -> dict[str, Any]:
    sim = await agent.wait_state(lambda s: s["terminal"] is not None, "the terminal summary")
    terminal: dict[str, Any] = sim["terminal"]
    return terminal


async def test_corrupted_conformance_list_keeps_the_last_good_one(tmp_path: Path,
                                                                  broker: Broker) -> None:
    key, pin = operator_key(tmp_path)
    listed = tmp_path / "conformance.toml"
    sig = tmp_path / "conformance.toml.sig"
    good = ec25(version=3).encode()
    listed.write_bytes(good)
    sig.write_text(sign(key, good))
    extra = pin + f'[conformance]\nlist = "{listed}"\n'
    async with lifecycle_rig(tmp_path, broker, extra=extra) as (agent, _sim, _sub):
        assert (await _terminal(agent))["list_version"] == 3
        cases = {
            "garbage list": lambda: listed.write_bytes(os.urandom(300)),
            "truncated list": lambda: listed.write_bytes(good[: len(good) // 2]),
            "bad signature": lambda: (listed.write_bytes(good + b"\n# changed\n"),
                                      sig.write_text(sign(key, good))),
            "garbage signature": lambda: (listed.write_bytes(good),
                                          sig.write_bytes(os.urandom(64))),
        }
        for name, spoil in cases.items():
            assert await agent.stop() == 0
            spoil()
            await agent.start()
            terminal = await _terminal(agent)
            assert terminal["list_version"] == 3, name  # the last good list, from the store
            assert terminal["list_error"], name
            status = await agent.cli("status", "--json")
            assert status.returncode == 0, (name, status.stderr)  # running
        assert "Traceback" not in agent.log.read_text()


async def test_corrupted_conformance_list_at_first_start_runs_without_one(
    tmp_path: Path, broker: Broker
) -> None:
    _key, pin = operator_key(tmp_path)
    listed = tmp_path / "conformance.toml"
    listed.write_bytes(os.urandom(200))
    (tmp_path / "conformance.toml.sig").write_text("not a signature")
    extra = pin + f'[conformance]\nlist = "{listed}"\n'
    async with lifecycle_rig(tmp_path, broker, extra=extra) as (agent, _sim, _sub):
        terminal = await _terminal(agent)
        assert terminal["list_version"] is None and terminal["list_error"]
        await agent.wait_state(lambda s: s["state"] == "active", "activation without a list")
        assert await agent.stop(signal.SIGTERM) == 0


# -- the database -------------------------------------------------------------------------------


def _real_database(path: Path) -> bytes:
    store = Store(path)
    try:
        with store.transaction() as db:
            for i in range(200):
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (f"k{i}", "v" * 200))
    finally:
        store.close()
    assert not Path(f"{path}-wal").exists()
    return path.read_bytes()


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(20_000))


def _header_only(path: Path) -> None:
    path.write_bytes(_real_database(path)[:100])


def _half(path: Path) -> None:
    path.write_bytes(_real_database(path)[: len(path.read_bytes()) // 2 or 1])


@pytest.mark.parametrize("spoil", [_garbage, _header_only, _half],
                         ids=["garbage", "header-only", "half"])
async def test_bad_database_exits_1_and_is_left_alone(tmp_path: Path, spoil: Any) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "simkeeper.db"
    spoil(db)
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    config = tmp_path / "agent.toml"
    config.write_text(GOOD.format(db=db, sock=tmp_path / "s.sock")
                      + f'[modem]\nport = "{tmp_path / "nomodem"}"\n')
    done = await asyncio.to_thread(simkeeper, "run", "--config", str(config))
    assert_one_line(done, 1, str(db))
    assert done.stderr.startswith("simkeeper run: ")
    status = await asyncio.to_thread(simkeeper, "status", "--config", str(config))
    assert_one_line(status, 1, str(db))
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before  # nothing replaced
    # Only SQLite's own side files may appear (an empty WAL, the shared-memory index).
    others = {p.name: p.stat().st_size for p in state.iterdir() if p.name != "simkeeper.db"}
    assert set(others) <= {"simkeeper.db-wal", "simkeeper.db-shm"}, others
    assert others.get("simkeeper.db-wal", 0) == 0, others
