"""``provision verify``: everything that can be wrong with a bundle, one line each."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core import config
from agent.sim.conformance import ConformanceError, load_signed
from agent.sim.manifest import ManifestError, load_manifest
from provisioning import keys
from provisioning.bundle import (
    CA,
    CERT,
    CONFIG,
    CONFORMANCE_SUFFIXES,
    ETC,
    KEY,
    MANIFEST,
    META,
    OPERATOR,
)
from provisioning.ca import check_is_ca, device_uri
from provisioning.files import ProvisionError
from provisioning.install import current
from provisioning.owner import Group

if TYPE_CHECKING:
    from cryptography import x509

REQUIRED = (CONFIG, KEY, CERT, CA, OPERATOR, META)


def resolve(path: Path) -> Path:
    """The bundle directory itself, or the generation an installed tree (``/etc/simkeeper``
    or a staging root holding ``etc/simkeeper``) points to."""
    for etc in (path, path / ETC.relative_to("/")):
        gen = current(etc)
        if gen is not None:
            return gen
    return path


def target_root(bundle: Path) -> Path | None:
    """The root of the tree ``bundle`` sits in, when it sits in ``<root>/etc/simkeeper``
    (its generation directory or that directory itself); None for this machine's ``/``."""
    bundle = Path(os.path.abspath(bundle))
    for etc in (bundle.parent, bundle):
        if etc.name == ETC.name and etc.parent.name == ETC.parent.name:
            root = etc.parent.parent
            return None if root == Path("/") else root
    return None


def _can_read(info: os.stat_result, gid: int) -> bool:
    mode = stat.S_IMODE(info.st_mode)
    return bool(mode & 0o004 or (mode & 0o040 and info.st_gid == gid))


