"""Scenario files: a personality, an initial state and timed steps (TOML or JSON).

```json
{"personality": "quectel",
 "sim": {"state": "ready", "iccid": "8981100005819480014"},
 "network": {"state": "roaming"},
 "sim2": {"iccid": "8981100005819480022", "imsi": "295050900000002"},
 "network2": {"state": "home"},
 "steps": [{"at": 2.0, "do": "network", "state": "denied", "reject_cause": 7},
           {"at": 4, "do": "network", "slot": 2, "state": "denied", "reject_cause": 8},
           {"at": 5, "do": "reboot"}]}
```
``sim2`` puts a card in a dual-SIM modem's second slot (left out: the slot is empty);
``network2`` is the network as that card meets it (left out: the same as ``network``);
``active_slot`` the slot in use at power-up. ``sim`` and ``network`` steps act on the active
slot, or on ``slot``. Every error is one line naming the key and the reason
(``steps[0].state: must be one of ...``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.simulator.state import NETWORK_STATES, SIM_STATES

PERSONALITY_NAMES = ("quectel", "simcom", "ublox")


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message is one line: ``<key>: <reason>``."""


# A field spec: (accepted types, check) where check returns an error reason or None.
_Spec = tuple[tuple[type, ...], Any]
_NUM = (int, float)


def _one_of(*values: object) -> Any:
    return lambda v: None if v in values else "must be one of " + ", ".join(map(str, values))


def _at_least(low: float) -> Any:
    return lambda v: None if v >= low else f"must be >= {low}"


def _between(low: float, high: float) -> Any:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _digits(low: int, high: int) -> Any:
    def check(v: str) -> str | None:
        ok = v.isdigit() and low <= len(v) <= high
        return None if ok else f"must be {low}-{high} digits"

    return check


SIM_FIELDS: dict[str, _Spec] = {
    "state": ((str,), _one_of(*SIM_STATES)),
    "iccid": ((str,), _digits(18, 20)),
    "imsi": ((str,), _digits(6, 15)),
    "pin": ((str,), _digits(4, 8)),
    "puk": ((str,), _digits(8, 8)),
    "msisdn": ((str,), None),
}
NETWORK_FIELDS: dict[str, _Spec] = {
    "state": ((str,), _one_of(*NETWORK_STATES)),
    "reject_cause": ((int,), _between(0, 255)),
    "mcc": ((str,), _digits(3, 3)),
    "mnc": ((str,), _digits(2, 3)),
    "operator": ((str,), None),
    "short_name": ((str,), None),
    "act": ((int,), _one_of(7, 9)),
    "tac": ((int,), _between(0, 0xFFFF)),
    "cell_id": ((int,), _between(0, 0xFFFFFFF)),
    "pci": ((int,), _between(0, 503)),
    "earfcn": ((int,), _at_least(0)),
    "band": ((int,), _between(1, 255)),
    "tz_quarters": ((int,), _between(-48, 56)),
}
SIGNAL_FIELDS: dict[str, _Spec] = {
    "rssi_dbm": ((int,), _between(-113, -51)),
    "rsrp_dbm": ((int,), _between(-140, -44)),
    "rsrq_db": ((int,), _between(-20, -3)),
    "sinr_db": ((int,), _between(-20, 40)),
}
_TRAFFIC: dict[str, _Spec] = {"up_bps": (_NUM, _at_least(0)), "down_bps": (_NUM, _at_least(0))}
_TIMING: dict[str, _Spec] = {
    "boot_seconds": (_NUM, _at_least(0)),
    "sim_busy_seconds": (_NUM, _at_least(0)),
}
_FAULTS: dict[str, _Spec] = {
    "reply_delay": (_NUM, _at_least(0)),
    "noise": (_NUM, _between(0, 1)),
    "noise_inside": ((bool,), None),
}
_SMS: dict[str, _Spec] = {"sender": ((str,), None), "text": ((str,), None)}
# The module's temperature (°C, whole degrees as the vendors print it), within the industrial
# range modules are specified for.
TEMPERATURE_FIELDS: dict[str, _Spec] = {"temperature_c": ((int,), _between(-40, 125))}

_SLOT: dict[str, _Spec] = {"slot": ((int,), _one_of(1, 2))}

