#!/usr/bin/env python3
"""Build the offline-installable simkeeper .deb for Debian bookworm / Raspberry Pi OS.

    python3 packaging/build_deb.py [--arch amd64|arm64|armhf] [--out DIR]
    ARCH=arm64 make deb

The package carries the agent and every dependency as wheels for the target (CPython 3.11,
glibc <= 2.36), fetched with ``pip download --platform ... --only-binary=:all:`` so an arm64
package builds on an x86 machine; postinst builds /opt/simkeeper/venv from them with
``--no-index`` (no network on the gateway). Dependencies are pinned to the versions installed
where this script runs (the build venv, which ``make test`` just tested) unless ``--no-pin``.
``--find-links DIR`` adds a local wheel directory (an offline build machine: with
``--no-index`` too). The package's version is the top entry of ``debian/changelog``, which
must be of the version in pyproject.toml. Needs dpkg-deb and pip; prints the path of the .deb.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
DEBIAN = PACKAGING / "debian"
CHANGELOG = DEBIAN / "changelog"
PYTHON_VERSION = "3.11"
GLIBC_MINOR = 36  # bookworm's glibc 2.36


def _manylinux(machine: str, oldest: int = 17) -> list[str]:
    """Every manylinux tag a glibc-2.36 system accepts: pip matches --platform tags exactly."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, oldest - 1, -1)]
    legacy = {"x86_64": ["manylinux2014", "manylinux2010", "manylinux1"]}.get(
        machine, ["manylinux2014"])
    return tags + [f"{name}_{machine}" for name in legacy]


PLATFORMS = {
    "amd64": _manylinux("x86_64", oldest=5),
    "arm64": _manylinux("aarch64"),
    "armhf": [*_manylinux("armv7l"), "linux_armv7l"],
}
SOURCES = ("pyproject.toml", "README.md", "agent", "drivers", "provisioning")
# The agent, and root's wipe of a decommissioned gateway's keys (the path unit starts the oneshot).
UNITS = ("simkeeper.service", "simkeeper-wipe.path", "simkeeper-wipe.service")
VENV_SIMKEEPER = "/opt/simkeeper/venv/bin/simkeeper"  # postinst builds the venv
# The reference config: not /etc/simkeeper/config.toml, which is the identity's (provisioning
# makes it a link into the current generation), so the package owns no file there.
EXAMPLE_CONFIG = "usr/share/simkeeper/config.toml.example"
POLKIT_RULE = "50-simkeeper.rules"
MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm")


class BuildError(Exception):
    pass


def host_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}.get(os.uname().machine,
                                                                               "amd64")


def run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    result = subprocess.run(cmd, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise BuildError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} failed "
                         f"(exit {result.returncode})")


def package_version(upstream: str) -> str:
    """The version of the top entry of debian/changelog, which must package ``upstream``."""
    header = CHANGELOG.read_text().partition("\n")[0]
    match = re.fullmatch(r"simkeeper \(([^()\s]+)\) [a-z-]+; urgency=[a-z]+", header)
    if match is None:
        raise BuildError(f"{CHANGELOG}: the first line is not an entry's header: {header!r}")
    if match[1].rpartition("-")[0] != upstream:
        raise BuildError(f"{CHANGELOG} is at {match[1]}, pyproject.toml at {upstream}: add an "
                         f"entry for {upstream}-1")
    return match[1]


def pins(python: str) -> str:
    """``name==version`` of everything installed beside the build's pip, editable ones left out."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()
                     if "==" in line and not line.lower().startswith("simkeeper=="))


def wheels(dest: Path, arch: str, python: str, *, pin: bool, find_links: list[str],
           no_index: bool) -> None:
    """The simkeeper wheel, its dependencies' wheels for ``arch``, and a pip wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:  # a clean copy: no build/ or egg-info left in the work tree
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, src / name)
        index = ["--no-index"] if no_index else []
        links = [arg for link in find_links for arg in ("--find-links", link)]
        run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest),
             *index, *links, str(src)])
        (built,) = dest.glob("simkeeper-*.whl")
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(pins(python) + "\n" if pin else "")
        platforms = [arg for p in PLATFORMS[arch] for arg in ("--platform", p)]
        run([python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--dest", str(dest), "--only-binary=:all:", *platforms,
             "--python-version", PYTHON_VERSION, "--implementation", "cp",
             "--constraint", str(constraints), *index, *links, str(built), "pip"])


