"""packaging/: the maintainer scripts and the .deb.

Fast checks run everywhere; shellcheck is used where installed (else ``sh -n``). The tests
marked ``deb`` build real packages (host architecture and arm64, about 10 s each with a warm pip
cache; they need dpkg-deb and PyPI or the pip cache), run lintian on one (no error; ``make
test`` installs lintian, skipped saying so where it is missing), unpack it into a scratch root,
build the venv there from the bundled wheels with the network cut off, and run
``simkeeper --version`` from it. The identity beside the package: test_packaging_identity.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__
from tests.test_packaging import PACKAGING, UNITS, _mdwe, _verify, build_deb

SCRIPTS = [PACKAGING / "debian" / name for name in (*build_deb.MAINTAINER_SCRIPTS, "make-venv")]


# -- maintainer scripts -----------------------------------------------------------------------


def _check_shell(paths: list[Path]) -> None:
    shellcheck = shutil.which("shellcheck")
    for path in paths:
        assert path.read_text().startswith("#!/bin/sh\n"), f"{path.name}: POSIX sh"
        cmd = [shellcheck, "--shell=sh", str(path)] if shellcheck else ["sh", "-n", str(path)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{path.name}:\n{result.stdout}{result.stderr}"


def test_maintainer_scripts_lint() -> None:
    """shellcheck when installed (apt-get install shellcheck), otherwise sh -n."""
    _check_shell(SCRIPTS)


def _systemd_calls(script: Path, *args: str, tmp_path: Path) -> list[str]:
    """What ``script ARGS`` asks of deb-systemd-helper, deb-systemd-invoke and systemctl, on
    a machine booted with systemd: stand-ins record the calls, and the script's system paths
    point into ``tmp_path`` (nothing on this machine changes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    log.write_text("")
    for tool in ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "udevadm"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')  # was-enabled: yes
        stub.chmod(0o755)
    text = script.read_text()
    for system in ("/run/systemd/system", "/run/udev", "/opt/simkeeper", "/etc/simkeeper",
                   "/var/lib/simkeeper"):
        fake = tmp_path / "root" / system.lstrip("/")
        fake.mkdir(parents=True, exist_ok=True)
        text = text.replace(system, str(fake))
    copy = tmp_path / script.name
    copy.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    result = subprocess.run(["sh", str(copy), *args], capture_output=True, text=True, env=env,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [c for c in log.read_text().splitlines() if not c.startswith("udevadm")]


def test_maintainer_scripts_handle_the_wipe_path_unit(tmp_path: Path) -> None:
    """postinst enables and starts simkeeper-wipe.path beside the service (started even before
    the gateway is configured); prerm stops it, postrm masks it. (abort-upgrade: the
    configure-only steps, user and venv, are not run.)"""
    debian = PACKAGING / "debian"
    calls = _systemd_calls(debian / "postinst", "abort-upgrade", "0.0.1-1", tmp_path=tmp_path)
    for unit in ("simkeeper.service", "simkeeper-wipe.path"):
        assert f"deb-systemd-helper unmask {unit}" in calls, calls
        assert f"deb-systemd-helper enable {unit}" in calls, calls
    assert "deb-systemd-invoke restart simkeeper-wipe.path" in calls, calls
    assert "deb-systemd-invoke restart simkeeper.service" not in calls  # no device_id yet
    # systemd through deb-systemd-helper/-invoke (lintian), systemctl only to reload
    assert [c for c in calls if c.startswith("systemctl")] == [
        "systemctl --system daemon-reload"], calls
    calls = _systemd_calls(debian / "prerm", "upgrade", "0.0.2-1", tmp_path=tmp_path)
    assert calls == ["deb-systemd-invoke stop simkeeper.service simkeeper-wipe.path"]
    calls = _systemd_calls(debian / "postrm", "remove", tmp_path=tmp_path)
    assert "deb-systemd-helper mask simkeeper.service simkeeper-wipe.path" in calls, calls


# -- the .deb ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    deb: Path
    arch: str


def _build(out: Path, arch: str) -> Built:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    return Built(build_deb.build(arch, out, sys.executable), arch)


@pytest.fixture(scope="module")
def host_deb(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("deb"), build_deb.host_arch())


@pytest.fixture(scope="module")
def unpacked(host_deb: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(host_deb.deb), str(root)], check=True)
    yield root


def _dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.deb
def test_deb_metadata_and_contents(host_deb: Built) -> None:
    fields = {k: _dpkg("-f", str(host_deb.deb), k).strip()
              for k in ("Package", "Version", "Architecture", "Depends")}
    assert fields["Package"] == "simkeeper"
    assert fields["Version"] == build_deb.package_version(__version__)
    assert fields["Version"].startswith(f"{__version__}-")
    assert fields["Architecture"] == host_deb.arch
    assert "python3 (>= 3.11~)" in fields["Depends"] and "python3 (<< 3.12)" in fields["Depends"]
    assert "adduser" in fields["Depends"]
    info = _dpkg("-I", str(host_deb.deb))
    for name in ("preinst", "postinst", "prerm", "postrm", "md5sums"):
        assert re.search(rf"\b{name}\b", info), name
    assert not re.search(r"\bconffiles\b", info)  # /etc/simkeeper is the identity's
    listing = _dpkg("-c", str(host_deb.deb))
    entries = {line.split()[5].lstrip("."): line.split() for line in listing.splitlines()}
    files = set(entries)
    assert {entry[1] for entry in entries.values()} == {"root/root"}
    for path in ("/lib/systemd/system/simkeeper.service", "/lib/udev/rules.d/70-simkeeper.rules",
                 "/lib/systemd/system/simkeeper-wipe.path",
                 "/lib/systemd/system/simkeeper-wipe.service",
                 "/usr/share/simkeeper/config.toml.example",
                 "/usr/share/polkit-1/rules.d/50-simkeeper.rules",
                 "/usr/lib/modules-load.d/simkeeper.conf", "/opt/simkeeper/lib/make-venv",
                 "/usr/share/doc/simkeeper/copyright",
                 "/usr/share/doc/simkeeper/changelog.Debian.gz",
                 "/usr/share/man/man1/simkeeper.1.gz", "/usr/share/lintian/overrides/simkeeper"):
        assert path in files, path
    assert sorted(f for f in files if f.startswith("/etc/")) == ["/etc/", "/etc/simkeeper/"]
    # simkeeper on PATH: the venv's entry point, which postinst builds
    link = entries["/usr/bin/simkeeper"]
    assert link[0].startswith("l") and link[6:] == ["->", "/opt/simkeeper/venv/bin/simkeeper"]
    wheels = sorted(Path(f).name for f in files if f.endswith(".whl"))
    names = {w.split("-")[0].lower().replace("_", "-") for w in wheels}
    assert {"simkeeper", "paho-mqtt", "pyserial", "pyudev", "cryptography", "cffi",
            "pip"} <= names, wheels


# The tags of the first package that lintian must not find again (besides any error); the
# vendor venv under /opt is overridden on purpose (packaging/debian/lintian-overrides says why).
FIXED = ("maintainer-script-calls-systemctl", "recursive-privilege-change",
         "copyright-without-copyright-notice", "debian-changelog-file-missing-or-wrong-name",
         "syntax-error-in-debian-changelog", "bogus-mail-host", "no-manual-page",
         "initial-upload-closes-no-bugs")


@pytest.mark.deb
def test_lintian_finds_no_error(host_deb: Built) -> None:
    lintian = shutil.which("lintian")
    if lintian is None:
        pytest.skip("lintian not installed (make test installs it: apt-get install lintian)")
    result = subprocess.run([lintian, "--fail-on", "error", str(host_deb.deb)],
                            capture_output=True, text=True, check=False)
    tags = re.findall(r"^([EWIPXO]): simkeeper[^:]*: (\S+)", result.stdout, re.M)
    assert result.returncode == 0 and not [t for level, t in tags if level == "E"], \
        result.stdout + result.stderr
    assert not [t for _, t in tags if t in FIXED], result.stdout


def test_changelog_is_of_the_packaged_version() -> None:
    """The package's version is the changelog's top entry, for pyproject's version."""
    assert build_deb.package_version(__version__).startswith(f"{__version__}-")
    with pytest.raises(build_deb.BuildError, match=r"add an entry for 9\.9\.9-1"):
        build_deb.package_version("9.9.9")


@pytest.mark.deb
def test_deb_maintainer_scripts(host_deb: Built, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(host_deb.deb), str(control)], check=True)
    assert not (control / "conffiles").exists()
    scripts = [control / name for name in build_deb.MAINTAINER_SCRIPTS]
    for script in scripts:
        assert os.access(script, os.X_OK), script.name
    _check_shell(scripts)
    postinst = (control / "postinst").read_text()
    for needle in ("adduser --system --group", "dialout", "make-venv", "udevadm control",
                   "daemon-reload", "enable", "device_id", "WIPE=simkeeper-wipe.path",
                   'for unit in "$UNIT" "$WIPE"', 'deb-systemd-helper enable "$unit"'):
        assert needle in postinst, needle
    postrm = (control / "postrm").read_text()
    assert "purge" in postrm and "deluser" in postrm and "/var/lib/simkeeper" in postrm


