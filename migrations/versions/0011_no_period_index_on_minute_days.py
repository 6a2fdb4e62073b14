"""The (unit, period_start) index leaves the daily partitions of minute rows.

Revision ID: 0011
Revises: 0010

Postgres only (SQLite keeps one plain table and its index). The index served retention and
the reads of one period across entities (a month's rows for the bills, an hour's). Minute rows
are never read that way: they are read per entity, by the primary key, and retention drops
their daily partitions whole, deleting rows only from their DEFAULT partition. On the daily
partitions the index was pure cost: an entry per minute row (nearly all the rows there are,
up to 144 M a day at 100 000 apps), and about 130 ms of the 600 ms that 120 000 closed minute
rows took to COPY in (measured alone, ``docs/benchmarks.md``).

The index moves from the partitioned parent to where it is used: the hour rows (a partitioned
index, so every hour partition made later has it), the day and month rows, and the minute
rows' DEFAULT partition. Creating it reads those tables once; the daily minute partitions,
the bulk of the rows, are not read.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from metering.rollups import partitions

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARENT_INDEX = "ix_usage_rollups_unit_period_start"
# Where the index stays: each table with it, and its index's name.
KEPT = {
    "usage_rollups_hour": "ix_usage_rollups_hour_unit_period_start",
    "usage_rollups_day": "ix_usage_rollups_day_unit_period_start",
    "usage_rollups_month": "ix_usage_rollups_month_unit_period_start",
    "usage_rollups_minute_default": "ix_usage_rollups_minute_default_unit_period_start",
}


def upgrade() -> None:
    if not partitions.is_partitioned(op.get_bind()):
        return
    op.execute(f"DROP INDEX {PARENT_INDEX}")
    for table, index in KEPT.items():
        op.execute(f"CREATE INDEX {index} ON {table} (unit, period_start)")


def downgrade() -> None:
    if not partitions.is_partitioned(op.get_bind()):
        return
    for index in KEPT.values():
        op.execute(f"DROP INDEX {index}")
    op.execute(f"CREATE INDEX {PARENT_INDEX} ON usage_rollups (unit, period_start)")
