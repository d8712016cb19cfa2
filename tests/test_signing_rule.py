"""One exact signing rule (DESIGN.md, "Commands"), proven with signers in three languages.

The same hostile arguments (non-ASCII, U+1F600, U+2028/U+2029, U+007F, every control
character, quotes and backslashes, nesting, the largest integers allowed) are signed by:

- node (tests/signers/sign.js, node's built-in ``crypto`` only: sorted keys, JSON.stringify);
- shell (tests/signers/sign.sh: ``jq -cjS`` makes the bytes, ``openssl pkeyutl -sign -rawin``
  signs them);
- Python (agent.fleet.sign.make_envelope, what ``fleet send`` uses);

and each envelope is run through the command processor with the operator's public key: it must
be executed, its handler given exactly the arguments signed. The bytes each signer builds are
compared with each other and with DESIGN.md's rule written out here, character by character.
Envelopes outside the rule are refused as ``malformed``, the reason naming the problem, and
nothing runs; the Python signer refuses to make them, and ``fleet send`` says so in one line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli import main
from agent.commands.args import SCHEMAS, Arg
from agent.core.signing import canonical_json
from agent.core.store import Store
from agent.fleet.sign import EnvelopeError, encode, make_envelope
from provisioning.keys import private_pem, sign
from tests.test_commands import DEVICE, NOW, Spy, processor

SIGNERS = Path(__file__).resolve().parent / "signers"
CONTROLS = "".join(chr(c) for c in range(0x20))
BIG = 2**53 - 1
HOSTILE: dict[str, dict[str, Any]] = {
    "non-ASCII": {"city": "Grüße 東京", "emoji": "\U0001f600", "mixed": "a\U0001f600ü東\x7f"},
    "separators": {"ls": "\u2028", "ps": "\u2029", "both": "x\u2028y\u2029z", "bom": "\ufeff"},
    "controls": {"all": CONTROLS, "del": "\x7f", "nul": "\x00", "around": f"<{CONTROLS}\x7f>"},
    "quotes": {"q": '"', "bs": "\\", "mix": '\\"\\\\"/\\u007f\\n', "slash": "</script>"},
    "nested": {"a": [1, [2, [3, [4, {"b": {"c": {"d": [True, False, None, "\x7f"]}}}]]]],
               "o": {"p": {"q": {"r": {"s": {}}}}}, "empty": [], "blank": {}},
    "integers": {"max": BIG, "min": -BIG, "zero": 0, "minus_one": -1, "list": [BIG, -BIG, 0]},
    "literals": {"t": True, "f": False, "n": None, "list": [None, True, False]},
    "keys": {"with-dash": 1, "with_underscore": 2, "_lead": 3, "Z": 4, "z": 5, "a-b": 6,
             "a_b": 7, "aB": 8, "a9": 9, "A-_9z": {"x-": {"_": [{"Y": "\u2028"}]}}},
}


def design_bytes(value: Any) -> bytes:
    """DESIGN.md's signed bytes, written from its text (not through any JSON library)."""
    return _design(value).encode("utf-8")


_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
          "\r": "\\r"}


def _string(text: str) -> str:
    return '"' + "".join(_SHORT.get(ch) or (f"\\u{ord(ch):04x}" if ord(ch) < 0x20 else ch)
                         for ch in text) + '"'


def _design(value: Any) -> str:
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ",".join(_design(v) for v in value) + "]"
    keys = sorted(value, key=lambda k: k.encode())
    return "{" + ",".join(f"{_string(k)}:{_design(value[k])}" for k in keys) + "}"


# -- the signers ------------------------------------------------------------------------------


