"""Typed reads of a modem: pure functions from information lines to frozen dataclasses.

Each parser takes the information lines of one answer (``AtChannel.command`` returns them),
or one line for URCs, and raises only :class:`ParseError` (a
:class:`drivers.errors.ModemError`). The modules follow the JSON of ``simkeeper modem info``:
identity, sim, network, signal, device (radio, clock) and packet data; import parsers from
those modules. The IMEI/ICCID check digit (Luhn) is public here for the agent's checks.
"""

from drivers.parsers._common import ParseError, luhn_digit, luhn_valid

__all__ = ["ParseError", "luhn_digit", "luhn_valid"]
