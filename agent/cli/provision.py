"""``simkeeper provision ...``: the factory side. CA and keys, device identities, bundles,
production-line batches and their birth log.

    init-ca       a factory CA (EC P-256, path length 0)
    operator-key  the operator's Ed25519 command key pair
    station-key   a production station's Ed25519 key pair (signs birth records)
    device        key + certificate + bundle, installed atomically into /etc/simkeeper
                  (root:simkeeper, key 0640, when that group exists: the agent runs as it)
    csr           a device key made where it stays, and its CSR
    sign-csr      the factory CA's certificate for a CSR
    server-cert   the fleet broker's TLS server certificate (its DNS names and IP addresses)
    operator-cert the operator's TLS client certificate (the identity the broker's ACL grants)
    install-cert  the certificate answering `csr`, installed as a bundle
    batch         a production-line run from a CSV, with a signed birth log
    verify        check a bundle, one problem per line
    verify-log    check a birth log's signatures and chain

Exit 0 on success, 1 when the thing asked failed, 2 on bad usage. ``cryptography`` is loaded
only by the provisioning functions this module calls.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Callable
from pathlib import Path

from agent.cli.errors import CliError, UsageError
from provisioning import birthlog, keys
from provisioning.batch import Batch
from provisioning.bundle import Settings, check_device_id, load_settings
from provisioning.ca import (
    CA_DAYS,
    DEVICE_DAYS,
    OPERATOR,
    OPERATOR_ID,
    SERVER,
    TLS_DAYS,
    ed25519_pair,
    init_ca,
    issue_operator,
    issue_server,
    load_ca,
    write_leaf,
)
from provisioning.device import install_cert, provision, request, sign_request
from provisioning.files import PUBLIC, File, ProvisionError, write_atomic
from provisioning.install import etc_dir
from provisioning.owner import SERVICE_GROUP, Group, service_group
from provisioning.verify import resolve, target_root, verify_bundle

DEFAULT_PORT = {"default": 8883, "beam": 1883}  # MQTT over TLS; Beam's plain entry point
Handler = Callable[[argparse.Namespace], int]


def _broker(text: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", text)
    if not match or (match[2] and not 1 <= int(match[2]) <= 65535):
        raise argparse.ArgumentTypeError(f"expected HOST[:PORT], got {text!r}")
    return match[1], int(match[2]) if match[2] else None


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 36500:
        raise argparse.ArgumentTypeError(f"expected a number of days 1-36500, got {text!r}")
    return int(text)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 or IPv6 address, got {text!r}"
                                         ) from None


def _dns(text: str) -> str:
    try:
        _ip(text)
    except argparse.ArgumentTypeError:
        pass
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is an IP address: give it with --ip")
    if len(text) > 253 or not re.fullmatch(rf"{_LABEL}(?:\.{_LABEL})*", text):
        raise argparse.ArgumentTypeError(f"expected a DNS name (labels of letters, digits and"
                                         f" '-', joined by dots), got {text!r}")
    return text


def _leaf_files(p: argparse.ArgumentParser, stem: str) -> None:
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="from init-ca")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help=f"where {stem}.pem and {stem}.key go (created; existing files are never"
                        " overwritten)")


def _leaf_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=_days, default=TLS_DAYS,
                   help=f"certificate validity (default {TLS_DAYS}, at most the CA's)")
    p.add_argument("--csr", type=Path, metavar="FILE",
                   help="certify this CSR's key instead of making one (no .key is written; only"
                        " the key is taken from the CSR, the names are this command's)")


def _tls_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("server-cert", help=f"the fleet broker's TLS server certificate:"
                       f" DIR/{SERVER}.pem, DIR/{SERVER}.key (0600)")
    _leaf_files(p, SERVER)
    p.add_argument("--dns", type=_dns, action="append", default=[], metavar="NAME",
                   help="a host name clients connect to (repeatable; the first is the CN)")
    p.add_argument("--ip", type=_ip, action="append", default=[], metavar="ADDR",
                   help="an IP address clients connect to (repeatable)")
    _leaf_key(p)
    p = sub.add_parser("operator-cert", help=f"the operator's TLS client certificate (CN"
                       f" {OPERATOR_ID}): DIR/{OPERATOR}.pem, DIR/{OPERATOR}.key (0600)")
    _leaf_files(p, OPERATOR)
    _leaf_key(p)


def _bundle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator-key", type=Path, required=True, metavar="PUB",
                   help="the operator's Ed25519 command public key (PEM) to pin")
    p.add_argument("--broker", type=_broker, required=True, metavar="HOST[:PORT]",
                   help="MQTT broker (port default: 8883, or 1883 with --profile beam)")
    p.add_argument("--profile", choices=["default", "beam"], default="default",
                   help="uplink profile (default default); beam: plain MQTT to SORACOM Beam,"
                   " which holds TLS")
    p.add_argument("--broker-ca", type=Path, metavar="FILE",
                   help="CA of the broker's server certificate (default: the device CA)")
    p.add_argument("--manifest", type=Path, metavar="FILE",
                   help="SIM manifest (.csv or .toml); the device's ICCID row is bundled")
    p.add_argument("--conformance", type=Path, metavar="FILE",
                   help="signed conformance list (.toml or .json), checked with --operator-key")
    p.add_argument("--conformance-sig", type=Path, metavar="FILE",
                   help="its detached signature (default: FILE.sig)")


def _sim_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--imei", help="the gateway modem's IMEI, recorded in bundle.json")
    p.add_argument("--iccid", help="the SIM's ICCID: selects its manifest row")


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, metavar="DIR",
                   help="install under DIR/etc/simkeeper (a staging tree), not /etc/simkeeper")
    p.add_argument("--force", action="store_true", help="replace an existing identity")


def _group_options(p: argparse.ArgumentParser, verb: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--group", metavar="NAME|GID",
                   help=f"the service's group, which {verb} (default: {SERVICE_GROUP!r} when it"
                        " exists in the target's etc/group: ROOT/etc/group of a staging tree"
                        " that has one, else this machine's)")
    g.add_argument("--no-group", action="store_true",
                   help="no service group: root-only files, the private key 0600")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("init-ca", help="a factory CA: DIR/ca.pem and DIR/ca.key (0600)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where the CA goes (created; an existing CA is never overwritten)")
    p.add_argument("--name", help="the CA's common name")
    p.add_argument("--days", type=_days, default=CA_DAYS, help=f"validity (default {CA_DAYS})")
    for name, what in (("operator-key", "operator"), ("station-key", "station")):
        p = sub.add_parser(name, help=f"an Ed25519 key pair: DIR/{what}.key (0600), .pub")
        p.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="where the key pair goes (created)")
    p = sub.add_parser("device", help="make a device identity and install its bundle")
    p.add_argument("--device-id", required=True, metavar="ID",
                   help="the gateway's id: its certificate's name and its MQTT topics")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="from init-ca")
    p.add_argument("--days", type=_days, default=DEVICE_DAYS,
                   help=f"certificate validity (default {DEVICE_DAYS}, at most the CA's)")
    _bundle_options(p)
    _sim_options(p)
    _target_options(p)
    _group_options(p, "reads the bundle: root:GROUP, directory 0750, key 0640")
    p = sub.add_parser("csr", help="a device key kept under /etc/simkeeper/request, its CSR")
    p.add_argument("--device-id", required=True, metavar="ID",
                   help="the gateway's id: its certificate's name and its MQTT topics")
    p.add_argument("--out", type=Path, metavar="FILE", help="also copy the CSR here")
    _target_options(p)
    p = sub.add_parser("sign-csr", help="the factory CA's certificate for a device CSR")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="from init-ca")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the signed certificate (PEM)")
    p.add_argument("--days", type=_days, default=DEVICE_DAYS,
                   help=f"certificate validity (default {DEVICE_DAYS}, at most the CA's)")
    p.add_argument("csr", type=Path, metavar="CSR", help="the device's CSR, from `csr`")
    _tls_parsers(sub)
    p = sub.add_parser("install-cert", help="install the certificate answering `csr`")
    p.add_argument("--ca-cert", type=Path, required=True, metavar="FILE",
                   help="the issuing CA's certificate (PEM)")
    _bundle_options(p)
    _sim_options(p)
    _target_options(p)
    _group_options(p, "reads the bundle: root:GROUP, directory 0750, key 0640")
    p.add_argument("cert", type=Path, metavar="CERT", help="the certificate from `sign-csr`")
    p = sub.add_parser("batch", help="a production-line run from a CSV (device_id,imei,iccid)")
    p.add_argument("--csv", type=Path, required=True, metavar="FILE",
                   help="one device a line: device_id,imei,iccid (with a header line)")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR", help="from init-ca")
    p.add_argument("--station-key", type=Path, required=True, metavar="KEY",
                   help="Ed25519 private key that signs the birth records")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="one tree per device: DIR/<device_id>/etc/simkeeper")
    p.add_argument("--log", type=Path, metavar="FILE",
                   help="factory log, JSON lines (default: DIR/factory-log.jsonl)")
    p.add_argument("--days", type=_days, default=DEVICE_DAYS,
                   help=f"certificate validity (default {DEVICE_DAYS}, at most the CA's)")
    p.add_argument("--reconfigure", action="store_true",
                   help="devices done before with other settings (broker, keys, lists) get"
                        " this run's, keeping their identity")
    _bundle_options(p)
    _group_options(p, "reads each bundle: root:GROUP, directory 0750, key 0640")
    p = sub.add_parser("verify", help="check a bundle; each problem on one line")
    p.add_argument("--ca", type=Path, metavar="FILE", help="the CA to trust (default: ca.pem)")
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR",
                   help="a bundle, an /etc/simkeeper, or a staging root")
    _group_options(p, "must read the bundle and alone may read the key (0640)")
    p = sub.add_parser("verify-log", help="check a factory log's signatures and chain")
    p.add_argument("--station-pub", type=Path, required=True, metavar="PUB",
                   help="the station's public key (station.pub from station-key)")
    p.add_argument("--head", metavar="HASH", help="the last line's hash, as recorded earlier")
    p.add_argument("log", type=Path, metavar="LOG", help="the factory log (JSON lines)")


def _settings(args: argparse.Namespace) -> Settings:
    host, port = args.broker
    conformance = None
    if args.conformance is not None:
        sig = args.conformance_sig or args.conformance.with_name(args.conformance.name + ".sig")
        conformance = (args.conformance, sig)
    elif args.conformance_sig is not None:
        raise UsageError("--conformance-sig needs --conformance")
    return load_settings(operator_key=args.operator_key, host=host,
                         port=port or DEFAULT_PORT[args.profile], profile=args.profile,
                         broker_ca=args.broker_ca, manifest=args.manifest,
                         conformance=conformance)


def _sims(args: argparse.Namespace) -> tuple[str | None, str | None]:
    from agent.sim.manifest import normalise_iccid
    from drivers.parsers.identity import imei_valid

    if args.imei is not None and not imei_valid(args.imei):
        raise UsageError(f"--imei {args.imei!r}: not 15 digits with a valid Luhn check digit")
    try:
        iccid = None if args.iccid is None else normalise_iccid(args.iccid)[0]
    except ValueError as exc:
        raise UsageError(f"--iccid: {exc}") from None
    return args.imei, iccid


def _device_id(text: str) -> str:
    try:
        return check_device_id(text)
    except ProvisionError as exc:
        raise UsageError(f"--device-id: {exc}") from None


def _group(args: argparse.Namespace, root: Path | None) -> Group | None:
    return service_group(args.group, root, enabled=not args.no_group)


def _gid(args: argparse.Namespace, root: Path | None) -> int | None:
    group = _group(args, root)
    return None if group is None else group.gid


def _done(where: Path) -> int:
    gen = resolve(where)
    cert = keys.load_cert(gen / "device.pem")
    print(f"{gen} {keys.common_name(cert.subject)} sha256:{keys.fingerprint(cert)}")
    return 0


def _init_ca(args: argparse.Namespace) -> int:
    cert = keys.load_cert(init_ca(args.out, name=args.name, days=args.days))
    print(f"{args.out / 'ca.pem'} sha256:{keys.fingerprint(cert)}")
    return 0


def _pair(stem: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        private, public = ed25519_pair(args.out, stem)
        print(f"{private} {public} key id {keys.key_id(keys.load_ed25519_public(public))}")
        return 0

    return run


def _device(args: argparse.Namespace) -> int:
    device_id, (imei, iccid) = _device_id(args.device_id), _sims(args)
    ca, settings = load_ca(args.ca), _settings(args)
    provision(device_id, ca, settings, root=args.root, force=args.force, imei=imei,
              iccid=iccid, days=args.days, gid=_gid(args, args.root))
    return _done(etc_dir(args.root))


def _csr(args: argparse.Namespace) -> int:
    path = request(_device_id(args.device_id), root=args.root, force=args.force)
    if args.out is not None:
        write_atomic(args.out, File(path.read_bytes(), PUBLIC), replace=True)
    print(args.out or path)
    return 0


def _issued(path: Path) -> int:
    cert = keys.load_cert(path)
    print(f"{path} {keys.common_name(cert.subject)} sha256:{keys.fingerprint(cert)}")
    return 0


def _sign_csr(args: argparse.Namespace) -> int:
    cert = sign_request(load_ca(args.ca), args.csr, days=args.days)
    write_atomic(args.out, File(keys.cert_pem(cert), PUBLIC), replace=True)
    return _issued(args.out)


def _server_cert(args: argparse.Namespace) -> int:
    if not args.dns and not args.ip:
        raise UsageError("give at least one --dns NAME or --ip ADDR: clients check the"
                         " broker's address against them")
    ca = load_ca(args.ca)
    return _issued(write_leaf(
        args.out, SERVER, lambda key: issue_server(ca, key, args.dns, args.ip, days=args.days),
        csr=args.csr))


def _operator_cert(args: argparse.Namespace) -> int:
    ca = load_ca(args.ca)
    return _issued(write_leaf(args.out, OPERATOR,
                              lambda key: issue_operator(ca, key, days=args.days), csr=args.csr))


def _install_cert(args: argparse.Namespace) -> int:
    imei, iccid = _sims(args)
    install_cert(args.cert, args.ca_cert, _settings(args), root=args.root, force=args.force,
                 imei=imei, iccid=iccid, gid=_gid(args, args.root))
    return _done(etc_dir(args.root))


def _batch(args: argparse.Namespace) -> int:
    log = args.log or args.out / "factory-log.jsonl"
    station = keys.load_ed25519_private(args.station_key, "station key")
    # The trees have no etc/group of their own: the group is looked up on this machine.
    run = Batch(load_ca(args.ca), _settings(args), station, args.out, log, args.days,
                _gid(args, None), reconfigure=args.reconfigure)
    out = run.run(args.csv)
    for line in (*out.warnings, *out.problems):
        print(f"{args.csv}:{line}", file=sys.stderr)
    print(f"made {len(out.made)}, skipped {len(out.skipped)} (done before),"
          f" reconfigured {len(out.reconfigured)}, recovered {len(out.recovered)},"
          f" failed {len(out.problems)}; log {log}")
    return 1 if out.problems else 0


def _verify(args: argparse.Namespace) -> int:
    trusted = None if args.ca is None else keys.load_cert(args.ca, "CA certificate")
    bundle = resolve(args.bundle)
    problems = verify_bundle(bundle, trusted_ca=trusted,
                             group=_group(args, target_root(bundle)))
    for problem in problems:
        print(f"{bundle}: {problem}")
    if not problems:
        print(f"{bundle}: ok")
    return 1 if problems else 0


def _verify_log(args: argparse.Namespace) -> int:
    if not args.log.is_file():
        raise ProvisionError(f"factory log {args.log}: no such file")
    pub = keys.load_ed25519_public(args.station_pub, "station key")
    result = birthlog.verify(args.log, pub, head=args.head)
    for problem in result.problems:
        print(f"{args.log}:{problem}")
    if not result.problems:
        print(f"{args.log}: ok, {len(result.records)} records, head {result.head}")
    return 1 if result.problems else 0


HANDLERS: dict[str, Handler] = {
    "init-ca": _init_ca, "operator-key": _pair("operator"), "station-key": _pair("station"),
    "device": _device, "csr": _csr, "sign-csr": _sign_csr, "server-cert": _server_cert,
    "operator-cert": _operator_cert, "install-cert": _install_cert,
    "batch": _batch, "verify": _verify, "verify-log": _verify_log,
}


def run(args: argparse.Namespace) -> int:
    try:
        return HANDLERS[args.action](args)
    except ProvisionError as exc:
        raise CliError(1, str(exc)) from None
    except OSError as exc:
        raise CliError(1, f"{exc.filename or ''}: {exc.strerror or exc}") from None
