"""Decommission (agent.decommission): the result goes up first, then the uplink stops, the
identity keys are wiped and the radio goes off; the agent then refuses to start until the
gateway is re-provisioned (a device certificate with another fingerprint).

The end-to-end test runs the daemon as a process inside a fake provisioned bundle
(``etc/id-1/`` with ``bundle.json``, ``device.key``, ``device.pem``, ``operator.pub`` and a
waiting ``etc/request/device.key``), the simulated modem on a pty and a real mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from agent import decommission
from agent.batch import decode_batch
from agent.config import parse
from agent.fleet.sign import make_envelope
from agent.store import Store
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
        sims = (await agent.status())["sims"]
        assert sims[0]["lifecycle"]["state"] == "terminated"

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
