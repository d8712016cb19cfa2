"""The factory SIM manifest: per ICCID, the activation deadline, APN and plan size.

Two formats, chosen by the file's suffix:

CSV (``.csv``), a header row then one SIM per row; ``#`` lines and blank lines are skipped::

    iccid,deadline,apn,plan_bytes
    8981100005819510010,2025-03-31T23:59:59+09:00,soracom.io,1073741824

TOML (``.toml``), one ``[[sim]]`` table per SIM::

    [[sim]]
    iccid = "8981100005819510010"
    deadline = 2025-03-31T23:59:59+09:00   # or a string, or Unix seconds
    apn = "soracom.io"
    plan_bytes = 1073741824

``iccid`` and ``deadline`` are required; ``apn`` and ``plan_bytes`` may be left out. A
deadline is ISO 8601 with its UTC offset (a date or time without one is ambiguous and refused)
or Unix seconds. A bad row is reported with its line and skipped whole; an ICCID listed twice is
refused on every line it appears. A file that cannot be read as CSV or TOML at all, or a CSV
header with unknown or missing columns, raises :class:`ManifestError` and nothing is applied.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.core.config import canonical_iccid
from agent.core.csvtable import TableError, read_table
from drivers.parsers import luhn_valid

COLUMNS = ("iccid", "deadline", "apn", "plan_bytes")
_REQUIRED = ("iccid", "deadline")
_DEADLINE_MIN, _DEADLINE_MAX = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01 UTC
_PLAN_MAX = 1 << 60
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_APN = re.compile(rf"{_LABEL}(\.{_LABEL})*")  # TS 23.003 §9.1
_UNIX = re.compile(r"[0-9]+(\.[0-9]+)?")
_TOML_SIM = re.compile(r"\s*\[\[\s*sim\s*\]\]")


class ManifestError(Exception):
    """The manifest as a whole is unusable; nothing of it was applied."""


@dataclass(frozen=True, slots=True)
class SimEntry:
    iccid: str
    deadline: float
    apn: str | None
    plan_bytes: int | None
    line: int | None


@dataclass(frozen=True, slots=True)
class Problem:
    """A row's problem; ``line`` is None when the format gives none (then ``row``, 1-based,
    says which entry)."""

    line: int | None
    row: int
    message: str

    def __str__(self) -> str:
        return f"{f'line {self.line}' if self.line else f'entry {self.row}'}: {self.message}"


@dataclass(frozen=True, slots=True)
class Manifest:
    entries: Mapping[str, SimEntry]
    errors: tuple[Problem, ...]  # rows skipped
    warnings: tuple[Problem, ...]  # rows kept


def normalise_iccid(value: object) -> tuple[str, str | None]:
    """The ICCID as the agent keys it (padding ``F`` stripped, as :mod:`drivers.parsers.sim`
    reads it from the modem) and a warning, if any; ValueError when it is not 18-22 digits."""
    iccid = canonical_iccid(value) if isinstance(value, str) else ""
    if not re.fullmatch(r"[0-9]{18,22}", iccid):
        raise ValueError(f"iccid: not 18-22 digits: {value!r}")
    if not iccid.startswith("89"):
        return iccid, f"iccid {iccid} does not start with 89 (ITU-T E.118)"
    if not luhn_valid(iccid):
        return iccid, f"iccid {iccid}: check digit does not match (Luhn); kept as written"
    return iccid, None


def parse_deadline(value: object) -> float:
    """ISO 8601 with an offset (string or TOML datetime) or Unix seconds; ValueError else."""
    raw = value
    if isinstance(value, str) and _UNIX.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"deadline: not ISO 8601 or Unix seconds: {value!r}") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"deadline: needs a UTC offset (e.g. +09:00 or Z): {raw!r}")
        value = value.timestamp()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"deadline: not a date and time: {raw!r}")
    if not (math.isfinite(value) and _DEADLINE_MIN <= value < _DEADLINE_MAX):
        raise ValueError(f"deadline: out of range 2000-2100: {raw!r}")
    return float(value)


def _apn(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not (isinstance(value, str) and len(value) <= 100 and _APN.fullmatch(value)):
        raise ValueError(f"apn: not an APN (labels of letters, digits and '-'): {value!r}")
    return value


def _plan(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _PLAN_MAX:
        raise ValueError(f"plan_bytes: not a whole number of bytes >= 1: {value!r}")
    return value


def _entry(raw: Mapping[str, Any], line: int | None) -> tuple[SimEntry, str | None]:
    unknown = sorted(set(raw) - set(COLUMNS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected {list(COLUMNS)}")
    for key in _REQUIRED:
        if raw.get(key) in (None, ""):
            raise ValueError(f"{key}: missing")
    iccid, warning = normalise_iccid(raw["iccid"])
    entry = SimEntry(iccid, parse_deadline(raw["deadline"]), _apn(raw.get("apn")),
                     _plan(raw.get("plan_bytes")), line)
    return entry, warning


Row = tuple[int | None, Mapping[str, Any] | str]  # line, fields or why the row is unreadable


def _build(rows: Iterable[Row]) -> Manifest:
    errors: list[Problem] = []
    warnings: list[Problem] = []
    found: dict[str, list[tuple[int, SimEntry]]] = {}
    for number, (line, raw) in enumerate(rows, 1):
        try:
            if isinstance(raw, str):
                raise ValueError(raw)
            entry, warning = _entry(raw, line)
        except ValueError as exc:
            errors.append(Problem(line, number, str(exc)))
            continue
        if warning:
            warnings.append(Problem(line, number, warning))
        found.setdefault(entry.iccid, []).append((number, entry))
    entries = {}
    for iccid, same in found.items():
        if len(same) == 1:
            entries[iccid] = same[0][1]
            continue
        where = ", ".join(str(Problem(e.line, n, "")).rstrip(": ") for n, e in same)
        errors.extend(Problem(e.line, n, f"iccid {iccid} listed more than once ({where})")
                      for n, e in same)
    return Manifest(entries, tuple(errors), tuple(warnings))


def parse_csv(text: str) -> Manifest:
    def check_header(header: list[str]) -> str | None:
        unknown = sorted(set(header) - set(COLUMNS))
        missing = [c for c in _REQUIRED if c not in header]
        if unknown or missing or len(set(header)) != len(header):
            return (f"bad header {header!r}: columns are {list(COLUMNS)}"
                    f" ({', '.join(_REQUIRED)} required), each once")
        return None

    try:
        rows = read_table(text, check_header, "no header row (iccid,deadline,apn,plan_bytes)")
    except TableError as exc:
        raise ManifestError(str(exc)) from None
    return _build(list(rows))


def parse_toml(text: str) -> Manifest:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"not TOML: {exc}") from None
    if set(doc) - {"sim"} or not isinstance(doc.get("sim", []), list):
        raise ManifestError("expected only [[sim]] tables at the top level")
    sims = doc.get("sim", [])
    lines: list[int | None] = [
        n for n, text_line in enumerate(text.splitlines(), 1) if _TOML_SIM.match(text_line)]
    if len(lines) != len(sims):  # inline tables: no line per entry
        lines = [None] * len(sims)
    return _build(
        (line, raw if isinstance(raw, dict) else "not a table")
        for line, raw in zip(lines, sims, strict=True))


def load_manifest(path: Path) -> Manifest:
    """Read ``path`` (``.csv`` or ``.toml``); :class:`ManifestError` when it cannot be read."""
    parse = {".csv": parse_csv, ".toml": parse_toml}.get(path.suffix.lower())
    if parse is None:
        raise ManifestError(f"{path}: a manifest is a .csv or .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return parse(text)
