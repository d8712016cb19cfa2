"""Ed25519 the way the operator signs things: PEM public keys, base64url signatures, canonical JSON.

Shared by the signed conformance list (detached signature over a file's bytes) and by signed
commands (signature over the canonical JSON of an envelope). ``cryptography`` is imported only
inside the functions that need it, so importing this module is free.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import TYPE_CHECKING, Any

from provisioning.keys import b64url

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["SigningError", "b64url", "canonical_json", "decode_signature", "load_public_key",
           "verify"]

SIGNATURE_BYTES = 64
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class SigningError(ValueError):
    """A key or a signature that cannot be used; the message says why."""


def decode_signature(text: str) -> bytes:
    """The 64 raw bytes of a base64url (no padding) Ed25519 signature. Only the canonical
    spelling is accepted, so one signature has exactly one text form."""
    try:
        if not _B64URL.fullmatch(text):
            raise ValueError(text)
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SigningError("signature is not base64url without padding") from None
    if len(raw) != SIGNATURE_BYTES:
        raise SigningError(f"signature is {len(raw)} bytes, Ed25519 needs {SIGNATURE_BYTES}")
    if b64url(raw) != text:
        raise SigningError("signature is not base64url without padding (non-canonical)")
    return raw


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from a SubjectPublicKeyInfo PEM."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError("not an Ed25519 key")
    return key


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` (64 raw bytes) is ``key``'s signature of ``data``."""
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def canonical_json(obj: Any) -> bytes:
    """DESIGN.md's signed bytes: keys sorted at every level, ``,`` and ``:`` without spaces,
    non-ASCII kept as UTF-8. Raises :class:`SigningError` for what has no UTF-8 form (lone
    surrogates) or no JSON form."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise SigningError(f"no canonical JSON form: {exc}") from None
