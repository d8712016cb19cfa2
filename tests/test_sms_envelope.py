"""Commands by SMS: the compact envelope, hostile texts, and the reader on the simulated modem."""

from __future__ import annotations

import contextlib
import hashlib
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands.sms import ModemSmsReply, SmsCommandReader
from agent.commands.sms_envelope import (
    PART_CHARS,
    SMS_NAMES,
    SmsAssembler,
    SmsEnvelopeError,
    decode_blob,
    encode_sms,
    reply_text,
)
from agent.core.signing import b64url, canonical_json
from agent.core.store import Store
from agent.fleet.sign import make_envelope
from drivers.channel import AtChannel
from drivers.simulator import SimulatedModem
from tests.test_commands import DEVICE, NOW, Spy, processor

KEY = Ed25519PrivateKey.generate()


def envelope(name: str = "suspend", **kw: Any) -> dict[str, Any]:
    args = {"scope": "data", "reason": "maintenance window"} if name == "suspend" else {}
    kw.setdefault("now", NOW)
    return make_envelope(KEY, DEVICE, name, args, **kw)


def test_round_trip_in_any_order_with_duplicates() -> None:
    env = envelope()
    parts = encode_sms(env)
    assert 1 < len(parts) <= 3, parts
    assert all(len(p) <= PART_CHARS and p.isascii() for p in parts)
    asm = SmsAssembler()
    shuffled = [*parts, parts[0]]
    random.Random(1).shuffle(shuffled)
    outs = [asm.feed(p) for p in shuffled]
    done = [o for o in outs if o is not None]
    assert done == [canonical_json(env)]


@pytest.mark.parametrize("text", [
    "", "hello", "SK1:", "SK1:abcd11:", "SK1:abcd21:AAAA", "SK1:abcd1Z:AAAA", "SK1:ab!d11:AA",
    "SK1:abcd11:A", "SK1:abcd11:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "SK1:abcd11:" + "A" * 300,
])
def test_garbage_raises_only_our_error(text: str) -> None:
    with pytest.raises(SmsEnvelopeError):
        SmsAssembler().feed(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=4), st.binary(max_size=300))
def test_hostile_texts_never_raise_anything_else(texts: list[str], blob: bytes) -> None:
    import base64

    asm = SmsAssembler()
    forged = "SK1:abcd11:" + base64.urlsafe_b64encode(blob).rstrip(b"=").decode()[:142]
    for text in [*texts, forged, *(t.replace("X", "SK1:") for t in texts)]:
        with contextlib.suppress(SmsEnvelopeError):
            asm.feed(text)


def test_a_tampered_part_is_refused() -> None:
    parts = encode_sms(envelope())
    last = parts[-1]
    bad = last[:-1] + ("A" if last[-1] != "A" else "B")
    asm = SmsAssembler()
    for p in parts[:-1]:
        assert asm.feed(p) is None
    with pytest.raises(SmsEnvelopeError, match="tag mismatch"):
        asm.feed(bad)


def test_incomplete_messages_expire() -> None:
    now = [0.0]
    asm = SmsAssembler(max_age=10, clock=lambda: now[0])
    parts = encode_sms(envelope())
    asm.feed(parts[0])
    now[0] = 11
    for p in parts[1:]:
        assert asm.feed(p) is None  # the first part was forgotten


async def test_round_trip_under_the_signing_rule(tmp_path: Path) -> None:
    """The hostile characters of DESIGN.md's rule survive SMS: the device runs the command with
    exactly the reason signed; a body outside the rule (a float) is refused, saying so."""
    reason = "Grüße 東京 \U0001f600\u2028\u2029\x7f" + "".join(chr(c) for c in range(32)) + '"\\'
    env = make_envelope(KEY, DEVICE, "suspend", {"scope": "data", "reason": reason}, now=NOW,
                        cid="sms-rule")
    asm = SmsAssembler()
    payload = [out for p in encode_sms(env) if (out := asm.feed(p)) is not None]
    assert payload == [canonical_json(env)]
    store, spy = Store(tmp_path / "simkeeper.db"), Spy()
    try:
        res = await processor(store, KEY, spy).handle(payload[0], names=SMS_NAMES, via="SMS")
    finally:
        store.close()
    assert res["status"] == "ok", res
    assert spy.calls == [("suspend", {"scope": "data", "reason": reason})]
    body = b'{"args":{"scope":"data","x":1.0},"device_id":"gw-0001","expires_at":2,"id":"f",' \
        b'"issued_at":1,"name":"suspend"}'
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    blob = bytes(64) + packer.compress(body) + packer.flush()
    with pytest.raises(SmsEnvelopeError, match=r"args\.x: 1\.0 is a float"):
        decode_blob(b64url(blob), b64url(hashlib.sha256(blob).digest())[:4])


