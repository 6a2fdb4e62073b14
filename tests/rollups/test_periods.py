"""Rollup periods are UTC, half-open, nested, and named by the stats API's intervalIds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from metering.core.errors import ValidationError
from metering.rollups.periods import (
    Unit,
    interval_id,
    next_start,
    parse_interval_id,
    seconds_in,
    start_of,
)

MOMENT = datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)


@pytest.mark.parametrize(
    ("unit", "start", "ident", "after"),
    [
        (
            Unit.MINUTE,
            datetime(2026, 12, 31, 23, 59, tzinfo=UTC),
            "2026-12-31:23:59",
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            Unit.HOUR,
            datetime(2026, 12, 31, 23, tzinfo=UTC),
            "2026-12-31:23",
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            Unit.DAY,
            datetime(2026, 12, 31, tzinfo=UTC),
            "2026-12-31",
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            Unit.MONTH,
            datetime(2026, 12, 1, tzinfo=UTC),
            "2026-12",
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_each_unit_floors_names_and_steps_across_the_year_end(
    unit: Unit, start: datetime, ident: str, after: datetime
) -> None:
    assert start_of(unit, MOMENT) == start
    assert interval_id(unit, MOMENT) == ident
    assert parse_interval_id(unit, ident) == start
    assert next_start(unit, start) == after


def test_periods_are_utc_whatever_the_callers_zone() -> None:
    tokyo = datetime(2026, 3, 1, 8, 30, tzinfo=timezone(timedelta(hours=9)))
    # 08:30 on 1 March in Tokyo is still February in UTC: February's bill.
    assert interval_id(Unit.MONTH, tokyo) == "2026-02"
    assert interval_id(Unit.DAY, tokyo) == "2026-02-28"
    with pytest.raises(ValueError, match="naive"):
        start_of(Unit.DAY, datetime(2026, 3, 1))  # noqa: DTZ001 (the point of the test)


@pytest.mark.parametrize(
    ("month", "days"), [("2026-02", 28), ("2028-02", 29), ("2026-04", 30), ("2026-12", 31)]
)
def test_months_last_as_long_as_the_calendar_says(month: str, days: int) -> None:
    assert seconds_in(Unit.MONTH, parse_interval_id(Unit.MONTH, month)) == days * 86_400


def test_smaller_periods_tile_the_larger_ones() -> None:
    month = parse_interval_id(Unit.MONTH, "2028-02")
    day, days = month, 0
    while day < next_start(Unit.MONTH, month):
        assert start_of(Unit.MONTH, day) == month
        day, days = next_start(Unit.DAY, day), days + 1
    assert days == 29
    assert sum(seconds_in(Unit.MINUTE, month) for _ in range(60)) == seconds_in(Unit.HOUR, month)


@pytest.mark.parametrize(
    ("unit", "value"),
    [
        (Unit.MONTH, "2026-13"),
        (Unit.MONTH, "2026-1"),
        (Unit.DAY, "2026-02-30"),
        (Unit.HOUR, "2026-02-01:24"),
        (Unit.MINUTE, "2026-02-01:10"),
        (Unit.DAY, "2026-02-01:10"),
        (Unit.DAY, ""),
    ],
)
def test_a_malformed_interval_id_is_a_clear_error(unit: Unit, value: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_interval_id(unit, value)
    assert unit.value in refused.value.message
