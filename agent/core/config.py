"""The agent's configuration: TOML, validated at load into frozen dataclasses.

Every key is declared once, on its dataclass field, with its default and its check. A wrong
key, type or value raises :class:`ConfigError` naming the key and the reason, e.g.
``uplink.port: expected an integer 1-65535, got "x"``; unknown keys are refused. The commented
reference (every key, its default, what it does) is ``packaging/config.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
import urllib.parse
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agent.core.readings import PRIORITY_MAX, PRIORITY_MIN, topic_problem

DEFAULT_PATH = Path("/etc/simkeeper/config.toml")
ENV_VAR = "SIMKEEPER_CONFIG"
MIB = 1 << 20
SOCKET_PATH_MAX = 100  # sun_path holds 107 bytes; the agent binds a slightly longer temp name

T = TypeVar("T")
Check = Callable[[Any, str], Any]  # (raw value, dotted key) -> value, or raise ConfigError


class ConfigError(Exception):
    """A config the agent refuses: the message names the key and the reason."""


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _bad(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {_show(value)}")


def _int(lo: int, hi: int) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(key, f"an integer {lo}-{hi}", value)
        return value

    return check


def _number(lo: float, hi: float) -> Check:
    def check(value: Any, key: str) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            raise _bad(key, f"a number {_num(lo)}-{_num(hi)}", value)
        return float(value)

    return check


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, "true or false", value)
    return value


def _choice(*choices: str) -> Check:
    def check(value: Any, key: str) -> str:
        if value not in choices:
            raise _bad(key, " or ".join(f'"{c}"' for c in choices), value)
        return str(value)

    return check


def _text(pattern: str, what: str) -> Check:
    regex = re.compile(pattern)

    def check(value: Any, key: str) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise _bad(key, what, value)
        return value

    return check


def _path(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _bad(key, "a file path", value)
    return Path(value)


def _topic(value: Any, key: str) -> str:
    if problem := topic_problem(value):
        raise _bad(key, f"a topic ({problem})", value)
    return str(value)


def _timezone(value: Any, key: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise _bad(key, 'an IANA time zone name such as "Asia/Tokyo"', value) from None
    return str(value)


def _url(value: Any, key: str) -> str:
    parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(key, "an http:// or https:// URL", value)
    return str(value)


def canonical_iccid(text: str) -> str:
    """An ICCID as the agent keys it: trimmed, upper case, padding ``F`` removed."""
    return text.strip().upper().rstrip("F")


def _iccid(value: Any, key: str) -> str:
    iccid = canonical_iccid(value) if isinstance(value, str) else ""
    if not re.fullmatch(r"\d{18,22}", iccid):
        raise _bad(key, "an ICCID of 18-22 digits", value)
    return iccid


def _list(check: Check, *, max_len: int = 64) -> Check:
    def check_list(value: Any, key: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or len(value) > max_len:
            raise _bad(key, f"a list of at most {max_len} entries", value)
        return tuple(check(item, f"{key}[{i}]") for i, item in enumerate(value))

    return check_list


def _table(cls: type[Any]) -> Check:
    return lambda value, key: _build(cls, value, key)


def spec(check: Check) -> dict[str, Check]:
    """A field's metadata: how to check its raw value."""
    return {"check": check}


