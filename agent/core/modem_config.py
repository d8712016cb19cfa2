"""The ``[modem]`` table of the configuration (agent.core.config): its keys and the checks
across them.

``port`` is ``"auto"`` (every AT port hotplug finds), one device path or pyserial URL, or a list
of them: one modem each, in the order of its SIM slot names (``modem``, ``modem2``, ...;
agent.sim.keepers). ``interface`` and ``nm_connection`` are one value (the first modem's) or a
list, one per port: a modem without an interface meters from its own counters only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.core.checks import (
    Check,
    ConfigError,
    bad,
    boolean,
    int_between,
    list_of,
    matches,
    number_between,
    one_of,
    spec,
    table,
)

MAX_MODEMS = 8

_PORT = matches(r"\S.*", '"auto", a device path or a pyserial URL')
_INTERFACE = matches(r"[A-Za-z0-9_.:\-]{1,15}", "a network interface name")
_NM = matches(r"[^\0\n]{1,200}", "a NetworkManager connection name")


def one_or_list(check: Check) -> Check:
    """One value, or a non-empty list of at most :data:`MAX_MODEMS` of them (a tuple)."""
    many = list_of(check, max_len=MAX_MODEMS)

    def check_one_or_list(value: Any, key: str) -> Any:
        if not isinstance(value, list):
            return check(value, key)
        if not value:
            raise bad(key, "one value or a non-empty list", value)
        return many(value, key)

    return check_one_or_list


def slot_name(index: int) -> str:
    """The name of the ``index``-th modem's SIM slot (0: ``modem``, then ``modem2``...)."""
    return "modem" if index == 0 else f"modem{index + 1}"


def slot_order(slot: str) -> tuple[int, str]:
    """Sorts slot names by position: ``modem``, ``modem2``, ... ``modem10``."""
    return len(slot), slot


def _nth(value: str | tuple[str, ...] | None, index: int) -> str | None:
    if isinstance(value, tuple):
        return value[index] if index < len(value) else None
    return value if index == 0 else None


@dataclass(frozen=True, slots=True)
class DualSimConfig:
    """``[modem.dual_sim]``: the switch policy of a modem with two SIM slots and one radio
    (agent.sim.dual_sim). Times in seconds."""

    enabled: bool = field(default=False, metadata=spec(boolean))
    primary: int = field(default=1, metadata=spec(int_between(1, 2)))  # the backup: the other
    # the primary unregistered this long (searching, denied without a permanent cause): backup
    no_registration: float = field(default=600.0, metadata=spec(number_between(10, 86400)))
    # at least this long on a SIM before the next switch (no flapping)
    min_dwell: float = field(default=900.0, metadata=spec(number_between(0, 86400)))
    # on the backup, the primary is tried again this often (cap: at its next period)
    recheck: float = field(default=3600.0, metadata=spec(number_between(10, 7 * 86400)))
    # how long a SIM switched to gets to register (or be activated) before going back
    switch_timeout: float = field(default=180.0, metadata=spec(number_between(5, 3600)))
    # a standby SIM awaiting activation is activated this long before its deadline
    standby_lead: float = field(default=3 * 86400.0,
                                metadata=spec(number_between(60, 366 * 86400)))


@dataclass(frozen=True, slots=True)
class ModemConfig:
    port: str | tuple[str, ...] = field(default="auto", metadata=spec(one_or_list(_PORT)))
    baud: int = field(default=115200, metadata=spec(int_between(300, 4_000_000)))
    data_path: str = field(
        default="networkmanager", metadata=spec(one_of("networkmanager", "agent", "external"))
    )
    interface: str | tuple[str, ...] = field(default="wwan0",
                                             metadata=spec(one_or_list(_INTERFACE)))
    nm_connection: str | tuple[str, ...] | None = field(default=None,
                                                        metadata=spec(one_or_list(_NM)))
    # how often a modem session reads the modem (state, signal, counters), seconds
    poll_interval: float = field(default=60.0, metadata=spec(number_between(1, 86400)))
    dual_sim: DualSimConfig = field(default_factory=DualSimConfig,
                                    metadata=spec(table(DualSimConfig)))

    @property
    def ports(self) -> tuple[str, ...]:
        """The configured ports (none for ``"auto"``)."""
        if isinstance(self.port, tuple):
            return self.port
        return () if self.port == "auto" else (self.port,)

    @property
    def several(self) -> bool:
        """More than one modem may be present (a list of ports, or hotplug)."""
        return len(self.ports) != 1

    def interface_for(self, index: int) -> str | None:
        return _nth(self.interface, index)

    def nm_connection_for(self, index: int) -> str | None:
        return _nth(self.nm_connection, index)


def check_modem(modem: ModemConfig) -> None:
    ports = modem.ports
    if "auto" in ports and len(ports) > 1:
        raise ConfigError('modem.port: "auto" finds every modem; it cannot be one of a list')
    if len(set(ports)) != len(ports):
        raise ConfigError("modem.port: a port appears twice")
    for key in ("interface", "nm_connection"):
        value = getattr(modem, key)
        if isinstance(value, tuple) and ports and len(value) != len(ports):
            raise ConfigError(f"modem.{key}: {len(value)} given for {len(ports)} ports (one"
                              " per port, in the same order)")
    if (len(ports) > 1 and modem.data_path == "networkmanager"
            and not isinstance(modem.nm_connection, tuple)):
        raise ConfigError("modem.nm_connection: with several modems and data_path ="
                          ' "networkmanager", name each modem\'s connection (a list, one per'
                          " port): a suspension takes down only its own SIM's connection")
