"""`simkeeper run` and `run --preflight` refuse the same configs, before anything starts, in one
line naming the key and the file, exit 2: an unknown key, a TLS file or operator key that
is missing or unreadable (issue 11, item 1). No traceback, and nothing is created."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_daemon import SIMKEEPER
from tests.test_decommission import as_agent

BASE = 'device_id = "gw"\n[store]\npath = "{db}"\n[ingest]\nsocket = "{sock}"\n'


def both(config: Path) -> list[subprocess.CompletedProcess[str]]:
    return [subprocess.run([*SIMKEEPER, "run", *extra, "--config", str(config)],
                           capture_output=True, text=True, timeout=60, check=False)
            for extra in ([], ["--preflight"])]


def write(tmp_path: Path, extra: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(BASE.format(db=tmp_path / "state" / "db", sock=tmp_path / "s") + extra)
    return config


@pytest.mark.parametrize(("extra", "line"), [
    ("[uplink]\ntls = true\ncert = \"{d}/absent.pem\"\nkey = \"{d}/key.pem\"\n",
     "uplink.cert: cannot read {d}/absent.pem: No such file or directory"),
    ("[commands]\noperator_key = \"{d}/operator.pub\"\n",
     "commands.operator_key: cannot read {d}/operator.pub: No such file or directory"),
    ("[uplink]\nport = 1883\ncolour = \"blue\"\n", "uplink.colour"),
])
def test_run_and_preflight_refuse_the_same_config_in_one_line(
        tmp_path: Path, extra: str, line: str) -> None:
    (tmp_path / "key.pem").write_text("not read: the cert is missing first\n")
    config = write(tmp_path, extra.format(d=tmp_path))
    for done in both(config):
        assert done.returncode == 2, done.stderr
        assert line.format(d=tmp_path) in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()  # nothing created


def test_a_file_the_service_user_cannot_read_is_named() -> None:
    """Checked as the user running it (the unit's ``simkeeper``): as root, the check runs in a
    child that became the agent's user."""
    with tempfile.TemporaryDirectory(prefix="skpf") as tmp:
        directory = Path(tmp)
        directory.chmod(0o755)  # the agent's user reads the config, not the key
        key = directory / "operator.pub"
        key.write_text("x")
        key.chmod(0o600)
        config = write(directory, f'[commands]\noperator_key = "{key}"\n')
        config.chmod(0o644)
        argv = ("run", "--preflight", "--config", str(config))
        if os.geteuid() == 0:
            done = as_agent(*argv)  # root's key, 0600: out of the agent's user's reach
        else:
            key.chmod(0)
            done = subprocess.run([*SIMKEEPER, *argv], capture_output=True, text=True,
                                  timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert f"commands.operator_key: cannot read {key}: Permission denied" in done.stderr