@pytest.mark.deb
def test_deb_reference_config_waits_for_provisioning(unpacked: Path) -> None:
    """The reference config is an example beside the live path, where provisioning puts the
    identity (tests/test_packaging_identity.py)."""
    assert list((unpacked / "etc/simkeeper").iterdir()) == []
    config = (unpacked / build_deb.EXAMPLE_CONFIG).read_text()
    assert not re.search(r"^\s*device_id\s*=", config, re.M)
    import tomllib

    parsed = tomllib.loads(config)
    assert "device_id" not in parsed and parsed["store"]["path"].startswith("/var/lib/simkeeper")


@pytest.mark.deb
def test_deb_installs_offline_into_a_scratch_root(unpacked: Path, tmp_path: Path) -> None:
    python = "/usr/bin/python3"
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=False).stdout.strip()
    if version != "(3, 11)":
        pytest.skip(f"the package targets Debian's python3 3.11; {python} is {version}")
    prefix = unpacked / "opt/simkeeper"
    cmd = [str(prefix / "lib/make-venv"), str(prefix)]
    offline = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if shutil.which("unshare") and offline.returncode == 0:
        cmd = ["unshare", "--net", *cmd]  # no network at all, as on a gateway in the field
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PYTHON"] = python
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    simkeeper = prefix / "venv/bin/simkeeper"
    out = subprocess.run([str(simkeeper), "--version"], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert (out.returncode, out.stdout.strip()) == (0, f"simkeeper {__version__}")
    assert not (prefix / "venv/bin/pip").exists()
    # /usr/bin/simkeeper leads to it (an absolute link: followed here inside the scratch root)
    target = os.readlink(unpacked / "usr/bin/simkeeper")
    assert (unpacked / target.lstrip("/")).samefile(simkeeper)
    # the installed stack under the unit's W^X, with Debian's python and libffi
    _mdwe(str(prefix / "venv/bin/python"), tmp_path)
    # and the unit verifies against the real executable
    if shutil.which("systemd-analyze"):
        for source in UNITS:
            unit = tmp_path / source.name
            unit.write_text((unpacked / "lib/systemd/system" / source.name).read_text()
                            .replace("/opt/simkeeper/venv/bin/simkeeper", str(simkeeper)))
        for source in UNITS:
            verified = _verify(tmp_path / source.name)
            if "cannot" not in verified.stderr:
                assert verified.returncode == 0 and not verified.stderr.strip(), \
                    f"{source.name}: {verified.stderr}"


@pytest.mark.deb
def test_deb_for_arm64_carries_aarch64_wheels(tmp_path: Path) -> None:
    built = _build(tmp_path, "arm64")
    assert _dpkg("-f", str(built.deb), "Architecture").strip() == "arm64"
    wheels = [line.split()[-1] for line in _dpkg("-c", str(built.deb)).splitlines()
              if line.endswith(".whl")]
    binary = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert binary, wheels  # cryptography, cffi
    assert all("aarch64" in w and "cp311" in w for w in binary), binary
