"""The ``[uplink]`` table of the configuration (agent.core.config): its keys and the checks
across them."""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from agent.core.checks import (
    ConfigError,
    bad,
    boolean,
    file_path,
    int_between,
    matches,
    num_text,
    number_between,
    one_of,
    spec,
    topic_name,
    url_value,
)

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    kind: str = field(default="mqtt", metadata=spec(one_of("mqtt", "unified-endpoint")))
    host: str = field(
        default="127.0.0.1",
        metadata=spec(matches(r"[A-Za-z0-9.:\-\[\]]{1,253}", "a host name or address")),
    )
    port: int = field(default=1883, metadata=spec(int_between(1, 65535)))
    profile: str = field(default="default", metadata=spec(one_of("default", "beam")))
    prefix: str = field(default="simkeeper", metadata=spec(topic_name))
    tls: bool = field(default=False, metadata=spec(boolean))
    ca: Path | None = field(default=None, metadata=spec(file_path))
    cert: Path | None = field(default=None, metadata=spec(file_path))
    key: Path | None = field(default=None, metadata=spec(file_path))
    allow_plain: bool = field(default=False, metadata=spec(boolean))
    keepalive: int = field(default=240, metadata=spec(int_between(5, 65535)))
    # seconds the broker keeps our session (and commands sent) while we are away; 0: clean
    session_expiry: int = field(default=259200, metadata=spec(int_between(0, 0xFFFFFFFF)))
    client_id: str = field(
        default="",
        metadata=spec(matches(r"[A-Za-z0-9_.:\-]{1,128}", "1-128 of A-Z a-z 0-9 _ . : -")),
    )
    username: str | None = field(
        default=None, metadata=spec(matches(r".{1,256}", "1-256 characters"))
    )
    password_file: Path | None = field(default=None, metadata=spec(file_path))
    batch_max_count: int = field(default=100, metadata=spec(int_between(1, 10_000)))
    batch_max_bytes: int = field(default=16384, metadata=spec(int_between(256, 16 * MIB)))
    batch_max_latency: float = field(default=5.0, metadata=spec(number_between(0, 3600)))
    rate_messages_per_minute: int = field(default=60, metadata=spec(int_between(1, 100_000)))
    rate_bytes_per_minute: int = field(default=262144, metadata=spec(int_between(1024, 1 << 30)))
    reconnect_min: float = field(default=1.0, metadata=spec(number_between(0.1, 3600)))
    reconnect_max: float = field(default=300.0, metadata=spec(number_between(1, 86400)))
    http_url: str = field(default="http://uni.soracom.io", metadata=spec(url_value))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_uplink(up: UplinkConfig) -> None:
    """What no one key says alone: TLS files with tls, plain only where it is safe, ..."""
    if up.profile == "beam" and not 5 <= up.keepalive <= 1200:
        raise bad("uplink.keepalive", '5-1200 with profile = "beam"', up.keepalive)
    if up.reconnect_max < up.reconnect_min:
        raise bad(
            "uplink.reconnect_max",
            f"at least reconnect_min ({num_text(up.reconnect_min)})",
            up.reconnect_max,
        )
    if up.rate_bytes_per_minute < up.batch_max_bytes:
        raise ConfigError(
            f"uplink.rate_bytes_per_minute: {up.rate_bytes_per_minute} is below batch_max_bytes"
            f" ({up.batch_max_bytes}); a full batch could never be sent"
        )
    for name in ("ca", "cert", "key"):
        if getattr(up, name) is not None and not up.tls:
            raise ConfigError(f"uplink.{name}: set, but uplink.tls is false")
    if (up.cert is None) != (up.key is None):
        raise ConfigError("uplink.cert: cert and key go together (mutual TLS needs both)")
    if not up.tls and not up.allow_plain and not _is_loopback(up.host):
        raise ConfigError(
            f"uplink.allow_plain: MQTT without TLS to {up.host} needs allow_plain = true"
            " (only inside a carrier network such as SORACOM Beam)"
        )
    url = urllib.parse.urlsplit(up.http_url)
    if (
        up.kind == "unified-endpoint"
        and url.scheme == "http"
        and not up.allow_plain
        and not _is_loopback(url.hostname or "")
    ):
        raise ConfigError(
            f"uplink.allow_plain: plain HTTP to {url.hostname} needs allow_plain = true"
            " (uni.soracom.io is only reachable inside the SORACOM network)"
        )
