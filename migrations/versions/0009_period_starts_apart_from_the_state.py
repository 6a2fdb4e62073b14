"""Where each entity's latest rows start moves from usage_state to a table of its own.

Revision ID: 0009
Revises: 0008

``usage_state`` keeps the value held, the running totals and the latest minute row's extremes:
what a busy app or account changes every cycle. ``usage_starts`` takes the start of the latest
row per unit (``minute``, ``hour``, ``day``, ``month``) and the latest minute row's values
carried in and totals at its start (``minute_conns0`` to ``minute_msg_refused0``), which change
only when a period begins for the entity. On Postgres an UPDATE writes a whole new version of
the row, so the state rewritten every cycle is now 23 columns instead of 41: at 100 000 apps
the table the cycle rewrites stays in Postgres's buffers (its versions at 41 columns did not).

Every state row gets its starts row, NULL where it was NULL. On Postgres the dropped columns
keep their space in a state row until the row is next written (the next cycle that changes
the entity); ``VACUUM FULL usage_state`` gives it back at once, if wanted. (Not ``CLUSTER`` in
here: on an empty table it leaves statistics that make the planner join a first cycle's new
entities against the table by nested loop, in time quadratic in their number.) Stop the
aggregation workers first: one of the other version would write columns that are not there.

The counter marks (``usage_marks.packed``) are stored uncompressed from now on (see below).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "opened", "refused", "ch_opened", "pub_n", "pub_b", "del_n", "del_b", "ch_refused",
    "msg_refused",
)  # fmt: skip
# The columns that move, in usage_state's order.
MOVED = (
    "minute", "hour", "day", "month", "minute_conns0", "minute_ws0", "minute_channels0",
    "minute_area0", "minute_ch_area0", *(f"minute_{c}0" for c in COUNTERS),
)  # fmt: skip
_KEYS = ("scope", "entity_id")


def upgrade() -> None:
    op.create_table(
        "usage_starts",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=True) for c in MOVED),
        sa.PrimaryKeyConstraint(*_KEYS, name=op.f("pk_usage_starts")),
    )
    columns = ", ".join((*_KEYS, *MOVED))
    op.execute(f"INSERT INTO usage_starts ({columns}) SELECT {columns} FROM usage_state")  # noqa: S608
    with op.batch_alter_table("usage_state") as batch:
        for c in MOVED:
            batch.drop_column(c)
    if op.get_bind().dialect.name == "postgresql":
        # Rewritten when a period begins for the entity (every minute for a busy one), all of
        # a page's rows in one statement: room for their new versions keeps the updates HOT.
        op.execute("ALTER TABLE usage_starts SET (fillfactor = 70)")
        # An incarnation's marks (a megabyte at 100 000 apps) are rewritten every cycle it
        # counted in: stored as they are, not run through pglz first. Totals that compress
        # (small numbers in int64) took 3.3 s for 20 marks of 15 000 apps, against 0.25 to
        # 0.37 s uncompressed; the benchmark's own marks did not compress, and cost the same.
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET STORAGE EXTENDED")
    with op.batch_alter_table("usage_state") as batch:
        for c in MOVED:
            batch.add_column(sa.Column(c, sa.BigInteger(), nullable=True))
    sets = ", ".join(f"{c} = s.{c}" for c in MOVED)
    op.execute(
        f"UPDATE usage_state SET {sets} FROM usage_starts s "  # noqa: S608
        "WHERE s.scope = usage_state.scope AND s.entity_id = usage_state.entity_id"
    )
    op.drop_table("usage_starts")
