"""Signed command envelopes, as the operator makes them (DESIGN.md, "Commands")."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.commands.envelope import Refused, parse_envelope
from agent.core.signing import SigningError, canonical_json
from provisioning.keys import sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_TTL = 300


class EnvelopeError(ValueError):
    """An envelope the device would refuse as malformed, so it is not made; the message says
    why (a float in the args, a key such as ``a.b``, a bad id...)."""


def new_id() -> str:
    """A fresh command id: 22 base64url characters (128 random bits)."""
    return secrets.token_urlsafe(16)


def make_envelope(
    key: Ed25519PrivateKey,
    device_id: str,
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    cid: str | None = None,
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
) -> dict[str, Any]:
    """The envelope, signed: ``{"id", "device_id", "name", "args", "issued_at", "expires_at",
    "sig"}``, valid from now for ``ttl`` seconds. Raises :class:`EnvelopeError` for one outside
    DESIGN.md's rule, checked by the device's own parser."""
    issued = int(time.time() if now is None else now)
    env: dict[str, Any] = {
        "id": cid or new_id(), "device_id": device_id, "name": name, "args": dict(args or {}),
        "issued_at": issued, "expires_at": issued + ttl,
    }
    try:
        env["sig"] = sign(key, canonical_json(env))
        parse_envelope(encode(env))
    except SigningError as exc:
        raise EnvelopeError(str(exc)) from None
    except Refused as exc:
        raise EnvelopeError(exc.detail) from None
    return env


def encode(envelope: Mapping[str, Any]) -> bytes:
    """The payload published on ``cmd``: the envelope as compact UTF-8 JSON."""
    return canonical_json(dict(envelope))
