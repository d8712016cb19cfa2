"""The MQTT uplink's link: mutual TLS, the last will, reconnect backoff, profile settings."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.backoff import Backoff
from agent.core.config import ConfigError, parse
from agent.fleet.localbroker import free_port
from agent.telemetry.mqtt import MqttUplink
from drivers.simulator import SimulatedModem
from tests.broker import (
    Broker,
    Kicker,
    Pki,
    Subscriber,
    open_outbox,
    until,
    uplink_settings,
    wait_until,
)
from tests.test_daemon import Agent, until_async

REPO = Path(__file__).resolve().parent.parent


async def test_mutual_tls_connects_and_delivers(
    tls_broker: Broker, pki: Pki, tmp_path: Path
) -> None:
    sub = Subscriber(tls_broker.port, "simkeeper/#", tls=(pki.ca, pki.client_cert, pki.client_key))
    settings = uplink_settings(
        tls_broker.port,
        tls=True,
        allow_plain=False,
        ca=pki.ca,
        cert=pki.client_cert,
        key=pki.client_key,
    )
    outbox = open_outbox(tmp_path)
    uplink = MqttUplink(settings, "gw-test", outbox)
    await uplink.start()
    try:
        ids = outbox.add([("telemetry", "t", '{"ok":true}', 1.0, 0)])
        await until(lambda: [r["id"] for r in sub.readings()] == ids, "the reading over TLS")
        assert [m.payload for m in sub.on("status")] == [b"online"]
    finally:
        await uplink.stop()
        sub.close()


@pytest.mark.parametrize(("case", "why"), [
    ("certificate from another CA", "the broker does not trust this device's certificate "
                                    "(unknown CA"),
    ("no certificate", "the broker requires a client certificate"),
    ("plain TCP", "closed before CONNACK"),
])
async def test_tls_broker_refuses(
    tls_broker: Broker, pki: Pki, tmp_path: Path, case: str, why: str
) -> None:
    """Refused, and the uplink says why in words when the TLS layer knows (issue 11, item 3)."""
    if case == "plain TCP":
        settings = uplink_settings(tls_broker.port)
    else:
        cert, key = (pki.rogue_cert, pki.rogue_key) if "another" in case else (None, None)
        settings = uplink_settings(
            tls_broker.port, tls=True, allow_plain=False, ca=pki.ca, cert=cert, key=key
        )
    sub = Subscriber(tls_broker.port, "simkeeper/#", tls=(pki.ca, pki.client_cert, pki.client_key))
    uplink = MqttUplink(settings, "gw-test", open_outbox(tmp_path))
    await uplink.start()
    try:
        await until(lambda: uplink.connect_attempts >= 3, "several refused attempts")
        assert not uplink.ready
        assert sub.on("status") == []
        assert uplink.last_error is not None and why in uplink.last_error
    finally:
        await uplink.stop()
        sub.close()


async def test_server_certificate_is_verified(broker: Broker, pki: Pki, tmp_path: Path) -> None:
    """An uplink configured for TLS never falls back to plain against a plain listener."""
    settings = uplink_settings(
        broker.port,
        tls=True,
        allow_plain=False,
        ca=pki.ca,
        cert=pki.client_cert,
        key=pki.client_key,
    )
    sub = Subscriber(broker.port, "simkeeper/#")
    uplink = MqttUplink(settings, "gw-test", open_outbox(tmp_path))
    await uplink.start()
    try:
        await until(lambda: uplink.connect_attempts >= 3, "several failed handshakes")
        assert not uplink.ready and sub.on("status") == []
        assert uplink.last_error is not None and "failed" in uplink.last_error
    finally:
        await uplink.stop()
        sub.close()


async def test_broker_certificate_from_another_ca(tls_broker: Broker, pki: Pki,
                                                  tmp_path: Path) -> None:
    """A broker whose certificate the configured CA did not sign: named as such."""
    settings = uplink_settings(tls_broker.port, tls=True, allow_plain=False, ca=pki.rogue_cert,
                               cert=pki.client_cert, key=pki.client_key)
    uplink = MqttUplink(settings, "gw-test", open_outbox(tmp_path))
    await uplink.start()
    try:
        await until(lambda: uplink.connect_attempts >= 2, "failed handshakes")
        assert not uplink.ready
        assert uplink.last_error is not None
        assert "not signed by the CA in uplink.ca (unknown CA)" in uplink.last_error
    finally:
        await uplink.stop()


_AGENT = """
import asyncio, sys
from pathlib import Path
from agent.telemetry.mqtt import MqttUplink
from drivers.simulator import SimulatedModem
from tests.broker import open_outbox, uplink_settings

