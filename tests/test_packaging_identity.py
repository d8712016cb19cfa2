"""The package and a provisioned identity on one gateway (issue 11, item 5). The package owns
no file in /etc/simkeeper (its reference config is /usr/share/simkeeper/config.toml.example),
so `simkeeper provision device` installs beside it without --force, an upgrade lays the
package's files again without touching the identity, and a purge leaves it. Up to 0.1.0-1 the
reference was the conffile /etc/simkeeper/config.toml: the upgrade removes it when untouched
and keeps it when changed by hand or provisioned over.

The package trees are packaging/build_deb.py's, without wheels. The dpkg tests install them
for real with ``dpkg --root`` into a scratch root (they need root: the files are root's), with
the maintainer scripts left out (the venv, the user and systemd need a real gateway; see
tests/test_packaging_deb.py), but for preinst, which removes the old reference."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_packaging import build_deb
from tests.test_provision import Factory, factory, gen_dir

__all__ = ["factory"]

CONFIG = "etc/simkeeper/config.toml"


def _tree(tmp: Path, version: str) -> Path:
    """The package's files for ``version``, as build_deb stages them (no wheels)."""
    tree = tmp / f"tree-{version}"
    (tmp / "no-wheels").mkdir(exist_ok=True)
    tree.mkdir()
    build_deb.stage(tree, build_deb.host_arch(), version, tmp / "no-wheels")
    return tree


def _lay(tree: Path, root: Path) -> set[str]:
    """What unpacking does: the package's files over ``root``; their paths."""
    paths = set()
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree)
        if rel.parts[0] == "DEBIAN":
            continue
        paths.add(rel.as_posix())
        target = root / rel
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.unlink(missing_ok=True)
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, target)
    return paths


def _snapshot(etc: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry of ``etc``: mode and content (a link: its target)."""
    return {p.relative_to(etc).as_posix(): (p.lstat().st_mode, os.readlink(p) if p.is_symlink()
                                            else b"" if p.is_dir() else p.read_bytes())
            for p in sorted(etc.rglob("*"))}


def _provision(factory: Factory, capsys: pytest.CaptureFixture[str], root: Path,
               *extra: str) -> dict[str, tuple[int, bytes | str]]:
    """`provision device` into the gateway ``root`` (its group simkeeper: ours), verified."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/group").write_text(f"simkeeper:x:{os.getgid()}:\n")
    rc, _, err = factory.cli(capsys, *factory.device_args(), "--root", root, *extra)
    assert rc == 0, err
    assert factory.cli(capsys, "verify", root)[0] == 0
    return _snapshot(root / "etc/simkeeper")


def test_package_files_and_identity_coexist_across_an_upgrade(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "gateway"
    package = _lay(_tree(tmp_path, "0.1.0-2"), root)
    assert sorted(p for p in package if p.split("/")[0] == "etc") == ["etc", "etc/simkeeper"]
    identity = _provision(factory, capsys, root)  # no --force: nothing in its way
    assert (root / CONFIG).is_symlink() and gen_dir(root).name.startswith("id-")
    assert all((root / p).exists() or (root / p).is_symlink() for p in package)
    upgraded = _lay(_tree(tmp_path, "0.1.0-3"), root)  # the next version's files over it
    assert upgraded == package
    assert _snapshot(root / "etc/simkeeper") == identity
    assert factory.cli(capsys, "verify", root)[0] == 0


# -- with dpkg --------------------------------------------------------------------------------


def _dpkg_root(tmp: Path) -> Path:
    if shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg not installed")
    if os.geteuid() != 0:
        pytest.skip("dpkg --root installs files owned by root: needs root")
    root = tmp / "gateway"
    admin = root / "var/lib/dpkg"
    for d in ("info", "updates"):
        (admin / d).mkdir(parents=True)
    for f in ("status", "available"):
        (admin / f).touch()
    return root


def _deb(tmp: Path, version: str, *, old_conffile: bool = False) -> Path:
    """The package of ``version`` with preinst its only maintainer script; ``old_conffile``:
    the reference config as the conffile /etc/simkeeper/config.toml, as up to 0.1.0-1."""
    tree = _tree(tmp, version)
    for script in set(build_deb.MAINTAINER_SCRIPTS) - {"preinst"}:
        (tree / "DEBIAN" / script).unlink()
    if old_conffile:
        (tree / CONFIG).write_bytes((tree / build_deb.EXAMPLE_CONFIG).read_bytes())
        (tree / "DEBIAN/conffiles").write_text(f"/{CONFIG}\n")
    deb = tmp / f"simkeeper_{version}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
                   check=True, capture_output=True)
    return deb


def _dpkg(root: Path, *args: str | Path) -> None:
    result = subprocess.run(["dpkg", f"--root={root}", "--force-depends",
                             "--force-script-chrootless", *map(str, args)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _conffiles(root: Path) -> str:
    return subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                           "-f=${Conffiles}", "simkeeper"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.deb
def test_dpkg_install_upgrade_and_purge_leave_the_identity(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dpkg_root(tmp_path)
    _dpkg(root, "-i", _deb(tmp_path, "0.1.0-2"))
    assert _conffiles(root) == ""
    identity = _provision(factory, capsys, root)
    _dpkg(root, "-i", _deb(tmp_path, "0.1.0-3"))
    assert _snapshot(root / "etc/simkeeper") == identity
    assert os.readlink(root / "usr/bin/simkeeper") == build_deb.VENV_SIMKEEPER
    _dpkg(root, "--purge", "simkeeper")
    assert not (root / "usr/bin/simkeeper").is_symlink()
    assert _snapshot(root / "etc/simkeeper") == identity


@pytest.mark.deb
@pytest.mark.parametrize("before", ["untouched", "edited", "provisioned"])
def test_upgrade_from_the_package_with_the_conffile(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        before: str) -> None:
    root = _dpkg_root(tmp_path)
    _dpkg(root, "-i", _deb(tmp_path, "0.1.0-1", old_conffile=True))
    assert f"/{CONFIG}" in _conffiles(root)
    if before == "edited":
        with (root / CONFIG).open("a") as f:
            f.write('device_id = "by-hand"\n')
    if before == "provisioned":  # 0.1.0-1 left no way but --force
        _provision(factory, capsys, root, "--force")
    kept = _snapshot(root / "etc/simkeeper")
    _dpkg(root, "-i", _deb(tmp_path, "0.1.0-2"))
    if before == "untouched":  # gone before the unpack: dpkg forgot it
        assert list((root / "etc/simkeeper").iterdir()) == []
        assert _conffiles(root) == ""
        _provision(factory, capsys, root)  # without --force now
    else:
        assert _snapshot(root / "etc/simkeeper") == kept
        assert _conffiles(root).split()[-1] == "obsolete"
