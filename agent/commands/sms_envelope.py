"""The signed command envelope in SMS: the same signed bytes, compact, split into parts.

A command travels as ``blob = sig (64 raw bytes) || deflate(canonical JSON without sig)``,
base64url without padding, cut into parts of at most :data:`PART_CHARS` characters, each a
GSM-7-safe text with its own header (the modem's concatenation header is not visible in text
mode, so parts carry their own)::

    SK1:<tag><i><n>:<chunk>

``tag``: 4 characters of base64url(SHA-256(blob)), naming the message and checking the
reassembly; ``i``/``n``: this part and the count, one character each from :data:`_DIGITS`
(1-based). A typical ``suspend`` is two parts. The device rebuilds the JSON envelope and hands it
to the command processor, which verifies it like any other: nothing here is trusted.

:class:`SmsAssembler` collects parts in any order, duplicates allowed, and raises only
:class:`SmsEnvelopeError` whatever the text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.commands.envelope import Refused, load_json
from agent.core.signing import (
    SIGNATURE_BYTES,
    SigningError,
    b64url,
    canonical_json,
    decode_signature,
)

PREFIX = "SK1:"
PART_CHARS = 153  # one segment of a concatenated GSM-7 SMS
MAX_PARTS = 8
MAX_JSON = 4096
SMS_NAMES = frozenset({"resume", "suspend", "get-state"})
_DIGITS = "123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEADER = len(PREFIX) + 4 + 2 + 1
_PART = re.compile(r"SK1:([A-Za-z0-9_-]{4})([1-9A-Z])([1-9A-Z]):([A-Za-z0-9_-]{1,"
                   + str(PART_CHARS - _HEADER) + "})")
_B64 = re.compile(r"[A-Za-z0-9_-]+")


class SmsEnvelopeError(ValueError):
    """A text that is not (part of) an SMS command; the message says why."""


def _tag(blob: bytes) -> str:
    return b64url(hashlib.sha256(blob).digest())[:4]


def encode_sms(envelope: Mapping[str, Any]) -> list[str]:
    """The SMS texts of a signed envelope (agent.fleet.sign.make_envelope)."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    try:
        sig = decode_signature(str(envelope.get("sig", "")))
    except SigningError as exc:
        raise SmsEnvelopeError(str(exc)) from None
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    blob = sig + packer.compress(canonical_json(body)) + packer.flush()
    text, tag = b64url(blob), _tag(blob)
    size = PART_CHARS - _HEADER
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    if len(chunks) > MAX_PARTS:
        raise SmsEnvelopeError(f"{len(chunks)} SMS parts; at most {MAX_PARTS}")
    n = _DIGITS[len(chunks) - 1]
    return [f"{PREFIX}{tag}{_DIGITS[i]}{n}:{chunk}" for i, chunk in enumerate(chunks)]


def decode_blob(text: str, tag: str) -> bytes:
    """The JSON envelope (with ``sig``) from the joined base64url text of all parts."""
    if not _B64.fullmatch(text) or len(text) % 4 == 1:
        raise SmsEnvelopeError("not base64url")
    blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _tag(blob) != tag:
        raise SmsEnvelopeError("parts do not add up (tag mismatch)")
    if len(blob) <= SIGNATURE_BYTES:
        raise SmsEnvelopeError("too short")
    inflater = zlib.decompressobj(-15)
    try:
        body = inflater.decompress(blob[SIGNATURE_BYTES:], MAX_JSON + 1)
    except zlib.error as exc:
        raise SmsEnvelopeError(f"bad deflate stream: {exc}") from None
    if len(body) > MAX_JSON or inflater.unconsumed_tail or not inflater.eof:
        raise SmsEnvelopeError("bad deflate stream: truncated or too large")
    try:
        obj = load_json(body, max_bytes=MAX_JSON)
    except Refused as exc:
        raise SmsEnvelopeError(exc.detail) from None
    if not isinstance(obj, dict) or "sig" in obj:
        raise SmsEnvelopeError("not an envelope")
    obj["sig"] = b64url(blob[:SIGNATURE_BYTES])
    try:
        return canonical_json(obj)
    except SigningError as exc:
        raise SmsEnvelopeError(str(exc)) from None


@dataclass
class _Pending:
    total: int
    first_seen: float
    parts: dict[int, str] = field(default_factory=dict)


class SmsAssembler:
    """Parts in, whole envelopes out. Incomplete messages are forgotten after ``max_age``
    seconds, and at most ``max_pending`` are kept (the oldest goes first)."""

    def __init__(self, *, max_age: float = 3600.0, max_pending: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pending: dict[str, _Pending] = {}
        self._max_age = max_age
        self._max_pending = max_pending
        self._clock = clock

    @staticmethod
    def is_command(text: str) -> bool:
        return text.strip().startswith(PREFIX)

    def feed(self, text: str) -> bytes | None:
        """The JSON envelope once ``text`` completes one; None while parts are missing."""
        m = _PART.fullmatch(text.strip())
        if m is None:
            raise SmsEnvelopeError("not an SK1 part")
        tag, index, total = m.group(1), _DIGITS.index(m.group(2)), _DIGITS.index(m.group(3)) + 1
        if index >= total or total > MAX_PARTS:
            raise SmsEnvelopeError(f"part {index + 1} of {total}: out of range")
        now = self._clock()
        for old in [t for t, p in self._pending.items() if now - p.first_seen > self._max_age]:
            del self._pending[old]
        pending = self._pending.get(tag)
        if pending is None or pending.total != total:
            pending = self._pending[tag] = _Pending(total, now)
            while len(self._pending) > self._max_pending:
                del self._pending[next(iter(self._pending))]
        pending.parts[index] = m.group(4)
        if len(pending.parts) < total:
            return None
        del self._pending[tag]
        return decode_blob("".join(pending.parts[i] for i in range(total)), tag)


def reply_text(result: Mapping[str, Any], limit: int = 160) -> str:
    """A ``cmd/result`` as one SMS: ``SK1R:<id> <status> <detail>``, cut to ``limit``."""
    detail = result.get("detail")
    if not isinstance(detail, str):
        detail = "" if detail is None else json.dumps(  # not signed: floats are fine here
            detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = f"SK1R:{result.get('id') or '-'} {result.get('status')} {detail}"
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
