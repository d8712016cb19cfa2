"""A device's bundle: everything ``/etc/simkeeper`` holds for one gateway.

One directory, written whole by :mod:`provisioning.install`::

    config.toml          agent config (agent.core.config schema), paths pointing into this directory
    device.key           EC P-256 private key, mode 0600, or 0640 root:simkeeper when installed
                         for the service's group (provisioning.owner)
    device.pem           certificate: CN = device id, SAN urn:simkeeper:device:<id>, clientAuth
    ca.pem               the CA that issued device.pem (and, by default, the broker's)
    broker-ca.pem        the broker's CA, when given apart (--broker-ca)
    operator.pub         the operator's Ed25519 command key (SubjectPublicKeyInfo PEM)
    manifest.csv         the SIM manifest rows for this device (agent.sim.manifest CSV)
    conformance.toml     the signed conformance list (or .json) and its detached signature,
    conformance.toml.sig   verified against operator.pub before it is bundled
    bundle.json          device id, IMEI, ICCID, cert fingerprint, SHA-256 of every file
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from agent.core import config
from agent.sim.conformance import ConformanceError, load_signed
from agent.sim.manifest import Manifest, ManifestError, load_manifest
from provisioning import keys
from provisioning.ca import OPERATOR_ID
from provisioning.files import PUBLIC, SECRET, File, ProvisionError, read

if TYPE_CHECKING:
    from cryptography import x509

ETC = PurePosixPath("/etc/simkeeper")
CONFIG, KEY, CERT, CA = "config.toml", "device.key", "device.pem", "ca.pem"
BROKER_CA, OPERATOR, MANIFEST, META = "broker-ca.pem", "operator.pub", "manifest.csv", "bundle.json"

CONFORMANCE_SUFFIXES = {".toml": "toml", ".json": "json"}
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Conformance:
    suffix: str  # ".toml" or ".json"
    data: bytes
    sig: bytes

    @property
    def name(self) -> str:
        return f"conformance{self.suffix}"


@dataclass(frozen=True, slots=True)
class Settings:
    """What every device of a run shares."""

    operator_pem: bytes
    host: str
    port: int
    profile: str = "default"
    broker_ca: bytes | None = None
    manifest: Manifest | None = None
    conformance: Conformance | None = None
    etc: PurePosixPath = ETC  # where /etc/simkeeper is on the device


@dataclass(frozen=True, slots=True)
class Identity:
    device_id: str
    key_pem: bytes
    cert: x509.Certificate
    ca_pem: bytes
    imei: str | None = None
    iccid: str | None = None


# Certificate names the fleet broker's ACL (packaging/mosquitto/simkeeper.acl) gives more than
# a device's own topics: a device must never be issued one.
RESERVED_IDS = frozenset({OPERATOR_ID})


def check_device_id(device_id: str) -> str:
    """The config schema's rule for ``device_id`` (1-64 of ``A-Za-z0-9_.-``), and not a name
    the broker reserves for the operator."""
    try:
        config.parse(f"device_id = {json.dumps(device_id)}")
    except config.ConfigError as exc:
        raise ProvisionError(str(exc)) from None
    if device_id.lower() in RESERVED_IDS:
        raise ProvisionError(f"device_id: {device_id!r} is reserved for the operator's identity")
    return device_id


def load_conformance(path: Path, sig: Path, operator_pem: bytes) -> Conformance:
    fmt = CONFORMANCE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ProvisionError(f"conformance list {path}: must be a .toml or .json file")
    data, signature = read(path, "conformance list"), read(sig, "conformance signature")
    try:
        load_signed(data, signature, operator_pem, "toml" if fmt == "toml" else "json")
    except ConformanceError as exc:
        raise ProvisionError(f"conformance list {path}: {exc}") from None
    return Conformance(path.suffix.lower(), data, signature)


def load_settings(*, operator_key: Path, host: str, port: int, profile: str = "default",
                  broker_ca: Path | None = None, manifest: Path | None = None,
                  conformance: tuple[Path, Path] | None = None) -> Settings:
    """Read and check the run's shared inputs; :class:`ProvisionError` on the first bad one."""
    operator_pem = read(operator_key, "operator key")
    keys.parse_ed25519_public(operator_pem, f"operator key {operator_key}")
    ca_pem = None
    if broker_ca is not None:
        ca_pem = read(broker_ca, "broker CA")
        keys.parse_cert(ca_pem, f"broker CA {broker_ca}")
    sims = None
    if manifest is not None:
        try:
            sims = load_manifest(manifest)
        except ManifestError as exc:
            raise ProvisionError(f"manifest: {exc}") from None
    signed = None if conformance is None else load_conformance(*conformance, operator_pem)
    return Settings(operator_pem, host, port, profile, ca_pem, sims, signed)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def manifest_csv(manifest: Manifest, iccid: str | None) -> bytes:
    """The rows for this device: its SIM's row, or every row when no ICCID is known."""
    if iccid is None:
        entries = list(manifest.entries.values())
    elif iccid in manifest.entries:
        entries = [manifest.entries[iccid]]
    else:
        raise ProvisionError(f"ICCID {iccid} has no valid row in the manifest")
    if not entries:
        raise ProvisionError("the manifest has no valid row")
    lines = ["iccid,deadline,apn,plan_bytes"] + [
        f"{e.iccid},{_iso(e.deadline)},{e.apn or ''},{e.plan_bytes or ''}" for e in entries]
    return ("\n".join(lines) + "\n").encode()


