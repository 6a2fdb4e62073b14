"""Usage rollups partitioned on Postgres: by unit; minute rows by UTC day, hour rows by month.

Revision ID: 0003
Revises: 0002

Postgres only: SQLite keeps one plain table, and this revision does nothing there. The layout
is described in ``metering/rollups/partitions.py`` and ``docs/rollups.md``.

The existing table is renamed, the partitioned one created with the partitions its rows need
(and those ahead), every row copied, the old table dropped: in one transaction, which holds the
old table locked for the whole copy. Stop the workers first; on a large table count on some
4 to 5 s per million rows (``bench/partitions.py`` writes the same table at that speed).
"""

import time
from collections.abc import Sequence

from alembic import op

from metering.rollups import partitions
from metering.rollups.periods import Unit

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = "scope, entity_id, unit, period_start"
OLD = "usage_rollups_0002"


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    # The copy takes as long as the table is big: the 5 min guard of env.py is not for it.
    op.execute("SET LOCAL statement_timeout = 0")
    op.execute(f"ALTER TABLE usage_rollups RENAME TO {OLD}")
    op.execute(f"ALTER TABLE {OLD} RENAME CONSTRAINT pk_usage_rollups TO pk_{OLD}")
    op.execute(f"ALTER INDEX ix_usage_rollups_unit_period_start RENAME TO ix_{OLD}")
    op.execute(
        f"CREATE TABLE usage_rollups (LIKE {OLD}, "
        f"CONSTRAINT pk_usage_rollups PRIMARY KEY ({KEY})) PARTITION BY LIST (unit)"
    )
    op.execute(
        "CREATE INDEX ix_usage_rollups_unit_period_start ON usage_rollups (unit, period_start)"
    )
    ff = "WITH (fillfactor = 85)"  # (as the table had, migration 0002; 0019 changed it)
    for unit, code in (("minute", 1), ("hour", 2)):
        op.execute(
            f"CREATE TABLE usage_rollups_{unit} PARTITION OF usage_rollups FOR VALUES IN ({code}) "
            "PARTITION BY RANGE (period_start)"
        )
        op.execute(
            f"CREATE TABLE usage_rollups_{unit}_default PARTITION OF usage_rollups_{unit} DEFAULT {ff}"
        )
    for unit, code in (("day", 3), ("month", 4)):
        op.execute(
            f"CREATE TABLE usage_rollups_{unit} PARTITION OF usage_rollups FOR VALUES IN ({code}) {ff}"
        )
    # A partition for every day (minute rows) and month (hour rows) that has rows, and ahead.
    covering = {
        unit: [
            r[0]
            for r in conn.exec_driver_sql(
                f"SELECT DISTINCT period_start / 86400 * 86400 FROM {OLD} WHERE unit = {code}"  # noqa: S608
            )
        ]
        for unit, code in ((Unit.MINUTE, 1), (Unit.HOUR, 2))
    }
    partitions.ensure(conn, int(time.time()), covering=covering)
    op.execute(f"INSERT INTO usage_rollups SELECT * FROM {OLD}")  # noqa: S608
    op.execute(f"DROP TABLE {OLD}")
    op.execute("ANALYZE usage_rollups")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("SET LOCAL statement_timeout = 0")
    new = "usage_rollups_0003"
    op.execute(f"ALTER TABLE usage_rollups RENAME TO {new}")
    op.execute(f"ALTER TABLE {new} RENAME CONSTRAINT pk_usage_rollups TO pk_{new}")
    op.execute(f"ALTER INDEX ix_usage_rollups_unit_period_start RENAME TO ix_{new}")
    op.execute(
        f"CREATE TABLE usage_rollups (LIKE {new}, CONSTRAINT pk_usage_rollups PRIMARY KEY ({KEY})) "
        "WITH (fillfactor = 85)"
    )
    op.execute(
        "CREATE INDEX ix_usage_rollups_unit_period_start ON usage_rollups (unit, period_start)"
    )
    op.execute(f"INSERT INTO usage_rollups SELECT * FROM {new}")  # noqa: S608
    op.execute(f"DROP TABLE {new}")
