"""Hotplug decisions from udev properties, without udev."""

from __future__ import annotations

import pytest

from drivers.hotplug import Hotplug, PortMatch, classify


def tty(path: str, vid: str, pid: str, interface: str, **extra: str) -> dict[str, str]:
    return {"SUBSYSTEM": "tty", "DEVNAME": path, "ID_VENDOR_ID": vid, "ID_MODEL_ID": pid,
            "ID_USB_INTERFACE_NUM": interface, **extra}


EC25 = [tty(f"/dev/ttyUSB{i}", "2c7c", "0125", f"0{i}") for i in range(4)]


def test_quectel_at_port_is_interface_2() -> None:
    matches = [m for m in map(classify, EC25) if m]
    assert matches == [PortMatch("/dev/ttyUSB2", "quectel", "EC25/EG25", "2c7c:0125")]


@pytest.mark.parametrize(("vid", "pid", "interface", "vendor"), [
    ("1e0e", "9001", "02", "simcom"),
    ("1BC7", "1201", "04", "telit"),
    ("05c6", "90b2", "02", "ublox"),
    ("12d1", "1506", "02", "huawei"),
    ("1519", "0020", "00", "sierra"),
])
def test_vendors(vid: str, pid: str, interface: str, vendor: str) -> None:
    match = classify(tty("/dev/ttyUSB9", vid, pid, interface))
    assert match is not None
    assert match.vendor == vendor
    assert classify(tty("/dev/ttyUSB9", vid, pid, "07")) is None


def test_unknown_devices_and_other_subsystems_are_ignored() -> None:
    assert classify(tty("/dev/ttyUSB0", "0403", "6001", "00")) is None  # an FTDI cable
    assert classify({"SUBSYSTEM": "net", "DEVNAME": "wwan0"}) is None


def test_udev_tag_wins_for_unknown_hardware() -> None:
    match = classify(tty("/dev/ttyACM0", "abcd", "0001", "03", SIMKEEPER_PORT="at",
                         ID_MODEL="Mystery_LTE"))
    assert match == PortMatch("/dev/ttyACM0", "generic", "Mystery_LTE", "abcd:0001")


def test_sessions_start_and_stop_with_the_device() -> None:
    added: list[PortMatch] = []
    removed: list[str] = []
    hp = Hotplug(added.append, removed.append)
    hp.scan(EC25)
    assert [m.path for m in added] == ["/dev/ttyUSB2"]
    hp.handle("change", EC25[2])  # no second session for the same port
    assert len(added) == 1
    hp.handle("remove", EC25[1])  # not ours
    hp.handle("remove", {"DEVNAME": "/dev/ttyUSB2"})
    assert removed == ["/dev/ttyUSB2"]
    assert hp.ports == {}
    hp.handle("add", EC25[2])  # plugged back in
    assert len(added) == 2


async def test_real_udev_monitor_starts_and_stops() -> None:
    pyudev = pytest.importorskip("pyudev")
    try:
        pyudev.Context()
    except Exception as exc:  # pragma: no cover - machines without udev
        pytest.skip(f"no udev here: {exc}")
    added: list[PortMatch] = []
    hp = Hotplug(added.append, lambda _path: None)
    hp.start()  # enumerates the machine's ttys: none of them is a USB modem here
    assert all(m.path.startswith("/dev/") for m in added)
    hp.stop()


async def test_hotplugged_modems_take_the_first_free_slot() -> None:
    """Each modem hotplug finds gets a SIM slot (its keeper, meter feed and SMS reader): the
    first one no present modem holds, so a modem that comes back takes its slot again."""
    from typing import Any

    from agent.core.config import ModemConfig
    from agent.core.tasks import Supervisor
    from agent.modem.ports import ModemPorts

    class Hooks:
        def attached(self, *_args: Any) -> None: ...

        def detached(self) -> None: ...

    async def observe(*_args: Any) -> None: ...

    asked: list[int] = []

    def slot_parts(index: int) -> tuple[Hooks, Any]:
        asked.append(index)
        return Hooks(), observe

    supervisor = Supervisor(1.0, 60.0)
    ports = ModemPorts(ModemConfig(), supervisor, slot_parts=slot_parts,
                       on_change=lambda: None, on_ready=lambda: None)
    try:
        ports.add("/dev/sk-test-a")
        ports.add("/dev/sk-test-b")
        ports.remove("/dev/sk-test-a")
        ports.add("/dev/sk-test-c")  # the first modem back, on another path: slot 0 again
        assert asked == [0, 1, 0]
        assert sorted((m["port"], m["slot"]) for m in ports.summaries()) == [
            ("/dev/sk-test-b", "modem2"), ("/dev/sk-test-c", "modem")]
    finally:
        await supervisor.stop()
