"""provision: CA, device identity and bundle, CSR flow, and `verify` catching each tampering.

Real keys, real files, the real CLI (``agent.cli.main``). Shared fixtures for the other
``test_provision_*`` modules live here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import main
from agent.core import config
from drivers.parsers import luhn_digit
from provisioning import keys
from provisioning.ca import device_uri, issue, load_ca

ROOT = Path(__file__).resolve().parents[1]


def luhn(prefix: str) -> str:
    """``prefix`` completed with its Luhn check digit."""
    return prefix + luhn_digit(prefix)


ICCID_A, ICCID_B = luhn("898110000581951001"), luhn("898110000581951002")
IMEI_A = luhn("35693803564380")


def provision_cli(capsys: pytest.CaptureFixture[str],
                  *args: str | Path) -> tuple[int, str, str]:
    """``simkeeper provision ARGS`` in this process: exit code, stdout, stderr."""
    capsys.readouterr()
    try:
        rc = main(["provision", *map(str, args)])
    except SystemExit as exc:  # argparse's own usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@dataclass
class Factory:
    dir: Path
    ca: Path
    operator_pub: Path
    operator_key: Path
    station_key: Path
    station_pub: Path
    manifest: Path
    conformance: Path

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
        return provision_cli(capsys, *args)

    def device_args(self, device_id: str = "gw-0001", *extra: str | Path) -> list[str | Path]:
        return ["device", "--device-id", device_id, "--ca", self.ca,
                "--operator-key", self.operator_pub, "--broker", "mqtt.example.com",
                "--manifest", self.manifest, "--iccid", ICCID_A, "--imei", IMEI_A,
                "--conformance", self.conformance, *extra]


def sign_file(path: Path, key_path: Path) -> Path:
    sig = path.with_name(path.name + ".sig")
    key = keys.load_ed25519_private(key_path)
    sig.write_text(keys.sign(key, path.read_bytes()))
    return sig


@pytest.fixture
def factory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Factory:
    d = tmp_path / "factory"
    for args in (["init-ca", "--out", d / "ca", "--name", "test CA"],
                 ["operator-key", "--out", d / "op"], ["station-key", "--out", d / "station"]):
        assert main(["provision", *map(str, args)]) == 0
    manifest = d / "sims.csv"
    manifest.write_text("iccid,deadline,apn,plan_bytes\n"
                        f"{ICCID_A},2099-03-31T23:59:59+09:00,soracom.io,1073741824\n"
                        f"{ICCID_B}F,2099-04-30T00:00:00Z,,\n")
    conformance = d / "conformance.toml"
    conformance.write_text('version = 3\npolicy = "enforce"\n\n[[terminal]]\n'
                           'manufacturer = "Quectel"\nmodel = "EC25"\ntac_prefixes = ["3569"]\n')
    sign_file(conformance, d / "op" / "operator.key")
    capsys.readouterr()
    return Factory(d, d / "ca", d / "op" / "operator.pub", d / "op" / "operator.key",
                   d / "station" / "station.key", d / "station" / "station.pub", manifest,
                   conformance)


def gen_dir(root: Path) -> Path:
    link = root / "etc/simkeeper/config.toml"
    return link.parent / Path(os.readlink(link)).parent


def test_ca_and_key_files(factory: Factory) -> None:
    from cryptography import x509

    assert (factory.ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (factory.operator_key.stat().st_mode & 0o777, factory.station_key.stat().st_mode
            & 0o777) == (0o600, 0o600)
    ca = load_ca(factory.ca)
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    assert ca.cert.subject == ca.cert.issuer
    keys.load_ed25519_public(factory.operator_pub)
    assert b"BEGIN PUBLIC KEY" in factory.operator_pub.read_bytes()  # SubjectPublicKeyInfo


def test_init_ca_refuses_to_overwrite(factory: Factory,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    before = (factory.ca / "ca.key").read_bytes()
    rc, _, err = factory.cli(capsys, "init-ca", "--out", factory.ca)
    assert rc == 1 and "already exists" in err and len(err.splitlines()) == 1
    assert (factory.ca / "ca.key").read_bytes() == before


def test_device_then_verify(factory: Factory, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    rc, out, err = factory.cli(capsys, *factory.device_args(), "--root", root)
    assert (rc, err) == (0, "")
    gen = gen_dir(root)
    assert out.split()[:2] == [str(gen), "gw-0001"]
    cfg = config.load(root / "etc/simkeeper/config.toml")
    assert cfg.device_id == "gw-0001" and cfg.uplink.tls and cfg.uplink.port == 8883
    assert cfg.uplink.host == "mqtt.example.com"
    for path in (cfg.uplink.ca, cfg.uplink.cert, cfg.uplink.key, cfg.commands.operator_key):
        assert path is not None and path.parent == Path("/etc/simkeeper") / gen.name
        assert (gen / path.name).is_file()
    assert (gen / "device.key").stat().st_mode & 0o777 == 0o600
    cert = keys.load_cert(gen / "device.pem")
    assert keys.common_name(cert.subject) == "gw-0001"
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device_uri("gw-0001")]
    cert.verify_directly_issued_by(load_ca(factory.ca).cert)
    manifest = (gen / "manifest.csv").read_text()
    assert ICCID_A in manifest and ICCID_B not in manifest  # only this device's SIM
    assert (gen / "conformance.toml").read_bytes() == factory.conformance.read_bytes()

    for target in (root, root / "etc/simkeeper", gen):
        rc, out, _ = factory.cli(capsys, "verify", target)
        assert rc == 0 and out.strip().endswith(": ok"), out
    rc, out, _ = factory.cli(capsys, "verify", "--ca", factory.ca / "ca.pem", root)
    assert rc == 0


def test_beam_profile_and_broker_ca(factory: Factory, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = factory.cli(capsys, "device", "--device-id", "gw-b", "--ca", factory.ca,
                             "--operator-key", factory.operator_pub, "--broker",
                             "beam.soracom.io", "--profile", "beam", "--root", tmp_path / "b")
    assert rc == 0, err
    cfg = config.load(tmp_path / "b/etc/simkeeper/config.toml")
    assert (cfg.uplink.profile, cfg.uplink.port, cfg.uplink.tls) == ("beam", 1883, False)
    assert cfg.uplink.cert is None and cfg.commands.operator_key is not None
    other = tmp_path / "broker-ca"
    assert main(["provision", "init-ca", "--out", str(other)]) == 0
    rc, _, err = factory.cli(capsys, "device", "--device-id", "gw-c", "--ca", factory.ca,
                             "--operator-key", factory.operator_pub, "--broker", "[::1]:8884",
                             "--broker-ca", other / "ca.pem", "--root", tmp_path / "c")
    assert rc == 0, err
    cfg = config.load(tmp_path / "c/etc/simkeeper/config.toml")
    assert cfg.uplink.ca is not None and cfg.uplink.ca.name == "broker-ca.pem"
    assert (cfg.uplink.host, cfg.uplink.port) == ("[::1]", 8884)
    assert factory.cli(capsys, "verify", tmp_path / "c")[0] == 0


BAD_INPUT = {
    "port": (["--broker", "host:0"], 2, "HOST[:PORT]"),
    "imei": (["--imei", "123"], 2, "--imei"),
    "iccid": (["--iccid", "12"], 2, "--iccid"),
    "signature": (["--conformance-sig", "x.sig"], 1, "signature"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_device_bad_input(factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    args, status, message = BAD_INPUT[case]
    (tmp_path / "x.sig").write_text("A" * 86)
    monkeypatch.chdir(tmp_path)
    rc, _, err = factory.cli(capsys, *factory.device_args(), *args, "--root", tmp_path / "r")
    assert rc == status and message in err and "Traceback" not in err
    assert not (tmp_path / "r/etc/simkeeper/config.toml").exists()


def test_device_refuses_unsigned_conformance(factory: Factory, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    factory.conformance.with_name("conformance.toml.sig").unlink()
    rc, _, err = factory.cli(capsys, *factory.device_args(), "--root", tmp_path / "r")
    assert rc == 1 and "conformance signature" in err
    assert not (tmp_path / "r/etc/simkeeper/config.toml").exists()


def test_device_needs_manifest_row(factory: Factory, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = factory.cli(capsys, *factory.device_args(), "--iccid", luhn("898110000581951009"),
                             "--root", tmp_path / "r")
    assert rc == 1 and "no valid row in the manifest" in err


# -- verify catches tampering ---------------------------------------------------------------


def _other_ca(gen: Path, tmp: Path) -> None:
    assert main(["provision", "init-ca", "--out", str(tmp / "evil")]) == 0
    (gen / "ca.pem").write_bytes((tmp / "evil/ca.pem").read_bytes())


def _swap_key(gen: Path, tmp: Path) -> None:
    (gen / "device.key").write_bytes(keys.private_pem(keys.new_ec_key()))


def _edit(name: str, old: str, new: str) -> Callable[[Path, Path], None]:
    def edit(gen: Path, tmp: Path) -> None:
        path = gen / name
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))

    return edit


def _chmod(gen: Path, tmp: Path) -> None:
    (gen / "device.key").chmod(0o644)


def _bad_sig(gen: Path, tmp: Path) -> None:
    sig = gen / "conformance.toml.sig"
    sig.write_text(sig.read_text()[::-1])


def _unlink(name: str) -> Callable[[Path, Path], None]:
    return lambda gen, tmp: (gen / name).unlink()


def _ca_key(gen: Path, tmp: Path) -> None:
    (gen / "ca.key").write_bytes(keys.private_pem(keys.new_ec_key()))
    (gen / "ca.key").chmod(0o600)


TAMPERING = {
    "wrong CA": (_other_ca, "device.pem: not issued by the CA"),
    "swapped key": (_swap_key, "device.key: does not match the certificate"),
    "wrong device id": (_edit("config.toml", '"gw-0001"', '"gw-0002"'),
                        "device.pem: subject CN 'gw-0001' is not the device id 'gw-0002'"),
    "loose key mode": (_chmod, "device.key: mode 0644"),
    "broken signature": (_bad_sig, "conformance.toml: signature"),
    "edited list": (_edit("conformance.toml", "version = 3", "version = 4"),
                    "conformance.toml: signature does not match"),
    "operator key": (_edit("operator.pub", "PUBLIC KEY", "PRIVATE THING"),
                     "operator.pub is not a PEM public key"),
    "manifest": (_edit("manifest.csv", "soracom.io", "not an apn!"), "manifest.csv: line 2"),
    "missing cert": (_unlink("device.pem"), "device.pem: missing"),
    "unsigned list": (_unlink("conformance.toml.sig"), "conformance.toml: unsigned"),
    "ca key shipped": (_ca_key, "ca.key: holds a private key"),
    "config elsewhere": (_edit("config.toml", "/etc/simkeeper/id-", "/etc/simkeeper/id-0"),
                         "uplink.cert = "),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_verify_reports_tampering(factory: Factory, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], case: str) -> None:
    root = tmp_path / "root"
    assert factory.cli(capsys, *factory.device_args(), "--root", root)[0] == 0
    tamper, expected = TAMPERING[case]
    tamper(gen_dir(root), tmp_path)
    rc, out, err = factory.cli(capsys, "verify", root)
    assert rc == 1 and err == ""
    assert any(expected in line for line in out.splitlines()), out
    assert all(line.startswith(str(gen_dir(root))) for line in out.splitlines())


def test_verify_with_pinned_ca_catches_a_consistent_forgery(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bundle remade whole from another CA verifies on its own, not against the factory CA."""
    evil = tmp_path / "evil"
    assert main(["provision", "init-ca", "--out", str(evil)]) == 0
    root = tmp_path / "root"
    assert factory.cli(capsys, *factory.device_args(), "--root", root)[0] == 0
    assert factory.cli(capsys, *factory.device_args("gw-0001")[:4], evil,
                       *factory.device_args()[5:], "--root", tmp_path / "forged")[0] == 0
    assert factory.cli(capsys, "verify", tmp_path / "forged")[0] == 0
    rc, out, _ = factory.cli(capsys, "verify", "--ca", factory.ca / "ca.pem",
                             tmp_path / "forged")
    assert rc == 1 and "ca.pem: is not the trusted CA" in out
    assert "device.pem: not issued by the CA 'test CA'" in out


