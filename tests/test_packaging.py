"""packaging/: the udev rules and the systemd units (the maintainer scripts and the .deb:
tests/test_packaging_deb.py). Each check that needs a tool this machine may lack
(systemd-analyze, udevadm verify, a kernel with PR_SET_MDWE) skips saying so.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from drivers.hotplug import AT_INTERFACES, classify

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "simkeeper.service"
WIPE_PATH = PACKAGING / "simkeeper-wipe.path"
WIPE_SERVICE = PACKAGING / "simkeeper-wipe.service"
UNITS = [UNIT, WIPE_PATH, WIPE_SERVICE]
RULES = PACKAGING / "udev" / "70-simkeeper.rules"


def _load(name: str) -> ModuleType:
    """A script of packaging/ as a module (packaging/ is no package: the name is PyPI's)."""
    spec = importlib.util.spec_from_file_location(f"simkeeper_{name}", PACKAGING / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen_udev = _load("gen_udev")
build_deb = _load("build_deb")


# -- udev rules -------------------------------------------------------------------------------

TOKEN = re.compile(
    r'(?P<key>[A-Z_]+)(?:\{(?P<attr>[^}]+)\})?(?P<op>==|!=|\+=|-=|:=|=)"(?P<value>[^"]*)"'
)
MATCH_ONLY = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL", "ATTRS"}
ASSIGN_ONLY = {"GOTO", "LABEL", "GROUP", "MODE", "SYMLINK"}
KEYS = MATCH_ONLY | ASSIGN_ONLY | {"ENV"}


@dataclass
class Token:
    key: str
    attr: str | None
    op: str
    value: str

    @property
    def is_match(self) -> bool:
        return self.op in ("==", "!=")


def parse_rules(text: str) -> list[list[Token]]:
    """The rules, one token list per rule; raises on anything udev would not accept."""
    rules: list[list[Token]] = []
    for number, raw in enumerate(text.replace("\\\n", "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = []
        for part in re.split(r",\s*", line):
            m = TOKEN.fullmatch(part.strip())
            assert m, f"line {number}: cannot parse {part!r}"
            token = Token(m["key"], m["attr"], m["op"], m["value"])
            assert token.key in KEYS, f"line {number}: unknown key {token.key}"
            assert (token.key in ("ENV", "ATTRS")) == (token.attr is not None), \
                f"line {number}: {token.key}{{...}}"
            if token.key in MATCH_ONLY:
                assert token.is_match, f"line {number}: {token.key} only matches"
            if token.key in ASSIGN_ONLY:
                assert not token.is_match, f"line {number}: {token.key} only assigns"
            tokens.append(token)
        rules.append(tokens)
    return rules


def _glob(pattern: str, value: str | None) -> bool:
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in pattern.split("|"))


@dataclass
class Device:
    """A tty as udev sees it: its own properties and its parents' (subsystem, attributes)."""

    kernel: str
    parents: list[tuple[str, dict[str, str]]]
    env: dict[str, str] = field(default_factory=dict)
    group: str | None = None
    mode: str | None = None
    symlinks: list[str] = field(default_factory=list)


def _substitute(value: str, attrs: dict[str, str]) -> str:
    return re.sub(r"\$attr\{([^}]+)\}", lambda m: attrs[m[1]], value)


def run_rules(rules: list[list[Token]], dev: Device) -> Device:
    """What the rules do to ``dev``: the subset of udev semantics these rules use."""
    labels = {r[0].value: i for i, r in enumerate(rules) if r[0].key == "LABEL"}
    number = re.sub(r"^\D*", "", dev.kernel)
    i = 0
    while i < len(rules):
        rule = rules[i]
        i += 1
        parent: dict[str, str] | None = None
        parent_tokens = [t for t in rule if t.key in ("SUBSYSTEMS", "ATTRS")]
        if parent_tokens:
            parent = next((attrs for subsystem, attrs in dev.parents if all(
                _glob(t.value, subsystem if t.key == "SUBSYSTEMS" else attrs.get(t.attr or ""))
                for t in parent_tokens)), None)
            if parent is None:
                continue
        ok = True
        for t in rule:
            if not t.is_match or t.key in ("SUBSYSTEMS", "ATTRS"):
                continue
            value = {"ACTION": "add", "SUBSYSTEM": "tty", "KERNEL": dev.kernel}.get(t.key) \
                if t.key != "ENV" else dev.env.get(t.attr or "")
            ok &= _glob(t.value, value or "") == (t.op == "==")
        if not ok:
            continue
        for t in rule:
            if t.is_match:
                continue
            value = _substitute(t.value, parent or {})
            value = value.replace("%n", number).replace("%k", dev.kernel)
            if t.key == "ENV":
                dev.env[t.attr or ""] = value
            elif t.key == "GROUP":
                dev.group = value
            elif t.key == "MODE":
                dev.mode = value
            elif t.key == "SYMLINK":
                dev.symlinks += value.split()
            elif t.key == "GOTO":
                i = labels[value]
    return dev


def _modem_port(vid: str, pid: str, interface: str, kernel: str = "ttyUSB2") -> Device:
    return Device(kernel, [("usb-serial", {}),
                           ("usb", {"bInterfaceNumber": interface}),
                           ("usb", {"idVendor": vid, "idProduct": pid})])


def test_udev_rules_are_generated_from_the_hotplug_table() -> None:
    assert RULES.read_text() == gen_udev.render(AT_INTERFACES), \
        "stale: run python3 packaging/gen_udev.py"
    check = subprocess.run([sys.executable, str(PACKAGING / "gen_udev.py"), "--check"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


def test_udev_rules_parse_and_every_goto_has_its_label() -> None:
    rules = parse_rules(RULES.read_text())
    labels = {r[0].value for r in rules if r[0].key == "LABEL"}
    gotos = {t.value for r in rules for t in r if t.key == "GOTO"}
    assert gotos and gotos <= labels


@pytest.mark.parametrize("usb_id", list(AT_INTERFACES), ids=":".join)
def test_udev_rules_claim_each_modem_at_port_and_only_it(usb_id: tuple[str, str]) -> None:
    rules = parse_rules(RULES.read_text())
    vid, pid = usb_id
    vendor, model, interface = AT_INTERFACES[usb_id]
    dev = run_rules(rules, _modem_port(vid, pid, interface, "ttyUSB2"))
    assert dev.env.get("SIMKEEPER_PORT") == "at"
    assert dev.env.get("ID_MM_PORT_IGNORE") == "1"
    assert (dev.group, dev.mode) == ("dialout", "0660")
    assert "simkeeper/at-2" in dev.symlinks
    # the agent's hotplug takes the port the rule tagged, as the same modem
    props = {"SUBSYSTEM": "tty", "DEVNAME": "/dev/ttyUSB2", "ID_VENDOR_ID": vid,
             "ID_MODEL_ID": pid, "ID_USB_INTERFACE_NUM": "ff", **dev.env}
    match = classify(props)
    assert match is not None and (match.vendor, match.model) == (vendor, model)
    # the modem's other ports stay ModemManager's
    other = f"{(int(interface, 16) + 1) % 8:02x}"
    untouched = run_rules(rules, _modem_port(vid, pid, other, "ttyUSB3"))
    assert "SIMKEEPER_PORT" not in untouched.env and "ID_MM_PORT_IGNORE" not in untouched.env
    assert untouched.group is None and untouched.symlinks == []


def test_udev_rules_leave_other_devices_alone() -> None:
    rules = parse_rules(RULES.read_text())
    for dev in (_modem_port("0403", "6001", "00", "ttyUSB0"),  # an FTDI cable
                Device("ttyS0", []), Device("ttyACM0", [("usb", {"bInterfaceNumber": "00"})])):
        assert run_rules(rules, dev).env.get("SIMKEEPER_PORT") is None


def test_udevadm_verify() -> None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm not installed (package udev)")
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("this udevadm has no `verify` (systemd < 254; bookworm has 252)")
    result = subprocess.run([udevadm, "verify", str(RULES)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd unit -----------------------------------------------------------------------------


def _unit(path: Path = UNIT) -> configparser.RawConfigParser:
    """The unit's last value of each key (see :func:`_values` for repeated ones)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _values(key: str, path: Path = UNIT, section: str = "Service") -> list[str]:
    """Every value of ``key`` in ``section``: the unit repeats some keys (DeviceAllow=,
    ExecCondition=)."""
    out = []
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(f"{key}="):
            out.append(line.split("=", 1)[1])
    return out


def test_unit_has_the_settings_the_agent_relies_on() -> None:
    unit = _unit()
    service = unit["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure",
        "User": "simkeeper", "SupplementaryGroups": "dialout",
        "StateDirectory": "simkeeper", "ConfigurationDirectory": "simkeeper",
        "RuntimeDirectory": "simkeeper", "ProtectSystem": "strict", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "ExecStart": "/opt/simkeeper/venv/bin/simkeeper run --config /etc/simkeeper/config.toml",
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-usb_device rw"} <= set(
        _values("DeviceAllow"))
    assert 60 <= int(service["WatchdogSec"]) <= 300
    assert service["MemoryMax"].endswith("M") and int(service["MemoryMax"][:-1]) <= 512
    # the socket directory the config names is the one systemd makes
    config = (PACKAGING / "config.toml").read_text()
    assert re.search(r'^socket = "/run/simkeeper/', config, re.M)
    assert re.search(r'^path = "/var/lib/simkeeper/', config, re.M)


def test_unit_restart_limits_throttle_without_giving_up() -> None:
    unit = _unit()
    interval = int(unit["Unit"]["StartLimitIntervalSec"])
    burst = int(unit["Unit"]["StartLimitBurst"])
    restart_sec = int(unit["Service"]["RestartSec"].rstrip("s"))
    assert restart_sec >= 10, "a crash loop must not hammer the SD card"
    # Restart= alone can start the unit at most interval / RestartSec + 1 times per interval:
    # below the burst, so the start limit never stops a gateway's agent for good.
    assert interval // restart_sec + 1 < burst


def test_exec_condition_skips_an_unconfigured_gateway(tmp_path: Path) -> None:
    condition = _values("ExecCondition")[0].split()
    assert condition[-1] == "/etc/simkeeper/config.toml"
    installed = tmp_path / "installed.toml"
    installed.write_text(build_deb.default_config((PACKAGING / "config.toml").read_text()))
    provisioned = tmp_path / "provisioned.toml"
    provisioned.write_text('device_id = "gw-0042"\n' + installed.read_text())
    grep = shutil.which("grep") or "/bin/grep"
    run = [grep, *condition[1:-1]]
    assert subprocess.run([*run, str(installed)], check=False).returncode == 1
    assert subprocess.run([*run, str(provisioned)], check=False).returncode == 0
    assert subprocess.run([*run, str(tmp_path / "absent")], check=False).returncode == 2


def test_exec_condition_skips_a_decommissioned_gateway() -> None:
    """The second condition: `run --preflight` exits 1 while decommissioned (tests/
    test_decommission.py), so systemd skips the start instead of restarting a refusal."""
    assert _values("ExecCondition")[1] == (
        "/opt/simkeeper/venv/bin/simkeeper run --preflight --config /etc/simkeeper/config.toml")


def test_wipe_units_run_root_wipe_identity_on_request() -> None:
    path = _unit(WIPE_PATH)
    service = _unit(WIPE_SERVICE)
    request = "/var/lib/simkeeper/wipe-requested"  # StateDirectory= + agent.sim.decommission
    assert path["Path"]["PathExists"] == request
    assert path["Path"]["Unit"] == WIPE_SERVICE.name
    assert path["Install"]["WantedBy"] == "multi-user.target"
    assert "Install" not in service  # only the path unit starts it
    assert service["Unit"]["ConditionPathExists"] == request
    expected = {
        "Type": "oneshot",
        "ExecStart": "/opt/simkeeper/venv/bin/simkeeper wipe-identity"
                     " --config /etc/simkeeper/config.toml",
        "ProtectSystem": "strict", "PrivateNetwork": "yes", "PrivateDevices": "yes",
        "NoNewPrivileges": "yes", "ProtectHome": "yes", "IPAddressDeny": "any",
        "RestrictAddressFamilies": "AF_UNIX",
    }
    for key, value in expected.items():
        assert service["Service"].get(key) == value, key
    assert "User" not in service["Service"]  # root: the keys are root's
    assert set(service["Service"]["ReadWritePaths"].split()) == {"/etc/simkeeper",
                                                                 "/var/lib/simkeeper"}
    assert set(service["Service"]["CapabilityBoundingSet"].split()) == {"CAP_DAC_OVERRIDE",
                                                                        "CAP_CHOWN"}
    # the database the request goes beside is the packaged config's
    assert re.search(r'^path = "/var/lib/simkeeper/[^/"]+"$',
                     (PACKAGING / "config.toml").read_text(), re.M)


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False, cwd=unit.parent)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    baseline = _verify(probe)
    if baseline.returncode != 0 or baseline.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run here: {baseline.stderr.strip()[:200]}")
    # The venv exists only after postinst: point Exec*= at a stand-in executable.
    stub = tmp_path / "simkeeper"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = tmp_path / "units"  # together: the path unit names the service it starts
    units.mkdir()
    for source in UNITS:
        (units / source.name).write_text(
            source.read_text().replace("/opt/simkeeper/venv/bin/simkeeper", str(stub)))
    for source in UNITS:
        result = _verify(units / source.name)
        assert result.returncode == 0 and result.stderr.strip() == "", \
            f"{source.name}: {result.stderr}"


@pytest.mark.parametrize("source", [UNIT, WIPE_SERVICE], ids=lambda p: p.name)
def test_systemd_exposure_score(tmp_path: Path, source: Path) -> None:
    """`systemd-analyze security`: 0 is a sealed service, 10 an unprotected one. The wipe runs
    as root, with two capabilities and no network."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    unit = tmp_path / source.name
    unit.write_text(source.read_text())
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                             str(unit)], capture_output=True, text=True, check=False)
    found = re.search(rf"Overall exposure level for {re.escape(source.name)}: ([0-9.]+)",
                      result.stdout)
    if found is None:
        pytest.skip(f"systemd-analyze security --offline unavailable: {result.stderr[:200]}")
    assert float(found[1]) <= 2.5, result.stdout


MDWE_PROBE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X memory was allowed: the probe proves nothing")
except OSError:
    pass
import asyncio, json, sqlite3, ssl, zlib
import paho.mqtt.client, pyudev, serial
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))
ed25519.Ed25519PrivateKey.generate().sign(b"x")
ssl.create_default_context()
pyudev.Context()
sqlite3.connect(":memory:").execute("create table t (x)")
asyncio.run(asyncio.sleep(0))
import agent.cli, drivers.hotplug
print("ok")
"""


def _mdwe(python: str, cwd: Path) -> None:
    result = subprocess.run([python, "-c", MDWE_PROBE], capture_output=True, text=True,
                            check=False, cwd=cwd)
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3): cannot emulate "
                    "MemoryDenyWriteExecute=")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_python_stack_runs_under_memory_deny_write_execute() -> None:
    """The kernel's own W^X (prctl PR_SET_MDWE) is what MemoryDenyWriteExecute= enforces."""
    _mdwe(sys.executable, ROOT)
