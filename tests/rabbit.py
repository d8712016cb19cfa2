"""A RabbitMQ node of the tests' own, with its MQTT plugin, on loopback.

Its own node name, ports (MQTT, AMQP, distribution), config, enabled-plugins file, database
and logs, all under a temporary directory; the system's RabbitMQ (if any) is left alone. As
root the node is started through ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (the ``/usr/sbin``
wrapper switches to the rabbitmq user, who cannot read our directory). It inherits no pipe of
ours: its output goes to a file, so nothing of pytest waits on it. Starting takes seconds (the
Erlang VM), so one node serves a whole test module.

Each test still gets a broker of its own: a :class:`Vhost`, the node's MQTT listener on a port
of its own that the plugin maps to a virtual host of its own (``mqtt_port_to_vhost_mapping``,
loaded with the vhosts from a definitions file at boot). Retained messages and MQTT sessions
live in a virtual host, so no test sees another's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent.fleet.localbroker import free_port

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
START_TIMEOUT = 120.0  # a cold Erlang VM on a loaded 2-core machine


def rabbitmq_server() -> str | None:
    return SERVER if os.access(SERVER, os.X_OK) else None


def _password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: a 4-byte salt, then SHA-256 of it and
    the password, in base64."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class Vhost:
    """One test's broker on a shared node: ``port``, its MQTT listener (anonymous: the guest
    user, from loopback only), is mapped to the virtual host ``name`` and no other."""

    name: str
    port: int


class Rabbit:
    """A node with ``vhosts`` MQTT listeners, one per virtual host; :meth:`take` hands each
    out once."""

    def __init__(self, directory: Path, vhosts: int = 1) -> None:
        self.directory = directory
        self.vhosts = [Vhost(f"test-{n}", free_port()) for n in range(vhosts)]
        self._free = list(self.vhosts)
        self.amqp_port, self.dist_port = free_port(), free_port()
        self.node = f"simkeeper-test-{self.amqp_port}@localhost"
        self.log = directory / "rabbit.out"
        directory.mkdir(parents=True, exist_ok=True)
        names = ["/", *(v.name for v in self.vhosts)]
        definitions = {  # a node with definitions to load seeds no default user or vhost
            "users": [{"name": "guest", "password_hash": _password_hash("guest"),
                       "hashing_algorithm": "rabbit_password_hashing_sha256",
                       "tags": ["administrator"]}],
            "vhosts": [{"name": name} for name in names],
            "permissions": [{"user": "guest", "vhost": name, "configure": ".*",
                             "write": ".*", "read": ".*"} for name in names],
            "global_parameters": [{"name": "mqtt_port_to_vhost_mapping",
                                   "value": {str(v.port): v.name for v in self.vhosts}}],
        }
        (directory / "definitions.json").write_text(json.dumps(definitions))
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.amqp_port}\n"
            + "".join(f"mqtt.listeners.tcp.{n} = {v.port}\n" for n, v in enumerate(self.vhosts))
            + "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\nmqtt.default_pass = guest\n"
            "mqtt.vhost = /\nmqtt.exchange = amq.topic\n"
            f"load_definitions = {directory / 'definitions.json'}\n"
            "log.console = false\n"
        )
        (directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def take(self) -> Vhost:
        """A virtual host no test has had yet."""
        if not self._free:
            raise RuntimeError(f"all {len(self.vhosts)} virtual hosts of the node are taken")
        return self._free.pop(0)

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
        while not all(self._answers(v.port) for v in self.vhosts):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ did not start: {tail}")
            time.sleep(0.2)

    @staticmethod
    def _answers(port: int) -> bool:
        """An MQTT 3.1.1 CONNECT gets its CONNACK accepting it (the plugin is up, not only the
        port, and the port's virtual host is there and open to the guest user)."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x0a\x00\x04ping")
                return s.recv(4) == b"\x20\x02\x00\x00"
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
