"""A RabbitMQ node of the tests' own, with its MQTT plugin, on loopback.

Its own node name, ports (MQTT, AMQP, distribution), config, enabled-plugins file, database
and logs, all under a temporary directory; the system's RabbitMQ (if any) is left alone. As
root the node is started through ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (the ``/usr/sbin``
wrapper switches to the rabbitmq user, who cannot read our directory). It inherits no pipe of
ours: its output goes to a file, so nothing of pytest waits on it. Starting takes seconds (the
Erlang VM), so one node serves a whole test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from agent.fleet.localbroker import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT = 120.0  # a cold Erlang VM on a loaded 2-core machine


def rabbitmq_server() -> str | None:
    return SERVER if os.access(SERVER, os.X_OK) else None


class Rabbit:
    """``port``: its MQTT listener (anonymous: the guest user, from loopback only)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.amqp_port, self.dist_port = free_port(), free_port()
        self.node = f"simkeeper-test-{self.port}@localhost"
        self.log = directory / "rabbit.out"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = {self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\nmqtt.default_pass = guest\n"
            "mqtt.vhost = /\nmqtt.exchange = amq.topic\n"
            "log.console = false\n"
        )
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = rabbitmq_server()
        assert server is not None
        d = self.directory
        env = {
            **os.environ,
            "HOME": str(d),  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([server], env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ did not start: {tail}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        """An MQTT 3.1.1 CONNECT gets its CONNACK (the plugin is up, not only the port)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x0a\x00\x04ping")
                return s.recv(4)[:1] == b"\x20"
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(30)
                break
            except subprocess.TimeoutExpired:
                continue
