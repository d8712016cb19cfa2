"""Usage counters: what the sources report and how a reading is counted.

Two sources report cumulative counters: the modem (``sent``, ``recv`` from the driver's data
counters) and the kernel for the data interface (``/sys/class/net/<if>/statistics``,
:func:`read_kernel`). Each modem slot's counters are its own: the last raw value of a slot's
source is kept in a ``usage_counter`` row (:func:`counter_row`: ``source`` for slot ``modem``,
as on a gateway of one modem; ``source@slot`` for the others), and :func:`count` adds only what
moved since to the SIM's billing period in ``usage_period`` (by ICCID, period and source).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("modem", "kernel")
SLOT = "modem"  # the first modem's slot: its keys are those of a one-modem gateway
_KERNEL_FILES = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")


@dataclass(frozen=True, slots=True)
class Counters:
    """Cumulative counters as a source reports them (packets: kernel only)."""

    tx_bytes: int
    rx_bytes: int
    tx_packets: int = 0
    rx_packets: int = 0


def read_kernel(interface: str, root: Path = Path("/")) -> tuple[Counters, str] | None:
    """The kernel's counters of ``interface`` and their epoch (boot id and interface index:
    either changing means the counters restarted), or None when the interface is absent."""
    base = root / "sys/class/net" / interface
    try:
        values = [int((base / "statistics" / name).read_text()) for name in _KERNEL_FILES]
        ifindex = (base / "ifindex").read_text().strip()
    except (OSError, ValueError):
        return None
    try:
        boot = (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return Counters(*values), f"{boot}/{ifindex}"


def counter_row(slot: str, source: str) -> str:
    """The ``usage_counter`` row of a slot's source."""
    return source if slot == SLOT else f"{source}@{slot}"


def count(db: Any, row: str, key: tuple[str, str, str], *, epoch: str, values: tuple[int, ...],
          last: tuple[int, ...]) -> None:
    """Add what the counters moved since ``last`` (a counter lower than before restarted:
    counted in full) to the SIM's period ``key`` (iccid, period, source); keep ``values`` in
    the ``usage_counter`` ``row``."""
    deltas = [v if v < old or last is values else v - old
              for v, old in zip(values, last, strict=True)]
    db.execute(
        "INSERT OR REPLACE INTO usage_counter"
        " (source, epoch, tx_bytes, rx_bytes, tx_packets, rx_packets) VALUES (?, ?, ?, ?, ?, ?)",
        (row, epoch, *values),
    )
    db.execute(
        "INSERT INTO usage_period (iccid, period, source, tx_bytes, rx_bytes, tx_packets,"
        " rx_packets) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (iccid, period, source) DO UPDATE"
        " SET tx_bytes = tx_bytes + excluded.tx_bytes, rx_bytes = rx_bytes + excluded.rx_bytes,"
        " tx_packets = tx_packets + excluded.tx_packets,"
        " rx_packets = rx_packets + excluded.rx_packets",
        (*key, *deltas),
    )
