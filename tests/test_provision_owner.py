"""Who may read an installed identity: the agent runs as the ``simkeeper`` system user
(packaging/simkeeper.service), so a bundle is root:<service group>, directory 0750, key 0640;
``verify`` accepts exactly that (or 0600 root-only when there is no service group); postinst
gives an identity already on the gateway to the group.

Real files, real chown, real reads as another uid: root only (the tests skip otherwise). The
service's group is a numeric gid that this machine does not have, so nothing on the host
changes; staging trees carry their own ``etc/group``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import owner
from tests.test_provision import ROOT, Factory, factory, gen_dir

__all__ = ["factory"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="chown to another group and reading as another uid"
                                       " need root")


def _unused(taken: Iterator[int], start: int) -> int:
    used = set(taken)
    return next(n for n in range(start, start + 10000) if n not in used)


GID = _unused((g.gr_gid for g in grp.getgrall()), 42420)  # the service's group
OTHER_GID = _unused((g.gr_gid for g in grp.getgrall()), GID + 1)
UID = _unused((p.pw_uid for p in pwd.getpwall()), 42420)  # the service's user
OTHER_UID = _unused((p.pw_uid for p in pwd.getpwall()), UID + 1)


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory other uids can walk into (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="simkeeper-owner-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _mode(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def _device(factory: Factory, capsys: pytest.CaptureFixture[str], root: Path,
            *extra: str | Path) -> Path:
    rc, _, err = factory.cli(capsys, *factory.device_args(), "--root", root, *extra)
    assert rc == 0, err
    return gen_dir(root)


def _verify(factory: Factory, capsys: pytest.CaptureFixture[str], root: Path,
            *extra: str | Path) -> tuple[int, str]:
    rc, out, err = factory.cli(capsys, "verify", *extra, root)
    assert err == ""
    return rc, out


def _read_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[bytes]:
    """``cat path`` as uid:gid with no supplementary groups: what the unit's process can do."""
    return subprocess.run(["cat", str(path)], user=uid, group=gid, extra_groups=[],
                          capture_output=True, check=False)


def _etc_group(root: Path, *lines: str) -> None:
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/group").write_text("".join(f"{line}\n" for line in
                                            ("root:x:0:", "dialout:x:20:", *lines)))


# -- install ----------------------------------------------------------------------------------

