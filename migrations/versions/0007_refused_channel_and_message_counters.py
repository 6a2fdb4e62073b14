"""Channel attaches and messages refused by enforcement: two more cumulative counters.

Revision ID: 0007
Revises: 0006

``usage_state`` gains the running totals ``ch_refused`` and ``msg_refused`` (and, for the
latest minute row it holds, ``minute_ch_refused0`` and ``minute_msg_refused0``),
``usage_rollups`` their values at each period's start, ``ch_refused0`` and ``msg_refused0``.
Nothing was counted before, so every one of them is 0. Each is declared as the counters beside
it: NOT NULL without a default, the minute row's nullable like the rest of that row.

On Postgres the NOT NULL columns are added with ``DEFAULT 0``, which then goes: no table is
rewritten (the 0 of the rows already there stays in the catalog), so this takes as long on a
billion rollup rows as on none. ``usage_rollups`` is altered on its partitioned parent, which
alters every partition (the DEFAULT ones included) and every partition created later. SQLite
copies both tables to drop the default.

Every counter mark (``usage_marks.packed``, per app its id and its totals as little-endian
int64) is repacked from seven int64 per app to nine, the two new totals 0; the downgrade
repacks them back to seven and drops the columns (the refusals counted are lost).

Stop the aggregation workers first (and, for the downgrade, bring every gateway back to the
six-counter protocol): a worker of the other version would read the marks at the wrong width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW = ("ch_refused", "msg_refused")
# int64 per app in usage_marks.packed: the app's id, then its totals (six before, eight after).
BEFORE, AFTER = 7, 9

_MARKS = sa.table(
    "usage_marks",
    sa.column("datacenter", sa.String),
    sa.column("incarnation", sa.String),
    sa.column("packed", sa.LargeBinary),
)


def _repack(width: int, into: int) -> None:
    """Each incarnation's marks from ``width`` int64 per app to ``into``: the totals that both
    have kept, new ones 0, others dropped. One mark at a time (each may hold megabytes)."""
    conn = op.get_bind()
    keys = conn.execute(sa.select(_MARKS.c.datacenter, _MARKS.c.incarnation)).all()
    for dc, inc in keys:
        where = (_MARKS.c.datacenter == dc) & (_MARKS.c.incarnation == inc)
        packed = conn.execute(sa.select(_MARKS.c.packed).where(where)).scalar_one()
        table = np.frombuffer(packed, dtype="<i8").reshape(-1, width)
        out = np.zeros((len(table), into), dtype="<i8")
        out[:, : min(width, into)] = table[:, : min(width, into)]
        conn.execute(_MARKS.update().where(where).values(packed=out.tobytes()))


def upgrade() -> None:
    counters = {"usage_state": NEW, "usage_rollups": tuple(f"{c}0" for c in NEW)}
    for table, columns in counters.items():
        with op.batch_alter_table(table) as batch:
            for c in columns:
                batch.add_column(
                    sa.Column(c, sa.BigInteger(), nullable=False, server_default=sa.text("0"))
                )
            if table == "usage_state":
                for c in NEW:
                    batch.add_column(sa.Column(f"minute_{c}0", sa.BigInteger(), nullable=True))
    # The latest minute row held in the state starts, like every period, with nothing refused.
    sets = ", ".join(f"minute_{c}0 = 0" for c in NEW)
    op.execute(f"UPDATE usage_state SET {sets} WHERE minute_refused0 IS NOT NULL")  # noqa: S608
    # A separate batch: on SQLite it copies the table, which needs the columns already filled.
    for table, columns in counters.items():
        with op.batch_alter_table(table) as batch:
            for c in columns:
                batch.alter_column(
                    c, existing_type=sa.BigInteger(), existing_nullable=False, server_default=None
                )
    _repack(BEFORE, AFTER)


def downgrade() -> None:
    _repack(AFTER, BEFORE)
    with op.batch_alter_table("usage_rollups") as batch:
        for c in NEW:
            batch.drop_column(f"{c}0")
    with op.batch_alter_table("usage_state") as batch:
        for c in NEW:
            batch.drop_column(f"minute_{c}0")
        for c in NEW:
            batch.drop_column(c)