def test_reply_text_fits_one_sms() -> None:
    text = reply_text({"id": "x", "status": "ok", "detail": {"state": "é" * 300}})
    assert len(text) <= 160 and text.startswith("SK1R:x ok ") and text.isascii()
    # a detail is not signed: a float in it is fine
    assert reply_text({"id": "y", "status": "ok", "detail": {"rssi": -71.5}}) == (
        'SK1R:y ok {"rssi":-71.5}')


class RecordingChannel:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = (), data: bytes | None = None) -> list[str]:
        self.sent.append((cmd, data))
        return []

    def add_urc_listener(self, callback: Any) -> Any:
        return lambda: None


async def test_modem_reply_uses_cmgs() -> None:
    chan = RecordingChannel()
    await ModemSmsReply(chan)("+818012345678", {"id": "a", "status": "ok", "detail": "done"})
    await ModemSmsReply(chan)("not-a-number", {"id": "a", "status": "ok", "detail": "done"})
    assert chan.sent == [('AT+CMGS="+818012345678"', b"SK1R:a ok done")]


# -- the reader on the simulated modem ----------------------------------------------------------


async def test_sms_commands_through_the_simulated_modem(tmp_path: Path) -> None:
    store = Store(tmp_path / "simkeeper.db")
    spy = Spy()
    proc = processor(store, KEY, spy)
    replies: list[tuple[str, dict[str, Any]]] = []
    async with SimulatedModem("quectel", boot_seconds=0.1, sim_busy_seconds=0.1) as sim:
        # one message waiting before the agent starts: read by the start-up sweep
        for part in encode_sms(envelope("get-state", cid="early")):
            sim.receive_sms(part)
        chan = await AtChannel.open(sim.path, timeout=2.0, resync_timeout=0.3)
        try:
            reader = SmsCommandReader(chan, proc, lambda s, r: replies.append((s, r)))
            await reader.start()
            await reader.idle()
            # then by +CMTI: a suspend, the same again (a repeat), a foreign SMS, a refused one
            for part in encode_sms(envelope(cid="sus-1")):
                sim.receive_sms(part, sender="+818011112222")
            sim.receive_sms("hello, is this thing on?")
            for part in encode_sms(envelope(cid="sus-1")):
                sim.receive_sms(part, sender="+818011112222")
            for part in encode_sms(envelope("decommission", cid="dec")):
                sim.receive_sms(part, sender="+818011112222")
            forged = encode_sms(make_envelope(Ed25519PrivateKey.generate(), DEVICE, "resume",
                                              {}, now=NOW))
            for part in forged:
                sim.receive_sms(part, sender="+819999999999")
            await _settle(reader)
            await reader.stop()
        finally:
            await chan.close()
        assert sim.state.sms == {}  # everything read and deleted
    assert [c[0] for c in spy.calls] == ["get-state", "suspend"]
    answered = [(s, r["id"], r["status"]) for s, r in replies]
    assert answered == [
        ("+818000000000", "early", "ok"),
        ("+818011112222", "sus-1", "ok"),
        ("+818011112222", "sus-1", "ok"),  # the repeat: the stored result
        ("+818011112222", "dec", "rejected"),  # not accepted by SMS
    ]
    assert "not accepted by SMS" in replies[-1][1]["detail"]
    assert reader.ignored == 1
    assert reader.results[-1]["detail"].startswith("bad signature")  # logged, not answered
    store.close()


async def _settle(reader: SmsCommandReader) -> None:
    import asyncio

    for _ in range(100):  # +CMTI arrive asynchronously: wait until quiet
        await asyncio.sleep(0.05)
        await reader.idle()
        if len(reader.results) >= 5:
            return
