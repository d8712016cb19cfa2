"""The factory CA (EC P-256, path length 0) and what it signs: device certificates.

A device certificate names the device twice: subject CN (what mosquitto's
``use_identity_as_username`` takes) and a SAN URI ``urn:simkeeper:device:<id>`` (device ids
may hold ``_``, which a DNS name may not). It is for TLS client authentication only.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from provisioning import keys
from provisioning.files import PUBLIC, SECRET, File, ProvisionError, make_dir, write_atomic

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CA_DAYS, DEVICE_DAYS = 7305, 3652  # 20 and 10 years: a gateway's service life, then some
BACKDATE = dt.timedelta(minutes=5)  # a clock slightly behind still accepts a fresh cert


def device_uri(device_id: str) -> str:
    return f"urn:simkeeper:device:{device_id}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ProvisionError(f"{path} already exists; not overwriting it")


def init_ca(out: Path, *, name: str | None = None, days: int = CA_DAYS) -> Path:
    """A new self-signed CA in ``out`` (``ca.pem``, ``ca.key`` mode 0600); returns the cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    make_dir(out)
    _refuse_existing(out / CA_CERT, out / CA_KEY)
    key = keys.new_ec_key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "simkeeper"),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           name or f"simkeeper factory CA {secrets.token_hex(4)}"),
    ])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(out / CA_KEY, File(keys.private_pem(key), SECRET))
    write_atomic(out / CA_CERT, File(keys.cert_pem(cert), PUBLIC))
    return out / CA_CERT


def ed25519_pair(out: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.key`` (PKCS#8 PEM, mode 0600) and ``<stem>.pub`` (SubjectPublicKeyInfo PEM)."""
    make_dir(out)
    private, public = out / f"{stem}.key", out / f"{stem}.pub"
    _refuse_existing(private, public)
    key = keys.new_ed25519_key()
    write_atomic(private, File(keys.private_pem(key), SECRET))
    write_atomic(public, File(keys.public_pem(key.public_key()), PUBLIC))
    return private, public


@dataclass(frozen=True, slots=True)
class CA:
    cert: x509.Certificate
    key: EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return keys.cert_pem(self.cert)


def check_is_ca(cert: x509.Certificate, where: str) -> None:
    from cryptography import x509

    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise ProvisionError(f"{where} is not a CA certificate (basicConstraints CA:false)")


def load_ca(directory: Path) -> CA:
    """``ca.pem`` and ``ca.key`` from ``directory``, checked to belong together."""
    cert = keys.load_cert(directory / CA_CERT, "CA certificate")
    check_is_ca(cert, f"CA certificate {directory / CA_CERT}")
    key = keys.load_ec_key(directory / CA_KEY, "CA key")
    if not keys.same_key(cert.public_key(), key.public_key()):
        raise ProvisionError(f"CA key {directory / CA_KEY} does not match {directory / CA_CERT}")
    return CA(cert, key)


def _device_name(device_id: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def issue(ca: CA, public_key: PublicKeyTypes, device_id: str, *,
          days: int = DEVICE_DAYS) -> x509.Certificate:
    """A TLS client certificate for ``device_id``, valid at most as long as the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ProvisionError("a device key must be EC P-256")
    now = _now()
    until = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_device_name(device_id)).issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri(device_id))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def make_csr(key: EllipticCurvePrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_device_name(device_id))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri(device_id))]), critical=False)
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return csr.public_bytes(s.Encoding.PEM)