class _Checker:
    def __init__(self, bundle: Path, trusted_ca: x509.Certificate | None,
                 group: Group | None) -> None:
        self.dir = bundle
        self.trusted_ca = trusted_ca
        self.group = group
        self.problems: list[str] = []
        self.now = dt.datetime.now(dt.UTC)

    def bad(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def run(self) -> list[str]:
        if not self.dir.is_dir():
            return [f"{self.dir}: not a directory"]
        for name in REQUIRED:
            if not (self.dir / name).is_file():
                self.bad(name, "missing")
        self.files()
        meta = self.meta()
        device_id = self.config(meta)
        self.identity(device_id)
        operator = self.operator()
        self.manifest(meta)
        self.conformance(operator)
        return self.problems

    def directory(self) -> None:
        info = self.dir.stat()
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022:
            self.bad("directory", f"mode {mode:04o}: writable by group or others")
        group = self.group
        if group is not None and not (mode & 0o001 or (mode & 0o010 and info.st_gid == group.gid)):
            self.bad("directory", f"mode {mode:04o}, gid {info.st_gid}: the service's group"
                                  f" {group} cannot enter it (root:{group.name} 0750 expected)")

    def key_mode(self, name: str, info: os.stat_result) -> None:
        """0600 (root only) or 0640 with the service's group; nothing else."""
        mode, group = stat.S_IMODE(info.st_mode), self.group
        if mode & 0o037:
            self.bad(name, f"mode {mode:04o}: a private key must be 0600, or 0640 with the"
                           " service's group (no group write, no access for others)")
        elif mode & 0o040 and (group is None or info.st_gid != group.gid):
            service = f"the service's is {group}" if group else "there is no service group here"
            self.bad(name, f"mode {mode:04o}: readable by gid {info.st_gid}, and {service}")
        elif name == KEY and group is not None and not mode & 0o040:
            self.bad(name, f"mode {mode:04o}, gid {info.st_gid}: the service's group {group}"
                           f" cannot read it (root:{group.name} 0640 expected)")

    def files(self) -> None:
        self.directory()
        for path in sorted(self.dir.iterdir()):
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                self.bad(path.name, "not a regular file")
                continue
            mode = stat.S_IMODE(info.st_mode)
            if path.name.endswith(".key"):
                self.key_mode(path.name, info)
            elif mode & 0o022:
                self.bad(path.name, f"mode {mode:04o}: writable by group or others")
            elif self.group is not None and not _can_read(info, self.group.gid):
                self.bad(path.name, f"mode {mode:04o}, gid {info.st_gid}: the service's group"
                                    f" {self.group} cannot read it")
            if path.name != KEY and b"PRIVATE KEY" in path.read_bytes():
                self.bad(path.name, "holds a private key; only device.key belongs in a bundle")

    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.dir / META).read_text(encoding="utf-8"))
            files = meta["files"]
            if not isinstance(meta, dict) or not isinstance(files, dict):
                raise TypeError
        except (OSError, ValueError, TypeError, KeyError):
            if (self.dir / META).is_file():
                self.bad(META, "not the JSON a bundle carries")
            return {}
        for name, digest in sorted(files.items()):
            path = self.dir / name
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                self.bad(name, "changed since provisioning (SHA-256 differs from bundle.json)")
            elif not path.is_file():
                self.bad(name, "listed in bundle.json but missing")
        for path in sorted(self.dir.iterdir()):
            if path.name not in files and path.name != META:
                self.bad(path.name, "not listed in bundle.json")
        return meta

    def config(self, meta: dict[str, Any]) -> str | None:
        if not (self.dir / CONFIG).is_file():
            return None
        try:
            cfg = config.load(self.dir / CONFIG)
        except config.ConfigError as exc:
            self.bad(CONFIG, str(exc).removeprefix(f"{self.dir / CONFIG}: "))
            return None
        if meta and meta.get("device_id") != cfg.device_id:
            self.bad(META, f"device id {meta.get('device_id')!r} is not config's"
                           f" {cfg.device_id!r}")
        paths = {"uplink.ca": cfg.uplink.ca, "uplink.cert": cfg.uplink.cert,
                 "uplink.key": cfg.uplink.key, "commands.operator_key": cfg.commands.operator_key}
        for key, path in paths.items():
            if path is not None and (path.parent.name != self.dir.name
                                     or not (self.dir / path.name).is_file()):
                self.bad(CONFIG, f"{key} = {str(path)!r} is not a file of this bundle")
        if cfg.commands.operator_key is None:
            self.bad(CONFIG, "commands.operator_key is not set: every command would be refused")
        return cfg.device_id

    def _load(self, name: str) -> x509.Certificate | None:
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            return keys.parse_cert(path.read_bytes(), name)
        except ProvisionError as exc:
            self.problems.append(str(exc))
            return None

    def identity(self, device_id: str | None) -> None:
        cert, ca = self._load(CERT), self._load(CA)
        if cert is not None:
            self.certificate(cert, device_id)
            self.key(cert)
        if self.trusted_ca is not None:
            if ca is not None and keys.fingerprint(ca) != keys.fingerprint(self.trusted_ca):
                self.bad(CA, "is not the trusted CA given with --ca")
            ca = self.trusted_ca
        if cert is not None and ca is not None:
            self.chain(cert, ca)

    def certificate(self, cert: x509.Certificate, device_id: str | None) -> None:
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        cn = keys.common_name(cert.subject)
        if device_id is not None and cn != device_id:
            self.bad(CERT, f"subject CN {cn!r} is not the device id {device_id!r}")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if device_id is not None and uris and uris != [device_uri(device_id)]:
            self.bad(CERT, f"SAN URI {uris} is not {device_uri(device_id)}")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            client = ExtendedKeyUsageOID.CLIENT_AUTH in eku
        except x509.ExtensionNotFound:
            client = True
        if not client:
            self.bad(CERT, "not usable for TLS client authentication (extendedKeyUsage)")
        self.validity(CERT, cert)

    def validity(self, name: str, cert: x509.Certificate) -> None:
        if self.now < cert.not_valid_before_utc:
            self.bad(name, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if self.now > cert.not_valid_after_utc:
            self.bad(name, f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

    def key(self, cert: x509.Certificate) -> None:
        if not (self.dir / KEY).is_file():
            return
        try:
            key = keys.load_ec_key(self.dir / KEY)
        except ProvisionError:
            self.bad(KEY, "not an unencrypted EC P-256 private key (PEM)")
            return
        if not keys.same_key(key.public_key(), cert.public_key()):
            self.bad(KEY, "does not match the certificate in device.pem")

    def chain(self, cert: x509.Certificate, ca: x509.Certificate) -> None:
        from cryptography.exceptions import InvalidSignature

        try:
            check_is_ca(ca, "the CA")
        except ProvisionError as exc:
            self.bad(CA, str(exc))
            return
        self.validity(CA, ca)
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            self.bad(CERT, f"not issued by the CA {keys.common_name(ca.subject)!r}"
                           " (chain does not verify)")

    def operator(self) -> bytes | None:
        path = self.dir / OPERATOR
        if not path.is_file():
            return None
        data = path.read_bytes()
        try:
            keys.parse_ed25519_public(data, OPERATOR)
        except ProvisionError as exc:
            self.problems.append(str(exc))
            return None
        return data

    def manifest(self, meta: dict[str, Any]) -> None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return
        try:
            sims = load_manifest(path)
        except ManifestError as exc:
            self.bad(MANIFEST, str(exc).removeprefix(f"{path}: "))
            return
        for problem in sims.errors:
            self.bad(MANIFEST, str(problem))
        iccid = meta.get("iccid")
        if iccid and iccid not in sims.entries:
            self.bad(MANIFEST, f"no row for this device's ICCID {iccid}")
        for entry in sims.entries.values():
            if entry.deadline < self.now.timestamp():
                when = dt.datetime.fromtimestamp(entry.deadline, dt.UTC)
                self.bad(MANIFEST, f"line {entry.line}: activation deadline of {entry.iccid}"
                                   f" passed on {when:%Y-%m-%d %H:%M} UTC")

    def conformance(self, operator: bytes | None) -> None:
        for suffix, fmt in CONFORMANCE_SUFFIXES.items():
            path = self.dir / f"conformance{suffix}"
            sig = path.with_name(path.name + ".sig")
            if not path.is_file():
                if sig.is_file():
                    self.bad(sig.name, f"a signature without {path.name}")
                continue
            if not sig.is_file():
                self.bad(path.name, f"unsigned: {sig.name} is missing")
            elif operator is not None:
                try:
                    load_signed(path.read_bytes(), sig.read_bytes(), operator,
                                "toml" if fmt == "toml" else "json")
                except ConformanceError as exc:
                    self.bad(path.name, str(exc))


def verify_bundle(path: Path, *, trusted_ca: x509.Certificate | None = None,
                  group: Group | None = None) -> list[str]:
    """Every problem of the bundle at ``path`` (or installed under it), one line each.
    ``group``: the service's group (:mod:`provisioning.owner`), which must be able to read the
    bundle and may be the only group that reads the key; None: the key must be 0600."""
    return _Checker(resolve(path), trusted_ca, group).run()
