"""Atomic install into /etc/simkeeper: --force, and crashes at each step leave the old identity
whole (the crash is a real process exit in a subprocess, in the middle of the install)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import config
from provisioning.install import current
from tests.test_provision import ROOT, Factory, factory, gen_dir

__all__ = ["factory"]


def _snapshot(gen: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in gen.iterdir()}


def _installed(factory: Factory, root: Path, capsys: pytest.CaptureFixture[str],
               device_id: str = "gw-0001") -> Path:
    rc, _, err = factory.cli(capsys, *factory.device_args(device_id), "--root", root)
    assert rc == 0, err
    return gen_dir(root)


def test_refuses_without_force_replaces_with_it(factory: Factory, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    old = _installed(factory, root, capsys)
    before = _snapshot(old)
    rc, out, err = factory.cli(capsys, *factory.device_args("gw-0002"), "--root", root)
    assert rc == 1 and out == "" and "already holds an identity" in err and "--force" in err
    assert gen_dir(root) == old and _snapshot(old) == before
    rc, _, err = factory.cli(capsys, *factory.device_args("gw-0002"), "--root", root, "--force")
    assert rc == 0, err
    new = gen_dir(root)
    assert new != old and not old.exists()  # the old private key is gone with it
    assert config.load(root / "etc/simkeeper/config.toml").device_id == "gw-0002"
    assert factory.cli(capsys, "verify", root)[0] == 0
    assert sorted(p.name for p in new.parent.iterdir()) == [
        ".provision.lock", "config.toml", new.name]


def test_packaged_default_config_is_not_an_identity(factory: Factory, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    etc = tmp_path / "root/etc/simkeeper"
    etc.mkdir(parents=True)
    (etc / "config.toml").write_bytes((ROOT / "packaging/config.toml").read_bytes())
    _installed(factory, tmp_path / "root", capsys)
    assert (etc / "config.toml").is_symlink()


def test_hand_made_identity_needs_force(factory: Factory, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    etc = tmp_path / "root/etc/simkeeper"
    etc.mkdir(parents=True)
    (etc / "config.toml").write_text('device_id = "old"\n[commands]\noperator_key = "/x.pub"\n')
    rc, _, err = factory.cli(capsys, *factory.device_args(), "--root", tmp_path / "root")
    assert rc == 1 and "config.toml of old" in err
    assert not (etc / "config.toml").is_symlink()


CRASH = """
import os, sys
import provisioning.files as files, provisioning.install as install
from agent.cli import main
point = sys.argv[1]
if point == "write":  # the third file of the new bundle is being written
    real, count = files.write_new, [0]
    def write_new(path, file):
        count[0] += 1
        if count[0] == 3:
            path.write_bytes(file.data[:10])
            os._exit(9)
        real(path, file)
    install.write_new = write_new
elif point == "rename":  # staged and fsynced, not yet renamed
    real_rename = os.rename
    def rename(src, dst):
        os._exit(9)
    install.os.rename = rename
elif point == "switch":  # generation complete, link not yet switched
    install._switch = lambda etc, gen: os._exit(9)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("point", ["write", "rename", "switch"])
def test_crash_leaves_the_old_identity(factory: Factory, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], point: str) -> None:
    root = tmp_path / "root"
    old = _installed(factory, root, capsys)
    before = _snapshot(old)
    args = [str(a) for a in factory.device_args("gw-0002")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CRASH, point, "provision", *args, "--root",
                           str(root), "--force"], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 9, done.stderr
    etc = root / "etc/simkeeper"
    assert current(etc) == old and _snapshot(old) == before
    leftovers = [p.name for p in etc.iterdir() if p.name.startswith((".stage-", "id-"))]
    assert len(leftovers) == 2  # the old generation and the unfinished new one
    assert factory.cli(capsys, "verify", root)[0] == 0
    assert config.load(etc / "config.toml").device_id == "gw-0001"
    # The next run cleans up and installs.
    rc, _, err = factory.cli(capsys, *args, "--root", root, "--force")
    assert rc == 0, err
    assert [p.name for p in etc.iterdir() if p.name.startswith((".stage-", "id-"))] == [
        gen_dir(root).name]
    assert config.load(etc / "config.toml").device_id == "gw-0002"


def test_failure_while_staging_cleans_up(factory: Factory, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    old = _installed(factory, root, capsys)
    def full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", full)  # provisioning.install's rename
    rc, _, err = factory.cli(capsys, *factory.device_args("gw-0002"), "--root", root, "--force")
    assert rc == 1 and "No space left on device" in err
    monkeypatch.undo()
    etc = root / "etc/simkeeper"
    assert current(etc) == old
    assert sorted(p.name for p in etc.iterdir()) == [".provision.lock", "config.toml", old.name]
