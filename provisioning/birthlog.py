"""The factory log: one signed birth record per device, as JSON lines, in a hash chain.

A record::

    {"seq": 3, "time": "2025-04-01T09:00:00Z", "device_id": "gw-0003",
     "imei": "356938035643809", "iccid": "8981100005819510010",
     "cert_sha256": "<hex>", "station": "<key id>", "prev": "<hex>", "sig": "<base64url>"}

``prev`` is the SHA-256 of the previous line's bytes (64 zeros for the first), ``seq`` counts
from 1, and ``sig`` is the station key's Ed25519 signature over the record without ``sig``,
serialised like a command envelope (keys sorted, no whitespace, UTF-8). An edited line fails
its signature; a deleted or inserted one breaks the chain at the next line. Cutting lines off
the end is only seen against a head recorded elsewhere (``verify-log --head``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioning import keys
from provisioning.files import ProvisionError, fsync_dir, locked, why

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

GENESIS = "0" * 64
FIELDS = ("seq", "time", "device_id", "imei", "iccid", "cert_sha256", "station", "prev")


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass(frozen=True, slots=True)
class Verified:
    records: list[dict[str, Any]]
    problems: list[str]  # "line N: why"
    head: str  # hash of the last line (GENESIS when empty)


def _check(record: Any, number: int, seq: int, prev: str, *, pub: Ed25519PublicKey,
           station: str) -> str | None:
    if not isinstance(record, dict) or set(record) != {*FIELDS, "sig"}:
        return f"line {number}: not a birth record (fields {sorted(FIELDS)} and sig)"
    body = {k: v for k, v in record.items() if k != "sig"}
    if not isinstance(record["sig"], str) or not keys.signature_ok(pub, canonical(body),
                                                                   record["sig"]):
        if record["station"] != station:
            return f"line {number}: signed by station {record['station']}, not {station}"
        return f"line {number}: signature does not verify (the line was edited)"
    if record["prev"] != prev:
        return (f"line {number}: chain broken: prev is not the hash of line {number - 1}"
                " (a line before it was deleted, inserted or reordered)")
    if record["seq"] != seq:
        return f"line {number}: seq {record['seq']}, expected {seq}"
    return None


def verify(log: Path, pub: Ed25519PublicKey, *, head: str | None = None) -> Verified:
    """Check every line of ``log``; a problem names its line. ``head``, when given, must be
    the hash of the last line (what an earlier run reported)."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise ProvisionError(f"cannot read factory log {log}: {why(exc)}") from None
    station = keys.key_id(pub)
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    prev, seq, reported = GENESIS, 1, False
    lines = data.split(b"\n")
    if lines[-1]:
        problems.append(f"line {len(lines)}: incomplete (no newline): a write was cut short")
    for number, line in enumerate(lines[:-1], 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        problem = _check(record, number, seq, prev, pub=pub, station=station)
        if problem and not (reported and "chain broken" in problem):
            problems.append(problem)
        reported = problem is not None
        if isinstance(record, dict):
            records.append(record)
            seq = record.get("seq", seq) if isinstance(record.get("seq"), int) else seq
        seq, prev = seq + 1, line_hash(line)
    if head is not None and prev != head:
        problems.append(f"line {len(lines) - 1}: the last line's hash is not the expected head"
                        f" {head} (lines cut off the end?)")
    return Verified(records, problems, prev)


def append(log: Path, key: Ed25519PrivateKey, *, device_id: str, imei: str | None,
           iccid: str | None, cert_sha256: str, at: float | None = None) -> dict[str, Any]:
    """Add one signed record; the log must verify first (a broken chain is not extended)."""
    with locked(log.with_name(log.name + ".lock")):
        state = verify(log, key.public_key())
        if state.problems:
            raise ProvisionError(f"factory log {log}: {state.problems[0]}; not extending it")
        record: dict[str, Any] = {
            "seq": len(state.records) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            "device_id": device_id, "imei": imei, "iccid": iccid, "cert_sha256": cert_sha256,
            "station": keys.key_id(key.public_key()), "prev": state.head,
        }
        record["sig"] = keys.sign(key, canonical(record))
        line = canonical(record) + b"\n"
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(log.parent)
        except OSError as exc:
            raise ProvisionError(f"cannot write factory log {log}: {why(exc)}") from None
        return record
