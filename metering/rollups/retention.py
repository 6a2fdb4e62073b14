"""Retention: rollup rows older than their unit's setting go, and marks nobody needs.

On Postgres the minute and hour rows are partitioned by day and by month
(``metering.rollups.partitions``): whole partitions are dropped, and this task is also what
keeps partitions created ahead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, delete, select, text, update

from metering.live.store import DatacenterStore
from metering.rollups import partitions, source, state
from metering.rollups.fold import UNIT_CODES, period_start
from metering.rollups.models import UsageCursor, UsageMark, UsageRollup
from metering.rollups.periods import Unit


def _oldest_lag(conn: Connection) -> int:
    """The oldest minute whose row closed hour, day and month rows still lack in usage_rollups
    (``fold.Book.lag``: the aggregator settles them within minutes): minute rows from it on
    stay, whatever their age, as reads widen those rows by them."""
    _, _, values = state.select(conn)
    lag = values[:, state.LAG_COLUMN]
    lag = lag[lag >= 0]
    return int(lag.min()) if lag.size else 2**62


@dataclass(frozen=True, slots=True)
class RetentionResult:
    deleted: dict[str, int]  # rows deleted, per unit
    marks_forgotten: int
    dropped: dict[str, list[str]] = field(default_factory=dict)  # partitions, per unit
    created: list[str] = field(default_factory=list)  # partitions made ahead


def enforce_retention(
    engine: Engine,
    datacenters: Mapping[str, DatacenterStore],
    kept: Mapping[Unit, float | None],
    *,
    now: float | None = None,
) -> RetentionResult:
    """Delete rollup rows older than each unit's retention, and counter marks nobody needs.

    Reads never synthesise a period before a unit's horizon (the start of the oldest period
    kept), so a deleted period reads as absent, not as a carried value. On Postgres, first the
    partitions ahead; then a unit split by time loses its partitions wholly past the cutoff,
    and rows are deleted only from its DEFAULT partition: the rest of the rows past the cutoff
    go with their partition (reads already stop at the horizon).
    """
    second = int(time.time() if now is None else now)
    deleted: dict[str, int] = {}
    dropped: dict[str, list[str]] = {}
    with engine.begin() as conn:
        # The cursor row first: an aggregation cycle under way finishes, the next one skips
        # (it takes the row with SKIP LOCKED) instead of waiting on partitions being dropped.
        cursor = conn.execute(
            select(UsageCursor.__table__).where(UsageCursor.id == 1).with_for_update()
        ).one()
        if conn.dialect.name == "postgresql":
            # Creating and dropping partitions wait for readers, and reads queue behind them:
            # better to try again next hour than to stall the stats API.
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        created = partitions.ensure(conn, second)
        horizons = json.loads(cursor.horizons or "{}")
        t = UsageRollup.__table__
        for unit, seconds in kept.items():
            if seconds is None:
                continue
            cutoff = period_start(unit, second - int(seconds))
            if unit is Unit.MINUTE:
                cutoff = min(cutoff, _oldest_lag(conn))
            code = UNIT_CODES[unit]
            expired = partitions.expire(conn, unit, cutoff)
            if expired is None:
                result = conn.execute(
                    delete(UsageRollup).where((t.c.unit == code) & (t.c.period_start < cutoff))
                )
                deleted[unit.value] = result.rowcount
            else:
                deleted[unit.value] = expired.deleted
                dropped[unit.value] = expired.dropped
            horizons[str(code)] = max(cutoff, int(horizons.get(str(code), 0)))
        conn.execute(
            update(UsageCursor)
            .where(UsageCursor.id == 1)
            .values(horizons=json.dumps(horizons, sort_keys=True))
        )
    # Marks of reaped incarnations whose final totals were applied an hour ago or more: their
    # Redis counters go first, so that no counter is ever left without its mark.
    forgotten = 0
    with engine.begin() as conn:
        old = conn.execute(
            select(UsageMark.datacenter, UsageMark.incarnation).where(
                UsageMark.retired & (UsageMark.updated < second - 3600)
            )
        ).all()
        by_dc: dict[str, list[str]] = {}
        for dc, inc in old:
            by_dc.setdefault(dc, []).append(inc)
        for dc, incs in by_dc.items():
            store = datacenters.get(dc)
            if store is None:
                continue
            source.forget_incarnations(store, incs)
            conn.execute(
                delete(UsageMark).where(
                    (UsageMark.datacenter == dc) & UsageMark.incarnation.in_(incs)
                )
            )
            forgotten += len(incs)
    return RetentionResult(deleted, forgotten, dropped, created)
