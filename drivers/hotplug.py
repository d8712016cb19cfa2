"""Hotplug: find modems' AT ports as USB modems come and go.

A pyudev monitor joins the event loop with ``loop.add_reader`` on its netlink socket. Every
``tty`` device is classified from its udev properties alone (:func:`classify`), so the decision
is tested with plain dicts and no udev: a port our udev rule tagged (``SIMKEEPER_PORT=at``, see
``packaging/``) wins; otherwise the USB VID:PID and interface number pick the AT port from
:data:`AT_INTERFACES`. The callbacks start and stop a modem session per port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# (vendor id, product id) -> (vendor, model family, AT interface number).
# Interface numbers from the vendors' USB interface descriptions (Linux USB driver guides):
# Quectel and SIMCom put DM on 00, NMEA on 01, AT on 02, PPP on 03; Telit LE910Cx has AT
# on 04 (and 05); Huawei's E-series and ME909 on 02; u-blox SARA-R4 (Qualcomm VID) on 02;
# Sierra HL78xx (CDC-ACM) has AT on 00.
AT_INTERFACES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("2c7c", "0121"): ("quectel", "EC21", "02"),
    ("2c7c", "0125"): ("quectel", "EC25/EG25", "02"),
    ("2c7c", "0191"): ("quectel", "EG91", "02"),
    ("2c7c", "0195"): ("quectel", "EG95", "02"),
    ("2c7c", "0296"): ("quectel", "BG96", "02"),
    ("2c7c", "0306"): ("quectel", "EP06/EG06", "02"),
    ("2c7c", "0700"): ("quectel", "BG95/BG77", "02"),
    ("1e0e", "9001"): ("simcom", "SIM7600", "02"),
    ("1e0e", "9205"): ("simcom", "SIM7080", "02"),
    ("1e0e", "9206"): ("simcom", "SIM7080", "02"),
    ("05c6", "90b2"): ("ublox", "SARA-R4", "02"),
    ("1546", "1312"): ("ublox", "SARA-R5", "02"),
    ("1bc7", "1201"): ("telit", "LE910C1", "04"),
    ("1bc7", "1206"): ("telit", "LE910C1", "04"),
    ("1519", "0020"): ("sierra", "HL7xxx", "00"),
    ("1199", "c001"): ("sierra", "HL78xx", "00"),
    ("12d1", "1506"): ("huawei", "E3372/ME909", "02"),
    ("12d1", "15c1"): ("huawei", "ME906s", "02"),
}


@dataclass(frozen=True, slots=True)
class PortMatch:
    path: str
    vendor: str
    model: str
    usb_id: str  # "2c7c:0125"


def classify(props: Mapping[str, str]) -> PortMatch | None:
    """The AT port a udev ``tty`` device is, or None."""
    if props.get("SUBSYSTEM") != "tty":
        return None
    path = props.get("DEVNAME", "")
    vid = props.get("ID_VENDOR_ID", "").lower()
    pid = props.get("ID_MODEL_ID", "").lower()
    known = AT_INTERFACES.get((vid, pid))
    if props.get("SIMKEEPER_PORT") == "at":
        vendor, model = (known[0], known[1]) if known else ("generic", props.get("ID_MODEL", ""))
        return PortMatch(path, vendor, model, f"{vid}:{pid}")
    if known is None or not path:
        return None
    vendor, model, interface = known
    if props.get("ID_USB_INTERFACE_NUM", "").lower() != interface:
        return None
    return PortMatch(path, vendor, model, f"{vid}:{pid}")


class Hotplug:
    """Tracks AT ports; calls ``on_add(match)`` and ``on_remove(path)`` as they come and go."""

    def __init__(self, on_add: Callable[[PortMatch], None],
                 on_remove: Callable[[str], None]) -> None:
        self.on_add = on_add
        self.on_remove = on_remove
        self.ports: dict[str, PortMatch] = {}
        self._monitor: Any = None

    def handle(self, action: str, props: Mapping[str, str]) -> None:
        """One udev event (action ``add``/``remove``/``change``/``bind``...)."""
        path = props.get("DEVNAME", "")
        if action == "remove":
            if self.ports.pop(path, None) is not None:
                log.info("modem port %s gone", path)
                self.on_remove(path)
            return
        match = classify(props)
        if match is None or path in self.ports:
            return
        log.info("modem port %s (%s %s, %s)", path, match.vendor, match.model, match.usb_id)
        self.ports[path] = match
        self.on_add(match)

    def scan(self, devices: Iterable[Mapping[str, str]]) -> None:
        """Devices already present at start-up."""
        for props in devices:
            self.handle("add", props)

    def start(self) -> None:
        """Enumerate present ttys and watch udev on the running loop (needs pyudev and udev)."""
        import pyudev

        context = pyudev.Context()
        self.scan(dict(d.properties) for d in context.list_devices(subsystem="tty"))
        monitor = pyudev.Monitor.from_netlink(context)
        monitor.filter_by("tty")
        monitor.start()
        self._monitor = monitor
        asyncio.get_running_loop().add_reader(monitor.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._monitor.fileno())
            self._monitor = None

    def _on_readable(self) -> None:
        while (device := self._monitor.poll(timeout=0)) is not None:
            self.handle(device.action or "add", dict(device.properties))
