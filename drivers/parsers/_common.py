"""Helpers shared by the typed parsers: finding a prefixed line, splitting and converting fields.

Every failure is a :class:`ParseError`, so a caller catches :class:`drivers.errors.ModemError`
and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from drivers.at import split_fields, unquote
from drivers.errors import ModemError


class ParseError(ModemError):
    """A modem answer did not have the shape its parser expects."""


_INT = re.compile(r"[+-]?[0-9]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")


def values(lines: Sequence[str], prefix: str) -> list[str]:
    """The value parts (text after ``<prefix>:``, any case) of every line carrying ``prefix``;
    any prefix character works, Sierra's ``!`` included."""
    head = re.compile(re.escape(prefix) + r"\s*:", re.IGNORECASE)
    found = []
    for line in lines:
        m = head.match(line.strip())
        if m:
            found.append(line.strip()[m.end():].strip())
    return found


def value(lines: Sequence[str], prefix: str) -> str:
    """The value part of the first line carrying ``prefix``."""
    found = values(lines, prefix)
    if not found:
        raise ParseError(f"no {prefix} line in {list(lines)!r}")
    return found[0]


def fields(text: str) -> list[str]:
    """Comma-separated fields with quotes and surrounding spaces removed."""
    return [unquote(f).strip() for f in split_fields(text)]


def to_int(text: str, what: str = "field") -> int:
    """A decimal field (ASCII digits only: ``int()`` would also take ``1_0`` or other scripts)."""
    if not _INT.fullmatch(text.strip()):
        raise ParseError(f"{what}: not a number: {text!r}")
    return int(text.strip())


def is_hex(text: str) -> bool:
    return _HEX.fullmatch(text) is not None


def opt_int(text: str | None) -> int | None:
    """An integer field, or None when the field is absent or empty."""
    if text is None or not text.strip():
        return None
    return to_int(text)


def field(items: Sequence[str], index: int) -> str | None:
    """``items[index]``, or None when the field is absent or empty."""
    if index < len(items) and items[index]:
        return items[index]
    return None


def hex_code(text: str | None) -> str | None:
    """An area or cell code as 3GPP prints it: upper-case hex, no ``0x``, None when absent or
    not hex."""
    if text is None:
        return None
    code = unquote(text).strip()
    if code[:2].lower() == "0x":
        code = code[2:]
    return code.upper() if is_hex(code) else None


def luhn_digit(body: str) -> str:
    """The Luhn check digit for ``body`` (IMEI: 3GPP TS 23.003 Annex B; ICCID: ITU-T E.118)."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    """Whether ``number`` (ASCII digits) ends with its Luhn check digit."""
    return len(number) > 1 and number.isascii() and number.isdigit() \
        and luhn_digit(number[:-1]) == number[-1]
