"""Billing periods: a SIM's data is metered per period, which starts at midnight of the cycle
day (1-28) in the plan's time zone and ends at the next one."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo


def billing_period(now: float, cycle_day: int, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of the billing period holding ``now``: midnight of ``cycle_day`` (1-28)."""
    local = datetime.fromtimestamp(now, tz)
    year, month = local.year, local.month
    if local.day < cycle_day:
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    start = datetime(year, month, cycle_day, tzinfo=tz)
    year, month = (year, month + 1) if month < 12 else (year + 1, 1)
    return start, datetime(year, month, cycle_day, tzinfo=tz)


def period_end(report: dict[str, Any]) -> float:
    """When the period of a ``usage`` report ends (Unix seconds)."""
    return datetime.fromisoformat(report["period"]["end"]).timestamp()
