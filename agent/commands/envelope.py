"""The signed command envelope (DESIGN.md, "Commands"), parsed as hostile input.

``{"id", "device_id", "name", "args", "issued_at", "expires_at", "sig"}``, nothing more: ``id``
1-64 of ``A-Za-z0-9_-``; ``issued_at``/``expires_at`` integer Unix seconds; ``args`` an object;
``sig`` the 64-byte Ed25519 signature, base64url without padding, over the canonical JSON of the
other fields (:func:`agent.core.signing.canonical_json`).

:func:`parse_envelope` raises :class:`Refused` only, whatever the bytes: size and nesting are
capped before anything else looks at them, duplicate keys and NaN are refused, and anything
outside DESIGN.md's signing rule (a float, even ``1.0``; an integer past ±(2^53-1); a key such
as ``"2"`` or ``"a.b"``; a lone surrogate) is malformed, the reason saying what and where.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.signing import SigningError, canonical_json, decode_signature

Reason = Literal[
    "malformed", "unsigned", "bad signature", "unknown key", "other device", "expired",
    "not yet valid", "replayed", "unknown command", "bad arguments",
]
FIELDS = frozenset({"id", "device_id", "name", "args", "issued_at", "expires_at", "sig"})
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DEVICE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_BYTES = 256 * 1024  # an update-conformance list rides in args
MAX_DEPTH = 16
MAX_LIFETIME = 30 * 86400  # bounds how long the journal must remember an id
_MAX_TIME = 1 << 40


class Refused(Exception):
    """A command refused before it had any effect: ``reason`` is one of :data:`Reason`,
    ``detail`` is what ``cmd/result`` says (the reason first)."""

    def __init__(self, reason: Reason, why: str = "", cid: str | None = None) -> None:
        super().__init__(f"{reason}: {why}" if why else reason)
        self.reason: Reason = reason
        self.cid = cid

    @property
    def detail(self) -> str:
        return str(self)


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    issued_at: int
    expires_at: int
    sig: bytes
    signed: bytes  # the canonical bytes the signature covers

    @property
    def digest(self) -> str:
        """Names this exact command (the signed bytes): a repeat has the same digest."""
        return hashlib.sha256(self.signed).hexdigest()


class _Float(float):
    """A JSON number with a fraction or an exponent, named as it was written (``1e3``, not
    ``1000.0``) when the signing rule refuses it."""

    text: str

    def __new__(cls, text: str) -> _Float:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:  # two values for one key: which one was signed?
        if key in obj:
            raise ValueError(f"duplicate key {key[:40]!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            if level > limit:
                return False
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children)
    return True


def load_json(payload: bytes, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON from untrusted bytes; :class:`Refused` ("malformed") otherwise."""
    if len(payload) > max_bytes:
        raise Refused("malformed", f"{len(payload)} bytes, at most {max_bytes} accepted")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("malformed", "not UTF-8") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_float=_Float)
    except RecursionError:
        raise Refused("malformed", f"nested deeper than {max_depth}") from None
    except ValueError as exc:
        raise Refused("malformed", f"not JSON ({str(exc)[:80]})") from None
    if not _depth(obj, max_depth):
        raise Refused("malformed", f"nested deeper than {max_depth}")
    return obj


def _time(obj: dict[str, Any], key: str, cid: str | None) -> int:
    value = obj[key]
    if type(value) is not int or not 0 <= value < _MAX_TIME:
        raise Refused("malformed", f"{key} must be integer Unix seconds", cid)
    return value


def parse_envelope(payload: bytes, *, max_bytes: int = MAX_BYTES,
                   max_depth: int = MAX_DEPTH) -> Envelope:
    """The envelope in ``payload``, its shape checked (not its signature, device or time)."""
    obj = load_json(payload, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(obj, dict):
        raise Refused("malformed", "not a JSON object")
    raw_id = obj.get("id")
    cid = raw_id if isinstance(raw_id, str) and ID_PATTERN.fullmatch(raw_id) else None
    if obj.get("sig") in (None, ""):
        raise Refused("unsigned", "no sig", cid)
    missing, extra = sorted(FIELDS - obj.keys()), sorted(obj.keys() - FIELDS)
    if missing or extra:
        why = [f"missing {missing}"] if missing else []
        why += [f"unknown fields {extra}"] if extra else []
        raise Refused("malformed", ", ".join(why)[:200], cid)
    if cid is None:
        raise Refused("malformed", "id must be 1-64 of A-Z a-z 0-9 _ -")
    if not isinstance(obj["device_id"], str) or not _DEVICE.fullmatch(obj["device_id"]):
        raise Refused("malformed", "device_id must be 1-64 of A-Z a-z 0-9 _ . -", cid)
    if not isinstance(obj["name"], str) or not 0 < len(obj["name"]) <= 64:
        raise Refused("malformed", "name must be a string of 1-64 characters", cid)
    if not isinstance(obj["args"], dict):
        raise Refused("malformed", "args must be an object", cid)
    issued, expires = _time(obj, "issued_at", cid), _time(obj, "expires_at", cid)
    if not issued <= expires <= issued + MAX_LIFETIME:
        raise Refused("malformed", f"expires_at must be within {MAX_LIFETIME} s after issued_at",
                      cid)
    sig = obj.pop("sig")
    try:
        signed = canonical_json(obj)
    except SigningError as exc:
        raise Refused("malformed", str(exc), cid) from None
    if not isinstance(sig, str):
        raise Refused("bad signature", "sig must be a string", cid)
    try:
        raw_sig = decode_signature(sig)
    except SigningError as exc:
        raise Refused("bad signature", str(exc), cid) from None
    return Envelope(id=cid, device_id=obj["device_id"], name=obj["name"], args=obj["args"],
                    issued_at=issued, expires_at=expires, sig=raw_sig, signed=signed)
