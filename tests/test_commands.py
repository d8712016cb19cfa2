"""CommandProcessor: every refusal reason, idempotent repeats, the journal, key rotation; the
operator key pinned at start without ``cryptography``, and a bad one refused in one line."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.commands.args import SCHEMAS
from agent.commands.processor import CommandProcessor, Handler
from agent.core.signing import canonical_json
from agent.core.store import Store
from agent.core.trusted_time import TrustedNow
from agent.fleet.sign import encode, make_envelope
from provisioning.keys import public_pem, sign

NOW = 1_750_000_000
DEVICE = "gw-0001"


@dataclass
class FakeClock:
    ts: float | None = float(NOW)
    lower_bound: float = float(NOW)

    def now(self) -> TrustedNow:
        if self.ts is None:
            return TrustedNow(None, None, self.lower_bound)
        return TrustedNow(self.ts, "ntp", self.ts)


@dataclass
class Spy:
    """Records every handler call: ``calls`` is (name, args) in order."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)

    def handlers(self) -> dict[str, Handler]:
        def make(name: str) -> Handler:
            async def handler(args: dict[str, Any]) -> Any:
                self.calls.append((name, args))
                if name in self.fail:
                    raise RuntimeError(f"{name} broke\nsecond line")
                if name == "get-state":
                    return {"state": "active"}
                return f"{name} done"
            return handler
        return {name: make(name) for name in SCHEMAS if name != "rotate-key"}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "simkeeper.db")
    yield s
    s.close()


def processor(store: Store, key: Ed25519PrivateKey | None, spy: Spy,
              clock: FakeClock | None = None, **kw: Any) -> CommandProcessor:
    keys = [public_pem(key.public_key())] if key is not None else []
    return CommandProcessor(store, DEVICE, keys, clock or FakeClock(), spy.handlers(), **kw)


def signed(key: Ed25519PrivateKey, name: str = "suspend", args: dict[str, Any] | None = None,
           **kw: Any) -> bytes:
    if args is None and name == "suspend":
        args = {"scope": "data", "reason": "test"}
    kw.setdefault("now", NOW)
    device = kw.pop("device", DEVICE)
    return encode(make_envelope(key, device, name, args, **kw))


def resign(key: Ed25519PrivateKey, env: dict[str, Any]) -> bytes:
    body = {k: v for k, v in env.items() if k != "sig"}
    return canonical_json({**body, "sig": sign(key, canonical_json(body))})


def lax_signed(key: Ed25519PrivateKey, env: dict[str, Any]) -> bytes:
    """``env`` signed as a signer that ignores DESIGN.md's rule would: over Python's json of
    whatever it holds (floats, big integers, any key, lone surrogates)."""
    body = {k: v for k, v in env.items() if k != "sig"}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    sig = sign(key, raw.encode("utf-8", "surrogatepass"))
    return json.dumps({**body, "sig": sig}).encode()


def reason(res: dict[str, Any]) -> str:
    assert res["status"] == "rejected", res
    return str(res["detail"]).split(":")[0]


# -- accepted ---------------------------------------------------------------------------------


