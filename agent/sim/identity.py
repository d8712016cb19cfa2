"""The gateway's identity on disk: the provisioned bundle, its device certificate (and that
certificate's fingerprint, which tells a re-provisioned gateway from a decommissioned one), and
the private key files a decommission wipes (:mod:`agent.sim.decommission`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

from agent.core.config import Config

log = logging.getLogger(__name__)

BUNDLE_META = "bundle.json"  # provisioning.bundle.META: the config sits in a provisioned bundle
BUNDLE_CERT = "device.pem"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_MAX_KEY = 1 << 20  # a private key file is a few hundred bytes; never overwrite anything big


def bundle_dir(config_path: Path | None) -> Path | None:
    """The provisioned bundle the config belongs to (``bundle.json`` beside the config file,
    through the ``/etc/simkeeper/config.toml`` link), None for a hand-written config."""
    if config_path is None:
        return None
    try:
        directory = config_path.resolve().parent
    except OSError:
        return None
    return directory if (directory / BUNDLE_META).is_file() else None


def identity_cert(cfg: Config, config_path: Path | None) -> Path | None:
    """The device certificate: ``[uplink] cert``, else the bundle's ``device.pem``."""
    if cfg.uplink.cert is not None:
        return cfg.uplink.cert
    bundle = bundle_dir(config_path)
    return bundle / BUNDLE_CERT if bundle is not None else None


def fingerprint(cert: Path | None) -> str | None:
    """SHA-256 of the certificate (its DER when the file is PEM), hex; None when there is none
    or it cannot be read."""
    if cert is None:
        return None
    try:
        data = cert.read_bytes()
    except OSError:
        return None
    match = _PEM_CERT.search(data)
    if match is not None:
        with contextlib.suppress(binascii.Error, ValueError):
            data = base64.b64decode(b"".join(match[1].split()), validate=True)
    return hashlib.sha256(data).hexdigest()


# -- the keys ---------------------------------------------------------------------------------


def _looks_private(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 64 * 1024:
            return False
        return b"PRIVATE KEY-----" in path.read_bytes()
    except OSError:
        return False


def key_files(cfg: Config, config_path: Path | None) -> list[Path]:
    """The identity's private keys: ``[uplink] key``, every PEM private key of the bundle and a
    device key still waiting under ``request/``. Never the operator's public key, the
    certificates or the CA."""
    found: list[Path] = []
    if cfg.uplink.key is not None:
        found.append(cfg.uplink.key)
    bundle = bundle_dir(config_path)
    if bundle is not None:
        places = [bundle]
        if bundle.name.startswith("id-"):  # provisioning.install's generation layout
            places.append(bundle.parent / "request")
        for place in places:
            with contextlib.suppress(OSError):
                found += [p for p in sorted(place.iterdir()) if _looks_private(p)]
    never = {_real(p) for p in (cfg.commands.operator_key, cfg.uplink.cert, cfg.uplink.ca)
             if p is not None}
    out: list[Path] = []
    seen: set[Path] = set()
    for path in found:
        real = _real(path)
        if real not in never and real not in seen:
            seen.add(real)
            out.append(path)
    return out


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def wipe(paths: list[Path]) -> tuple[list[str], dict[str, str]]:
    """Overwrite each file with random bytes, fsync, unlink; (wiped, {path: why not}). A file
    already gone counts as wiped.

    Best effort only: on an SD card or eMMC the flash translation layer remaps blocks (wear
    levelling), so the old key's bits may survive on the chip after the overwrite, and a
    filesystem snapshot or backup keeps its own copy. What actually retires the identity is the
    operator revoking the device certificate at the CA and the broker; the wipe keeps the key
    from the next holder of the gateway who only has the filesystem.
    """
    wiped: list[str] = []
    failed: dict[str, str] = {}
    for path in paths:
        try:
            _wipe_one(path)
        except FileNotFoundError:
            wiped.append(str(path))
        except OSError as exc:
            failed[str(path)] = exc.strerror or str(exc)
        else:
            wiped.append(str(path))
    return wiped, failed


def _wipe_one(path: Path) -> None:
    real = path.resolve(strict=True)
    fd = os.open(real, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        if size > _MAX_KEY:
            raise OSError(0, f"{size} bytes: too big for a key, left alone")
        os.pwrite(fd, os.urandom(size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    real.unlink()
    if path.is_symlink():
        path.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(real.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
