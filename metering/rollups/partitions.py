"""Partitions of ``usage_rollups`` on Postgres: created ahead, filled from DEFAULT, dropped whole.

The layout (built by migration 0003; why, in ``docs/rollups.md``; measured by
``bench/partitions.py``)::

    usage_rollups                       PARTITION BY LIST (unit)
      usage_rollups_minute              unit 1, PARTITION BY RANGE (period_start), a UTC day each
        usage_rollups_minute_20261122   [2026-11-22, 2026-11-23)
        usage_rollups_minute_default    anything outside the days created
      usage_rollups_hour                unit 2, PARTITION BY RANGE (period_start), a UTC month each
        usage_rollups_hour_202611       [2026-11, 2026-12)
        usage_rollups_hour_default
      usage_rollups_day                 unit 3: kept for ever by default, never dropped whole
      usage_rollups_month               unit 4: likewise

The (unit, period_start) index is on the hour rows (a partitioned index: their partitions made
later have it too), the day and month rows and ``usage_rollups_minute_default``, not on the
daily minute partitions (migration 0011: read per entity, dropped whole).

``ensure`` keeps partitions ready ahead (``SPLITS``: minute rows a week, hour rows through the
month after next); the migration and the hourly retention task call it.

Retention drops a unit's partitions once they lie wholly before its cutoff and deletes rows
only from the DEFAULT partition; reads never look before the cutoff (the unit's horizon), so a
row past it that waits for its day or month to be dropped is never served.

Every function here is a no-op on SQLite, where ``usage_rollups`` is one plain table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text

from metering.rollups.periods import Unit, next_start, start_of

TABLE = "usage_rollups"


@dataclass(frozen=True, slots=True)
class Split:
    span: Unit  # one partition per period of this unit
    ahead: int  # partitions kept ready after the one holding "now"


# The units split by time. Minute rows: a week ahead, not months: a read's "next row" statement
# plans and opens every partition after its start (bench/partitions.py, read).
SPLITS: dict[Unit, Split] = {Unit.MINUTE: Split(Unit.DAY, 7), Unit.HOUR: Split(Unit.MONTH, 2)}
# Room left in each page, per unit (migration 0019). Hour, day and month rows are rewritten
# as their periods' extremes widen, at the start of a period all of a busy world's at once: a
# page filled to half has room for a new version of every row in it, so that each update
# stays HOT (the new version on the same page, no new index entry) and pages are pruned of
# the old ones as they are read. Minute rows are written once and never updated: full pages.
FILLFACTOR: dict[Unit, int] = {Unit.MINUTE: 100, Unit.HOUR: 50, Unit.DAY: 50, Unit.MONTH: 50}
# pg_advisory_xact_lock key: one creator or dropper of partitions at a time.
LOCK_KEY = 0x726F6C6C757073  # "rollups"
_BOUND = re.compile(r"FOR VALUES FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: int  # seconds, inclusive
    end: int  # seconds, exclusive


@dataclass(frozen=True, slots=True)
class Expired:
    dropped: list[str]  # partitions dropped whole
    deleted: int  # rows deleted from the DEFAULT partition


def parent(unit: Unit) -> str:
    """The partition of a unit (itself partitioned by time when the unit is in ``SPLITS``)."""
    return f"{TABLE}_{unit.value}"


def default(unit: Unit) -> str:
    return f"{TABLE}_{unit.value}_default"


def name(unit: Unit, start: datetime) -> str:
    fmt = "%Y%m%d" if SPLITS[unit].span is Unit.DAY else "%Y%m"
    return f"{TABLE}_{unit.value}_{start.strftime(fmt)}"


def is_partitioned(conn: Connection) -> bool:
    """Whether ``usage_rollups`` is partitioned here (Postgres, after migration 0003)."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": TABLE}
    ).scalar()
    return kind == "p"


def partitions(conn: Connection, unit: Unit) -> list[Partition]:
    """The dated partitions of a unit in ``SPLITS``, oldest first (not its DEFAULT)."""
    rows = conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:p)"
        ),
        {"p": parent(unit)},
    ).all()
    out = []
    for relname, bound in rows:
        m = _BOUND.fullmatch(bound)
        if m is not None:
            out.append(Partition(relname, int(m[1]), int(m[2])))
    return sorted(out, key=lambda p: p.start)


def _lock(conn: Connection) -> None:
    """Serialize with other maintainers, then keep writers out until the commit.

    EXCLUSIVE on the top table still lets reads through. Taking it before any unit's table
    (which ``CREATE TABLE ... PARTITION OF`` and ``DROP TABLE`` lock in ACCESS EXCLUSIVE mode)
    is the order the aggregator's insert takes them in, so the two cannot deadlock, and no row
    can be routed to a DEFAULT partition while rows move out of it.
    """
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
    conn.exec_driver_sql(f"LOCK TABLE {TABLE} IN EXCLUSIVE MODE")