def _q(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def config_text(identity: Identity, settings: Settings, directory: PurePosixPath) -> str:
    def at(name: str) -> str:
        return _q(str(directory / name))

    beam = settings.profile == "beam"
    lines = [
        f"# simkeeper identity of {identity.device_id}, made by `simkeeper provision` on"
        f" {_iso(int(time.time()))}.",
        "# Every key is described in the reference config (packaging/config.toml).",
        f"device_id = {_q(identity.device_id)}",
        "",
        "[uplink]",
        f"host = {_q(settings.host)}",
        f"port = {settings.port}",
        f"profile = {_q(settings.profile)}",
    ]
    if beam:
        lines += [
            "# SORACOM Beam: plain MQTT inside the carrier network; Beam holds the TLS",
            "# credentials toward the broker. device.key/device.pem stay this gateway's identity.",
            "tls = false",
            "allow_plain = true",
        ]
    else:
        lines += ["tls = true", f"ca = {at(BROKER_CA if settings.broker_ca else CA)}",
                  f"cert = {at(CERT)}", f"key = {at(KEY)}"]
    lines += ["", "[commands]", f"operator_key = {at(OPERATOR)}", ""]
    text = "\n".join(lines)
    try:
        config.parse(text)
    except config.ConfigError as exc:
        raise ProvisionError(f"generated config is refused: {exc}") from None
    return text


def build(identity: Identity, settings: Settings, directory: PurePosixPath) -> dict[str, File]:
    """The bundle's files, for a bundle that will sit at ``directory`` on the device."""
    files = {
        CONFIG: File(config_text(identity, settings, directory).encode()),
        KEY: File(identity.key_pem, SECRET),
        CERT: File(keys.cert_pem(identity.cert)),
        CA: File(identity.ca_pem),
        OPERATOR: File(settings.operator_pem),
    }
    if settings.broker_ca is not None:
        files[BROKER_CA] = File(settings.broker_ca)
    if settings.manifest is not None:
        files[MANIFEST] = File(manifest_csv(settings.manifest, identity.iccid))
    if settings.conformance is not None:
        files[settings.conformance.name] = File(settings.conformance.data)
        files[f"{settings.conformance.name}.sig"] = File(settings.conformance.sig)
    meta: dict[str, Any] = {
        "format": FORMAT, "device_id": identity.device_id, "imei": identity.imei,
        "iccid": identity.iccid, "created": int(time.time()),
        "cert_sha256": keys.fingerprint(identity.cert),
        "files": {name: hashlib.sha256(f.data).hexdigest() for name, f in sorted(files.items())},
    }
    files[META] = File((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(), PUBLIC)
    return files
