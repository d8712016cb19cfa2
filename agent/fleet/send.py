"""``fleet send``: sign a command for one or many devices, publish it on ``cmd`` (QoS 1), and
wait for each device's ``cmd/result`` with the same id.

Results are not signed: they say what a device answered as far as the broker can be trusted
(a command, on the other hand, cannot be forged by the broker).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from agent.commands.args import SCHEMAS
from agent.fleet.mqtt import BrokerOptions, FleetError, connect, stop
from agent.fleet.sign import DEFAULT_TTL, encode, make_envelope

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class Outcome:
    device: str
    id: str
    result: dict[str, Any] | None  # None: no answer within the timeout
    queued: bool = False  # the device was offline: the broker holds the command for it

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.get("status") == "ok"

    def line(self) -> str:
        if self.result is None and self.queued:
            return json.dumps({"device": self.device, "id": self.id, "status": "queued",
                               "detail": "device offline; the broker holds the command for it"},
                              ensure_ascii=False)
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


RESEND_MIN, RESEND_MAX = 2.0, 60.0  # seconds between publishes of one command (beam)


def send(opts: BrokerOptions, key: Ed25519PrivateKey, devices: Sequence[str], name: str,
         args: Mapping[str, Any], *, timeout: float = 30.0, ttl: int = DEFAULT_TTL,
         client_id: str = "", profile: str = "default",
         say: Callable[[str], None] = lambda _line: None) -> list[Outcome]:
    """Send to every device in ``devices`` and wait up to ``timeout`` seconds for all answers.

    A device whose retained ``status`` is ``offline`` is named at once through ``say``, with
    what becomes of its command. With ``profile="default"`` the broker keeps the command in
    the device's session until it is back (its outcome is ``queued``, not waited for). With
    ``"beam"`` (SORACOM Beam keeps no session) the same envelope is published again, with
    backoff, until it is answered, it expires or ``timeout`` ends; the device runs it once."""
    envelopes = {d: make_envelope(key, d, name, args, ttl=ttl) for d in dict.fromkeys(devices)}
    sending = _Sending(opts, envelopes)
    sending.client = connect(opts, sending.attach, client_id=client_id,
                             timeout=min(timeout, 30.0))
    try:
        away = sending.subscribe(timeout)
        for device in sorted(away):
            say(_offline_line(device, envelopes[device], profile))
        sending.publish(envelopes)
        beam = profile == "beam"
        sending.wait([d for d in envelopes if beam or d not in away], timeout, resend=beam)
    finally:
        stop(sending.client)
    return [Outcome(d, e["id"], sending.results.get(d), queued=d in away and not beam)
            for d, e in envelopes.items()]


def _offline_line(device: str, envelope: Mapping[str, Any], profile: str) -> str:
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(envelope["expires_at"]))
    if profile == "beam":
        then = ("fleet send publishes it again until the device answers, the command expires"
                f" ({until}) or --timeout ends")
    else:
        then = ("the broker keeps the command in the device's session; the device runs it when"
                f" it is back, if that is before it expires ({until}); raise --ttl for longer")
    return f"{device}: offline (its retained status); {then}"


class _Sending:
    """One ``send``: the devices' retained statuses, their results, on paho's thread."""

    client: mqtt.Client

    def __init__(self, opts: BrokerOptions, envelopes: Mapping[str, Mapping[str, Any]]) -> None:
        self.opts, self.envelopes = opts, envelopes
        self._wanted = {(opts.topic(d, "cmd/result"), e["id"]): d for d, e in envelopes.items()}
        self._status_of = {opts.topic(d, "status"): d for d in envelopes}
        self.results: dict[str, dict[str, Any]] = {}
        self._offline: set[str] = set()
        self._cond = threading.Condition()
        self._subscribed = threading.Semaphore(0)

    def attach(self, client: mqtt.Client) -> None:
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a: self._subscribed.release()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic in self._status_of:
            device = self._status_of[msg.topic]
            with self._cond:
                (self._offline.add if msg.payload == b"offline" else self._offline.discard)(device)
            return
        try:
            res = json.loads(msg.payload)
        except ValueError:
            return
        answered = self._wanted.get((msg.topic, res.get("id"))) if isinstance(res, dict) else None
        if answered is not None:
            with self._cond:
                self.results.setdefault(answered, res)
                self._cond.notify_all()

    def subscribe(self, timeout: float) -> set[str]:
        """Subscribe to the devices' statuses and results; the devices whose retained status
        says ``offline``. Exact status topics: a broker may serve retained messages only to
        those (RabbitMQ 3.x); they arrive before the SUBACK of the next subscription."""
        for topics in ([(t, 1) for t in self._status_of],
                       [(self.opts.topic("+", "cmd/result"), 1)]):
            self.client.subscribe(topics)
            if not self._subscribed.acquire(timeout=timeout):
                raise FleetError("broker did not confirm the subscriptions")
        with self._cond:
            return set(self._offline)

    def publish(self, envelopes: Mapping[str, Mapping[str, Any]]) -> None:
        for device, env in envelopes.items():
            self.client.publish(self.opts.topic(device, "cmd"), encode(env), qos=1)

    def wait(self, waited: Sequence[str], timeout: float, *, resend: bool) -> None:
        """Until every device in ``waited`` has answered or ``timeout`` ends; with ``resend``,
        the unanswered and unexpired commands go again, each after twice the pause before."""
        now = time.monotonic()
        deadline, pause = now + timeout, RESEND_MIN
        again = now + pause if resend else deadline
        with self._cond:
            while any(d not in self.results for d in waited):
                now = time.monotonic()
                if now >= deadline:
                    return
                if now >= again:
                    missing = {d: e for d, e in self.envelopes.items()
                               if d not in self.results and e["expires_at"] > time.time()}
                    if not missing:
                        return
                    self.publish(missing)
                    pause = min(pause * 2, RESEND_MAX)
                    again = now + pause
                self._cond.wait(min(deadline, again) - now)
