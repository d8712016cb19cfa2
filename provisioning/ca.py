"""The factory CA (EC P-256, path length 0) and what it signs.

- A device certificate names the device twice: subject CN (what mosquitto's
  ``use_identity_as_username`` takes) and a SAN URI ``urn:simkeeper:device:<id>`` (device ids
  may hold ``_``, which a DNS name may not). It is for TLS client authentication only.
- The fleet broker's server certificate: CN the host name, every DNS name and IP address
  clients connect to in subjectAltName (what their host name check reads), serverAuth only.
- The operator's client certificate: CN ``simkeeper-operator``, the one name besides the device
  ids that packaging/mosquitto/simkeeper.acl grants (every device's topics, commands), and
  that no device may carry; clientAuth only.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING

from provisioning import keys
from provisioning.files import PUBLIC, SECRET, File, ProvisionError, make_dir, write_atomic

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from cryptography.x509.oid import ObjectIdentifier

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CA_DAYS, DEVICE_DAYS = 7305, 3652  # 20 and 10 years: a gateway's service life, then some
TLS_DAYS = 825  # the broker's and the operator's: renewed by people, not baked into a gateway
OPERATOR_ID = "simkeeper-operator"  # the ACL's `user` line (packaging/mosquitto/simkeeper.acl)
SERVER, OPERATOR = "server", "operator-tls"  # file stems: server.pem/.key, operator-tls.pem/.key
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


def _named(cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _leaf(ca: CA, public_key: PublicKeyTypes, cn: str, usage: ObjectIdentifier, *,
          names: Sequence[x509.GeneralName], days: int) -> x509.Certificate:
    """An end-entity certificate for ``public_key`` (EC P-256): subject CN ``cn``, extended key
    usage ``usage`` only, ``names`` (if any) in subjectAltName; valid at most as long as the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if (not isinstance(public_key, ec.EllipticCurvePublicKey)
            or public_key.curve.name != "secp256r1"):
        raise ProvisionError("the key to certify must be EC P-256")
    now = _now()
    until = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_named(cn)).issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def issue(ca: CA, public_key: PublicKeyTypes, device_id: str, *,
          days: int = DEVICE_DAYS) -> x509.Certificate:
    """A TLS client certificate for ``device_id``."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _leaf(ca, public_key, device_id, ExtendedKeyUsageOID.CLIENT_AUTH,
                 names=[x509.UniformResourceIdentifier(device_uri(device_id))], days=days)


def issue_server(ca: CA, public_key: PublicKeyTypes, dns: Sequence[str],
                 ips: Sequence[IPv4Address | IPv6Address], *,
                 days: int = TLS_DAYS) -> x509.Certificate:
    """The broker's TLS server certificate: CN the first name given, every DNS name and IP
    address in subjectAltName."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not dns and not ips:
        raise ProvisionError("a server certificate needs at least one DNS name or IP address")
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ip) for ip in ips]
    return _leaf(ca, public_key, str([*dns, *ips][0]), ExtendedKeyUsageOID.SERVER_AUTH,
                 names=names, days=days)


def issue_operator(ca: CA, public_key: PublicKeyTypes, *,
                   days: int = TLS_DAYS) -> x509.Certificate:
    """The operator's TLS client certificate (CN :data:`OPERATOR_ID`)."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _leaf(ca, public_key, OPERATOR_ID, ExtendedKeyUsageOID.CLIENT_AUTH, names=[],
                 days=days)


def write_leaf(out: Path, stem: str, make: Callable[[PublicKeyTypes], x509.Certificate], *,
               csr: Path | None = None) -> Path:
    """``make``'s certificate as ``out/<stem>.pem``, for a new key written beside it as
    ``<stem>.key`` (0600), or for the key of ``csr`` (only its key is used: the CA names the
    certificate). Neither file may exist yet. Returns the certificate's path."""
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _refuse_existing(cert_path, key_path)
    key = None
    if csr is None:
        key = keys.new_ec_key()
        public: PublicKeyTypes = key.public_key()
    else:
        public = keys.load_csr(csr).public_key()
    cert = make(public)
    make_dir(out)
    if key is not None:
        write_atomic(key_path, File(keys.private_pem(key), SECRET))
    write_atomic(cert_path, File(keys.cert_pem(cert), PUBLIC))
    return cert_path


def make_csr(key: EllipticCurvePrivateKey, device_id: str) -> x509.CertificateSigningRequest:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_named(device_id))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(device_uri(device_id))]), critical=False)
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    from cryptography.hazmat.primitives import serialization as s

    return csr.public_bytes(s.Encoding.PEM)
