"""One device's identity, two ways:

- made at the station (:func:`provision`): key and certificate from the factory CA at once;
- made on the device (:func:`request` then :func:`install_cert`): the key is generated where
  it stays (``/etc/simkeeper/request/device.key``), only the CSR leaves, and the certificate
  the operator's CA returns is checked against the key and the device id before it is
  installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from provisioning import keys
from provisioning.bundle import Identity, Settings, build, check_device_id
from provisioning.ca import CA, DEVICE_DAYS, check_is_ca, csr_pem, issue, make_csr
from provisioning.files import SECRET, File, ProvisionError, make_dir, write_atomic
from provisioning.install import etc_dir, install

if TYPE_CHECKING:
    from cryptography import x509

REQUEST = "request"  # under /etc/simkeeper: the key waiting for its certificate
REQUEST_KEY, REQUEST_CSR = "device.key", "device.csr"


def _install(identity: Identity, settings: Settings, root: Path | None, force: bool,
             gid: int | None) -> Path:
    return install(etc_dir(root), lambda where: build(identity, settings, where), force=force,
                   gid=gid)


def provision(device_id: str, ca: CA, settings: Settings, *, root: Path | None = None,
              force: bool = False, imei: str | None = None, iccid: str | None = None,
              days: int = DEVICE_DAYS, gid: int | None = None) -> Path:
    """Make a key and certificate for ``device_id`` and install the bundle; its directory.
    ``gid``: the group the bundle is given to, read-only (:mod:`provisioning.owner`)."""
    check_device_id(device_id)
    key = keys.new_ec_key()
    cert = issue(ca, key.public_key(), device_id, days=days)
    identity = Identity(device_id, keys.private_pem(key), cert, ca.pem, imei, iccid)
    return _install(identity, settings, root, force, gid)


def request(device_id: str, *, root: Path | None = None, force: bool = False) -> Path:
    """A new device key kept under ``request/`` and its CSR; the CSR's path."""
    check_device_id(device_id)
    where = etc_dir(root) / REQUEST
    make_dir(where)
    if (where / REQUEST_KEY).exists() and not force:
        raise ProvisionError(f"a request is already waiting in {where}; --force makes a new key")
    key = keys.new_ec_key()
    write_atomic(where / REQUEST_KEY, File(keys.private_pem(key), SECRET), replace=force)
    write_atomic(where / REQUEST_CSR, File(csr_pem(make_csr(key, device_id))), replace=True)
    return where / REQUEST_CSR


def sign_request(ca: CA, csr_path: Path, *, days: int = DEVICE_DAYS) -> x509.Certificate:
    """The factory CA's answer to a device's CSR (development and small fleets)."""
    csr = keys.load_csr(csr_path)
    device_id = keys.common_name(csr.subject)
    if device_id is None:
        raise ProvisionError(f"CSR {csr_path}: the subject has no single CN (the device id)")
    return issue(ca, csr.public_key(), check_device_id(device_id), days=days)


def check_cert(cert: x509.Certificate, key_pem_path: Path, device_id: str,
               ca: x509.Certificate) -> None:
    """The certificate belongs to this key and this device, and ``ca`` issued it."""
    from cryptography.exceptions import InvalidSignature

    key = keys.load_ec_key(key_pem_path, "device key")
    if not keys.same_key(cert.public_key(), key.public_key()):
        raise ProvisionError(f"the certificate is not for the key in {key_pem_path}")
    cn = keys.common_name(cert.subject)
    if cn != device_id:
        raise ProvisionError(f"the certificate's CN is {cn!r}, the request was for {device_id!r}")
    check_is_ca(ca, "the CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisionError("the certificate was not issued by the given CA") from None


def install_cert(cert_path: Path, ca_path: Path, settings: Settings, *,
                 root: Path | None = None, force: bool = False, imei: str | None = None,
                 iccid: str | None = None, gid: int | None = None) -> Path:
    """Install the certificate answering the waiting request, as a full bundle (given to
    group ``gid``, like :func:`provision`)."""
    where = etc_dir(root) / REQUEST
    if not (where / REQUEST_KEY).is_file():
        raise ProvisionError(f"no request is waiting in {where} (run `provision csr` first)")
    csr = keys.load_csr(where / REQUEST_CSR)
    device_id = keys.common_name(csr.subject) or ""
    cert = keys.load_cert(cert_path)
    ca = keys.load_cert(ca_path, "CA certificate")
    check_cert(cert, where / REQUEST_KEY, device_id, ca)
    identity = Identity(device_id, (where / REQUEST_KEY).read_bytes(), cert, keys.cert_pem(ca),
                        imei, iccid)
    installed = _install(identity, settings, root, force, gid)
    shutil.rmtree(where, ignore_errors=True)
    return installed
