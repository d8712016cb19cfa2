"""The agent's links up: MQTT always (commands, state, results, and readings by default), and
the Unified Endpoint over HTTP for readings when ``[uplink] kind = "unified-endpoint"``.

Their long-running parts (the MQTT connection, the drains) run under the daemon's supervisor;
:meth:`Uplinks.stop` ends them and then says the retained ``offline``, at most once (a
decommission stops the uplinks before the daemon does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.core.config import Config
from agent.core.tasks import Supervisor
from agent.telemetry.drain import UplinkStats
from agent.telemetry.mqtt import MqttUplink
from agent.telemetry.outbox import Outbox, Reading

if TYPE_CHECKING:
    from agent.telemetry.http import HttpUplink


class Uplinks:
    def __init__(self, cfg: Config, outbox: Outbox, supervisor: Supervisor, *,
                 on_command: Callable[[bytes], None],
                 allow: Callable[[Reading], bool]) -> None:
        self._kind = cfg.uplink.kind
        self._supervisor = supervisor
        self._http: HttpUplink | None = None
        if cfg.uplink.kind == "unified-endpoint":
            from agent.telemetry.http import HttpUplink  # http.client only when it is used

            self._http = HttpUplink(cfg.uplink, cfg.device_id, outbox, allow=allow)
        self.mqtt = MqttUplink(cfg.uplink, cfg.device_id, outbox, on_command=on_command,
                               allow=allow, carry_readings=self._http is None)
        self._stopped: float | None = None
        self._stop_reason: str | None = None

    async def start(self) -> None:
        await self.mqtt.start(self._supervisor.spawn)
        if self._http is not None:
            await self._http.start(self._supervisor.spawn)

    async def stop(self, reason: str | None = None) -> None:
        """End the drains and the connection, then the retained ``offline``; at most once.
        ``reason``: why it stops while the agent runs on (``decommissioned``), for ``status``."""
        if self._stopped is not None:
            return
        self._stopped, self._stop_reason = time.time(), reason
        readings = self._http or self.mqtt
        await self._supervisor.stop(*readings.parts, *self.mqtt.parts)
        if self._http is not None:
            await self._http.stop()
        await self.mqtt.stop()

    @property
    def stats(self) -> UplinkStats:
        return (self._http or self.mqtt).stats

    def set_telemetry_allowed(self, allowed: bool) -> None:
        (self._http or self.mqtt).set_telemetry_allowed(allowed)

    def publish_result(self, result: dict[str, Any]) -> None:
        self.mqtt.publish_result(result)

    def publish_state(self, state: dict[str, Any]) -> asyncio.Future[None] | None:
        return self.mqtt.publish_state(state)

    @property
    def ready(self) -> bool:
        """The MQTT session is up (commands and results flow)."""
        return self.mqtt.ready

    def state(self) -> dict[str, Any]:
        """The ``uplink`` object of ``status``."""
        stats = self.stats
        connected = self.mqtt.ready and self._stopped is None
        http = self._http
        failing = http is not None and http.failing
        state = ("stopped" if self._stopped else "failing" if failing
                 else "connected" if connected else "connecting")
        errors = [(at, error) for at, error in (
            (self.mqtt.last_error_at, self.mqtt.last_error),
            (http and http.last_error_at, http and http.last_error)) if at and error]
        last_at, last_error = max(errors) if errors else (None, None)
        return {
            "kind": self._kind,
            "connected": connected,
            "state": state,
            "stop_reason": self._stop_reason,  # stopped on purpose: why (decommissioned)
            "connect_attempts": self.mqtt.connect_attempts,
            "protocol": self.mqtt.speaks,  # e.g. "MQTT 3.1.1 (the broker's only)"
            "readings_sent": stats.readings,
            "batches_sent": stats.batches,
            "last_error": last_error,  # why the last connection or POST failed, in words
            "last_error_at": last_at,
            **({"http_status": http.last_status} if http else {}),  # the last POST's answer
        }