async def main() -> None:
    settings = uplink_settings(int(sys.argv[1]))
    uplink = MqttUplink(settings, "gw-test", open_outbox(Path(sys.argv[2])))
    await uplink.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_last_will_marks_a_killed_agent_offline(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "simkeeper/gw-test/status")
    proc = subprocess.Popen(
        [sys.executable, "-c", _AGENT, str(broker.port), str(tmp_path)], cwd=REPO
    )
    try:
        wait_until(lambda: [m.payload for m in sub.messages] == [b"online"], what="online")
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        proc.wait()
        wait_until(lambda: len(sub.messages) == 2, what="the last will")
        assert sub.messages[-1].payload == b"offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sub.close()
    late = Subscriber(broker.port, "simkeeper/gw-test/status")
    try:
        wait_until(lambda: len(late.messages) == 1, what="the retained status")
        assert late.messages[0].payload == b"offline" and late.messages[0].retain
    finally:
        late.close()


@pytest.mark.parametrize("far_end", ["broker down", "broker kicks after CONNACK"])
async def test_reconnects_back_off_without_a_storm(tmp_path: Path, far_end: str) -> None:
    """Neither a refused connection nor one kicked right after CONNACK (no PUBACK came) resets
    the backoff: it grows over the attempts. A storm (no backoff, or one reset by each short-lived
    connection) would keep it at its first step."""
    kicker = Kicker() if far_end.startswith("broker kicks") else None
    port = kicker.port if kicker else free_port()
    backoff = Backoff(0.01, 3600.0)
    uplink = MqttUplink(uplink_settings(port), "gw-test", open_outbox(tmp_path), backoff=backoff)
    await uplink.start()
    try:
        await until(lambda: uplink.connect_attempts >= 6, "six attempts")
        assert backoff.attempts >= 5  # one delay before each attempt after the first
        if kicker:  # each attempt got through to CONNACK and was kicked
            assert kicker.accepted >= 5
    finally:
        await uplink.stop()
        if kicker:
            kicker.close()


async def test_rejoins_a_broker_restarted_again_and_again_at_once(
    broker: Broker, tmp_path: Path
) -> None:
    """A PUBACK proves a connection, and its loss starts the backoff from the bottom again. The
    backoff here would grow towards an hour: a reset missed at any restart leaves the uplink
    waiting out a grown delay, and the wait for it to come back gives up."""
    backoff = Backoff(0.05, 3600.0)
    uplink = MqttUplink(
        uplink_settings(broker.port), "gw-test", open_outbox(tmp_path), backoff=backoff
    )
    await uplink.start()
    try:
        for restart in range(6):
            # attempts == 0: reset by the PUBACK of this connection's "online"
            await until(lambda: uplink.ready and backoff.attempts == 0, f"connection {restart}")
            broker.kill()
            refused = uplink.connect_attempts + 4  # the backoff grows while the broker is down
            await until(lambda n=refused: uplink.connect_attempts >= n, "refused attempts")
            broker.start()
        await until(lambda: uplink.ready and backoff.attempts == 0, "the last connection")
    finally:
        await uplink.stop()


@pytest.mark.parametrize("keepalive", [0, 4, 1201])
def test_beam_profile_refuses_keepalive_outside_5_to_1200(keepalive: int) -> None:
    text = (
        f'device_id = "gw"\n[uplink]\nprofile = "beam"\nallow_plain = true\nkeepalive = {keepalive}'
    )
    with pytest.raises(ConfigError, match="keepalive"):
        parse(text)


def test_plain_mqtt_off_loopback_needs_allow_plain() -> None:
    with pytest.raises(ConfigError, match="allow_plain"):
        parse('device_id = "gw"\n[uplink]\nhost = "broker.example.com"')
    assert parse('device_id = "gw"\n[uplink]\nhost = "beam.soracom.io"\nallow_plain = true')


async def test_status_says_why_the_broker_refuses(tls_broker: Broker, pki: Pki,
                                                 tmp_path: Path) -> None:
    """The operator's step (issue 11, item 3): a device certificate from another CA; the agent's
    log and `simkeeper status` say the broker does not trust it, in words."""
    async with SimulatedModem("quectel", link=tmp_path / "modem", boot_seconds=0.2) as _sim:
        agent = Agent(tmp_path, tls_broker.port, str(tmp_path / "modem"))
        agent.config.write_text(agent.config.read_text().replace("[uplink]\n", (
            f'[uplink]\ntls = true\nca = "{pki.ca}"\ncert = "{pki.rogue_cert}"\n'
            f'key = "{pki.rogue_key}"\n')))
        await agent.start()
        try:
            async def said() -> bool:
                up = (await agent.status())["uplink"] or {}
                return "unknown CA" in (up.get("last_error") or "")

            await until_async(said, "the reason in status")
            text = (await agent.cli("status")).stdout
            assert "the broker does not trust this device's certificate" in text, text
            assert "the broker does not trust this device's certificate" in agent.log.read_text()
        finally:
            await agent.stop()