async def test_a_signed_command_runs_once_and_repeats_get_the_stored_result(
        store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    proc = processor(store, key, spy)
    payload = signed(key, cid="cmd-1")
    first = await proc.handle(payload)
    assert first == {"id": "cmd-1", "status": "ok", "detail": "suspend done"}
    assert spy.calls == [("suspend", {"scope": "data", "reason": "test"})]
    for _ in range(3):
        assert await proc.handle(payload) == first
    assert len(spy.calls) == 1
    # a new processor on the same store (a restart) remembers it too
    again = processor(store, key, spy)
    assert await again.handle(payload) == first
    assert len(spy.calls) == 1


async def test_concurrent_duplicates_run_once(store: Store, key: Ed25519PrivateKey) -> None:
    gate = asyncio.Event()
    calls = 0

    async def slow(_args: dict[str, Any]) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return "resumed"

    proc = CommandProcessor(store, DEVICE, [public_pem(key.public_key())], FakeClock(),
                            {"resume": slow})
    payload = signed(key, "resume", cid="dup")
    tasks = [asyncio.create_task(proc.handle(payload)) for _ in range(5)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(r == {"id": "dup", "status": "ok", "detail": "resumed"} for r in results)


async def test_handler_failure_is_a_one_line_failed_result_and_not_rerun(
        store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy(fail={"reset-modem"})
    proc = processor(store, key, spy)
    payload = signed(key, "reset-modem", cid="r1")
    res = await proc.handle(payload)
    assert res == {"id": "r1", "status": "failed",
                   "detail": "RuntimeError: reset-modem broke second line"}
    assert await proc.handle(payload) == res
    assert len(spy.calls) == 1


async def test_get_state_returns_an_object(store: Store, key: Ed25519PrivateKey) -> None:
    res = await processor(store, key, Spy()).handle(signed(key, "get-state"))
    assert res["status"] == "ok" and res["detail"] == {"state": "active"}


async def test_sync_handlers_and_none_detail(store: Store, key: Ed25519PrivateKey) -> None:
    seen: list[dict[str, Any]] = []
    proc = CommandProcessor(store, DEVICE, [public_pem(key.public_key())], FakeClock(),
                            {"activate": seen.append})
    res = await proc.handle(signed(key, "activate"))
    assert res["status"] == "ok" and res["detail"] == "done" and seen == [{}]


async def test_interrupted_run_is_not_rerun(store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    proc = processor(store, key, spy)
    payload = signed(key, "decommission", cid="d1")
    with store.transaction() as db:  # what a crash mid-handler leaves behind
        env = json.loads(payload)
        digest = hashlib.sha256(
            canonical_json({k: v for k, v in env.items() if k != "sig"})).hexdigest()
        db.execute("INSERT INTO command_journal VALUES ('d1', ?, 'decommission', 0, ?, "
                   "'running', NULL)", (digest, NOW + 10**6))
    res = await proc.handle(payload)
    assert res["status"] == "failed" and res["detail"].startswith("interrupted")
    assert spy.calls == []


# -- every refusal ----------------------------------------------------------------------------


async def test_each_refusal_reason(store: Store, key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    spy = Spy()
    clock = FakeClock()
    proc = processor(store, key, spy, clock)
    env = make_envelope(key, DEVICE, "suspend", {"scope": "data"}, now=NOW, cid="base")
    unsigned = {k: v for k, v in env.items() if k != "sig"}
    cases: dict[str, bytes] = {
        "unsigned": canonical_json(unsigned),
        "unsigned ": canonical_json({**unsigned, "sig": ""}),
        "bad signature": resign(other, env),
        "bad signature ": canonical_json({**env, "args": {"scope": "radio"}}),
        "bad signature  ": canonical_json({**env, "sig": env["sig"][:-4]}),
        "other device": signed(key, device="gw-0002"),
        "expired": signed(key, now=NOW - 1000, ttl=300),
        "not yet valid": signed(key, now=NOW + 1000),
        "unknown command": signed(key, "self-destruct", {}),
        "bad arguments": signed(key, "suspend", {"scope": "everything"}),
        "bad arguments ": signed(key, "suspend", {"scope": "data", "until": "soon"}),
        "bad arguments  ": signed(key, "suspend", {"scope": "data", "colour": 1}),
        "bad arguments   ": signed(key, "set-plan", {"iccid": "8981", "bytes": 10}),
        "bad arguments    ": signed(key, "rotate-key", {"public_key": "not a key"}),
        "malformed": b"\xff\xfe",
        "malformed ": b'{"id": "x"',
        "malformed  ": canonical_json({**env, "extra": 1}),
        "malformed   ": lax_signed(key, {**env, "issued_at": 1.5}),
        "malformed    ": lax_signed(key, {**env, "args": {"scope": "data", "until": 1.0}}),
    }
    for want, payload in cases.items():
        res = await proc.handle(payload)
        assert reason(res) == want.strip(), (want, res)
    assert spy.calls == []
    assert proc.journal.size() == 0
    # within the skew is fine
    assert (await proc.handle(signed(key, now=NOW + 100, cid="skewed")))["status"] == "ok"


async def test_replayed_id_with_another_envelope(store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    proc = processor(store, key, spy)
    assert (await proc.handle(signed(key, "resume", cid="same")))["status"] == "ok"
    res = await proc.handle(signed(key, "decommission", cid="same"))
    assert reason(res) == "replayed" and res["id"] == "same"
    assert [c[0] for c in spy.calls] == ["resume"]


async def test_no_key_configured_refuses_everything(store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    res = await processor(store, None, spy).handle(signed(key))
    assert reason(res) == "unknown key" and "no operator key" in res["detail"]
    assert spy.calls == []


async def test_sms_restricts_names(store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    res = await processor(store, key, spy).handle(
        signed(key, "decommission"), names={"resume", "suspend", "get-state"}, via="SMS")
    assert reason(res) == "unknown command" and "SMS" in res["detail"]
    assert spy.calls == []


# -- time -------------------------------------------------------------------------------------


async def test_without_trusted_time_only_provable_expiry_refuses(
        store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    clock = FakeClock(ts=None, lower_bound=NOW - 5000)
    proc = processor(store, key, spy, clock)
    res = await proc.handle(signed(key, now=NOW + 3600, cid="future"))
    assert res["status"] == "ok" and "no trusted time" in res["detail"]
    res = await proc.handle(signed(key, now=NOW - 10_000, ttl=300, cid="old"))
    assert reason(res) == "expired" and "no trusted time" in res["detail"]
    state = await proc.handle(signed(key, "get-state", {}, cid="gs"))
    assert "no trusted time" in state["detail"]["time_note"]
    assert len(spy.calls) == 2


async def test_journal_outlives_expiry_then_is_pruned(store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    clock = FakeClock()
    proc = processor(store, key, spy, clock, skew=120, journal_keep=600)
    payload = signed(key, "resume", cid="old", ttl=300)
    assert (await proc.handle(payload))["status"] == "ok"
    clock.ts = NOW + 300 + 120 + 599  # expired, but still remembered: the stored result
    assert (await proc.handle(payload))["status"] == "ok"
    clock.ts = NOW + 300 + 120 + 700
    assert (await proc.handle(signed(key, "activate", now=clock.ts)))["status"] == "ok"
    assert proc.journal.lookup("old") is None  # pruned by the next command
    assert reason(await proc.handle(payload)) == "expired"
    assert len(spy.calls) == 2


# -- key rotation -----------------------------------------------------------------------------


async def test_rotate_key_installs_the_next_key_and_retires_the_old(
        store: Store, key: Ed25519PrivateKey) -> None:
    spy = Spy()
    nxt = Ed25519PrivateKey.generate()
    proc = processor(store, key, spy)
    pem = public_pem(nxt.public_key()).decode()
    res = await proc.handle(signed(key, "rotate-key", {"public_key": pem}, cid="rot"))
    assert res["status"] == "ok" and "installed" in res["detail"], res
    assert reason(await proc.handle(signed(key, "resume"))) == "unknown key"
    assert (await proc.handle(signed(nxt, "resume")))["status"] == "ok"
    # persisted: a restarted agent (same config key) trusts the new key only
    again = processor(store, key, spy)
    assert reason(await again.handle(signed(key, "activate"))) == "unknown key"
    assert (await again.handle(signed(nxt, "activate")))["status"] == "ok"
    # installing the key in force again is refused
    same = await again.handle(signed(nxt, "rotate-key", {"public_key": pem}))
    assert reason(same) == "bad arguments"
    assert [c[0] for c in spy.calls] == ["resume", "activate"]


def test_bad_configured_key_refuses_to_start(store: Store) -> None:
    with pytest.raises(ValueError, match="operator key is not a PEM public key"):
        CommandProcessor(store, DEVICE, [b"junk"], FakeClock(), {})
    with pytest.raises(ValueError, match="unknown commands"):
        CommandProcessor(store, DEVICE, [], FakeClock(), {"fly": lambda _a: None})


def _python(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return done.stdout.split()


def test_cryptography_waits_for_the_first_signature(tmp_path: Path,
                                                    key: Ed25519PrivateKey) -> None:
    """The daemon's modules and a pinned key import no ``cryptography`` (about 9 MB of RSS); the
    first command's signature check does."""
    pem = tmp_path / "operator.pub"
    pem.write_bytes(public_pem(key.public_key()))
    payload = tmp_path / "command.json"
    payload.write_bytes(signed(key, "get-state"))
    assert _python(f"""
import asyncio, sys
import agent.daemon
from agent.commands.processor import CommandProcessor
from agent.core.store import Store
from agent.core.trusted_time import TrustedNow

class Clock:
    def now(self):
        return TrustedNow({NOW}.0, "ntp", {NOW}.0)

async def get_state(args):
    return {{"state": "active"}}

store = Store({str(tmp_path / "simkeeper.db")!r})
proc = CommandProcessor(store, {DEVICE!r}, [open({str(pem)!r}, "rb").read()], Clock(),
                        {{"get-state": get_state}})
print("cryptography" in sys.modules)
answer = asyncio.run(proc.handle(open({str(payload)!r}, "rb").read()))
print(answer["status"], "cryptography" in sys.modules)
store.close()
""") == ["False", "ok", "True"]


def test_run_refuses_a_bad_operator_key_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "operator.pub").write_text("junk\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f'device_id = "{DEVICE}"\n[modem]\nport = "{tmp_path / "no-modem"}"\n'
        f'data_path = "external"\n[store]\npath = "{tmp_path / "simkeeper.db"}"\n'
        f'[ingest]\nsocket = "{tmp_path / "ingest.sock"}"\n'
        f'[commands]\noperator_key = "{tmp_path / "operator.pub"}"\n')
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        1, "simkeeper run: operator key is not a PEM public key: no PUBLIC KEY block\n")
