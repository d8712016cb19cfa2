"""Decommission (agent.sim.decommission): the result goes up first, then the uplink stops, the
identity keys are wiped and the radio goes off; the agent then refuses to start until the
gateway is re-provisioned (a device certificate with another fingerprint).

The end-to-end test runs the daemon as a process inside a fake provisioned bundle
(``etc/id-1/`` with ``bundle.json``, ``device.key``, ``device.pem``, ``operator.pub`` and a
waiting ``etc/request/device.key``), the simulated modem on a pty and a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.config import parse
from agent.core.store import Store
from agent.fleet.sign import make_envelope
from agent.sim import decommission
from agent.telemetry.batch import decode_batch
from tests.broker import WAIT, Broker, Message, Pki, Subscriber, until
from tests.test_daemon import DEVICE, SIMKEEPER, send_command
from tests.test_e2e_lifecycle import lifecycle_rig, operator_key


def bundle(tmp_path: Path, pki: Pki) -> tuple[Path, Path]:
    """A provisioned-looking bundle: (its directory, the waiting request key)."""
    gen = tmp_path / "etc" / "id-1"
    gen.mkdir(parents=True)
    (gen / "bundle.json").write_text('{"format": 1}\n')
    shutil.copy(pki.client_key, gen / "device.key")
    shutil.copy(pki.client_cert, gen / "device.pem")
    shutil.copy(pki.ca, gen / "ca.pem")
    request = tmp_path / "etc" / "request"
    request.mkdir()
    shutil.copy(pki.rogue_key, request / "device.key")
    return gen, request / "device.key"


class Recorder(Subscriber):
    """Records, when the command result arrives, whether the key and the radio were still
    there: the result must go before the wipe and the radio off."""

    def __init__(self, port: int, key: Path, commands: list[str]) -> None:
        self.key, self.commands = key, commands
        self.at_result: dict[str, bool] = {}
        super().__init__(port, f"simkeeper/{DEVICE}/#")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/cmd/result") and not self.at_result:
            self.at_result = {"key": self.key.exists(), "cfun0": "AT+CFUN=0" in self.commands}
        super()._on_message(client, userdata, msg)


def index(messages: list[Message], suffix: str, payload: bytes | None = None) -> int:
    return next(i for i, m in enumerate(messages) if m.topic.endswith("/" + suffix)
                and (payload is None or m.payload == payload))


async def test_decommission_end_to_end(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    gen, request_key = bundle(tmp_path, pki)
    key, pin = operator_key(gen)
    async with lifecycle_rig(gen, broker, extra=pin) as (agent, sim, _sub):
        await agent.wait_state(lambda s: s["state"] == "active", "activation")
        rec = Recorder(broker.port, gen / "device.key", sim.commands)
        try:
            await until(lambda: bool(rec.on("status")), "the retained online")
            result = await send_command(broker.port, make_envelope(key, DEVICE, "decommission"))
            assert result["status"] == "ok", result
            assert "keys wiped" in result["detail"]
            await until(lambda: not (gen / "device.key").exists(), "the device key wiped")
            await until(lambda: sim.state.radio == 0, "AT+CFUN=0 at the simulator")
            await until(lambda: any(m.payload == b"offline" for m in rec.on("status")),
                        "the session down")
            messages = list(rec.messages)
        finally:
            rec.close()
        # The result went up while the key and the radio were still there, before the event
        # went up and the session ended (retained offline).
        assert rec.at_result == {"key": True, "cfun0": False}
        assert index(messages, "cmd/result") < index(messages, "status", b"offline")
        events = [r["topic"] for m in messages if m.topic.endswith("/events")
                  for r in decode_batch(m.payload)["readings"]]
        assert "decommissioned" in events
        assert not request_key.exists()
        for kept in ("operator.pub", "device.pem", "ca.pem", "bundle.json"):
            assert (gen / kept).exists(), kept
        # Local readings are refused from now on.
        refused = await agent.cli("publish", "sensors/x", "1")
        assert refused.returncode != 0 and "decommissioned" in refused.stderr
        assert await agent.stop() == 0

        # A decommissioned gateway refuses to start: exit 1, one line.
        done = await agent.cli("run")
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("simkeeper run: decommissioned at ")
        assert "re-provision this gateway" in done.stderr
        # The daemon ran as root here: it wiped the keys itself and asked nothing of root.
        assert not (agent.database.parent / decommission.WIPE_REQUEST).exists()
        assert (await agent.cli("run", "--preflight")).returncode == 1
        status = await agent.status()
        assert status["sims"][0]["lifecycle"]["state"] == "terminated"
        gone = status["decommissioned"]
        assert gone["wiped"] is True and gone["not_wiped"] == []
        assert gone["iccid"] == status["sims"][0]["iccid"] and gone["at"] > 0

        # Re-provisioned: a new key and certificate in the bundle; it starts again.
        shutil.copy(pki.rogue_cert, gen / "device.pem")
        shutil.copy(pki.rogue_key, gen / "device.key")
        await agent.start()
        assert (await agent.stop()) == 0
        store = Store(agent.database)
        try:
            assert decommission.load_marker(store) is None
            history = json.loads(store.query("SELECT value FROM meta WHERE key = ?",
                                             (decommission.HISTORY,))[0][0])
        finally:
            store.close()
        assert len(history) == 1 and history[0]["completed_at"] is not None
        assert history[0]["wiped"] and history[0]["not_wiped"] == {}


async def test_decommission_when_killed_midway_finishes_at_the_refused_start(
    tmp_path: Path, pki: Pki
) -> None:
    gen, _request = bundle(tmp_path, pki)
    config = gen / "agent.toml"
    db = gen / "state.db"
    config.write_text(f'device_id = "{DEVICE}"\n[store]\npath = "{db}"\n'
                      f'[ingest]\nsocket = "{gen / "s.sock"}"\n')
    cfg = parse(config.read_text())
    store = Store(db)
    try:
        fp = decommission.fingerprint(decommission.identity_cert(cfg, config))
        assert fp is not None
        decommission._save(store, decommission.MARKER,  # part one done, part two never ran
                           {"at": 1_750_000_000, "cert_sha256": fp, "completed_at": None,
                            "iccid": None})
    finally:
        store.close()
    done = await asyncio.to_thread(
        subprocess.run, [*SIMKEEPER, "run", "--config", str(config)],
        capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "simkeeper run: decommissioned at 2025-06-15T15:06:40Z; re-provision this gateway"
        " (simkeeper provision device ... --force) to use it again")
    assert not (gen / "device.key").exists()
    assert (gen / "device.pem").exists()


def test_key_files_never_include_public_material(tmp_path: Path, pki: Pki) -> None:
    gen, request_key = bundle(tmp_path, pki)
    (gen / "operator.pub").write_text("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n")
    tls_key = tmp_path / "client.key"
    shutil.copy(pki.client_key, tls_key)
    cfg = parse(f'device_id = "gw"\n[uplink]\ntls = true\ncert = "{gen / "device.pem"}"\n'
                f'key = "{tls_key}"\nca = "{gen / "ca.pem"}"\n'
                f'[commands]\noperator_key = "{gen / "operator.pub"}"\n')
    found = decommission.key_files(cfg, gen / "config.toml")
    assert found == [tls_key, gen / "device.key", request_key]
    # A hand-written config (no bundle.json beside it): only the key it names.
    assert decommission.key_files(cfg, tmp_path / "config.toml") == [tls_key]
    wiped, failed = decommission.wipe([*found, tmp_path / "gone.key"])
    assert failed == {} and len(wiped) == 4
    assert not any(p.exists() for p in found)
    assert (gen / "operator.pub").exists() and (gen / "device.pem").exists()


def test_reprovisioning_rule(tmp_path: Path, pki: Pki) -> None:
    cert = tmp_path / "device.pem"
    shutil.copy(pki.client_cert, cert)
    with_cert = parse(f'device_id = "gw"\n[uplink]\ntls = true\ncert = "{cert}"\n'
                      f'key = "{tmp_path / "k"}"\n')
    without = parse('device_id = "gw"\n')
    store = Store(tmp_path / "db")
    try:
        fp = decommission.fingerprint(cert)
        for cfg in (with_cert, without):  # same certificate, or none at all: refused
            decommission._save(store, decommission.MARKER,
                               {"at": 0, "cert_sha256": fp, "completed_at": 1.0,
                                "not_wiped": {}})
            try:
                decommission.check_start(store, cfg, None)
            except decommission.Decommissioned as exc:
                assert "1970-01-01T00:00:00Z" in str(exc)
            else:
                raise AssertionError("started while decommissioned")
        shutil.copy(pki.rogue_cert, cert)  # a new identity
        cleared = decommission.check_start(store, with_cert, None)
        assert cleared is not None and cleared["cert_sha256"] == fp
        assert decommission.check_start(store, with_cert, None) is None
        # An unreadable marker still refuses (fail closed).
        with store.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('decommission', 'garbage')")
        try:
            decommission.check_start(store, without, None)
        except decommission.Decommissioned:
            pass
        else:
            raise AssertionError("an unreadable marker let it start")
    finally:
        store.close()
    assert fp is not None and fp == _der_sha256(pki.client_cert)


def _der_sha256(path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


# -- keys the agent may not wipe: the request, root's wipe-identity, preflight, status --------

AGENT_UID = AGENT_GID = 65534  # nobody/nogroup: the agent's user in the packaged unit


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A scratch tree another uid can reach (pytest's tmp_path is root's own, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent runs as another user and root wipes (tests run"
                    " as root in CI)")
    top = Path(tempfile.mkdtemp(prefix="simkeeper-decommission-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def packaged_layout(top: Path, pki: Pki) -> tuple[Path, Path, Path]:
    """The packaged unit's files: the bundle root:agent 0750 with keys 0640 (readable, not
    removable by the agent), a root-only request key, the agent's state directory; (config,
    bundle, database)."""
    gen, request_key = bundle(top, pki)
    state = top / "var"
    state.mkdir()
    config = gen / "config.toml"
    config.write_text(f'device_id = "{DEVICE}"\n[store]\npath = "{state / "simkeeper.db"}"\n'
                      f'[ingest]\nsocket = "{state / "s.sock"}"\n')
    os.chown(gen, 0, AGENT_GID)
    gen.chmod(0o750)
    for path in gen.iterdir():
        os.chown(path, 0, AGENT_GID)
        path.chmod(0o640 if path.suffix == ".key" else 0o644)
    request_key.parent.chmod(0o700)
    request_key.chmod(0o600)
    (top / "etc").chmod(0o755)
    return config, gen, state / "simkeeper.db"


def decommissioned(config: Path, db: Path, **marker: Any) -> None:
    """A decommission marker (part one done) in a database owned by the agent."""
    cfg = parse(config.read_text())
    store = Store(db)
    try:
        fp = decommission.fingerprint(decommission.identity_cert(cfg, config))
        decommission._save(store, decommission.MARKER,
                           {"at": 1_750_000_000, "cert_sha256": fp, "completed_at": None,
                            "iccid": None, "wiped": [], "not_wiped": {}, **marker})
    finally:
        store.close()
    for path in [db.parent, *db.parent.iterdir()]:
        os.chown(path, AGENT_UID, AGENT_GID)
    db.parent.chmod(0o750)


def simkeeper(*args: str, agent: bool = False) -> subprocess.CompletedProcess[str]:
    """``simkeeper ARGS``; as the agent's user (no supplementary groups) when ``agent``."""
    if agent:
        return as_agent(*args)
    return subprocess.run([*SIMKEEPER, *args], capture_output=True, text=True, timeout=WAIT,
                          check=False, cwd="/")