def test_verify_not_a_bundle(factory: Factory, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = factory.cli(capsys, "verify", tmp_path)
    assert rc == 1 and "config.toml: missing" in out


# -- CSR flow -------------------------------------------------------------------------------


def test_csr_flow(factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "dev"
    rc, out, _ = factory.cli(capsys, "csr", "--device-id", "gw-0042", "--root", root,
                             "--out", tmp_path / "gw.csr")
    assert rc == 0 and out.strip() == str(tmp_path / "gw.csr")
    key = root / "etc/simkeeper/request/device.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE" not in (tmp_path / "gw.csr").read_bytes()
    assert factory.cli(capsys, "csr", "--device-id", "gw-0042", "--root", root)[0] == 1
    rc, _, _ = factory.cli(capsys, "sign-csr", "--ca", factory.ca, "--out", tmp_path / "gw.pem",
                           tmp_path / "gw.csr")
    assert rc == 0
    key_pem = key.read_bytes()
    rc, _, err = factory.cli(capsys, "install-cert", "--root", root, "--ca-cert",
                             factory.ca / "ca.pem", "--operator-key", factory.operator_pub,
                             "--broker", "mqtt.example.com", tmp_path / "gw.pem")
    assert rc == 0, err
    gen = gen_dir(root)
    assert (gen / "device.key").read_bytes() == key_pem  # the key never left the device
    assert not key.parent.exists()
    assert factory.cli(capsys, "verify", root)[0] == 0


def test_install_cert_checks_key_and_device_id(factory: Factory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "dev"
    assert factory.cli(capsys, "csr", "--device-id", "gw-0042", "--root", root)[0] == 0
    ca = load_ca(factory.ca)
    mine = keys.load_ec_key(root / "etc/simkeeper/request/device.key").public_key()
    cases = {
        "not for the key": issue(ca, keys.new_ec_key().public_key(), "gw-0042"),
        "CN is 'gw-0043'": issue(ca, mine, "gw-0043"),
    }
    assert main(["provision", "init-ca", "--out", str(tmp_path / "other")]) == 0
    cases["not issued by the given CA"] = issue(load_ca(tmp_path / "other"), mine, "gw-0042")
    for message, cert in cases.items():
        (tmp_path / "c.pem").write_bytes(keys.cert_pem(cert))
        rc, _, err = factory.cli(capsys, "install-cert", "--root", root, "--ca-cert",
                                 factory.ca / "ca.pem", "--operator-key", factory.operator_pub,
                                 "--broker", "h", tmp_path / "c.pem")
        assert rc == 1 and message in err, err
        assert not (root / "etc/simkeeper/config.toml").exists()


# -- memory: the daemon's imports do not load cryptography -----------------------------------


def test_agent_imports_do_not_load_cryptography() -> None:
    code = ("import sys\n"
            "import agent.cli, agent.core.config, agent.telemetry.outbox, agent.telemetry.ingest\n"
            "import agent.sim.manifest\n"
            "import agent.cli.provision, provisioning.batch, provisioning.verify\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')\n"
            "print(loaded)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env).stdout
    assert out.strip() == "[]"


def test_cli_entry_runs_as_a_program(factory: Factory, tmp_path: Path) -> None:
    exe = shutil.which("simkeeper", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "agent.cli"]
    done = subprocess.run([*cmd, "provision", "verify", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    assert done.returncode == 1 and "config.toml: missing" in done.stdout
    assert "Traceback" not in done.stderr


def test_operator_identity_name_is_never_a_device_id() -> None:
    from provisioning.bundle import check_device_id
    from provisioning.files import ProvisionError

    assert check_device_id("gw-0001") == "gw-0001"
    with pytest.raises(ProvisionError, match="reserved"):
        check_device_id("simkeeper-operator")
