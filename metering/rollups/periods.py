"""UTC periods of the rollups and their ``intervalId`` strings.

A period is a half-open UTC interval ``[start, end)``. Units nest: every minute lies in one
hour, every hour in one day, every day in one calendar month (the billing month).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from metering.core.errors import ValidationError


class Unit(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


_FORMATS = {
    Unit.MINUTE: "%Y-%m-%d:%H:%M",
    Unit.HOUR: "%Y-%m-%d:%H",
    Unit.DAY: "%Y-%m-%d",
    Unit.MONTH: "%Y-%m",
}
_PATTERNS = {
    Unit.MINUTE: re.compile(r"\d{4}-\d{2}-\d{2}:\d{2}:\d{2}"),
    Unit.HOUR: re.compile(r"\d{4}-\d{2}-\d{2}:\d{2}"),
    Unit.DAY: re.compile(r"\d{4}-\d{2}-\d{2}"),
    Unit.MONTH: re.compile(r"\d{4}-\d{2}"),
}


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: use timezone-aware UTC")
    return moment.astimezone(UTC)


def start_of(unit: Unit, moment: datetime) -> datetime:
    """The start of the period of ``unit`` that contains ``moment``."""
    m = _utc(moment)
    if unit is Unit.MINUTE:
        return m.replace(second=0, microsecond=0)
    if unit is Unit.HOUR:
        return m.replace(minute=0, second=0, microsecond=0)
    if unit is Unit.DAY:
        return m.replace(hour=0, minute=0, second=0, microsecond=0)
    return m.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_start(unit: Unit, start: datetime) -> datetime:
    """The start of the period after the one that starts at ``start``."""
    s = start_of(unit, start)
    if unit is Unit.MINUTE:
        return s + timedelta(minutes=1)
    if unit is Unit.HOUR:
        return s + timedelta(hours=1)
    if unit is Unit.DAY:
        return s + timedelta(days=1)
    return s.replace(year=s.year + 1, month=1) if s.month == 12 else s.replace(month=s.month + 1)


def interval_id(unit: Unit, moment: datetime) -> str:
    """``yyyy-mm-dd:hh:mm``, ``yyyy-mm-dd:hh``, ``yyyy-mm-dd`` or ``yyyy-mm``."""
    return start_of(unit, moment).strftime(_FORMATS[unit])


def parse_interval_id(unit: Unit, value: str) -> datetime:
    """The start of the period an ``intervalId`` names; a clear error for anything else."""
    if not _PATTERNS[unit].fullmatch(value):
        raise ValidationError(
            f"{value!r} is not a {unit.value} intervalId (expected {_FORMATS[unit]})"
        )
    try:
        return datetime.strptime(value, _FORMATS[unit]).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not a valid {unit.value}: {exc}") from None


def seconds_in(unit: Unit, start: datetime) -> int:
    """How many seconds the period starting at ``start`` lasts (months differ)."""
    return int((next_start(unit, start) - start_of(unit, start)).total_seconds())
