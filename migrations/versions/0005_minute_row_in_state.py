"""The latest minute row of each app and account lives in usage_state until the minute ends.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# usage_rollups' columns from conns0 on, each as usage_state.minute_<column>.
COLUMNS = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", "opened0", "refused0", "ch_opened0",
    "pub_n0", "pub_b0", "del_n0", "del_b0", "peak", "peak_at", "min", "ws_peak", "ch_peak",
    "ch_min",
)  # fmt: skip
_LATEST = (
    "r.scope = usage_state.scope AND r.entity_id = usage_state.entity_id "
    "AND r.unit = 1 AND r.period_start = usage_state.minute"
)


def upgrade() -> None:
    with op.batch_alter_table("usage_state") as batch:
        for c in COLUMNS:
            batch.add_column(sa.Column(f"minute_{c}", sa.BigInteger(), nullable=True))
    # Each entity's latest minute row moves into its state row.
    sets = ", ".join(f"minute_{c} = r.{c}" for c in COLUMNS)
    op.execute(f"UPDATE usage_state SET {sets} FROM usage_rollups r WHERE {_LATEST}")  # noqa: S608
    op.execute(
        "DELETE FROM usage_rollups WHERE unit = 1 AND EXISTS (SELECT 1 FROM usage_state s "
        "WHERE s.scope = usage_rollups.scope AND s.entity_id = usage_rollups.entity_id "
        "AND s.minute = usage_rollups.period_start AND s.minute_peak IS NOT NULL)"
    )


def downgrade() -> None:
    cols = ", ".join(COLUMNS)
    values = ", ".join(f"minute_{c}" for c in COLUMNS)
    op.execute(
        f"INSERT INTO usage_rollups (scope, entity_id, unit, period_start, {cols}) "  # noqa: S608
        f"SELECT scope, entity_id, 1, minute, {values} FROM usage_state "
        "WHERE minute IS NOT NULL AND minute_peak IS NOT NULL"
    )
    with op.batch_alter_table("usage_state") as batch:
        for c in COLUMNS:
            batch.drop_column(f"minute_{c}")
