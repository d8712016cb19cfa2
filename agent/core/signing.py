"""Ed25519 the way the operator signs things: PEM public keys, base64url signatures, canonical JSON.

Shared by the signed conformance list (detached signature over a file's bytes) and by signed
commands (signature over the canonical JSON of an envelope, under DESIGN.md's exact rule,
:func:`check_rule`, so that a signer in any language makes the same bytes). A public key is kept
as its 32 raw bytes, read from its PEM here without ``cryptography``: the daemon pins the
operator key at start (a bad one is refused there), and ``cryptography`` (about 9 MB of RSS) is
only imported by :func:`verify`, when the first signature is checked.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, NoReturn

__all__ = ["MAX_INT", "SigningError", "b64url", "canonical_json", "check_rule",
           "decode_signature", "key_id", "load_public_key", "spki_id", "verify"]

SIGNATURE_BYTES = 64
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
MAX_INT = 2**53 - 1  # the largest integer every JSON reader holds exactly (an IEEE double)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_PEM = re.compile(rb"-----BEGIN ((?:RSA )?PUBLIC KEY)-----(.*?)-----END \1-----", re.S)
_ED25519_OID = bytes.fromhex("2b6570")  # 1.3.101.112 (RFC 8410)
# DER of an Ed25519 SubjectPublicKeyInfo up to the key: the only encoding RFC 8410 allows.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


class SigningError(ValueError):
    """A key or a signature that cannot be used; the message says why."""


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


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


def load_public_key(pem: bytes) -> bytes:
    """The 32 raw bytes of the Ed25519 key in a SubjectPublicKeyInfo PEM (the first ``PUBLIC
    KEY`` block; text around it and whitespace inside it are ignored, as ``cryptography``
    does)."""
    block = _PEM.search(pem)
    if block is None:
        raise SigningError("not a PEM public key: no PUBLIC KEY block")
    if block.group(1) != b"PUBLIC KEY":
        raise SigningError("not an Ed25519 key")
    try:
        der = base64.b64decode(b"".join(block.group(2).split()), validate=True)
    except binascii.Error:
        raise SigningError("not a PEM public key: bad base64") from None
    if der.startswith(_ED25519_SPKI) and len(der) == len(_ED25519_SPKI) + 32:
        return der[len(_ED25519_SPKI):]
    if _algorithm(der) not in (None, _ED25519_OID):
        raise SigningError("not an Ed25519 key")
    raise SigningError("not a PEM public key: not a DER Ed25519 SubjectPublicKeyInfo")


def _algorithm(der: bytes) -> bytes | None:
    """The algorithm OID of a DER SubjectPublicKeyInfo; None when it has none."""
    try:
        at = _content(der, 0, 0x30)[0]  # SubjectPublicKeyInfo
        at = _content(der, at, 0x30)[0]  # AlgorithmIdentifier
        start, end = _content(der, at, 0x06)
    except (ValueError, IndexError):
        return None
    return der[start:end]


def _content(der: bytes, at: int, tag: int) -> tuple[int, int]:
    """Where the content of the DER element at ``at`` starts and ends; it must be a ``tag``."""
    if der[at] != tag:
        raise ValueError(f"tag {der[at]:#x}")
    size, at = der[at + 1], at + 2
    if size & 0x80:  # long form: the next (size & 0x7F) bytes hold the length
        width = size & 0x7F
        size, at = int.from_bytes(der[at:at + width], "big"), at + width
    if at + size > len(der):
        raise ValueError("truncated")
    return at, at + size


def spki_id(der: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its DER SPKI's SHA-256."""
    return hashlib.sha256(der).hexdigest()[:16]


def key_id(key: bytes) -> str:
    """:func:`spki_id` of a raw Ed25519 public key."""
    return spki_id(_ED25519_SPKI + key)


def verify(key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` (64 raw bytes) is the signature of ``data`` by ``key`` (32 raw
    bytes, from :func:`load_public_key`)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def check_rule(obj: Any) -> None:
    """Raise :class:`SigningError` naming the first value outside DESIGN.md's signing rule, and
    where it is (``args.list[2]``): strings without lone surrogates, integers within
    ±(2^53-1), ``true``/``false``/``null``, arrays, and objects whose keys match
    ``[A-Za-z_][A-Za-z0-9_-]*``. No floats, even integral ones (``1.0``)."""
    try:
        _check(obj, "")
    except RecursionError:
        raise SigningError("nested too deep (or circular)") from None


def _check(value: Any, where: str) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            _refuse(where, "a lone surrogate in a string (it has no UTF-8 form)")
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:
            _refuse(where, f"{_cut(repr(value))} is outside -(2^53-1)..2^53-1")
    elif isinstance(value, float):
        _refuse(where, f"{_cut(repr(value))} is a float; the signing rule has integers only")
    elif isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str) or not _KEY.fullmatch(key):
                _refuse(where, f"key {_cut(repr(key))} does not match {_KEY.pattern}")
            _check(child, f"{where}.{key}" if where else key)
    elif isinstance(value, list | tuple):
        for index, child in enumerate(value):
            _check(child, f"{where}[{index}]")
    else:
        _refuse(where, f"a {type(value).__name__} has no JSON form")


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(where: str, what: str) -> NoReturn:
    raise SigningError(f"{_cut(where or 'the envelope', 120)}: {what}")


def canonical_json(obj: Any) -> bytes:
    """DESIGN.md's signed bytes: keys sorted at every level, ``,`` and ``:`` without spaces,
    integers in plain decimal, non-ASCII and U+007F kept as UTF-8, control characters escaped
    as ``\\b \\t \\n \\f \\r`` or ``\\u00xx``. Raises :class:`SigningError` (why, and where)
    for anything outside the rule (:func:`check_rule`)."""
    check_rule(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")
