"""Counter marks packed as int64 (metering.rollups.marks) instead of JSON.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MARKS = sa.table(
    "usage_marks",
    sa.column("datacenter", sa.String),
    sa.column("incarnation", sa.String),
    sa.column("totals", sa.Text),
    sa.column("packed", sa.LargeBinary),
)


def _pack(totals: str) -> bytes:
    """JSON {app: [6 totals]} to the packed form: rows of (app, 6 totals), sorted by app."""
    marks = json.loads(totals)
    rows = sorted([int(app), *values] for app, values in marks.items())
    return np.array(rows, dtype="<i8").reshape(-1, 7).tobytes()


def _unpack(packed: bytes) -> str:
    table = np.frombuffer(packed, dtype="<i8").reshape(-1, 7)
    return json.dumps({str(int(r[0])): [int(x) for x in r[1:]] for r in table})


def _convert(column: str, into: str, convert: Callable[[Any], Any]) -> None:
    """Fill ``into`` from ``column`` for every mark."""
    conn = op.get_bind()
    for dc, inc, value in conn.execute(
        sa.select(_MARKS.c.datacenter, _MARKS.c.incarnation, _MARKS.c[column])
    ).all():
        conn.execute(
            _MARKS.update()
            .where((_MARKS.c.datacenter == dc) & (_MARKS.c.incarnation == inc))
            .values({into: convert(value)})
        )


def upgrade() -> None:
    op.add_column("usage_marks", sa.Column("packed", sa.LargeBinary(), nullable=True))
    _convert("totals", "packed", _pack)
    with op.batch_alter_table("usage_marks") as batch:
        batch.alter_column("packed", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("totals")
    if op.get_bind().dialect.name == "postgresql":
        # Rewritten whole each cycle and incompressible: skip pglz's compression attempt.
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.add_column("usage_marks", sa.Column("totals", sa.Text(), nullable=True))
    _convert("packed", "totals", _unpack)
    with op.batch_alter_table("usage_marks") as batch:
        batch.alter_column("totals", existing_type=sa.Text(), nullable=False)
        batch.drop_column("packed")
