"""`simkeeper fleet` against a real mosquitto: send (one, --all, refusals, timeouts), every
command end to end, key rotation, keygen, watch --once."""

from __future__ import annotations

import asyncio
import json
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from agent.cli import main
from agent.commands.args import SCHEMAS, describe, validate
from agent.commands.inbox import CommandInbox
from agent.commands.processor import CommandProcessor
from agent.core.store import Store
from agent.fleet import watch
from agent.fleet.mqtt import BrokerOptions
from agent.fleet.send import parse_arg, send
from agent.telemetry.batch import encode_entries
from agent.telemetry.mqtt import MqttUplink
from agent.telemetry.outbox import Outbox
from provisioning.keys import private_pem, public_pem
from tests.broker import WAIT, Broker, Subscriber, until, uplink_settings, wait_until
from tests.test_commands import FakeClock, Spy

ICCID = "8981100005819480014"


class Device:
    """A device's command side on the test's loop: paho (its own thread) hands each ``cmd``
    payload to the loop, the processor answers on ``cmd/result``."""

    def __init__(self, port: int, processor: CommandProcessor, prefix: str = "simkeeper") -> None:
        self.processor = processor
        self.base = f"{prefix}/{processor.device_id}"
        self.loop = asyncio.get_running_loop()
        self.ready = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_a: c.subscribe(f"{self.base}/cmd", qos=1)
        self.client.on_subscribe = lambda *_a: setattr(self, "ready", True)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._answer(payload)))

    async def _answer(self, payload: bytes) -> None:
        result = await self.processor.handle(payload)
        self.client.publish(f"{self.base}/cmd/result", json.dumps(result), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def devices(broker: Broker, tmp_path: Path, key: Ed25519PrivateKey, names: list[str],
                  spy: Spy) -> AsyncIterator[list[Device]]:
    pem = [public_pem(key.public_key())]
    stores = [Store(tmp_path / f"{n}.db") for n in names]
    devs = [Device(broker.port, CommandProcessor(s, n, pem, FakeClock(ts=None, lower_bound=0),
                                                 spy.handlers()))
            for s, n in zip(stores, names, strict=True)]
    try:
        for d in devs:
            await asyncio.to_thread(wait_until, lambda d=d: d.ready, WAIT, "device subscribed")
        yield devs
    finally:
        for d in devs:
            d.close()
        for s in stores:
            s.close()


@pytest.fixture
def operator(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "operator.key"
    path.write_bytes(private_pem(key))
    return key, path


def cli(broker: Broker, *argv: str) -> list[str]:
    return ["fleet", *argv, "--broker", f"127.0.0.1:{broker.port}"]


async def run_cli(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)


async def test_send_prints_the_result(broker: Broker, tmp_path: Path,
                                      operator: tuple[Ed25519PrivateKey, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    key, key_file = operator
    spy = Spy()
    async with devices(broker, tmp_path, key, ["gw-0001"], spy):
        code = await run_cli(cli(broker, "send", "gw-0001", "suspend", "--arg", "scope=data",
                                 "--arg", "until=1900000000", "--key", str(key_file)))
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    result = json.loads(out[0])
    assert result["device"] == "gw-0001" and result["status"] == "ok"
    assert result["detail"].startswith("suspend done")
    assert spy.calls == [("suspend", {"scope": "data", "until": 1900000000})]


async def test_send_refused_and_timeout_exit_1(broker: Broker, tmp_path: Path,
                                               operator: tuple[Ed25519PrivateKey, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _key, key_file = operator
    spy = Spy()
    listed = tmp_path / "fleet.txt"
    listed.write_text("# the fleet\ngw-0001\n\ngw-0002\n")
    async with devices(broker, tmp_path, Ed25519PrivateKey.generate(), ["gw-0001"], spy):
        # The timeout also bounds the CONNACK, the SUBACK and gw-0001's answer: long enough
        # for a loaded machine (gw-0002's timeout is the test's run time, so not WAIT).
        code = await run_cli(cli(broker, "send", "--all", str(listed), "resume", "--key",
                                 str(key_file), "--timeout", "5"))
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 1
    assert [(r["device"], r["status"]) for r in lines] == [("gw-0001", "rejected"),
                                                          ("gw-0002", "timeout")]
    assert lines[0]["detail"].startswith("bad signature")
    assert spy.calls == []


async def test_send_usage_errors(broker: Broker, operator: tuple[Ed25519PrivateKey, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _key, key_file = operator
    assert await run_cli(cli(broker, "send", "gw-1", "fly", "--key", str(key_file))) == 2
    assert await run_cli(cli(broker, "send", "gw-1", "resume", "--arg", "x")) == 2
    assert await run_cli(cli(broker, "send", "gw-1", "resume", "--key", "/nonexistent")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("simkeeper fleet send: ") for line in err)


async def test_a_missing_tls_file_is_named(broker: Broker, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Every fleet tool names the file it cannot read (issue 11, item 16)."""
    absent = tmp_path / "absent.pem"
    for argv in (["watch", "--once", "--cert", str(absent), "--client-key", str(absent)],
                 ["flux-bridge", "--webhook", "http://127.0.0.1:9/", "--ca", str(absent)]):
        assert await run_cli(cli(broker, *argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"simkeeper fleet watch: --cert: cannot read {absent}: No such file or"
                   " directory",
                   f"simkeeper fleet flux-bridge: --ca: cannot read {absent}: No such file or"
                   " directory"]


async def test_every_command_end_to_end(broker: Broker, tmp_path: Path,
                                        operator: tuple[Ed25519PrivateKey, Path]) -> None:
    key, _ = operator
    spy = Spy()
    opts = BrokerOptions(port=broker.port)
    nxt = Ed25519PrivateKey.generate()
    commands: list[tuple[str, dict[str, Any]]] = [
        ("suspend", {"scope": "telemetry", "reason": "test"}), ("resume", {}),
        ("set-activation-deadline", {"iccid": ICCID, "deadline": 1_900_000_000}),
        ("activate", {}), ("report-usage", {}), ("get-state", {}),
        ("set-plan", {"iccid": ICCID, "bytes": 10**9, "cycle_day": 5}), ("reset-modem", {}),
        ("update-conformance", {"list": "version = 1", "signature": "AAAA"}),
        ("clear-malfunction", {}), ("decommission", {}),
    ]
    async with devices(broker, tmp_path, key, ["gw-0001"], spy):
        for name, args in commands:
            [outcome] = await asyncio.to_thread(send, opts, key, ["gw-0001"], name, args,
                                                timeout=WAIT)
            assert outcome.ok, outcome
        [rotated] = await asyncio.to_thread(
            send, opts, key, ["gw-0001"], "rotate-key",
            {"public_key": public_pem(nxt.public_key()).decode()}, timeout=WAIT)
        assert rotated.ok, rotated
        [old] = await asyncio.to_thread(send, opts, key, ["gw-0001"], "resume", {}, timeout=WAIT)
        [new] = await asyncio.to_thread(send, opts, nxt, ["gw-0001"], "resume", {}, timeout=WAIT)
    assert old.result is not None and old.result["detail"].startswith("unknown key")
    assert new.ok
    assert [c[0] for c in spy.calls] == [n for n, _ in commands] + ["resume"]


async def test_hostile_payloads_through_the_broker(broker: Broker, tmp_path: Path,
                                                   operator: tuple[Ed25519PrivateKey, Path]
                                                   ) -> None:
    key, _ = operator
    spy = Spy()
    # Subscribed (SUBACK back) before the first payload goes, as the device is (devices()).
    sub = await asyncio.to_thread(Subscriber, broker.port, "simkeeper/gw-0001/cmd/result")
    payloads = [b"", b"\x00" * 100, b"[" * 10000, b'{"sig":"x"}', b"null", b"\xff" * 70000]
    try:
        async with devices(broker, tmp_path, key, ["gw-0001"], spy):
            pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            pub.connect("127.0.0.1", broker.port)
            pub.loop_start()
            for p in payloads:
                pub.publish("simkeeper/gw-0001/cmd", p, qos=1).wait_for_publish(WAIT)
            # Every payload answered: the processor has been through all of them.
            await until(lambda: len(sub.on("cmd/result")) == len(payloads),
                        "every payload answered")
            pub.disconnect()
            pub.loop_stop()
        results = [m.payload for m in sub.on("cmd/result")]
    finally:
        sub.close()
    assert len(results) == len(payloads)
    assert all(json.loads(r)["status"] == "rejected" for r in results)
    assert spy.calls == []


async def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert await run_cli(["fleet", "keygen", "--out", str(out)]) == 0
    assert stat.S_IMODE((out / "operator.key").stat().st_mode) == 0o600
    assert (out / "operator.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "key id" in capsys.readouterr().out
    assert await run_cli(["fleet", "keygen", "--out", str(out)]) == 1  # never overwrites


async def test_watch_once(broker: Broker, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[watch.Watcher] = []
    release = threading.Event()

    class HeldWatcher(watch.Watcher):
        """The CLI's watcher, as the test sees it: ``settle`` (the CLI's rule for "the retained
        messages are in": a quiet spell) begins only on ``release``, so the live usage the test
        publishes cannot miss the table on a slow machine."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        def settle(self, *args: Any, **kwargs: Any) -> None:
            if not release.wait(WAIT):
                raise TimeoutError("the test never released the watcher")
            super().settle(*args, **kwargs)

    monkeypatch.setattr(watch, "Watcher", HeldWatcher)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    state = {"device_id": "gw-0001", "ts": 1_700_000_000,
             "sims": [{"iccid": ICCID, "state": "awaiting-activation", "deadline": 4e9,
                       "activated_at": None, "suspension": {"scope": "data"}}]}
    usage = {"iccid": ICCID, "bytes_up": 1500, "bytes_down": 500_000, "plan_bytes": 1_000_000,
             "share_used": 0.5015}
    batch = encode_entries("gw-0001", ["u1"], [json.dumps(
        {"id": "u1", "ts": 1, "topic": "usage", "data": usage})])
    for topic, payload, retain in [
        ("simkeeper/gw-0001/status", b"online", True),
        ("simkeeper/gw-0001/state", json.dumps(state).encode(), True),
        ("simkeeper/gw-0002/status", b"offline", True),
    ]:
        pub.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)
    code_task = asyncio.create_task(run_cli(cli(broker, "watch", "--once")))
    try:
        # The usage is not retained: publish it once the watcher's SUBACK is back.
        await until(lambda: bool(made) and made[0].subscribed.is_set(),
                    "the watcher's subscription")
        watcher = made[0]
        pub.publish("simkeeper/gw-0001/usage", batch.payload, qos=1).wait_for_publish(WAIT)

        def usage_seen() -> bool:
            with watcher.lock:
                dev = watcher.devices.get("gw-0001")
                return dev is not None and dev.usage is not None

        await until(usage_seen, "the usage at the watcher")
    finally:
        release.set()
    assert await code_task == 0
    pub.disconnect()
    pub.loop_stop()
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["DEVICE", "ONLINE", "SIM", "DEADLINE", "SUSPENDED", "USAGE",
                              "LAST", "SEEN"]
    gw1, gw2 = out[1].split(), out[2].split()
    assert gw1[:3] == ["gw-0001", "yes", "awaiting-activation"] and "data" in gw1
    assert "501.5kB/1.0MB" in out[1] and "(50%)" in out[1]
    assert gw2[:3] == ["gw-0002", "no", "-"]


async def test_daemon_wiring_with_the_real_uplink(broker: Broker, tmp_path: Path,
                                                  operator: tuple[Ed25519PrivateKey, Path]
                                                  ) -> None:
    key, _ = operator
    spy = Spy()
    store = Store(tmp_path / "simkeeper.db")
    outbox = Outbox(store, max_bytes=1 << 20, max_age=86400.0)
    proc = CommandProcessor(store, "gw-0001", [public_pem(key.public_key())], FakeClock(
        ts=None, lower_bound=0), spy.handlers())
    uplink: MqttUplink | None = None

    def publish(result: dict[str, Any]) -> None:
        assert uplink is not None
        uplink.publish_result(result)

    inbox = CommandInbox(proc, publish)
    uplink = MqttUplink(uplink_settings(broker.port, client_id="gw-0001"), "gw-0001", outbox,
                        on_command=inbox.put)
    await uplink.start()
    answering = asyncio.create_task(inbox.run())
    try:
        await uplink.wait_ready()
        [outcome] = await asyncio.to_thread(send, BrokerOptions(port=broker.port), key,
                                            ["gw-0001"], "get-state", {}, timeout=WAIT)
    finally:
        answering.cancel()
        await uplink.stop()
        store.close()
    assert outcome.ok and outcome.result is not None
    assert outcome.result["detail"]["state"] == "active"


def test_arg_values_are_read_by_the_commands_schema(tmp_path: Path) -> None:
    """`--arg iccid=8981...` stays a string, a deadline takes ISO 8601 or Unix seconds, a plan
    may be null; a value that cannot be the argument's type is refused naming the type; every
    command and argument is listed in `fleet send --help` (issue 11, item 10)."""
    iccid = "8981100005819480014"
    assert parse_arg("set-plan", f"iccid={iccid}") == ("iccid", iccid)
    assert parse_arg("set-plan", "bytes=1000000") == ("bytes", 1_000_000)
    assert parse_arg("set-plan", "bytes=null") == ("bytes", None)
    assert parse_arg("set-activation-deadline", "deadline=2027-01-31T00:00:00Z") == (
        "deadline", 1_801_353_600)
    assert parse_arg("set-activation-deadline", "deadline=2027-01-31T09:00:00+09:00") == (
        "deadline", 1_801_353_600)
    assert parse_arg("suspend", "until=1801353600") == ("until", 1_801_353_600)
    with pytest.raises(ValueError, match="deadline must be a time"):
        parse_arg("set-activation-deadline", "deadline=next tuesday")
    pem = tmp_path / "operator.pub"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n...\n")
    assert parse_arg("rotate-key", f"public_key=@{pem}") == ("public_key", pem.read_text())
    args = validate("set-plan", dict(parse_arg("set-plan", a) for a in
                                     (f"iccid={iccid}", "bytes=5000000", "cycle_day=15")))
    assert args == {"iccid": iccid, "bytes": 5_000_000, "cycle_day": 15}
    text = describe()
    for name, schema in SCHEMAS.items():
        assert f"  {name}\n" in text + "\n" and all(f"      {k}" in text for k in schema)


def test_the_watch_table_says_dash_never_none() -> None:
    """A device whose state is not known yet (issue 11, item 2)."""
    table = watch.render([watch.Device("gw-1", "online", {"state": None, "suspension": None})],
                         now=0.0)
    assert "None" not in table and "gw-1" in table