def default_config(text: str) -> str:
    """packaging/config.toml with its example device_id commented out: a gateway gets its id
    at provisioning, and until then the unit's ExecCondition skips the start."""
    out = []
    for line in text.splitlines():
        if line.startswith("device_id") and "=" in line:
            out.append("# set by `simkeeper provision device`; the service starts once it is set")
            out.append("# " + line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _roff(text: str) -> str:
    """Text for a man page line: backslashes and hyphens escaped, never a control line."""
    return "\\&" + text.replace("\\", "\\e").replace("-", "\\-")


def manual(version: str) -> str:
    """simkeeper(1), from the command line's own table of commands and their one-line help."""
    sys.path.insert(0, str(ROOT))
    from agent import cli

    lines = [f'.TH SIMKEEPER 1 "" "simkeeper {version}" "User Commands"',
             ".SH NAME", "simkeeper \\- edge agent for cellular IoT gateways",
             ".SH SYNOPSIS",
             ".B simkeeper", "[\\fB\\-\\-log\\-level\\fR \\fILEVEL\\fR] \\fICOMMAND\\fR"
             " [\\fIARGUMENTS\\fR]", ".br", ".B simkeeper \\-\\-version",
             ".SH DESCRIPTION",
             "Keeps the gateway's IoT SIM inside its service terms and forwards its telemetry",
             "over MQTT. \\fBsimkeeper run\\fR is the daemon, started by simkeeper.service;",
             "\\fBsimkeeper\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR gives each command's options.",
             ".SH COMMANDS"]
    for name, (_module, help_text) in cli.COMMANDS.items():
        lines += [".TP", f".B {_roff(name)}", _roff(help_text)]
    lines += [".SH FILES", ".TP", ".I /etc/simkeeper/config.toml",
              _roff("the config (every command's --config, or $SIMKEEPER_CONFIG); "
                    "`simkeeper provision device` installs it with the device's identity"),
              ".TP", f".I /{EXAMPLE_CONFIG}", _roff("the reference config: every key, commented"),
              ".TP", ".I /var/lib/simkeeper", _roff("the agent's state and outbox"),
              ".SH EXIT STATUS",
              _roff("0 success, 1 the thing asked failed, 2 bad usage; errors are one line on "
                    "stderr."),
              ".SH SEE ALSO", ".I /usr/share/doc/simkeeper/README.md"]
    return "\n".join(lines) + "\n"


def _gzip(path: Path, data: bytes) -> None:
    """``gzip -9n``: no name, no time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    path.chmod(0o644)


def _files(root: Path) -> list[Path]:
    """The package's regular files, not its symbolic links: ``/usr/bin/simkeeper`` names the
    venv postinst builds, absent here or another installation's."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def stage(root: Path, arch: str, version: str, wheel_dir: Path) -> None:
    def put(src: Path | str, rel: str, mode: int = 0o644, text: str | None = None) -> None:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            shutil.copyfile(src, target)
        else:
            target.write_text(text)
        target.chmod(mode)

    for unit in UNITS:
        put(PACKAGING / unit, f"lib/systemd/system/{unit}")
    put(PACKAGING / "udev" / "70-simkeeper.rules", "lib/udev/rules.d/70-simkeeper.rules")
    put(PACKAGING / "modules-load.d" / "simkeeper.conf", "usr/lib/modules-load.d/simkeeper.conf")
    put(PACKAGING / "polkit" / POLKIT_RULE, f"usr/share/polkit-1/rules.d/{POLKIT_RULE}")
    put("", EXAMPLE_CONFIG, text=default_config((PACKAGING / "config.toml").read_text()))
    (root / "etc/simkeeper").mkdir(parents=True)  # provisioning fills it: no file of ours
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/simkeeper").symlink_to(VENV_SIMKEEPER)
    doc = "usr/share/doc/simkeeper"
    put(PACKAGING / "README.md", f"{doc}/README.md")
    put(DEBIAN / "copyright", f"{doc}/copyright")
    _gzip(root / doc / "changelog.Debian.gz", CHANGELOG.read_bytes())
    _gzip(root / "usr/share/man/man1/simkeeper.1.gz", manual(version).encode())
    put(DEBIAN / "lintian-overrides", "usr/share/lintian/overrides/simkeeper")
    put(DEBIAN / "make-venv", "opt/simkeeper/lib/make-venv", 0o755)
    for wheel in sorted(wheel_dir.glob("*.whl")):
        put(wheel, f"opt/simkeeper/wheels/{wheel.name}")

    control = root / "DEBIAN"
    control.mkdir()
    size = sum(p.stat().st_size for p in _files(root)) // 1024 + 1
    put("", "DEBIAN/control", text=(DEBIAN / "control.in").read_text()
        .replace("@VERSION@", version).replace("@ARCH@", arch).replace("@SIZE@", str(size)))
    for script in MAINTAINER_SCRIPTS:
        put(DEBIAN / script, f"DEBIAN/{script}", 0o755)
    sums = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}"
            for p in _files(root) if control not in p.parents]
    put("", "DEBIAN/md5sums", text="\n".join(sums) + "\n")
    for d in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
        d.chmod(0o755)


def build(arch: str, out: Path, python: str, *, pin: bool = True,
          find_links: list[str] | None = None, no_index: bool = False) -> Path:
    if arch not in PLATFORMS:
        raise BuildError(f"unsupported arch {arch!r} (one of {', '.join(PLATFORMS)})")
    if shutil.which("dpkg-deb") is None:
        raise BuildError("dpkg-deb not found (apt-get install dpkg-dev)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = package_version(project["version"])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="simkeeper-deb-") as tmp:
        wheel_dir = Path(tmp) / "wheels"
        wheels(wheel_dir, arch, python, pin=pin, find_links=find_links or [], no_index=no_index)
        root = Path(tmp) / "root"
        root.mkdir()
        stage(root, arch, version, wheel_dir)
        deb = out / f"simkeeper_{version}_{arch}.deb"
        run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
            stdout=subprocess.DEVNULL)
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_deb.py", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=os.environ.get("ARCH") or host_arch(),
                        help="Debian architecture (default: $ARCH or this machine's)")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the .deb goes")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose pip fetches wheels (and whose pins are used)")
    parser.add_argument("--no-pin", action="store_true",
                        help="newest dependency versions instead of the build venv's")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR",
                        help="also take wheels from DIR")
    parser.add_argument("--no-index", action="store_true", help="no PyPI: --find-links only")
    args = parser.parse_args(argv)
    try:
        deb = build(args.arch, args.out, args.python, pin=not args.no_pin,
                    find_links=args.find_links, no_index=args.no_index)
    except BuildError as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