def _build(cls: type[T], raw: Any, where: str) -> T:
    if not isinstance(raw, dict):
        raise _bad(where or "config", "a table", raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in raw:
        if name not in fields:
            raise ConfigError(f"{_key(where, name)}: unknown key")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = spec.metadata["check"](raw[name], _key(where, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_key(where, name)}: missing (required)")
    return cls(**values)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# -- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModemConfig:
    port: str = field(
        default="auto", metadata=spec(_text(r"\S.*", '"auto", a device path or a pyserial URL'))
    )
    baud: int = field(default=115200, metadata=spec(_int(300, 4_000_000)))
    data_path: str = field(
        default="networkmanager", metadata=spec(_choice("networkmanager", "agent", "external"))
    )
    interface: str = field(
        default="wwan0", metadata=spec(_text(r"[A-Za-z0-9_.:\-]{1,15}", "a network interface name"))
    )
    nm_connection: str | None = field(
        default=None, metadata=spec(_text(r"[^\0\n]{1,200}", "a NetworkManager connection name"))
    )
    # how often a modem session reads the modem (state, signal, counters), seconds
    poll_interval: float = field(default=60.0, metadata=spec(_number(1, 86400)))


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    kind: str = field(default="mqtt", metadata=spec(_choice("mqtt", "unified-endpoint")))
    host: str = field(
        default="127.0.0.1",
        metadata=spec(_text(r"[A-Za-z0-9.:\-\[\]]{1,253}", "a host name or address")),
    )
    port: int = field(default=1883, metadata=spec(_int(1, 65535)))
    profile: str = field(default="default", metadata=spec(_choice("default", "beam")))
    prefix: str = field(default="simkeeper", metadata=spec(_topic))
    tls: bool = field(default=False, metadata=spec(_bool))
    ca: Path | None = field(default=None, metadata=spec(_path))
    cert: Path | None = field(default=None, metadata=spec(_path))
    key: Path | None = field(default=None, metadata=spec(_path))
    allow_plain: bool = field(default=False, metadata=spec(_bool))
    keepalive: int = field(default=240, metadata=spec(_int(5, 65535)))
    client_id: str = field(
        default="", metadata=spec(_text(r"[A-Za-z0-9_.:\-]{1,128}", "1-128 of A-Z a-z 0-9 _ . : -"))
    )
    username: str | None = field(
        default=None, metadata=spec(_text(r".{1,256}", "1-256 characters"))
    )
    password_file: Path | None = field(default=None, metadata=spec(_path))
    batch_max_count: int = field(default=100, metadata=spec(_int(1, 10_000)))
    batch_max_bytes: int = field(default=16384, metadata=spec(_int(256, 16 * MIB)))
    batch_max_latency: float = field(default=5.0, metadata=spec(_number(0, 3600)))
    rate_messages_per_minute: int = field(default=60, metadata=spec(_int(1, 100_000)))
    rate_bytes_per_minute: int = field(default=262144, metadata=spec(_int(1024, 1 << 30)))
    reconnect_min: float = field(default=1.0, metadata=spec(_number(0.1, 3600)))
    reconnect_max: float = field(default=300.0, metadata=spec(_number(1, 86400)))
    http_url: str = field(default="http://uni.soracom.io", metadata=spec(_url))


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path = field(default=Path("/var/lib/simkeeper/simkeeper.db"), metadata=spec(_path))


@dataclass(frozen=True, slots=True)
class IngestConfig:
    socket: Path = field(default=Path("/run/simkeeper/ingest.sock"), metadata=spec(_path))
    group: str | None = field(
        default=None, metadata=spec(_text(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,31}", "a group name"))
    )
    max_reading_bytes: int = field(default=65536, metadata=spec(_int(256, 16 * MIB)))
    max_clients: int = field(default=64, metadata=spec(_int(1, 4096)))
    client_timeout: float = field(default=60.0, metadata=spec(_number(1, 3600)))


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    max_bytes: int = field(default=64 * MIB, metadata=spec(_int(MIB, 1 << 40)))
    max_age: float = field(default=7 * 86400.0, metadata=spec(_number(60, 366 * 86400)))
    drop_policy: str = field(
        default="oldest-lowest-priority", metadata=spec(_choice("oldest-lowest-priority"))
    )


@dataclass(frozen=True, slots=True)
class Threshold:
    share: float = field(metadata=spec(_number(0.01, 10)))
    action: str = field(metadata=spec(_choice("event", "throttle", "stop")))


@dataclass(frozen=True, slots=True)
class Plan:
    iccid: str = field(metadata=spec(_iccid))
    plan_bytes: int = field(metadata=spec(_int(1, 1 << 60)))
    cycle_day: int | None = field(default=None, metadata=spec(_int(1, 28)))


@dataclass(frozen=True, slots=True)
class UsageConfig:
    cycle_day: int = field(default=1, metadata=spec(_int(1, 28)))
    timezone: str = field(default="UTC", metadata=spec(_timezone))
    header_overhead_bytes: int = field(default=52, metadata=spec(_int(0, 1500)))
    publish_interval: float = field(default=3600.0, metadata=spec(_number(60, 31 * 86400)))
    plan_bytes: int | None = field(default=None, metadata=spec(_int(1, 1 << 60)))
    thresholds: tuple[Threshold, ...] = field(
        default=(Threshold(0.8, "event"), Threshold(1.0, "throttle")),
        metadata=spec(_list(_table(Threshold), max_len=8)),
    )
    throttle_min_priority: int = field(default=1, metadata=spec(_int(PRIORITY_MIN, PRIORITY_MAX)))
    critical_topics: tuple[str, ...] = field(default=(), metadata=spec(_list(_topic)))
    plan: tuple[Plan, ...] = field(default=(), metadata=spec(_list(_table(Plan), max_len=16)))


_APN = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
_HOST = r"[A-Za-z0-9.:\-\[\]]{1,253}"


def _suffix(*suffixes: str) -> Check:
    def check(value: Any, key: str) -> Path:
        path = _path(value, key)
        if path.suffix.lower() not in suffixes:
            raise _bad(key, f"a {' or '.join(suffixes)} file", value)
        return path

    return check


def _alarms(value: Any, key: str) -> tuple[float, ...]:
    found = _list(_number(60, 366 * 86400), max_len=8)(value, key)
    if list(found) != sorted(set(found), reverse=True):
        raise _bad(key, "seconds before the deadline, decreasing, each once", value)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """The SIM keeper (:mod:`agent.sim.keeper`): activation, alarms, network rejects."""

    manifest: Path | None = field(default=None, metadata=spec(_suffix(".csv", ".toml")))
    apn: str = field(default="soracom.io", metadata=spec(_text(_APN, "an APN")))
    cid: int = field(default=1, metadata=spec(_int(1, 24)))
    probe: str = field(default="uplink", metadata=spec(_choice("uplink", "tcp", "udp")))
    probe_host: str = field(default="pong.soracom.io", metadata=spec(_text(_HOST, "a host")))
    probe_port: int = field(default=7, metadata=spec(_int(1, 65535)))
    probe_timeout: float = field(default=10.0, metadata=spec(_number(0.1, 300)))
    poll_interval: float = field(default=60.0, metadata=spec(_number(1, 86400)))
    register_timeout: float = field(default=180.0, metadata=spec(_number(1, 3600)))
    retry_base: float = field(default=15.0, metadata=spec(_number(0.01, 86400)))
    retry_min: float = field(default=10.0, metadata=spec(_number(0.01, 86400)))
    retry_urgent: float = field(default=60.0, metadata=spec(_number(0.01, 86400)))
    retry_cap: float = field(default=1800.0, metadata=spec(_number(0.01, 7 * 86400)))
    network_probe_interval: float = field(
        default=6 * 3600.0, metadata=spec(_number(1, 30 * 86400))
    )
    time_sync_interval: float = field(default=3600.0, metadata=spec(_number(10, 7 * 86400)))
    alarms: tuple[float, ...] = field(
        default=(7 * 86400.0, 86400.0, 3600.0), metadata=spec(_alarms)
    )


@dataclass(frozen=True, slots=True)
class ConformanceConfig:
    list: Path | None = field(default=None, metadata=spec(_suffix(".toml", ".json")))
    signature: Path | None = field(default=None, metadata=spec(_path))
    malfunction_resets: int = field(default=5, metadata=spec(_int(1, 1000)))
    malfunction_window: float = field(default=3600.0, metadata=spec(_number(1, 7 * 86400)))


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # how often the agent's own health reading goes up on agent/health, seconds
    interval: float = field(default=300.0, metadata=spec(_number(10, 86400)))


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    operator_key: Path | None = field(default=None, metadata=spec(_path))


@dataclass(frozen=True, slots=True)
class Config:
    device_id: str = field(
        metadata=spec(_text(r"[A-Za-z0-9_.\-]{1,64}", "1-64 of A-Z a-z 0-9 _ . -"))
    )
    modem: ModemConfig = field(default_factory=ModemConfig, metadata=spec(_table(ModemConfig)))
    uplink: UplinkConfig = field(default_factory=UplinkConfig, metadata=spec(_table(UplinkConfig)))
    store: StoreConfig = field(default_factory=StoreConfig, metadata=spec(_table(StoreConfig)))
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata=spec(_table(IngestConfig)))
    outbox: OutboxConfig = field(default_factory=OutboxConfig, metadata=spec(_table(OutboxConfig)))
    usage: UsageConfig = field(default_factory=UsageConfig, metadata=spec(_table(UsageConfig)))
    health: HealthConfig = field(default_factory=HealthConfig, metadata=spec(_table(HealthConfig)))
    commands: CommandsConfig = field(
        default_factory=CommandsConfig, metadata=spec(_table(CommandsConfig))
    )
    lifecycle: LifecycleConfig = field(
        default_factory=LifecycleConfig, metadata=spec(_table(LifecycleConfig))
    )
    conformance: ConformanceConfig = field(
        default_factory=ConformanceConfig, metadata=spec(_table(ConformanceConfig))
    )


# -- rules across keys ------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_uplink(up: UplinkConfig) -> None:
    if up.profile == "beam" and not 5 <= up.keepalive <= 1200:
        raise _bad("uplink.keepalive", '5-1200 with profile = "beam"', up.keepalive)
    if up.reconnect_max < up.reconnect_min:
        raise _bad(
            "uplink.reconnect_max",
            f"at least reconnect_min ({_num(up.reconnect_min)})",
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


def _check_usage(usage: UsageConfig) -> None:
    shares = [t.share for t in usage.thresholds]
    if shares != sorted(set(shares)):
        raise ConfigError("usage.thresholds: shares must be increasing, each once")
    iccids = [p.iccid for p in usage.plan]
    if len(iccids) != len(set(iccids)):
        raise ConfigError("usage.plan: an ICCID appears twice")


def _check_lifecycle(lc: LifecycleConfig, conf: ConformanceConfig) -> None:
    if not lc.retry_min <= lc.retry_urgent <= lc.retry_cap:
        raise ConfigError(
            "lifecycle.retry_urgent: need retry_min <= retry_urgent <= retry_cap"
            f" (got {_num(lc.retry_min)}, {_num(lc.retry_urgent)}, {_num(lc.retry_cap)})"
        )
    if conf.signature is not None and conf.list is None:
        raise ConfigError("conformance.signature: set, but conformance.list is not")


def _check(config: Config) -> Config:
    _check_uplink(config.uplink)
    _check_usage(config.usage)
    _check_lifecycle(config.lifecycle, config.conformance)
    if len(os.fsencode(config.ingest.socket)) > SOCKET_PATH_MAX:
        raise ConfigError(
            f"ingest.socket: longer than {SOCKET_PATH_MAX} bytes (a Unix socket limit)"
        )
    if config.ingest.max_reading_bytes > config.outbox.max_bytes:
        raise ConfigError("ingest.max_reading_bytes: larger than outbox.max_bytes")
    if not config.uplink.client_id:
        config = dataclasses.replace(
            config, uplink=dataclasses.replace(config.uplink, client_id=config.device_id)
        )
    return config


# -- loading ----------------------------------------------------------------------------------


def parse(text: str) -> Config:
    """Validate TOML text; ``uplink.client_id`` defaults to ``device_id``."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: a hostile file hits the limit
        raise ConfigError("not valid TOML: nested too deeply") from None
    return _check(_build(Config, raw, ""))


def resolve_path(path: Path | None = None) -> Path:
    """The file to read: ``path``, else ``$SIMKEEPER_CONFIG``, else the default."""
    return path or Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load(path: Path | None = None) -> Config:
    path = resolve_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read config: {reason}") from None
    try:
        return parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` option every command takes."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"config file (default: ${ENV_VAR} or {DEFAULT_PATH})",
    )