def _tool(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: that signer is not run")


def _run(argv: list[str], stdin: bytes) -> bytes:
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


Signer = Callable[[Path, dict[str, Any], bool], bytes]


def _external(*argv: str) -> Signer:
    def signer(key_file: Path, body: dict[str, Any], canonical: bool) -> bytes:
        # the signer reads \u escapes (ensure_ascii), and must write raw UTF-8 where DESIGN says
        return _run([*argv, str(key_file), *(["--canonical"] if canonical else [])],
                    json.dumps(body).encode())
    return signer


def _python(key_file: Path, body: dict[str, Any], canonical: bool) -> bytes:
    if canonical:
        return canonical_json(body)
    from provisioning.keys import load_ed25519_private

    key = load_ed25519_private(key_file)
    env = make_envelope(key, body["device_id"], body["name"], body["args"], cid=body["id"],
                        ttl=body["expires_at"] - body["issued_at"], now=body["issued_at"])
    return encode(env)


@pytest.fixture(params=["node", "shell", "python"])
def signer(request: pytest.FixtureRequest) -> Signer:
    if request.param == "node":
        _tool("node")
        return _external("node", str(SIGNERS / "sign.js"))
    if request.param == "shell":
        _tool("openssl", "jq")
        return _external("sh", str(SIGNERS / "sign.sh"))
    return _python


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def key_file(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    path = tmp_path / "operator.key"
    path.write_bytes(private_pem(key))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "simkeeper.db")
    yield s
    s.close()


@pytest.fixture
def anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """``suspend`` takes one more argument, ``payload``, of any JSON value: the real commands'
    arguments are strings, integers and null, and the hostile set is more than that."""
    monkeypatch.setitem(SCHEMAS["suspend"], "payload", (False, Arg(lambda v: v, "anything")))


def body(cid: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "device_id": DEVICE, "name": "suspend", "args": args,
            "issued_at": NOW, "expires_at": NOW + 300}


# -- accepted: every signer, the same bytes -----------------------------------------------------


@pytest.mark.usefixtures("anything")
async def test_every_signer_is_accepted_with_the_same_bytes(
        signer: Signer, key: Ed25519PrivateKey, key_file: Path, store: Store) -> None:
    spy = Spy()
    proc = processor(store, key, spy)
    for n, (case, payload) in enumerate(HOSTILE.items()):
        reason = "".join(v for v in payload.values() if isinstance(v, str))[:200]
        args = {"scope": "data", "reason": reason, "payload": payload}
        env = body(f"case-{n}", args)
        signed = signer(key_file, env, True)
        assert signed == design_bytes(env) == canonical_json(env), case
        res = await proc.handle(signer(key_file, env, False))
        assert res == {"id": f"case-{n}", "status": "ok", "detail": "suspend done"}, (case, res)
        assert spy.calls[-1] == ("suspend", args), case
    assert proc.executed == len(HOSTILE)


def test_every_character_encodes_as_design_says(signer: Signer, key_file: Path) -> None:
    """Every Unicode scalar value, in a value and beside the escapes it must not disturb."""
    every = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    env = {"s": every, "t": "\\u007f\\\x7f\\\\\x7f\x7f\x7f"}
    assert signer(key_file, env, True) == design_bytes(env)


# -- refused: outside the rule ------------------------------------------------------------------

_ENVELOPE = ('{"id":"%s","device_id":"' + DEVICE + '","name":"suspend","args":%s,'
             f'"issued_at":{NOW},"expires_at":{NOW + 300}')
OUTSIDE = {  # args as written by a signer that ignores the rule -> what the refusal names
    '{"scope":"data","x":0.00001}': "args.x: 0.00001 is a float",
    '{"scope":"data","x":1.0}': "args.x: 1.0 is a float",
    '{"scope":"data","x":1e3}': "args.x: 1e3 is a float",
    '{"scope":"data","x":[1,-0.0]}': "args.x[1]: -0.0 is a float",
    '{"scope":"data","x":9007199254740992}': "args.x: 9007199254740992 is outside",
    '{"scope":"data","x":-9007199254740992}': "args.x: -9007199254740992 is outside",
    '{"scope":"data","2":1}': "args: key '2' does not match",
    '{"scope":"data","10":1,"2":1}': "args: key '10' does not match",
    '{"scope":"data","\U0001f600":1}': "args: key '\U0001f600' does not match",
    '{"scope":"data","a\\ud83d\\ude00":1}': "args: key 'a\U0001f600' does not match",
    '{"scope":"data","a.b":1}': "args: key 'a.b' does not match",
    '{"scope":"data","x":{"ok":[{"a b":1}]}}': "args.x.ok[0]: key 'a b' does not match",
    '{"scope":"data","":1}': "args: key '' does not match",
    '{"scope":"data","reason":"\\ud800"}': "args.reason: a lone surrogate",
    '{"scope":"data","reason":"\\udc00x\\ud83d"}': "args.reason: a lone surrogate",
    '{"scope":"data","scope":"radio"}': "duplicate key 'scope'",
    '{"scope":"data","x":{"a":1,"a":1}}': "duplicate key 'a'",
    '{"scope":"data","x":NaN}': "NaN is not JSON",
    '{"scope":"data","x":-Infinity}': "-Infinity is not JSON",
    '["scope","data"]': "args must be an object",
}
OUTSIDE_FIELDS = {
    '{"id":"a.b","device_id":"gw-0001","name":"suspend","args":{},"issued_at":1,"expires_at":2':
        "id must be 1-64 of A-Z a-z 0-9 _ -",
    '{"id":"","device_id":"gw-0001","name":"suspend","args":{},"issued_at":1,"expires_at":2':
        "id must be 1-64 of A-Z a-z 0-9 _ -",
    _ENVELOPE.replace(f'"issued_at":{NOW}', f'"issued_at":{NOW}.0') % ("t1", "{}"):
        "issued_at must be integer Unix seconds",
    _ENVELOPE.replace(f'"expires_at":{NOW + 300}', f'"expires_at":"{NOW + 300}"') % ("t2", "{}"):
        "expires_at must be integer Unix seconds",
}


def _honestly_signed(key: Ed25519PrivateKey, text: str) -> bytes:
    """``text`` (an envelope without sig, its last ``}`` missing), signed over its own bytes:
    what a signer that skips the rule sends. Refused as malformed, never as a bad signature."""
    raw = (text + "}").encode("utf-8", "surrogatepass")
    return (text + f',"sig":"{sign(key, raw)}"}}').encode("utf-8", "surrogatepass")


async def test_outside_the_rule_is_malformed_and_not_run(
        key: Ed25519PrivateKey, store: Store) -> None:
    spy = Spy()
    proc = processor(store, key, spy)
    cases = {_ENVELOPE % (f"neg-{n}", args): why for n, (args, why) in enumerate(OUTSIDE.items())}
    for text, why in {**cases, **OUTSIDE_FIELDS}.items():
        res = await proc.handle(_honestly_signed(key, text))
        assert res["status"] == "rejected", (text, res)
        assert res["detail"].startswith("malformed: ") and why in res["detail"], (text, res)
        assert "\n" not in res["detail"]
    assert spy.calls == [] and proc.executed == 0 and proc.journal.size() == 0


@pytest.mark.parametrize(("args", "why"), [
    ({"x": 0.00001}, "args.x: 1e-05 is a float"),
    ({"x": 1.0}, "args.x: 1.0 is a float"),
    ({"x": float("nan")}, "args.x: nan is a float"),
    ({"x": [2**53]}, "args.x[0]: 9007199254740992 is outside"),
    ({"2": 1}, "args: key '2' does not match"),
    ({"\U0001f600": 1}, "args: key '\U0001f600' does not match"),
    ({"a.b": 1}, "args: key 'a.b' does not match"),
    ({"s": "\ud800"}, "args.s: a lone surrogate"),
    ({"x": {1, 2}}, "args.x: a set has no JSON form"),
])
def test_the_python_signer_refuses_what_the_device_would(
        key: Ed25519PrivateKey, args: dict[str, Any], why: str) -> None:
    with pytest.raises(EnvelopeError, match="^" + re.escape(why)):
        make_envelope(key, DEVICE, "resume", args)


@pytest.mark.parametrize(("kw", "why"), [
    ({"cid": "a.b"}, "malformed: id must be"),
    ({"ttl": 31 * 86400}, "malformed: expires_at must be within"),
])
def test_the_python_signer_refuses_a_bad_shape(key: Ed25519PrivateKey, kw: dict[str, Any],
                                               why: str) -> None:
    with pytest.raises(EnvelopeError, match=why):
        make_envelope(key, DEVICE, "resume", **kw)


@pytest.mark.parametrize(("arg", "why"), [
    ("x=0.00001", "args.x: 1e-05 is a float"),
    ("a.b=1", "args: key 'a.b' does not match"),
])
def test_fleet_send_refuses_in_one_line_before_connecting(
        key_file: Path, capsys: pytest.CaptureFixture[str], arg: str, why: str) -> None:
    # port 9 (discard): nothing listens, and nothing is tried: the envelope is refused first
    code = main(["fleet", "send", "gw-0001", "resume", "--arg", arg, "--key", str(key_file),
                 "--broker", "127.0.0.1:9", "--timeout", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"simkeeper fleet send: {why}"), err
