"""``fleet send``: sign a command for one or many devices, publish it on ``cmd`` (QoS 1), and
wait for each device's ``cmd/result`` with the same id.

Results are not signed: they say what a device answered as far as the broker can be trusted
(a command, on the other hand, cannot be forged by the broker).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from agent.commands.args import SCHEMAS
from agent.fleet.mqtt import BrokerOptions, FleetError, new_client, start, stop
from agent.fleet.sign import DEFAULT_TTL, encode, make_envelope

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class Outcome:
    device: str
    id: str
    result: dict[str, Any] | None  # None: no answer within the timeout

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.get("status") == "ok"

    def line(self) -> str:
        if self.result is None:
            return json.dumps({"device": self.device, "id": self.id, "status": "timeout",
                               "detail": "no result before the timeout"}, ensure_ascii=False)
        return json.dumps({"device": self.device, **self.result}, ensure_ascii=False)


def parse_arg(name: str, text: str) -> tuple[str, Any]:
    """``k=v`` for command ``name``: ``v`` read as the command's schema types ``k``
    (:mod:`agent.commands.args`: an ICCID stays a string, a time takes ISO 8601 or Unix
    seconds); ``k=@FILE`` is the file's text (a conformance list, a public key). A key the
    schema does not know keeps JSON's reading of ``v``, for the device to refuse by name."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                return key, f.read()
        except OSError as exc:
            raise ValueError(f"cannot read {value[1:]}: {exc.strerror}") from None
    field = SCHEMAS.get(name, {}).get(key)
    if field is not None:
        try:
            return key, field[1].parse(value)
        except ValueError:
            raise ValueError(f"{key} must be {field[1].doc}, not {value!r}") from None
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def send(opts: BrokerOptions, key: Ed25519PrivateKey, devices: Sequence[str], name: str,
         args: Mapping[str, Any], *, timeout: float = 30.0, ttl: int = DEFAULT_TTL,
         client_id: str = "") -> list[Outcome]:
    """Send to every device in ``devices`` and wait up to ``timeout`` seconds for all answers."""
    envelopes = {d: make_envelope(key, d, name, args, ttl=ttl) for d in dict.fromkeys(devices)}
    wanted = {(opts.topic(d, "cmd/result"), e["id"]): d for d, e in envelopes.items()}
    results: dict[str, dict[str, Any]] = {}
    cond = threading.Condition()
    subscribed = threading.Event()
    client = new_client(opts, client_id)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            res = json.loads(msg.payload)
        except ValueError:
            return
        device = wanted.get((msg.topic, res.get("id"))) if isinstance(res, dict) else None
        if device is not None:
            with cond:
                results.setdefault(device, res)
                cond.notify_all()

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    start(client, opts, timeout=min(timeout, 30.0))
    try:
        client.subscribe(opts.topic("+", "cmd/result"), qos=1)
        if not subscribed.wait(timeout):
            raise FleetError("broker did not confirm the subscription to cmd/result")
        for device, env in envelopes.items():
            client.publish(opts.topic(device, "cmd"), encode(env), qos=1)
        deadline = time.monotonic() + timeout
        with cond:
            while len(results) < len(envelopes) and (left := deadline - time.monotonic()) > 0:
                cond.wait(left)
    finally:
        stop(client)
    return [Outcome(d, e["id"], results.get(d)) for d, e in envelopes.items()]
