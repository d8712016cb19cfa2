"""Batches of readings as they travel up the link, and the decoder a consumer uses.

The wire format (DESIGN.md, MQTT contract)::

    {"device_id": str, "batch_id": str, "readings": [{"id", "ts", "topic", "data"}, ...]}

``data`` is the reading's own JSON, embedded as JSON (not as a string). When zlib makes the
payload smaller it is sent compressed; a consumer tells the two apart by the first byte: ``{``
for JSON, ``0x78`` for a zlib stream.

``batch_id`` is derived from the reading ids alone, so a batch rebuilt after a crash (the same
unacknowledged readings, taken again from the outbox) carries the same id, and a consumer can
drop it as a whole.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _string
from typing import Any, Protocol

# Header bytes of a zlib stream with the default window (RFC 1950: CMF 0x78).
ZLIB_MAGIC = 0x78
_JSON_MAGIC = ord("{")
# Level 6 costs little CPU on a Pi and gets within a few percent of level 9 on JSON.
_LEVEL = 6
# Compressions spent guessing a batch's count by its payload size before halving the range.
_INTERPOLATIONS = 4


class BatchError(ValueError):
    """A payload that is not a batch (bad compression, bad JSON, wrong shape)."""


class ReadingLike(Protocol):
    """What a batch needs of an outbox reading (agent.telemetry.outbox.Reading fits)."""

    @property
    def id(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def topic(self) -> str: ...
    @property
    def data(self) -> str: ...


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A batch ready for the wire: ``payload`` is what is published or POSTed."""

    batch_id: str
    ids: tuple[str, ...]
    payload: bytes
    json_size: int  # the uncompressed JSON, for the compression figures

    @property
    def compressed(self) -> bool:
        return self.payload[:1] == bytes((ZLIB_MAGIC,))


def batch_id_for(ids: Sequence[str]) -> str:
    """A stable id from the reading ids: 32 hex digits of SHA-256 over them, in order."""
    digest = hashlib.sha256()
    for reading_id in ids:
        digest.update(reading_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _entry(reading: ReadingLike) -> str:
    """What ``json.dumps`` makes of the reading, compact, at a quarter of its cost: every
    reading of a backlog goes through here. The data is already compact JSON text: spliced in."""
    return (f'{{"id":{_string(reading.id)},"ts":{float(reading.ts)!r},'
            f'"topic":{_string(reading.topic)},"data":{reading.data}}}')


def _envelope(device_id: str, batch_id: str, entries: Sequence[str]) -> str:
    head = json.dumps({"device_id": device_id, "batch_id": batch_id}, separators=(",", ":"))
    return f'{head[:-1]},"readings":[{",".join(entries)}]}}'


# The envelope around the entries: device id, a 32-digit batch id, keys and brackets.
_ENVELOPE_FIXED = len(_envelope("", "0" * 32, []))


def _fit(device_id: str, readings: Sequence[ReadingLike], max_bytes: int) -> list[str]:
    """The JSON entries of the longest prefix of ``readings`` whose JSON fits in ``max_bytes``
    (at least one reading)."""
    budget = max_bytes - _ENVELOPE_FIXED - len(json.dumps(device_id)) + 2
    entries: list[str] = []
    for reading in readings:
        entry = _entry(reading)
        cost = len(entry.encode()) + (1 if entries else 0)
        if entries and cost > budget:
            break
        entries.append(entry)
        budget -= cost
    return entries


def encode_entries(
    device_id: str, ids: Sequence[str], entries: Sequence[str], *, compress: bool = True
) -> EncodedBatch:
    """The wire form of a batch from its JSON entries and their reading ids."""
    if not entries or len(ids) != len(entries):
        raise ValueError("a batch needs at least one reading, and one id per entry")
    bid = batch_id_for(ids)
    raw = _envelope(device_id, bid, entries).encode()
    payload = raw
    if compress:
        packed = zlib.compress(raw, _LEVEL)
        if len(packed) < len(raw):
            payload = packed
    return EncodedBatch(batch_id=bid, ids=tuple(ids), payload=payload, json_size=len(raw))


def encode_batch(
    device_id: str,
    readings: Sequence[ReadingLike],
    max_bytes: int,
    *,
    compress: bool = True,
) -> EncodedBatch:
    """The longest prefix of ``readings`` whose payload (what goes on the wire, compressed or
    not) fits in ``max_bytes``. At least one reading is always taken (a single oversized reading
    must not block its stream for ever). The caller sends the rest in a later batch."""
    entries = _fit(device_id, readings, max_bytes)  # these fit uncompressed, so in any case
    ids = [r.id for r in readings]
    if not compress or len(entries) == len(readings):
        return encode_entries(device_id, ids[: len(entries)], entries, compress=compress)
    lo, hi = len(entries), len(readings) + 1  # lo readings fit, hi do not
    entries += [_entry(r) for r in readings[lo:]]
    best: EncodedBatch | None = None
    # Compressed, more may fit. The payload grows about linearly with the count: interpolate
    # from the largest count known to fit (0 bytes for none) towards the smallest known not to,
    # starting with all of them; then, should that close in slowly, halve.
    below, below_size, above_size = 0, 0, 0
    probe = 0
    while hi - lo > 1:
        if probe == 0:
            n = len(readings)
        elif probe < _INTERPOLATIONS:
            n = below + (hi - below) * (max_bytes - below_size) // (above_size - below_size)
        else:
            n = (lo + hi) // 2
        n = min(hi - 1, max(lo + 1, n))
        probe += 1
        batch = encode_entries(device_id, ids[:n], entries[:n])
        if len(batch.payload) <= max_bytes:
            lo, best, below, below_size = n, batch, n, len(batch.payload)
        else:
            hi, above_size = n, len(batch.payload)
    return best or encode_entries(device_id, ids[:lo], entries[:lo])


def decode_batch(payload: bytes) -> dict[str, Any]:
    """Decode a batch payload, compressed or not; raise BatchError if it is not a batch."""
    if not payload:
        raise BatchError("empty payload")
    if payload[0] == ZLIB_MAGIC:
        try:
            payload = zlib.decompress(payload)
        except zlib.error as exc:
            raise BatchError(f"bad zlib stream: {exc}") from exc
    elif payload[0] != _JSON_MAGIC:
        raise BatchError(f"unknown first byte 0x{payload[0]:02x}")
    try:
        batch = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BatchError(f"bad JSON: {exc}") from exc
    if not (
        isinstance(batch, dict)
        and isinstance(batch.get("device_id"), str)
        and isinstance(batch.get("batch_id"), str)
        and isinstance(batch.get("readings"), list)
        and all(
            isinstance(r, dict) and {"id", "ts", "topic", "data"} <= r.keys()
            for r in batch["readings"]
        )
    ):
        raise BatchError("not a batch: needs device_id, batch_id and readings[id, ts, topic, data]")
    return batch
