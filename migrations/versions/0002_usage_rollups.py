"""Usage rollups: entity state, period rows, the aggregator's cursor, counter marks, gaps.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_cursor",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("second", sa.BigInteger(), nullable=True),
        sa.Column("first_second", sa.BigInteger(), nullable=True),
        sa.Column("cycle", sa.BigInteger(), nullable=False),
        sa.Column("counter_cursors", sa.Text(), nullable=False),
        sa.Column("horizons", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_cursor")),
    )
    op.create_table(
        "usage_gaps",
        sa.Column("second", sa.BigInteger(), nullable=False),
        sa.Column("missed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("second", name=op.f("pk_usage_gaps")),
    )
    op.create_table(
        "usage_marks",
        sa.Column("datacenter", sa.String(length=100), nullable=False),
        sa.Column("incarnation", sa.String(length=200), nullable=False),
        sa.Column("totals", sa.Text(), nullable=False),
        sa.Column("retired", sa.Boolean(), nullable=False),
        sa.Column("updated", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("datacenter", "incarnation", name=op.f("pk_usage_marks")),
    )
    op.create_table(
        "usage_rollups",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("unit", sa.SmallInteger(), nullable=False),
        sa.Column("period_start", sa.BigInteger(), nullable=False),
        sa.Column("conns0", sa.BigInteger(), nullable=False),
        sa.Column("ws0", sa.BigInteger(), nullable=False),
        sa.Column("channels0", sa.BigInteger(), nullable=False),
        sa.Column("area0", sa.BigInteger(), nullable=False),
        sa.Column("ch_area0", sa.BigInteger(), nullable=False),
        sa.Column("opened0", sa.BigInteger(), nullable=False),
        sa.Column("refused0", sa.BigInteger(), nullable=False),
        sa.Column("ch_opened0", sa.BigInteger(), nullable=False),
        sa.Column("pub_n0", sa.BigInteger(), nullable=False),
        sa.Column("pub_b0", sa.BigInteger(), nullable=False),
        sa.Column("del_n0", sa.BigInteger(), nullable=False),
        sa.Column("del_b0", sa.BigInteger(), nullable=False),
        sa.Column("peak", sa.BigInteger(), nullable=False),
        sa.Column("peak_at", sa.BigInteger(), nullable=False),
        sa.Column("min", sa.BigInteger(), nullable=False),
        sa.Column("ws_peak", sa.BigInteger(), nullable=False),
        sa.Column("ch_peak", sa.BigInteger(), nullable=False),
        sa.Column("ch_min", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "scope", "entity_id", "unit", "period_start", name=op.f("pk_usage_rollups")
        ),
    )
    op.create_index(
        "ix_usage_rollups_unit_period_start",
        "usage_rollups",
        ["unit", "period_start"],
        unique=False,
    )
    op.create_table(
        "usage_state",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("conns", sa.BigInteger(), nullable=False),
        sa.Column("ws", sa.BigInteger(), nullable=False),
        sa.Column("channels", sa.BigInteger(), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=False),
        sa.Column("area", sa.BigInteger(), nullable=False),
        sa.Column("ch_area", sa.BigInteger(), nullable=False),
        sa.Column("opened", sa.BigInteger(), nullable=False),
        sa.Column("refused", sa.BigInteger(), nullable=False),
        sa.Column("ch_opened", sa.BigInteger(), nullable=False),
        sa.Column("pub_n", sa.BigInteger(), nullable=False),
        sa.Column("pub_b", sa.BigInteger(), nullable=False),
        sa.Column("del_n", sa.BigInteger(), nullable=False),
        sa.Column("del_b", sa.BigInteger(), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=True),
        sa.Column("hour", sa.BigInteger(), nullable=True),
        sa.Column("day", sa.BigInteger(), nullable=True),
        sa.Column("month", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("scope", "entity_id", name=op.f("pk_usage_state")),
    )
    op.execute(
        "INSERT INTO usage_cursor (id, cycle, counter_cursors, horizons) VALUES (1, 0, '{}', '{}')"
    )
    if op.get_bind().dialect.name == "postgresql":
        # Rewritten every cycle in place: room in each page keeps the updates HOT (no index
        # entry per update, no page split).
        op.execute("ALTER TABLE usage_state SET (fillfactor = 70)")
        op.execute("ALTER TABLE usage_rollups SET (fillfactor = 85)")


def downgrade() -> None:
    op.drop_table("usage_state")
    op.drop_index("ix_usage_rollups_unit_period_start", table_name="usage_rollups")
    op.drop_table("usage_rollups")
    op.drop_table("usage_marks")
    op.drop_table("usage_gaps")
    op.drop_table("usage_cursor")
