"""Batch encoding and decoding: limits, compression choice, stable ids, hostile payloads."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.telemetry.batch import BatchError, batch_id_for, decode_batch, encode_batch


@dataclass(frozen=True)
class R:
    id: str
    ts: float
    topic: str
    data: str


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
readings = st.lists(
    st.builds(
        R,
        id=st.from_regex(r"[0-9a-f]{8}-[0-9]{1,6}", fullmatch=True),
        ts=st.floats(0, 4e9),
        topic=st.from_regex(r"[a-z0-9/]{1,20}", fullmatch=True),
        data=json_values.map(lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False)),
    ),
    min_size=1,
    max_size=30,
)


@given(readings, st.integers(64, 4096), st.booleans())
def test_round_trip_within_limits(rs: list[R], max_bytes: int, compress: bool) -> None:
    batch = encode_batch("gw-1", rs, max_bytes, compress=compress)
    decoded = decode_batch(batch.payload)
    taken = rs[: len(batch.ids)]
    assert decoded["device_id"] == "gw-1" and decoded["batch_id"] == batch.batch_id
    assert [(r["id"], r["ts"], r["topic"]) for r in decoded["readings"]] == [
        (r.id, r.ts, r.topic) for r in taken
    ]
    assert [r["data"] for r in decoded["readings"]] == [json.loads(r.data) for r in taken]
    assert len(batch.ids) == 1 or len(batch.payload) <= max_bytes  # what goes on the wire
    if len(batch.ids) < len(rs):  # it stopped because the next one did not fit
        longer = encode_batch("gw-1", rs[: len(batch.ids) + 1], 1 << 30, compress=compress)
        assert len(longer.payload) > max_bytes
    if batch.compressed:
        assert compress and len(batch.payload) < batch.json_size
    elif compress:
        assert len(zlib.compress(batch.payload, 6)) >= len(batch.payload)


def test_batch_id_depends_only_on_the_reading_ids() -> None:
    a = [R("x-1", 1.0, "t", "1"), R("x-2", 2.0, "t", "2")]
    b = [R("x-1", 9.0, "u", '"other"'), R("x-2", 8.0, "u", "null")]
    assert encode_batch("d", a, 4096).batch_id == encode_batch("d", b, 4096).batch_id
    assert batch_id_for(["x-1", "x-2"]) != batch_id_for(["x-2", "x-1"])
    assert batch_id_for(["x-1", "x-2"]) != batch_id_for(["x-1x-2"])


def test_an_oversized_reading_still_goes_alone() -> None:
    noise = base64.b64encode(random.Random(0).randbytes(4000)).decode()  # zlib cannot shrink it
    big = R("x-1", 1.0, "t", json.dumps(noise))
    batch = encode_batch("d", [big, R("x-2", 1.0, "t", "1")], 256)
    assert batch.ids == ("x-1",)


def test_count_is_the_callers_and_bytes_are_ours() -> None:
    rs = [R(f"x-{i}", float(i), "t", '{"v":1}') for i in range(100)]
    batch = encode_batch("d", rs, 600, compress=False)
    assert 1 < len(batch.ids) < 100 and batch.json_size <= 600
    assert batch.payload[:1] == b"{"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x01",
        b"x\x9cgarbage",
        b"{not json",
        b'{"device_id": 1}',
        b"[1,2]",
        zlib.compress(b'{"batch_id":"x"}'),
        b'{"device_id":"d","batch_id":"b","readings":[{}]}',
    ],
)
def test_decoder_raises_only_batch_error(payload: bytes) -> None:
    with pytest.raises(BatchError):
        decode_batch(payload)


@given(st.binary(max_size=200))
def test_decoder_on_any_bytes(payload: bytes) -> None:
    with contextlib.suppress(BatchError):
        decode_batch(payload)