def test_install_with_group_gives_the_bundle_to_it(factory: Factory, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--group", str(GID))
    assert _mode(gen) == (0o750, 0, GID)
    assert _mode(gen / "device.key") == (0o640, 0, GID)
    for path in gen.iterdir():
        if path.name != "device.key":
            assert _mode(path) == (0o644, 0, GID), path.name
    etc = root / "etc/simkeeper"
    assert _mode(etc)[1:] == (0, 0)  # /etc/simkeeper itself stays the package's
    assert _mode(etc / ".provision.lock") == (0o600, 0, 0)
    assert _verify(factory, capsys, root, "--group", str(GID)) == (0, f"{gen}: ok\n")


def test_no_group_keeps_the_key_root_only(factory: Factory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--no-group")
    assert _mode(gen) == (0o755, 0, 0) and _mode(gen / "device.key") == (0o600, 0, 0)
    assert _verify(factory, capsys, root, "--no-group")[0] == 0


def test_staging_root_resolves_the_group_in_its_own_etc_group(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    _etc_group(root, f"simkeeper:x:{GID}:", f"other:x:{OTHER_GID}:")
    assert owner.service_group(None, root) == owner.Group("simkeeper", GID,
                                                          str(root / "etc/group"))
    gen = _device(factory, capsys, root)  # no --group: simkeeper of ROOT/etc/group
    assert _mode(gen / "device.key") == (0o640, 0, GID) and _mode(gen)[2] == GID
    assert _verify(factory, capsys, root)[0] == 0  # verify resolves it the same way
    assert _verify(factory, capsys, gen)[0] == 0  # also from the generation directory
    # --group NAME is looked up there too, not on this machine.
    other = tmp_path / "other"
    _etc_group(other, f"simkeeper:x:{GID}:", f"other:x:{OTHER_GID}:")
    assert _mode(_device(factory, capsys, other, "--group", "other") / "device.key")[2] \
        == OTHER_GID


def test_staging_root_without_the_group_stays_root_only(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    _etc_group(root)
    gen = _device(factory, capsys, root)
    assert _mode(gen / "device.key") == (0o600, 0, 0)
    assert _verify(factory, capsys, root)[0] == 0
    rc, _, err = factory.cli(capsys, *factory.device_args("gw-0002"), "--root",
                             tmp_path / "r2", "--group", "nosuchgroup")
    assert rc == 1 and "group 'nosuchgroup' does not exist on this machine" in err
    _etc_group(tmp_path / "r3")
    rc, _, err = factory.cli(capsys, *factory.device_args("gw-0002"), "--root",
                             tmp_path / "r3", "--group", "simkeeper")
    assert rc == 1 and f"does not exist on {tmp_path / 'r3/etc/group'}" in err
    assert not (tmp_path / "r3/etc/simkeeper/config.toml").exists()


def test_csr_flow_installs_for_the_group(factory: Factory, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "dev"
    assert factory.cli(capsys, "csr", "--device-id", "gw-0042", "--root", root,
                       "--out", tmp_path / "gw.csr")[0] == 0
    request = root / "etc/simkeeper/request/device.key"
    assert _mode(request) == (0o600, 0, 0)  # waiting for its certificate: root only
    assert factory.cli(capsys, "sign-csr", "--ca", factory.ca, "--out", tmp_path / "gw.pem",
                       tmp_path / "gw.csr")[0] == 0
    rc, _, err = factory.cli(capsys, "install-cert", "--root", root, "--group", str(GID),
                             "--ca-cert", factory.ca / "ca.pem", "--operator-key",
                             factory.operator_pub, "--broker", "mqtt.example.com",
                             tmp_path / "gw.pem")
    assert rc == 0, err
    assert _mode(gen_dir(root) / "device.key") == (0o640, 0, GID)


def test_batch_trees_for_the_group(factory: Factory, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_provision_batch import GOOD, _batch, _csv

    rc, _, err = _batch(factory, capsys, _csv(tmp_path, *GOOD[:2]), "--group", str(GID))
    assert rc == 0, err
    for device_id in ("gw-0000", "gw-0001"):
        gen = gen_dir(tmp_path / "out" / device_id)
        assert _mode(gen) == (0o750, 0, GID) and _mode(gen / "device.key") == (0o640, 0, GID)


# -- verify -----------------------------------------------------------------------------------

LOOSE = {
    0o644: "device.key: mode 0644: a private key must be 0600, or 0640 with the service's group",
    0o660: "device.key: mode 0660: a private key must be 0600, or 0640 with the service's group",
    0o604: "device.key: mode 0604: a private key must be",
    0o650: "device.key: mode 0650: a private key must be",
}


@pytest.mark.parametrize("mode", LOOSE)
def test_verify_refuses_loose_group_modes(factory: Factory, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], mode: int) -> None:
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--group", str(GID))
    (gen / "device.key").chmod(mode)
    rc, out = _verify(factory, capsys, root, "--group", str(GID))
    assert rc == 1 and f"{gen}: {LOOSE[mode]}" in out.splitlines()[0], out


def test_verify_refuses_a_key_readable_by_another_group(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--group", str(GID))
    os.chown(gen / "device.key", -1, OTHER_GID)
    rc, out = _verify(factory, capsys, root, "--group", str(GID))
    assert rc == 1 and (f"device.key: mode 0640: readable by gid {OTHER_GID}, and the"
                        f" service's is {GID}") in out
    # No service group at all: nobody but root may read the key.
    os.chown(gen / "device.key", -1, GID)
    rc, out = _verify(factory, capsys, root, "--no-group")
    assert rc == 1 and f"readable by gid {GID}, and there is no service group here" in out


def test_verify_says_when_the_service_cannot_read_its_key(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What an identity installed before this fix looks like to a gateway with the group."""
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--no-group")
    rc, out = _verify(factory, capsys, root, "--group", str(GID))
    assert rc == 1
    assert (f"device.key: mode 0600, gid 0: the service's group {GID} cannot read it"
            f" (root:{GID} 0640 expected)") in out
    assert f"directory: mode 0755, gid 0: the service's group {GID} cannot enter it" not in out
    gen.chmod(0o750)
    rc, out = _verify(factory, capsys, root, "--group", str(GID))
    assert f"directory: mode 0750, gid 0: the service's group {GID} cannot enter it" in out


def test_verify_refuses_writable_bundle_files(factory: Factory, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    gen = _device(factory, capsys, root, "--group", str(GID))
    (gen / "operator.pub").chmod(0o664)
    gen.chmod(0o770)
    rc, out = _verify(factory, capsys, root, "--group", str(GID))
    assert rc == 1
    assert "operator.pub: mode 0664: writable by group or others" in out
    assert "directory: mode 0770: writable by group or others" in out


# -- the agent's user reads it ----------------------------------------------------------------

def test_the_service_user_reads_its_key_and_no_one_else(
        factory: Factory, world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = world / "root"
    gen = _device(factory, capsys, root, "--group", str(GID))
    key = gen / "device.key"
    read = _read_as(UID, GID, key)
    assert read.returncode == 0, read.stderr
    assert read.stdout == key.read_bytes()
    link = root / "etc/simkeeper/config.toml"  # the agent's path: the link into the bundle
    assert _read_as(UID, GID, link).stdout == link.read_bytes()
    for path in (key, gen / "device.pem"):
        other = _read_as(OTHER_UID, OTHER_GID, path)
        assert other.returncode != 0 and b"Permission denied" in other.stderr


def test_before_the_fix_the_service_user_could_not(
        factory: Factory, world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = _device(factory, capsys, world / "root", "--no-group")
    denied = _read_as(UID, GID, gen / "device.key")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


# -- postinst on a gateway that already has an identity ---------------------------------------

def _fix_identity(dpkg_root: Path, group: str) -> None:
    """postinst's fix_identity, run against a scratch root (``DPKG_ROOT``)."""
    script = (ROOT / "packaging/debian/postinst").read_text()
    start = script.index("fix_identity() {")
    body = script[start:script.index("\n}\n", start) + 3]
    subprocess.run(["sh", "-eu", "-c", f'{body}fix_identity "$1"', "sh", group], check=True,
                   env={**os.environ, "DPKG_ROOT": str(dpkg_root)})


def test_postinst_gives_an_existing_identity_to_the_group(
        factory: Factory, world: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = world / "root"
    gen = _device(factory, capsys, root, "--no-group")  # provisioned before this fix
    (gen / "manifest.csv").chmod(0o664)
    request = root / "etc/simkeeper/request"
    request.mkdir()
    (request / "device.key").write_bytes(b"waiting")
    (request / "device.key").chmod(0o600)
    _fix_identity(root, str(GID))
    assert _mode(gen) == (0o750, 0, GID)
    assert _mode(gen / "device.key") == (0o640, 0, GID)
    assert _mode(gen / "manifest.csv") == (0o644, 0, GID)
    assert _mode(request / "device.key") == (0o600, 0, 0)  # not the identity: untouched
    assert _mode(root / "etc/simkeeper")[2] == 0
    assert _verify(factory, capsys, root, "--group", str(GID)) == (0, f"{gen}: ok\n")
    assert _read_as(UID, GID, gen / "device.key").returncode == 0
    _fix_identity(root, str(GID))  # again (every configure): the same
    assert _mode(gen / "device.key") == (0o640, 0, GID)


def test_postinst_hand_made_identity_and_none(world: Path) -> None:
    etc = world / "root/etc/simkeeper"
    etc.mkdir(parents=True)
    _fix_identity(world / "root", str(GID))  # the packaged default: nothing to do
    assert sorted(p.name for p in etc.iterdir()) == []
    (etc / "config.toml").write_text('device_id = "gw-1"\n')
    (etc / "device.key").write_bytes(b"key")
    (etc / "device.key").chmod(0o600)
    (etc / "ca.pem").write_bytes(b"ca")
    _fix_identity(world / "root", str(GID))
    assert _mode(etc / "device.key") == (0o640, 0, GID)
    assert _mode(etc / "ca.pem")[2] == 0 and _mode(etc)[2] == 0
    # A link that leads out of /etc/simkeeper is not followed.
    outside = world / "outside"
    outside.mkdir()
    (outside / "config.toml").write_text("")
    (etc / "config.toml").unlink()
    (etc / "config.toml").symlink_to("id-x/../../../outside/config.toml")
    _fix_identity(world / "root", str(GID))
    assert _mode(outside)[2] == 0 and _mode(outside / "config.toml")[2] == 0


def _python_as(uid: int, gid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """This Python and the project as uid:gid. The venv's interpreter may sit under a
    directory that uid cannot enter (/root/.pyenv): then the system's of the same version,
    given the venv's packages."""
    site = sysconfig.get_path("purelib")
    system = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}",
                          path="/usr/bin:/usr/local/bin")
    for exe, env in ((sys.executable, {}),
                     (system, {"PYTHONPATH": os.pathsep.join([str(ROOT), site])})):
        if exe is None:
            continue
        try:
            run = subprocess.run([exe, *args], user=uid, group=gid, extra_groups=[], cwd=ROOT,
                                 env={**os.environ, **env}, capture_output=True, text=True,
                                 check=False)
        except PermissionError:
            continue
        if "ModuleNotFoundError" not in run.stderr:
            return run
    pytest.skip(f"no Python with this project's packages can be run as uid {uid}")


NOT_ROOT = """
import sys
from pathlib import Path, PurePosixPath
from provisioning.files import File, ProvisionError
from provisioning.install import install
try:
    install(Path(sys.argv[1]), lambda where: {"device.key": File(b"k", 0o600)},
            gid=int(sys.argv[2]))
except ProvisionError as exc:
    print(exc)
    sys.exit(1)
"""


def test_a_group_it_is_not_in_is_refused_without_root(world: Path) -> None:
    """A factory station run as an ordinary user cannot give files to the service's group:
    it says so, and leaves nothing half-made."""
    etc = world / "etc/simkeeper"
    etc.mkdir(parents=True)
    os.chown(etc, UID, GID)
    run = _python_as(UID, GID, "-c", NOT_ROOT, str(etc), str(OTHER_GID))
    assert run.returncode == 1, run.stderr
    assert "not permitted (only root may); run as root, or --no-group" in run.stdout
    assert sorted(p.name for p in etc.iterdir()) == [".provision.lock"]
