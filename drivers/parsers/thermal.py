"""The module's own temperature, in each vendor's dialect (°C).

3GPP TS 27.007 has no temperature read; each vendor has its own command, and some report
several sensors. :class:`Temperature` carries the one figure the agent reports (the hottest
sensor, which is what throttles or shuts the module down) and says which sensor it came from.

- Quectel ``AT+QTEMP``: EC2x/EG2x/EG9x ``+QTEMP: <pmic_temp>,<xo_temp>,<pa_temp>``; newer
  (RG50xQ/RM5xxQ) firmware one ``+QTEMP: "<sensor>","<temp>"`` line per sensor.
- SIMCom ``AT+CPMUTEMP``: ``+CPMUTEMP: <temp>`` (SIM7500/SIM7600 Series AT Command Manual,
  "Read the temperature of the module").
- Telit ``AT#TEMPMON=1``: ``#TEMPMEAS: <level>,<value>``, ``<level>`` the threshold band
  (-2..2), ``<value>`` in Celsius degrees (LE910 V2 Series AT Commands 80446ST10707A,
  UC864-E/G 80304ST10041a, ``#TEMPMON``). ``#TEMPMEAS`` is also the monitor's URC, so the
  profile names it as the answer's prefix.

Not read (no format confirmed from a manual): u-blox ``+UTEMP``, Huawei ``^CHIPTEMP``, Sierra
Wireless, SIMCom SIM800, generic 27.007.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drivers.parsers._common import ParseError, fields, to_int, value, values

# What a module's sensor can read; anything outside is a sentinel (an absent or unconnected
# sensor), not a temperature.
PLAUSIBLE = range(-60, 151)

# EC2x positional order (Quectel: PMIC, crystal oscillator, power amplifier).
QTEMP_POSITIONS = ("pmic", "xo", "pa")


@dataclass(frozen=True, slots=True)
class Temperature:
    """``celsius`` of the hottest plausible sensor, ``sensor`` its name (None when the modem
    reports a single figure); ``sensors`` every plausible reading, in the modem's order."""

    celsius: float
    sensor: str | None = None
    sensors: tuple[tuple[str, float], ...] = ()


def _reading(text: str, what: str) -> int | None:
    """A sensor field as an integer °C, None when it is a sentinel (not plausible)."""
    number = to_int(text, what)
    return number if number in PLAUSIBLE else None


def _hottest(readings: list[tuple[str, float]], what: str) -> Temperature:
    if not readings:
        raise ParseError(f"{what}: no plausible sensor reading")
    name, celsius = max(readings, key=lambda r: r[1])  # first of equals: the modem's order
    return Temperature(celsius, name, tuple(readings))


def parse_qtemp(lines: Sequence[str]) -> Temperature:
    """Quectel ``AT+QTEMP``, either form: three unnamed integers (PMIC, XO, PA on EC2x) or
    ``"<sensor>","<temp>"`` pairs, one line per sensor (several pairs on a line also read)."""
    found = values(lines, "+QTEMP")
    if not found:
        raise ParseError(f"no +QTEMP line in {list(lines)!r}")
    readings: list[tuple[str, float]] = []
    for text in found:
        items = fields(text)
        if not items or not items[0]:
            raise ParseError(f"+QTEMP: empty answer: {text!r}")
        if items[0].lstrip("+-").isdigit():  # positional: <pmic_temp>,<xo_temp>,<pa_temp>
            for i, item in enumerate(items):
                name = QTEMP_POSITIONS[i] if i < len(QTEMP_POSITIONS) else f"sensor{i}"
                if (reading := _reading(item, "+QTEMP")) is not None:
                    readings.append((name, float(reading)))
            continue
        if len(items) % 2:
            raise ParseError(f"+QTEMP: sensor without a value: {text!r}")
        for name, item in zip(items[::2], items[1::2], strict=True):
            if (reading := _reading(item, f"+QTEMP {name}")) is not None:
                readings.append((name, float(reading)))
    return _hottest(readings, "+QTEMP")


def parse_cpmutemp(lines: Sequence[str]) -> Temperature:
    """SIMCom ``AT+CPMUTEMP``: ``+CPMUTEMP: <temp>`` (°C)."""
    reading = _reading(fields(value(lines, "+CPMUTEMP"))[0], "+CPMUTEMP")
    if reading is None:
        raise ParseError(f"+CPMUTEMP: implausible temperature in {list(lines)!r}")
    return Temperature(float(reading))


def parse_tempmeas(lines: Sequence[str]) -> Temperature:
    """Telit ``AT#TEMPMON=1``: ``#TEMPMEAS: <level>,<value>`` (``<value>`` in °C)."""
    items = fields(value(lines, "#TEMPMEAS"))
    if len(items) < 2:
        raise ParseError(f"#TEMPMEAS: expected <level>,<value>: {list(lines)!r}")
    to_int(items[0], "#TEMPMEAS level")
    reading = _reading(items[1], "#TEMPMEAS value")
    if reading is None:
        raise ParseError(f"#TEMPMEAS: implausible temperature in {list(lines)!r}")
    return Temperature(float(reading))
