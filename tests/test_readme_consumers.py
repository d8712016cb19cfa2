"""The README's consumers (issue 11, item 14), run as written: the Python one on telemetry and
the shell one on events, against a real broker carrying batches both plain and compressed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.telemetry.batch import encode_entries
from tests.broker import Broker, wait_until

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(after: str, lang: str) -> str:
    found = re.search(re.escape(after) + r".*?```" + lang + r"\n(.*?)```", README, re.S)
    assert found, f"no {lang} block after {after!r} in the README"
    return found.group(1)


def _publish(port: int, topic: str, readings: list[tuple[str, str, object]]) -> None:
    """One plain and one compressed batch (zlib only pays on a long one)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for compress in (False, True):
            entries = [json.dumps({"id": f"{i}-{compress}", "ts": 1.0, "topic": t, "data": d})
                       for i, t, d in readings]
            batch = encode_entries("gw-1", [f"{i}-{compress}" for i, _t, _d in readings],
                                   entries, compress=compress)
            assert (batch.payload[:1] == b"{") != compress
            client.publish(f"simkeeper/gw-1/{topic}", batch.payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _consume(argv: list[str], out: Path, port: int, topic: str, *,
             readings: list[tuple[str, str, object]], want: list[str]) -> list[str]:
    """Run the consumer; once it is subscribed (it printed a marker batch, published again
    until it does), publish ``readings`` and wait for every line in ``want``."""
    with out.open("w") as sink:
        # its own process group: the shell consumer's mosquitto_sub dies with it
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while "marker" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            _publish(port, topic, [("m", "marker", 0)])
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: "marker" in out.read_text(), 0.5)
        _publish(port, topic, readings)
        wait_until(lambda: all(w in out.read_text() for w in want), what=f"{want} printed")
        return out.read_text().splitlines()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_python_consumer(broker: Broker, tmp_path: Path) -> None:
    code = _block("A consumer in Python", "python").replace('"BROKER", 1883',
                                                            f'"127.0.0.1", {broker.port}')
    script = tmp_path / "consumer.py"
    script.write_text(code)
    readings = [("r1", "sensors/a", {"t": 21.5}), ("r2", "sensors/b", [1, "x"])]
    topic = "simkeeper/gw-1/telemetry"
    want = [f"{topic} r1-False sensors/a {{'t': 21.5}}", f"{topic} r2-True sensors/b [1, 'x']"]
    _consume([sys.executable, "-u", str(script)], tmp_path / "out", broker.port, "telemetry",
             readings=readings, want=want)


def test_the_shell_consumer(broker: Broker, tmp_path: Path) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (make deps installs mosquitto-clients)")
    code = _block("And in shell", "sh").replace("-h BROKER", f"-h 127.0.0.1 -p {broker.port}")
    events = [("e1", "suspend", {"kind": "suspend", "to": "suspended"})]
    want = ['suspend {"kind": "suspend", "to": "suspended"}']
    lines = _consume(["sh", "-c", code], tmp_path / "out", broker.port, "events",
                     readings=events, want=want)
    assert lines.count(want[0]) == 2, lines  # the plain batch and the compressed one


def _section(title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert found, f"no section {title!r} in the README"
    return found.group(1)


def test_the_readme_names_every_command_and_the_emitted_events() -> None:
    """What an operator reads is what the agent takes and says: every command name of the one
    schema, and every event kind the agent emits by name, appear in the README's lists."""
    from agent.commands.args import NAMES

    commands = _section("Commands")
    assert not [n for n in sorted(NAMES) if f"`{n}`" not in commands]
    emitted = set()
    for source in (Path(__file__).resolve().parents[1] / "agent").rglob("*.py"):
        emitted.update(re.findall(r'emit\(\s*"([a-z-]+)"', source.read_text()))
    assert "at-command" in emitted  # the scan finds them
    topics = _section("What each topic carries")
    assert not [k for k in sorted(emitted) if f"`{k}`" not in topics]
