"""Keys, certificates and detached signatures: the one place provisioning touches
``cryptography``. It is imported inside each function, so importing this module is free."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import TYPE_CHECKING

from agent.core.signing import SigningError, b64url, load_public_key, spki_id
from provisioning.files import ProvisionError, read

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes


def new_ec_key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def new_ed25519_key() -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def private_pem(key: EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def public_pem(key: PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization as s

    return key.public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)


def spki_der(key: PublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return key.public_bytes(s.Encoding.DER, s.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: PublicKeyTypes) -> str:
    """A short name for a public key (agent.core.signing.spki_id)."""
    return spki_id(spki_der(key))


def cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return cert.public_bytes(s.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex."""
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def _load_private(path: Path, what: str) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(read(path, what), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{what} {path} is not an unencrypted PEM private key ({exc})"
                             ) from None


def load_ec_key(path: Path, what: str = "key") -> EllipticCurvePrivateKey:
    """An unencrypted EC P-256 private key (PEM)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _load_private(path, what)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ProvisionError(f"{what} {path} is not an EC P-256 key")
    return key


def load_ed25519_private(path: Path, what: str = "key") -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _load_private(path, what)
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvisionError(f"{what} {path} is not an Ed25519 private key")
    return key


def parse_ed25519_public(data: bytes, where: str) -> Ed25519PublicKey:
    """A SubjectPublicKeyInfo PEM holding an Ed25519 key (the operator's, a station's), read as
    the agent reads it (agent.core.signing.load_public_key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        return Ed25519PublicKey.from_public_bytes(load_public_key(data))
    except SigningError as exc:
        raise ProvisionError(f"{where} is {exc}") from None


def load_ed25519_public(path: Path, what: str = "public key") -> Ed25519PublicKey:
    return parse_ed25519_public(read(path, what), f"{what} {path}")


def parse_cert(data: bytes, where: str) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise ProvisionError(f"{where} is not a PEM certificate: {exc}") from None


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    return parse_cert(read(path, what), f"{what} {path}")


def load_csr(path: Path) -> x509.CertificateSigningRequest:
    from cryptography import x509

    try:
        csr = x509.load_pem_x509_csr(read(path, "CSR"))
    except ValueError as exc:
        raise ProvisionError(f"CSR {path} is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise ProvisionError(f"CSR {path}: its signature does not verify")
    return csr


def same_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    return spki_der(a) == spki_der(b)


def common_name(name: x509.Name) -> str | None:
    from cryptography.x509.oid import NameOID

    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if len(values) == 1 else None


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """A detached Ed25519 signature, base64url without padding."""
    return b64url(key.sign(data))


def signature_ok(key: Ed25519PublicKey, data: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    text = signature.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{86}", text):
        return False
    try:
        key.verify(base64.urlsafe_b64decode(text + "=="), data)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True
