"""``usage_state`` holds 64 entities of a scope to a row.

Revision ID: 0014
Revises: 0013

``usage_state(scope, entity_id, packed)`` becomes ``usage_state(scope, block, packed)``: a row
per scope and ``block = entity_id >> 6``, whose ``packed`` holds the values of the entities in
it (``metering.rollups.state``: their count, their ids, their widths, the 39 fields of each,
then the 21-value held row of each that holds one; big-endian int64). Every busy entity's
value is rewritten every cycle, and Postgres pays per row rewritten (an index entry, a tuple
header, a TOAST pointer): 120 000 entities took 0.9 to 1.3 s as one row each, 0.30 to 0.39 s
as 1 875 rows of 64. On Postgres the blocks are stored out of line uncompressed (``STORAGE
EXTERNAL``): pglz would compress every 20 to 30 kB block on every write, 7 to 9 s a cycle.

Both ways in Python, in batches, every entity's value kept byte for byte: the downgrade gives
each entity its row back as it was. Stop the aggregation workers first; at 120 000 entities
it takes a few seconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from itertools import groupby
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BLOCK_BITS = 6
NARROW = 39  # an entity's fields (migration 0012)
WIDE = NARROW + 21  # with a held minute row
_BATCH = 5_000


def _batches(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), _BATCH):
        yield rows[start : start + _BATCH]


def _encode(members: Sequence[tuple[int, bytes]]) -> bytes:
    """A block's value from its entities' (id, packed value), in id order."""
    widths = [len(p) // 8 for _, p in members]
    if any(
        w not in {NARROW, WIDE} or 8 * w != len(p)
        for w, (_, p) in zip(widths, members, strict=True)
    ):
        raise ValueError("a usage_state row is neither 312 nor 480 bytes: not at migration 0013")
    n = len(members)
    head = struct.pack(f">{1 + 2 * n}q", n, *(e for e, _ in members), *widths)
    return b"".join(
        [head, *(p[: 8 * NARROW] for _, p in members), *(p[8 * NARROW :] for _, p in members)]
    )


def _decode(block: int, packed: bytes) -> list[tuple[int, bytes]]:
    """A block's entities' (id, packed value)."""
    (n,) = struct.unpack_from(">q", packed)
    ids = struct.unpack_from(f">{n}q", packed, 8)
    widths = struct.unpack_from(f">{n}q", packed, 8 * (1 + n))
    at = 8 * (1 + 2 * n)
    held = at + 8 * NARROW * n
    out = []
    for e, w in zip(ids, widths, strict=True):
        if e >> BLOCK_BITS != block or w not in {NARROW, WIDE}:
            raise ValueError(f"usage_state block {block} is malformed")
        value = packed[at : at + 8 * NARROW]
        at += 8 * NARROW
        if w == WIDE:
            value += packed[held : held + 8 * (WIDE - NARROW)]
            held += 8 * (WIDE - NARROW)
        out.append((e, value))
    if held != len(packed):
        raise ValueError(f"usage_state block {block} is malformed")
    return out


def _create(key: str) -> Any:
    table = op.create_table(
        "usage_state",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column(key, sa.BigInteger(), nullable=False),
        sa.Column("packed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("scope", key, name=op.f("pk_usage_state")),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Rewritten in place every cycle: room in each page for new row versions (migration
        # 0010); a block's value out of line, never compressed.
        op.execute("ALTER TABLE usage_state SET (fillfactor = 45)")
        if key == "block":
            op.execute("ALTER TABLE usage_state ALTER COLUMN packed SET STORAGE EXTERNAL")
    return table


def upgrade() -> None:
    conn = op.get_bind()
    old = conn.execute(
        sa.text("SELECT scope, entity_id, packed FROM usage_state ORDER BY scope, entity_id")
    ).all()
    rows = [
        {"scope": scope, "block": block, "packed": _encode([(e, bytes(p)) for _, e, p in group])}
        for (scope, block), group in groupby(old, key=lambda r: (r[0], r[1] >> BLOCK_BITS))
    ]
    op.drop_table("usage_state")
    table = _create("block")
    for batch in _batches(rows):
        conn.execute(table.insert(), list(batch))


def downgrade() -> None:
    conn = op.get_bind()
    blocks = conn.execute(sa.text("SELECT scope, block, packed FROM usage_state")).all()
    rows = [
        {"scope": scope, "entity_id": e, "packed": value}
        for scope, block, packed in blocks
        for e, value in _decode(block, bytes(packed))
    ]
    op.drop_table("usage_state")
    table = _create("entity_id")
    for batch in _batches(rows):
        conn.execute(table.insert(), list(batch))