def ensure(
    conn: Connection, now: int, *, covering: Mapping[Unit, Iterable[int]] | None = None
) -> list[str]:
    """Create the missing partitions: the one holding ``now`` and ``Split.ahead`` after it per
    unit, and one holding each second in ``covering`` (per unit); return their names.

    Rows waiting in a DEFAULT partition for a range created move into it (Postgres refuses to
    create a partition whose range has rows in DEFAULT). Idempotent; two maintainers at once
    serialize on an advisory lock, and the second finds nothing to do. In the caller's
    transaction.
    """
    if not is_partitioned(conn):
        return []
    moment = datetime.fromtimestamp(now, UTC)
    wanted: dict[Unit, set[datetime]] = {}
    for unit, split in SPLITS.items():
        seconds = (covering or {}).get(unit, ())
        starts = {start_of(split.span, datetime.fromtimestamp(s, UTC)) for s in seconds}
        start = start_of(split.span, moment)
        for _ in range(split.ahead + 1):
            starts.add(start)
            start = next_start(split.span, start)
        wanted[unit] = starts
    if not _missing(conn, wanted):
        return []  # the usual hourly call: no lock taken
    _lock(conn)
    created = []
    for unit, starts in _missing(conn, wanted).items():
        for start in sorted(starts):
            _create(conn, unit, start)
            created.append(name(unit, start))
    return created


def _missing(conn: Connection, wanted: Mapping[Unit, set[datetime]]) -> dict[Unit, set[datetime]]:
    out = {}
    for unit, starts in wanted.items():
        have = {p.start for p in partitions(conn, unit)}
        missing = {s for s in starts if int(s.timestamp()) not in have}
        if missing:
            out[unit] = missing
    return out


def _create(conn: Connection, unit: Unit, start: datetime) -> None:
    lo, hi = int(start.timestamp()), int(next_start(SPLITS[unit].span, start).timestamp())
    table, dflt = name(unit, start), default(unit)
    where, bounds = "period_start >= :lo AND period_start < :hi", {"lo": lo, "hi": hi}
    waiting = conn.execute(
        text(f"SELECT EXISTS (SELECT 1 FROM {dflt} WHERE {where})"),  # noqa: S608
        bounds,
    ).scalar()
    if waiting:
        # Out of DEFAULT into a holding table, the partition created, and back into it: all in
        # this transaction, while _lock keeps new rows out of DEFAULT.
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS _moving_{TABLE} (LIKE {TABLE}) ON COMMIT DROP"
        )
        conn.exec_driver_sql(f"TRUNCATE _moving_{TABLE}")
        conn.execute(
            text(
                f"WITH m AS (DELETE FROM {dflt} WHERE {where} RETURNING *) "  # noqa: S608
                f"INSERT INTO _moving_{TABLE} SELECT * FROM m"
            ),
            bounds,
        )
    conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {table} PARTITION OF {parent(unit)} "
        f"FOR VALUES FROM ({lo}) TO ({hi}) WITH (fillfactor = {FILLFACTOR[unit]})"
    )
    if waiting:
        conn.exec_driver_sql(f"INSERT INTO {table} SELECT * FROM _moving_{TABLE}")  # noqa: S608


def expire(conn: Connection, unit: Unit, cutoff: int) -> Expired | None:
    """Drop the unit's partitions that end at or before ``cutoff``, and delete the rows before
    it from its DEFAULT partition. None where the unit is not split by time (SQLite, day and
    month rows): the caller deletes by unit and age. In the caller's transaction.

    Rows before the cutoff in the partition that straddles it stay until that whole partition
    is past it (at most a day of minute rows, a month of hour rows): ``bench/partitions.py``
    shows that deleting them would cost every hour what dropping them later costs nothing.
    """
    if unit not in SPLITS or not is_partitioned(conn):
        return None
    dropped = []
    expired = [p for p in partitions(conn, unit) if p.end <= cutoff]
    if expired:
        _lock(conn)
        for p in partitions(conn, unit):  # again, under the lock
            if p.end <= cutoff:
                conn.exec_driver_sql(f"DROP TABLE {p.name}")
                dropped.append(p.name)
    deleted = conn.execute(
        text(f"DELETE FROM {default(unit)} WHERE period_start < :c"),  # noqa: S608
        {"c": cutoff},
    ).rowcount
    return Expired(dropped=dropped, deleted=deleted)