def as_agent(*args: str) -> subprocess.CompletedProcess[str]:
    """``simkeeper ARGS`` in a forked child that became the agent's user: the interpreter
    itself may be out of that user's reach (a venv on root's pyenv), so everything it needs is
    imported before the fork."""
    from agent import cli
    from agent.cli import run, status, wipe  # noqa: F401

    with tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 70
            try:
                os.setgroups([])
                os.setgid(AGENT_GID)
                os.setuid(AGENT_UID)
                os.chdir("/")
                sys.stderr = err
                code = cli.main(list(args))
            except BaseException:
                traceback.print_exc(file=err)
            finally:
                err.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return subprocess.CompletedProcess(list(args), os.waitstatus_to_exitcode(status), "",
                                           err.read())


def marker_of(db: Path) -> dict[str, Any]:
    store = Store(db)
    try:
        marker = decommission.load_marker(store)
    finally:
        store.close()
    assert marker is not None
    return marker


REFUSAL = ("simkeeper run: decommissioned at 2025-06-15T15:06:40Z; re-provision this gateway"
           " (simkeeper provision device ... --force) to use it again\n")


def test_agent_that_may_not_wipe_asks_root_and_wipe_identity_completes(
    shared: Path, pki: Pki
) -> None:
    config, gen, db = packaged_layout(shared, pki)
    decommissioned(config, db)
    request = db.parent / decommission.WIPE_REQUEST
    key = gen / "device.key"

    # The refused start (here its preflight), as the agent: the key stays, the marker says so
    # and root is asked, in the agent's state directory.
    done = simkeeper("run", "--preflight", "--config", str(config), agent=True)
    assert (done.returncode, done.stderr.splitlines()[-1] + "\n") == (1, REFUSAL), done.stderr
    assert key.exists() and request.exists()
    assert request.stat().st_uid == AGENT_UID
    asked = json.loads(request.read_text())
    assert asked["at"] == 1_750_000_000 and str(key) in asked["not_wiped"]
    marker = marker_of(db)
    assert marker["completed_at"] is not None and str(key) in marker["not_wiped"]

    status = simkeeper("status", "--json", "--config", str(config))
    assert json.loads(status.stdout)["decommissioned"] == {
        "at": 1_750_000_000, "iccid": None, "wiped": False, "not_wiped": [str(key)]}
    text = simkeeper("status", "--config", str(config)).stdout
    assert f"identity keys NOT wiped: {key}; waiting for simkeeper-wipe (root)" in text

    # Root (simkeeper-wipe.service) wipes every identity key, the root-only request key too,
    # completes the marker and removes the request; the database stays the agent's.
    wiped = simkeeper("wipe-identity", "--config", str(config))
    assert wiped.returncode == 0, wiped.stderr
    assert wiped.stdout.startswith("decommission at 2025-06-15T15:06:40Z complete: ")
    assert not key.exists() and not (shared / "etc/request/device.key").exists()
    assert (gen / "device.pem").exists() and (gen / "ca.pem").exists()
    assert not request.exists()
    marker = marker_of(db)
    assert marker["not_wiped"] == {} and str(key) in marker["wiped"]
    for path in db.parent.iterdir():  # SQLite gives what it made as root to the db's owner
        assert path.stat().st_uid == AGENT_UID, path

    status = simkeeper("status", "--json", "--config", str(config))
    assert json.loads(status.stdout)["decommissioned"] == {
        "at": 1_750_000_000, "iccid": None, "wiped": True, "not_wiped": []}
    text = simkeeper("status", "--config", str(config)).stdout
    assert "decommissioned at " in text and "identity keys wiped" in text

    # Still decommissioned, nothing left to ask; the agent still opens its database.
    done = simkeeper("run", "--preflight", "--config", str(config), agent=True)
    assert (done.returncode, done.stderr) == (1, REFUSAL)
    assert not request.exists()
    again = simkeeper("wipe-identity", "--config", str(config))
    assert again.returncode == 0, again.stderr

    # Re-provisioned: preflight lets the daemon start (the daemon, not preflight, clears the
    # marker), and a request left over is void: root wipes nothing.
    shutil.copy(pki.rogue_cert, gen / "device.pem")
    shutil.copy(pki.rogue_key, key)
    done = simkeeper("run", "--preflight", "--config", str(config), agent=True)
    assert (done.returncode, done.stderr) == (0, "")
    assert marker_of(db)["at"] == 1_750_000_000
    request.write_text(json.dumps(marker))
    void = simkeeper("wipe-identity", "--config", str(config))
    assert void.returncode == 1 and void.stdout == ""
    assert void.stderr.startswith("simkeeper wipe-identity: re-provisioned (certificate ")
    assert void.stderr.count("\n") == 1 and "nothing wiped" in void.stderr
    assert key.exists() and not request.exists()


