"""Hour, day and month rows leave room in each page for a new version of each; minute rows none.

Revision ID: 0019
Revises: 0018

Postgres only (SQLite keeps one plain table). ``usage_rollups`` and its partitions had a fill
factor of 85 (migrations 0002 and 0003). Hour, day and month rows are rewritten (merged) as
their periods' extremes widen, and at the start of a period every busy entity's at once: at a
month's start at 100 000 apps, 27 000 merges of the rows begun in its first minute in each
cycle of its third minute. An update is HOT (the new version on the same page, no new entry
in the key's and the period index) only while its page has room for it: at 85 a page of 35
rows has room for about 5 new versions. At 50 it has room for all of them, and Postgres
prunes the old versions when it next reads the page. Measured on this kind of machine
(``bench/fillfactor.py``: 33 000 merges a cycle into three tables of 330 000 rows, ten cycles,
three rounds): a median cycle of 322 ms at 85 (19 % of the updates HOT), 288 ms at 70 (48 %),
242 ms at 50 (all), the tables 317, 363 and 430 MiB. The hour, day and month partitions take
up to twice the pages for their rows; minute rows, 60 times as many per period, are written
once and never updated, and now fill their pages (100), which saves more than that.

The new fill factor applies to the pages written from now on (``VACUUM FULL`` of a partition
applies it at once, if wanted: it locks the partition). Partitions made from now on get it
from ``metering.rollups.partitions.FILLFACTOR``. The downgrade sets 85 everywhere again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Per unit code, as of this revision (copied: a migration keeps meaning what it meant).
_FILLFACTOR = {1: 100, 2: 50, 3: 50, 4: 50}
_BEFORE = dict.fromkeys(_FILLFACTOR, 85)


def _set(fillfactor: Mapping[int, int]) -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    # The tables that hold rows (the partitioned ones take no storage parameters), each with
    # the unit of the partition of usage_rollups it lies under.
    leaves = conn.execute(
        sa.text(
            "SELECT t.relid::regclass::text, u.relid::regclass::text "
            "FROM pg_partition_tree('usage_rollups') u "
            "JOIN LATERAL pg_partition_tree(u.relid) t ON t.isleaf "
            "WHERE u.level = 1"
        )
    ).all()
    units = {f"usage_rollups_{name}": code for name, code in
             (("minute", 1), ("hour", 2), ("day", 3), ("month", 4))}  # fmt: skip
    for table, under in leaves:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactor[units[under]]})")


def upgrade() -> None:
    _set(_FILLFACTOR)


def downgrade() -> None:
    _set(_BEFORE)
