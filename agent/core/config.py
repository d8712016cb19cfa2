"""The agent's configuration: TOML, validated at load into frozen dataclasses.

Every key is declared once, on its dataclass field, with its default and its check. A wrong
key, type or value raises :class:`ConfigError` naming the key and the reason, e.g.
``uplink.port: expected an integer 1-65535, got "x"``; unknown keys are refused. The commented
reference (every key, its default, what it does) is ``packaging/config.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.at_allow import DEFAULT_ALLOW, check_pattern
from agent.core.checks import (
    Check,
    ConfigError,
    bad,
    build,
    canonical_iccid,
    file_path,
    iccid_value,
    int_between,
    list_of,
    matches,
    num_text,
    number_between,
    one_of,
    spec,
    table,
    time_zone,
    topic_name,
)
from agent.core.metrics_config import MetricsConfig, metrics_table
from agent.core.modem_config import DualSimConfig, ModemConfig, check_modem
from agent.core.readings import PRIORITY_MAX, PRIORITY_MIN
from agent.core.uplink_config import MIB, UplinkConfig, check_uplink

__all__ = [  # ConfigError and canonical_iccid come from agent.core.checks
    "DEFAULT_PATH",
    "ENV_VAR",
    "MIB",
    "SOCKET_PATH_MAX",
    "CommandsConfig",
    "Config",
    "ConfigError",
    "ConformanceConfig",
    "DualSimConfig",
    "HealthConfig",
    "IngestConfig",
    "LifecycleConfig",
    "ModemConfig",
    "OutboxConfig",
    "Plan",
    "StoreConfig",
    "Threshold",
    "UplinkConfig",
    "UsageConfig",
    "add_argument",
    "canonical_iccid",
    "load",
    "parse",
    "resolve_path",
]

DEFAULT_PATH = Path("/etc/simkeeper/config.toml")
ENV_VAR = "SIMKEEPER_CONFIG"
SOCKET_PATH_MAX = 100  # sun_path holds 107 bytes; the agent binds a slightly longer temp name

# -- the schema -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path = field(default=Path("/var/lib/simkeeper/simkeeper.db"), metadata=spec(file_path))
    # What a power cut may take (a SIGKILL takes nothing acknowledged in either mode):
    # "crash-safe" syncs readings to the card at most sync_interval seconds after they were
    # acknowledged; "power-safe" syncs each before acknowledging it (more writes, slower).
    durability: str = field(default="crash-safe", metadata=spec(one_of("crash-safe", "power-safe")))
    sync_interval: float = field(default=5.0, metadata=spec(number_between(0.1, 300)))


@dataclass(frozen=True, slots=True)
class IngestConfig:
    socket: Path = field(default=Path("/run/simkeeper/ingest.sock"), metadata=spec(file_path))
    group: str | None = field(
        default=None, metadata=spec(matches(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,31}", "a group name"))
    )
    max_reading_bytes: int = field(default=65536, metadata=spec(int_between(256, 16 * MIB)))
    max_clients: int = field(default=64, metadata=spec(int_between(1, 4096)))
    client_timeout: float = field(default=60.0, metadata=spec(number_between(1, 3600)))


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    max_bytes: int = field(default=64 * MIB, metadata=spec(int_between(MIB, 1 << 40)))
    max_age: float = field(default=7 * 86400.0, metadata=spec(number_between(60, 366 * 86400)))
    drop_policy: str = field(
        default="oldest-lowest-priority",  # the keys of agent.telemetry.outbox.DROP_ORDER
        metadata=spec(one_of("oldest-lowest-priority")),
    )
    # the disk space the outbox leaves free: older readings are dropped rather than take it
    min_free_bytes: int = field(default=32 * MIB, metadata=spec(int_between(0, 1 << 40)))
    # readings kept in the journal file (and memory) before they move into the database
    journal_bytes: int = field(default=256 * 1024, metadata=spec(int_between(0, 64 * MIB)))


@dataclass(frozen=True, slots=True)
class Threshold:
    share: float = field(metadata=spec(number_between(0.01, 10)))
    action: str = field(metadata=spec(one_of("event", "throttle", "stop")))


@dataclass(frozen=True, slots=True)
class Plan:
    iccid: str = field(metadata=spec(iccid_value))
    plan_bytes: int = field(metadata=spec(int_between(1, 1 << 60)))
    cycle_day: int | None = field(default=None, metadata=spec(int_between(1, 28)))


@dataclass(frozen=True, slots=True)
class UsageConfig:
    cycle_day: int = field(default=1, metadata=spec(int_between(1, 28)))
    timezone: str = field(default="UTC", metadata=spec(time_zone))
    header_overhead_bytes: int = field(default=52, metadata=spec(int_between(0, 1500)))
    publish_interval: float = field(default=3600.0, metadata=spec(number_between(60, 31 * 86400)))
    plan_bytes: int | None = field(default=None, metadata=spec(int_between(1, 1 << 60)))
    thresholds: tuple[Threshold, ...] = field(
        default=(Threshold(0.8, "event"), Threshold(1.0, "throttle")),
        metadata=spec(list_of(table(Threshold), max_len=8)),
    )
    throttle_min_priority: int = field(
        default=1, metadata=spec(int_between(PRIORITY_MIN, PRIORITY_MAX))
    )
    critical_topics: tuple[str, ...] = field(default=(), metadata=spec(list_of(topic_name)))
    plan: tuple[Plan, ...] = field(default=(), metadata=spec(list_of(table(Plan), max_len=16)))


_APN = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
_HOST = r"[A-Za-z0-9.:\-\[\]]{1,253}"


def _suffix(*suffixes: str) -> Check:
    def check(value: Any, key: str) -> Path:
        path = file_path(value, key)
        if path.suffix.lower() not in suffixes:
            raise bad(key, f"a {' or '.join(suffixes)} file", value)
        return path

    return check


def _alarms(value: Any, key: str) -> tuple[float, ...]:
    found = list_of(number_between(60, 366 * 86400), max_len=8)(value, key)
    if list(found) != sorted(set(found), reverse=True):
        raise bad(key, "seconds before the deadline, decreasing, each once", value)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    """The SIM keeper (:mod:`agent.sim.keeper`): activation, alarms, network rejects."""

    manifest: Path | None = field(default=None, metadata=spec(_suffix(".csv", ".toml")))
    apn: str = field(default="soracom.io", metadata=spec(matches(_APN, "an APN")))
    cid: int = field(default=1, metadata=spec(int_between(1, 24)))
    probe: str = field(default="uplink", metadata=spec(one_of("uplink", "tcp", "udp")))
    probe_host: str = field(default="pong.soracom.io", metadata=spec(matches(_HOST, "a host")))
    probe_port: int = field(default=7, metadata=spec(int_between(1, 65535)))
    probe_timeout: float = field(default=10.0, metadata=spec(number_between(0.1, 300)))
    poll_interval: float = field(default=60.0, metadata=spec(number_between(1, 86400)))
    register_timeout: float = field(default=180.0, metadata=spec(number_between(1, 3600)))
    retry_base: float = field(default=15.0, metadata=spec(number_between(0.01, 86400)))
    retry_min: float = field(default=10.0, metadata=spec(number_between(0.01, 86400)))
    retry_urgent: float = field(default=60.0, metadata=spec(number_between(0.01, 86400)))
    retry_cap: float = field(default=1800.0, metadata=spec(number_between(0.01, 7 * 86400)))
    network_probe_interval: float = field(
        default=6 * 3600.0, metadata=spec(number_between(1, 30 * 86400))
    )
    time_sync_interval: float = field(default=3600.0, metadata=spec(number_between(10, 7 * 86400)))
    # a radio held off (stop-emission order, conformance enforce) is on this often (+-10 %)...
    probation_interval: float = field(
        default=6 * 3600.0, metadata=spec(number_between(60, 30 * 86400))
    )
    # ...for this long, to receive a queued order (agent.sim.probation)
    probation_window: float = field(default=600.0, metadata=spec(number_between(10, 86400)))
    alarms: tuple[float, ...] = field(
        default=(7 * 86400.0, 86400.0, 3600.0), metadata=spec(_alarms)
    )


@dataclass(frozen=True, slots=True)
class ConformanceConfig:
    list: Path | None = field(default=None, metadata=spec(_suffix(".toml", ".json")))
    signature: Path | None = field(default=None, metadata=spec(file_path))
    malfunction_resets: int = field(default=5, metadata=spec(int_between(1, 1000)))
    malfunction_window: float = field(default=3600.0, metadata=spec(number_between(1, 7 * 86400)))


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # how often the agent's own health reading goes up on agent/health, seconds
    interval: float = field(default=300.0, metadata=spec(number_between(10, 86400)))


@dataclass(frozen=True, slots=True)
class CommandsConfig:
    operator_key: Path | None = field(default=None, metadata=spec(file_path))
    # the AT commands `fleet at` may run (agent.core.at_allow): exact, or ending in =*
    at_allow: tuple[str, ...] = field(
        default=DEFAULT_ALLOW, metadata=spec(list_of(check_pattern, max_len=256))
    )


@dataclass(frozen=True, slots=True)
class Config:
    device_id: str = field(
        metadata=spec(matches(r"[A-Za-z0-9_.\-]{1,64}", "1-64 of A-Z a-z 0-9 _ . -"))
    )
    modem: ModemConfig = field(default_factory=ModemConfig, metadata=spec(table(ModemConfig)))
    uplink: UplinkConfig = field(default_factory=UplinkConfig, metadata=spec(table(UplinkConfig)))
    store: StoreConfig = field(default_factory=StoreConfig, metadata=spec(table(StoreConfig)))
    ingest: IngestConfig = field(default_factory=IngestConfig, metadata=spec(table(IngestConfig)))
    outbox: OutboxConfig = field(default_factory=OutboxConfig, metadata=spec(table(OutboxConfig)))
    usage: UsageConfig = field(default_factory=UsageConfig, metadata=spec(table(UsageConfig)))
    health: HealthConfig = field(default_factory=HealthConfig, metadata=spec(table(HealthConfig)))
    commands: CommandsConfig = field(
        default_factory=CommandsConfig, metadata=spec(table(CommandsConfig))
    )
    lifecycle: LifecycleConfig = field(
        default_factory=LifecycleConfig, metadata=spec(table(LifecycleConfig))
    )
    conformance: ConformanceConfig = field(
        default_factory=ConformanceConfig, metadata=spec(table(ConformanceConfig))
    )
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=spec(metrics_table))


# -- rules across keys ------------------------------------------------------------------------


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
            f" (got {num_text(lc.retry_min)}, {num_text(lc.retry_urgent)},"
            f" {num_text(lc.retry_cap)})"
        )
    if conf.signature is not None and conf.list is None:
        raise ConfigError("conformance.signature: set, but conformance.list is not")


def _check(config: Config) -> Config:
    check_modem(config.modem)
    check_uplink(config.uplink)
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
    return _check(build(Config, raw, ""))


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