def test_wipe_identity_refuses_a_gateway_not_decommissioned(tmp_path: Path, pki: Pki) -> None:
    gen, _request = bundle(tmp_path, pki)
    config = gen / "config.toml"
    db = tmp_path / "var" / "simkeeper.db"
    config.write_text(f'device_id = "{DEVICE}"\n[store]\npath = "{db}"\n')
    request = db.parent / decommission.WIPE_REQUEST
    for present in (False, True):  # no database yet; a database without a marker
        db.parent.mkdir(exist_ok=True)
        request.write_text("{}")  # forged or stale: the request is not trusted
        done = simkeeper("wipe-identity", "--config", str(config))
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "nothing wiped" in done.stderr and "Traceback" not in done.stderr
        assert (gen / "device.key").exists() and not request.exists()
        assert db.exists() is present
        if not present:
            Store(db).close()
    bad = simkeeper("wipe-identity", "--config", str(tmp_path / "absent.toml"))
    assert bad.returncode == 2 and bad.stderr.startswith("simkeeper wipe-identity: ")


def test_preflight_exit_codes(tmp_path: Path, pki: Pki) -> None:
    gen, _request = bundle(tmp_path, pki)
    config = gen / "config.toml"
    db = tmp_path / "var" / "simkeeper.db"
    config.write_text(f'device_id = "{DEVICE}"\n[store]\npath = "{db}"\n')
    preflight = ("run", "--preflight", "--config", str(config))
    # Never run: nothing to refuse, and nothing created.
    assert (simkeeper(*preflight).returncode, db.exists()) == (0, False)
    Store(db).close()
    assert simkeeper(*preflight).returncode == 0  # not decommissioned
    decommissioned(config, db, completed_at=1.0)
    done = simkeeper(*preflight)
    assert (done.returncode, done.stderr) == (1, REFUSAL)
    assert not (db.parent / decommission.WIPE_REQUEST).exists()  # root could wipe: no request
    # A config the daemon would refuse is refused here too (the unit is skipped, not looping).
    assert simkeeper("run", "--preflight", "--config", str(tmp_path / "absent.toml")
                     ).returncode == 2


