"""The ``[metrics]`` table of the configuration (agent.core.config): the agent's Prometheus
metrics (agent.commands.metrics) as a node_exporter textfile and on a local HTTP port, each off
while its key is absent.

``listen`` is an IP address (``[...]`` around IPv6) or ``localhost``, and a port. The metrics
name the SIMs (ICCIDs) and the page has no authentication, so an address other than loopback
(``0.0.0.0``, the gateway's LAN address) is refused unless ``allow_remote = true`` says the
operator means it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.checks import (
    ConfigError,
    bad,
    boolean,
    build,
    file_path,
    number_between,
    spec,
)
from agent.core.uplink_config import _is_loopback

_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[0-9.]+|localhost):([0-9]{1,5})")


def _textfile(value: Any, key: str) -> Path:
    path = file_path(value, key)
    if path.suffix != ".prom":  # node_exporter's textfile collector reads *.prom only
        raise bad(key, "a .prom file path (node_exporter reads *.prom only)", value)
    return path


def _listen(value: Any, key: str) -> str:
    found = _LISTEN.fullmatch(value) if isinstance(value, str) else None
    try:
        if found is None or not 1 <= int(found[2]) <= 65535:
            raise ValueError
        if found[1] != "localhost":
            ipaddress.ip_address(found[1].strip("[]"))
    except ValueError:
        raise bad(key, 'an IP address and port such as "127.0.0.1:9101"', value) from None
    return str(value)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    textfile: Path | None = field(default=None, metadata=spec(_textfile))
    # how often the textfile is written, seconds
    interval: float = field(default=60.0, metadata=spec(number_between(1, 86400)))
    listen: str | None = field(default=None, metadata=spec(_listen))
    allow_remote: bool = field(default=False, metadata=spec(boolean))

    @property
    def address(self) -> tuple[str, int] | None:
        """``listen`` as (host, port) for a server to bind, None when it is off."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def metrics_table(value: Any, key: str) -> MetricsConfig:
    """The table's check: its keys, then a non-loopback ``listen`` only with ``allow_remote``."""
    metrics = build(MetricsConfig, value, key)
    if (address := metrics.address) is not None and not metrics.allow_remote \
            and not _is_loopback(address[0]):
        raise ConfigError(
            f"{key}.listen: {address[0]} is not a loopback address; the metrics name the SIMs"
            " and have no authentication: set allow_remote = true to serve them there"
        )
    return metrics