# step action -> (its fields, required fields)
STEPS: dict[str, tuple[dict[str, _Spec], tuple[str, ...]]] = {
    "network": ({**NETWORK_FIELDS, **_SLOT}, ("state",)),
    "signal": (SIGNAL_FIELDS, ()),
    "sim": ({**SIM_FIELDS, **_SLOT}, ()),
    "radio": ({"fun": ((int,), _one_of(0, 1, 4))}, ("fun",)),
    "traffic": ({"up": ((int,), _at_least(0)), "down": ((int,), _at_least(0))}, ()),
    "traffic_rate": (_TRAFFIC, ()),
    "sms": (_SMS, ("text",)),
    "temperature": (TEMPERATURE_FIELDS, ("temperature_c",)),
    "urc": ({"text": ((str,), None)}, ("text",)),
    "reboot": ({}, ()),
    "silence": ({"duration": (_NUM, _at_least(0))}, ()),
    "slow": ({"delay": (_NUM, _at_least(0))}, ("delay",)),
    "garbage": ({"bytes": ((int,), _between(1, 65536))}, ()),
    "noise": (
        {"probability": (_NUM, _between(0, 1)), "inside": ((bool,), None)},
        ("probability",),
    ),
    "flood": (
        {
            "rate": (_NUM, _between(0.1, 10000)),
            "duration": (_NUM, _at_least(0)),
            "text": ((str,), None),
        },
        ("rate", "duration"),
    ),
    "vanish": ({"reappear_after": (_NUM, _at_least(0))}, ()),
}


@dataclass(frozen=True)
class Step:
    at: float
    action: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    personality: str | None = None
    seed: int | None = None
    radio: int = 1
    apn: str | None = None
    temperature_c: int | None = None
    sim: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] = field(default_factory=dict)
    sim2: dict[str, Any] | None = None  # None: the second slot is empty
    network2: dict[str, Any] = field(default_factory=dict)
    active_slot: int = 1
    signal: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)
    sms: tuple[dict[str, Any], ...] = ()
    steps: tuple[Step, ...] = ()


def check_fields(
    data: object, specs: Mapping[str, _Spec], where: str, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ScenarioError(f"{where or 'scenario'}: must be a table/object")
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ScenarioError(f"{prefix}{key}: unknown key (known: {known})")
        types, check = specs[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("number" if t is float else t.__name__ for t in types)
            raise ScenarioError(f"{prefix}{key}: must be {names}, not {value!r}")
        reason = check(value) if check else None
        if reason:
            raise ScenarioError(f"{prefix}{key}: {reason}, not {value!r}")
    for key in required:
        if key not in data:
            raise ScenarioError(f"{prefix}{key}: required")
    return dict(data)


_TOP: dict[str, _Spec] = {
    "personality": ((str,), _one_of(*PERSONALITY_NAMES)),
    "seed": ((int,), None),
    "radio": ((int,), _one_of(0, 1, 4)),
    "apn": ((str,), None),
    **TEMPERATURE_FIELDS,
    "sim": ((dict,), None),
    "network": ((dict,), None),
    "sim2": ((dict,), None),
    "network2": ((dict,), None),
    "active_slot": _SLOT["slot"],
    "signal": ((dict,), None),
    "traffic": ((dict,), None),
    "timing": ((dict,), None),
    "faults": ((dict,), None),
    "sms": ((list,), None),
    "steps": ((list,), None),
}


def parse_scenario(data: object) -> Scenario:
    """Validate a decoded scenario (dict) and build it."""
    top = check_fields(data, _TOP, "")
    sections = {
        name: check_fields(top.get(name, {}), spec, name)
        for name, spec in (
            ("sim", SIM_FIELDS),
            ("network", NETWORK_FIELDS),
            ("network2", NETWORK_FIELDS),
            ("signal", SIGNAL_FIELDS),
            ("traffic", _TRAFFIC),
            ("timing", _TIMING),
            ("faults", _FAULTS),
        )
    }
    messages = tuple(
        check_fields(m, _SMS, f"sms[{i}]", ("text",)) for i, m in enumerate(top.get("sms", []))
    )
    steps: list[Step] = []
    for i, raw in enumerate(top.get("steps", [])):
        where = f"steps[{i}]"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: must be a table/object")
        body = dict(raw)
        at = body.pop("at", None)
        action = body.pop("do", None)
        if isinstance(at, bool) or not isinstance(at, int | float) or at < 0:
            raise ScenarioError(f"{where}.at: required, a number of seconds >= 0")
        if action not in STEPS:
            raise ScenarioError(f"{where}.do: must be one of {', '.join(STEPS)}, not {action!r}")
        specs, required = STEPS[action]
        steps.append(Step(float(at), action, check_fields(body, specs, where, required)))
    steps.sort(key=lambda s: s.at)
    sim2 = top.get("sim2")
    return Scenario(
        personality=top.get("personality"),
        seed=top.get("seed"),
        radio=top.get("radio", 1),
        sim2=None if sim2 is None else check_fields(sim2, SIM_FIELDS, "sim2"),
        active_slot=top.get("active_slot", 1),
        apn=top.get("apn"),
        temperature_c=top.get("temperature_c"),
        sms=messages,
        steps=tuple(steps),
        **sections,
    )


def load_scenario(path: str | Path) -> Scenario:
    """Read a ``.toml`` or ``.json`` scenario file; ScenarioError (one line) on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"cannot read: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            data: object = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ScenarioError(
            f"not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {first}"
        ) from None
    return parse_scenario(data)