async def test_running_agent_that_may_not_wipe_asks_root(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decommission order's second part, when the wipe fails (the agent's user in the
    packaged unit): the marker is saved first, then the request written beside the database."""
    gen, _request = bundle(tmp_path, pki)
    config = gen / "config.toml"
    db = tmp_path / "var" / "simkeeper.db"
    config.write_text(f'device_id = "{DEVICE}"\n[store]\npath = "{db}"\n')
    cfg = parse(config.read_text())
    store = Store(db)
    request = db.parent / decommission.WIPE_REQUEST
    saved_before_request: list[bool] = []

    def refused(paths: list[Path]) -> tuple[list[str], dict[str, str]]:
        return [], {str(p): "Permission denied" for p in paths}

    real_request = decommission.request_wipe

    def request_wipe(cfg: Any, marker: dict[str, Any]) -> Path | None:
        saved_before_request.append(decommission.load_marker(store) == marker)
        return real_request(cfg, marker)

    monkeypatch.setattr(decommission, "wipe", refused)
    monkeypatch.setattr(decommission, "request_wipe", request_wipe)
    emitted: list[tuple[str, dict[str, Any]]] = []

    class Plant:
        def __init__(self) -> None:
            self.cfg, self.config_path, self.store = cfg, config, store
            self.outbox = SimpleNamespace(depth=lambda _stream: (0, 0))
            self.events = SimpleNamespace(emit=lambda topic, **kw: emitted.append((topic, kw)))
            self.keepers = SimpleNamespace(iccid=None, decommission=lambda announce: None,
                                           retire=lambda: None)

        def gates_changed(self) -> None:
            pass

        async def publish_state(self) -> bool:
            return False  # the uplink is down: the decommission goes on all the same

        async def stop_uplinks(self, _reason: str) -> None:
            pass

    try:
        job = decommission.Decommissioner(Plant(), drain_timeout=0.1)  # type: ignore[arg-type]
        job.begin()
        job.note_result()
        await asyncio.wait_for(job.done.wait(), WAIT)
        marker = decommission.load_marker(store)
    finally:
        store.close()
    assert marker is not None and str(gen / "device.key") in marker["not_wiped"]
    assert saved_before_request == [True]
    assert json.loads(request.read_text()) == marker
    assert (gen / "device.key").exists()
    assert ("decommission-incomplete", {"not_wiped": marker["not_wiped"],
                                        "wipe_requested": True}) in emitted
