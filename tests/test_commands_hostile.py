"""10,000 hostile payloads through CommandProcessor.handle: 0 executed, 0 crashes, each answered.
Operator key PEMs in every shape: the agent's own reader (no ``cryptography``) takes exactly
the Ed25519 keys ``cryptography`` takes, and the same raw key."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.core.signing import SigningError, canonical_json, load_public_key
from agent.core.store import Store
from agent.fleet.sign import make_envelope
from tests.test_commands import DEVICE, NOW, Spy, lax_signed, processor, resign, signed

COUNT = 10_000
_VALUES: list[Any] = [None, True, 0, -1, 1.5, 2**70, "", "x" * 300, [], {}, [1, [2]],
                      {"a": {"b": None}}, "\u202e", "\ud800", 1e308]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def generators(key: Ed25519PrivateKey, rogue: Ed25519PrivateKey,
               rng: random.Random) -> list[Callable[[], bytes]]:
    def env(**changes: Any) -> dict[str, Any]:
        base = make_envelope(key, DEVICE, "decommission", {}, now=NOW, cid=f"h{rng.random()}"[:60]
                             .replace(".", "_"))
        base.update(changes)
        return base

    def random_bytes() -> bytes:
        return rng.randbytes(rng.choice([0, 1, 2, 7, 64, 500, 4000]))

    def huge() -> bytes:
        return b'{"id":"' + b"a" * (300 * 1024) + b'"}'

    def deep() -> bytes:
        n = rng.choice([17, 100, 5000, 100_000])
        return (b"[" * n + b"]" * n) if rng.random() < 0.5 else (b'{"a":' * n + b"1" + b"}" * n)

    def wrong_types() -> bytes:
        field = rng.choice(["id", "device_id", "name", "args", "issued_at", "expires_at", "sig"])
        e = env()
        e[field] = rng.choice([v for v in _VALUES if v != e[field]])
        return json.dumps(e).encode("utf-8", "surrogatepass")

    def missing_or_extra() -> bytes:
        e = env()
        if rng.random() < 0.5:
            e.pop(rng.choice(sorted(e)))
        else:
            e[rng.choice(["key", "nonce", "Sig", "ID"])] = 1
        return canonical_json(e)

    def forged_sig() -> bytes:
        return canonical_json(env(sig=_b64(rng.randbytes(64))))

    def tampered() -> bytes:  # a valid signature over other bytes
        e = env()
        e["args"] = {"scope": rng.choice(["data", "radio"])}
        return canonical_json(e)

    def rogue_key() -> bytes:
        return resign(rogue, env())

    def replayed() -> bytes:  # the executed id "legit", re-signed around another command
        return signed(key, rng.choice(["decommission", "reset-modem", "suspend"]),
                      {"scope": "radio"} if rng.random() < 0.5 else {}, cid="legit")

    def refused_but_signed() -> bytes:
        kind = rng.randrange(4)
        if kind == 0:
            return signed(key, "decommission", {}, device="gw-9999")
        if kind == 1:
            return signed(key, "decommission", {}, now=NOW - 86400)
        if kind == 2:
            return signed(key, rng.choice(["format-disk", "Resume", "shell"]), {})
        return lax_signed(key, env(name="suspend", args={"scope": rng.choice(_VALUES)}))

    def junk_json() -> bytes:
        return rng.choice([b"null", b"[]", b'"str"', b"1e999", b'{"sig":null}', b"NaN",
                           b'{"a":1,"a":2}', b'{"id":"x","sig":"' + b"A" * 86 + b'"}',
                           b'\xef\xbb\xbf{}', json.dumps({"x": "\ud800"}).encode()])

    return [random_bytes, huge, deep, wrong_types, missing_or_extra, forged_sig, tampered,
            rogue_key, replayed, refused_but_signed, junk_json]


async def test_ten_thousand_hostile_payloads(tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    key, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    spy = Spy()
    proc = processor(store, key, spy)
    legit = signed(key, "resume", {}, cid="legit")
    first = await proc.handle(legit)
    assert first["status"] == "ok"
    spy.calls.clear()
    rng = random.Random(5)
    gens = generators(key, rogue, rng)
    statuses: dict[str, int] = {}
    for i in range(COUNT):
        payload = legit if i % 1000 == 0 else gens[i % len(gens)]()
        res = await proc.handle(payload)
        assert set(res) == {"id", "status", "detail"}, res
        assert res["id"] is None or isinstance(res["id"], str)
        assert isinstance(res["detail"], str) and "\n" not in res["detail"]
        if payload is legit:
            assert res == first
        else:
            assert res["status"] == "rejected", (payload[:200], res)
        statuses[res["detail"].split(":")[0]] = statuses.get(res["detail"].split(":")[0], 0) + 1
    assert spy.calls == []
    assert proc.executed == 1
    assert proc.journal.size() == 1
    assert {"malformed", "unsigned", "bad signature", "unknown command", "bad arguments",
            "replayed", "other device", "expired"} <= statuses.keys(), statuses
    store.close()


def _spki(key: Any, fmt: s.PublicFormat = s.PublicFormat.SubjectPublicKeyInfo) -> bytes:
    return bytes(key.public_key().public_bytes(s.Encoding.PEM, fmt))


def _pems() -> dict[str, bytes]:
    key = Ed25519PrivateKey.generate()
    pem = _spki(key)
    body = pem.split(b"\n")[1]
    der = base64.b64decode(body)
    return {
        "plain": pem, "text before": b"my key:\n" + pem, "same line": b"key " + pem,
        "no final newline": pem.rstrip(), "crlf": pem.replace(b"\n", b"\r\n"),
        "text after": pem + b"junk\n", "two blocks": pem + _spki(Ed25519PrivateKey.generate()),
        "spaces in body": pem.replace(body, body[:9] + b" \t" + body[9:]),
        "indented": b"  " + pem.replace(b"\n", b"\n  "),
        "unpadded": pem.replace(body, body.rstrip(b"=")),
        "bad base64": pem.replace(body, body[:10] + b"*" + body[11:]),
        "short key": pem.replace(body, base64.b64encode(der[:-1])),
        "long key": pem.replace(body, base64.b64encode(der[:1] + b"+" + der[2:] + b"\0")),
        "params": pem.replace(body, base64.b64encode(bytes.fromhex("302c300706032b65700500")
                                                     + der[-35:])),
        "empty block": b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
        "private key": key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                         s.NoEncryption()),
        "x25519": _spki(x25519.X25519PrivateKey.generate()),
        "ed448": _spki(ed448.Ed448PrivateKey.generate()),
        "p-256": _spki(ec.generate_private_key(ec.SECP256R1())),
        "rsa pkcs1": _spki(rsa.generate_private_key(65537, 1024), s.PublicFormat.PKCS1),
        "garbage": b"garbage", "empty": b"",
    }


@pytest.mark.parametrize("shape", sorted(_pems()))
def test_the_agents_key_reader_agrees_with_cryptography(shape: str) -> None:
    pem = _pems()[shape]
    try:
        theirs = load_pem_public_key(pem)
    except ValueError:
        theirs = None
    try:
        ours = load_public_key(pem)
    except SigningError as exc:
        assert not isinstance(theirs, Ed25519PublicKey), (shape, exc)
        wrong_kind = theirs is not None  # a key of another kind: said so
        assert str(exc).startswith("not an Ed25519 key" if wrong_kind else "not a PEM public key")
        return
    assert isinstance(theirs, Ed25519PublicKey), shape
    assert ours == theirs.public_bytes_raw()
