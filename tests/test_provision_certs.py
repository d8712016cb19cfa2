"""`provision server-cert` and `provision operator-cert` (issue 11, item 6): the fleet broker's
PKI made with `simkeeper provision` alone, then used for real.

One CA from `init-ca` issues the broker's certificate (localhost, 127.0.0.1), the operator's,
and two devices by the `provision device` flow. mosquitto runs the packaged simkeeper.conf and
simkeeper.acl (paths and port rewritten as in test_mosquitto_acl). Every client checks the
broker's host name against its certificate (paho's default, the agent's and the fleet tools'):
the agent's uplink and `fleet watch` by name (localhost), paho clients by address (127.0.0.1).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.cli import main
from agent.core import config
from agent.fleet.localbroker import LocalBroker, free_port
from agent.telemetry.batch import decode_batch
from agent.telemetry.mqtt import MqttUplink
from provisioning import keys
from provisioning.ca import OPERATOR_ID, csr_pem, load_ca, make_csr
from tests.broker import WAIT, fill, open_outbox, until, wait_until
from tests.test_daemon import SIMKEEPER
from tests.test_mosquitto_acl import (
    NOT_AUTHORIZED,
    PACKAGING,
    Client,
    Fleet,
    Identity,
    _config,
    _success,
)
from tests.test_provision import ROOT, gen_dir
from tests.test_provision import provision_cli as _run

DEVICES = ("gw-0001", "gw-0002")


def provision(*args: str | Path) -> None:
    assert main(["provision", *map(str, args)]) == 0


def start_broker(mosquitto: str, directory: Path, ca: Path) -> LocalBroker:
    """mosquitto with the packaged config, its server certificate in ``directory`` (where
    `server-cert --out` put it) and the fleet CA beside it, as the README installs them."""
    shutil.copy(ca / "ca.pem", directory / "ca.pem")
    port = free_port()
    broker = LocalBroker(directory, binary=mosquitto, config=_config(directory, port), port=port)
    broker.start(WAIT)
    return broker


@dataclass
class Made:
    dir: Path
    ca: Path  # the init-ca directory
    fleet: Fleet  # the broker (port, CA) and who may connect: the operator and each device
    bundles: dict[str, Path]  # device id -> its installed bundle


@pytest.fixture(scope="module")
def made(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    d = tmp_path_factory.mktemp("certs")
    provision("init-ca", "--out", d / "ca")
    provision("server-cert", "--ca", d / "ca", "--out", d / "broker", "--dns", "localhost",
              "--ip", "127.0.0.1")
    provision("operator-cert", "--ca", d / "ca", "--out", d / "operator")
    provision("operator-key", "--out", d / "commands")
    broker = start_broker(mosquitto, d / "broker", d / "ca")
    try:
        fleet = Fleet(broker.port, d / "ca" / "ca.pem")
        fleet.ids[OPERATOR_ID] = Identity(d / "operator/operator-tls.pem",
                                          d / "operator/operator-tls.key")
        bundles = {}
        for device in DEVICES:
            provision("device", "--device-id", device, "--ca", d / "ca", "--operator-key",
                      d / "commands/operator.pub", "--broker", f"localhost:{broker.port}",
                      "--root", d / device, "--no-group")
            bundles[device] = gen_dir(d / device)
            fleet.ids[device] = Identity(bundles[device] / "device.pem",
                                         bundles[device] / "device.key")
        yield Made(d, d / "ca", fleet, bundles)
    finally:
        broker.stop()


def connect(clients: list[Client], made: Made, name: str) -> Client:
    c = Client(made.fleet, made.fleet.ids[name])
    clients.append(c)
    return c.wait_connected()


# -- the certificates ------------------------------------------------------------------------


def _usage(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _key_is_secret_and_matches(cert_path: Path) -> None:
    key_path = cert_path.with_suffix(".key")
    assert key_path.stat().st_mode & 0o777 == 0o600
    key = keys.load_ec_key(key_path)
    assert keys.same_key(key.public_key(), keys.load_cert(cert_path).public_key())


def test_server_certificate_names_the_broker_for_server_auth(made: Made) -> None:
    path = made.dir / "broker/server.pem"
    cert = keys.load_cert(path)
    cert.verify_directly_issued_by(load_ca(made.ca).cert)
    assert keys.common_name(cert.subject) == "localhost"
    assert _usage(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _san(cert).get_values_for_type(x509.DNSName) == ["localhost"]
    assert _san(cert).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _key_is_secret_and_matches(path)


def test_operator_certificate_is_the_identity_the_acl_grants(made: Made) -> None:
    acl = (PACKAGING / "simkeeper.acl").read_text().splitlines()
    assert [line.split()[1] for line in acl if line.startswith("user ")] == [OPERATOR_ID]
    path = made.fleet.ids[OPERATOR_ID].cert
    cert = keys.load_cert(path)
    cert.verify_directly_issued_by(load_ca(made.ca).cert)
    assert keys.common_name(cert.subject) == OPERATOR_ID  # use_identity_as_username
    assert _usage(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _key_is_secret_and_matches(path)
    for device in DEVICES:  # and a device's certificate is for clients only too
        assert _usage(keys.load_cert(made.fleet.ids[device].cert)) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]


# -- against the packaged broker ---------------------------------------------------------------


async def test_device_publishes_and_the_operator_sees_every_device_and_commands(
    made: Made, clients: list[Client], tmp_path: Path
) -> None:
    operator = connect(clients, made, OPERATOR_ID)
    assert all(map(_success, operator.subscribe("simkeeper/+/telemetry")))
    bridge = connect(clients, made, OPERATOR_ID)  # what `fleet flux-bridge` subscribes to
    assert all(map(_success, bridge.subscribe("$share/simkeeper-bridge/simkeeper/+/telemetry")))

    # gw-0001: the agent's own uplink, with the bundle's config as the agent reads it.
    bundle = made.bundles["gw-0001"]
    uplink = config.load(bundle.parent / "config.toml").uplink
    assert (uplink.host, uplink.tls) == ("localhost", True)
    uplink = dataclasses.replace(  # the bundle's paths, staged under its --root; no lingering
        uplink, ca=bundle / "ca.pem", cert=bundle / "device.pem", key=bundle / "device.key",
        batch_max_latency=0.05)
    outbox = open_outbox(tmp_path)
    ids = fill(outbox, 5)
    commands: list[bytes] = []
    agent = MqttUplink(uplink, "gw-0001", outbox, on_command=commands.append)
    await agent.start()
    try:
        await until(lambda: {r["id"] for _, p in operator.got() for r in decode_batch(p)[
            "readings"]} >= set(ids), "gw-0001's readings at the operator")
        # gw-0002 with its bundle's certificate: the operator reads every device
        device = connect(clients, made, "gw-0002")
        assert _success(device.publish("simkeeper/gw-0002/telemetry", b"{}"))
        wait_until(lambda: bool(operator.got("simkeeper/gw-0002/telemetry")), what="gw-0002's")
        wait_until(lambda: {t for t, _ in bridge.got()} >= {
            "simkeeper/gw-0001/telemetry", "simkeeper/gw-0002/telemetry"}, what="shared sub")
        # and sends a command, which reaches the agent
        assert _success(operator.publish("simkeeper/gw-0001/cmd", b'{"marker": 1}'))
        await until(lambda: b'{"marker": 1}' in commands, "the command at gw-0001's agent")
    finally:
        await agent.stop()


def test_device_certificate_cannot_act_as_operator(made: Made, clients: list[Client]) -> None:
    operator = connect(clients, made, OPERATOR_ID)
    operator.subscribe("simkeeper/+/telemetry")
    impostor = connect(clients, made, "gw-0001")
    impostor.subscribe("simkeeper/+/telemetry")
    assert impostor.publish("simkeeper/gw-0002/cmd", b"{}") == NOT_AUTHORIZED
    victim = connect(clients, made, "gw-0002")
    assert _success(victim.publish("simkeeper/gw-0002/telemetry", b"private"))
    wait_until(lambda: bool(operator.got("simkeeper/gw-0002/telemetry")), what="gw-0002's")
    # gw-0002's reading was routed (PUBACKed) before this marker was sent: had the impostor
    # been given it, it would have come first on the impostor's connection.
    assert _success(impostor.publish("simkeeper/gw-0001/telemetry", b"marker"))
    wait_until(lambda: bool(impostor.got("simkeeper/gw-0001/telemetry")), what="the marker")
    assert impostor.got("simkeeper/gw-0002/telemetry") == []


def _watch(made: Made, broker: str) -> subprocess.CompletedProcess[str]:
    """The README's `fleet watch` line, with the operator's certificate."""
    operator = made.fleet.ids[OPERATOR_ID]
    return subprocess.run(
        [*SIMKEEPER, "fleet", "watch", "--once", "--broker", broker, "--ca",
         str(made.fleet.ca), "--cert", str(operator.cert), "--client-key", str(operator.key)],
        capture_output=True, text=True, cwd=ROOT, timeout=WAIT, check=False)


def _handshake(port: int, ca: Path, check_hostname: bool) -> None:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = check_hostname
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1"):
        pass


def test_the_broker_is_known_by_its_subject_alternative_names(
    made: Made, mosquitto: str, clients: list[Client]
) -> None:
    done = _watch(made, f"localhost:{made.fleet.port}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("DEVICE")
    # The same CA's certificate for another host: the chain verifies, the name does not.
    other = made.dir / "elsewhere"
    provision("server-cert", "--ca", made.ca, "--out", other, "--dns", "broker.example.net",
              "--ip", "10.0.0.5")
    broker = start_broker(mosquitto, other, made.ca)
    try:
        _handshake(broker.port, made.fleet.ca, check_hostname=False)
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(broker.port, made.fleet.ca, check_hostname=True)
        c = Client(dataclasses.replace(made.fleet, port=broker.port), made.fleet.ids[OPERATOR_ID])
        clients.append(c)
        assert isinstance(c.error, ssl.SSLCertVerificationError), c.error
        done = _watch(made, f"localhost:{broker.port}")
        assert done.returncode == 1 and "Hostname mismatch" in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1
    finally:
        broker.stop()


# -- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ((), "give at least one --dns NAME or --ip ADDR"),
    (("--dns", "10.0.0.5"), "is an IP address: give it with --ip"),
    (("--dns", "gw_0001.example.net"), "expected a DNS name"),
    (("--ip", "10.0.0"), "expected an IPv4 or IPv6 address"),
], ids=["no-name", "ip-as-dns", "bad-dns", "bad-ip"])
def test_server_cert_bad_usage(made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               args: tuple[str, ...], message: str) -> None:
    rc, _, err = _run(capsys, "server-cert", "--ca", made.ca, "--out", tmp_path / "b", *args)
    assert rc == 2 and message in err.splitlines()[-1], err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_existing_files_are_never_overwritten(made: Made, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    operator = made.fleet.ids[OPERATOR_ID]
    before = operator.key.read_bytes(), operator.cert.read_bytes()
    rc, _, err = _run(capsys, "operator-cert", "--ca", made.ca, "--out", operator.cert.parent)
    assert rc == 1 and "already exists" in err and len(err.splitlines()) == 1
    assert (operator.key.read_bytes(), operator.cert.read_bytes()) == before


def test_a_csr_keeps_its_key_and_gets_this_commands_names(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keys.new_ec_key()
    (tmp_path / "req.csr").write_bytes(csr_pem(make_csr(key, "gw-0001")))  # asks for gw-0001
    for action, extra, cn, names in (
            ("server-cert", ("--dns", "mqtt.example.net"), "mqtt.example.net",
             [x509.DNSName("mqtt.example.net")]),
            ("operator-cert", (), OPERATOR_ID, None)):
        out = tmp_path / action
        rc, _, err = _run(capsys, action, "--ca", made.ca, "--out", out, "--csr",
                          tmp_path / "req.csr", *extra)
        assert rc == 0, err
        [cert_path] = out.iterdir()  # no key: it stays where the CSR was made
        cert = keys.load_cert(cert_path)
        assert keys.same_key(cert.public_key(), key.public_key())
        assert keys.common_name(cert.subject) == cn
        if names is None:
            with pytest.raises(x509.ExtensionNotFound):
                _san(cert)
        else:
            assert list(_san(cert)) == names


def test_a_csr_for_another_kind_of_key_is_refused(
    made: Made, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "req.csr").write_bytes(csr_pem(make_csr(ec.generate_private_key(ec.SECP384R1()),
                                                        "gw-0001")))
    rc, _, err = _run(capsys, "operator-cert", "--ca", made.ca, "--out", tmp_path / "op",
                      "--csr", tmp_path / "req.csr")
    assert rc == 1 and err.strip().endswith("the key to certify must be EC P-256"), err
    assert not (tmp_path / "op").exists()
