"""``usage_state`` holds 64 entities of a scope to a row.

Revision ID: 0014
Revises: 0013

``usage_state(scope, entity_id, packed)`` becomes ``usage_state(scope, part, block, packed)``:
per scope and ``block = entity_id >> 6``, two rows, whose ``packed`` holds one part of the
values of the entities in it (``metering.rollups.state``: their count, their ids, their
widths, the part's fields of each, then the 21-value held row of each that holds one;
big-endian int64). Part 0 is what changes whenever the entity does (its state and its minute
row's extremes, 21 fields), part 1 what changes only when a row begins or a held row comes or
goes (its minute row's start and start values, its hour, day and month starts, 18 fields,
and the held row). Every busy entity's part 0 is rewritten every cycle, and Postgres pays
per row rewritten (an index entry, a tuple header, a TOAST pointer) and per byte: 120 000
entities' 480 bytes took 0.8 to 1.3 s as one row each, 0.3 to 0.5 s as 1 875 rows of 64;
part 0 alone is 168 bytes an entity. On Postgres the blocks are stored out of line
uncompressed (``STORAGE EXTERNAL``): pglz would compress every 10 to 30 kB block on every
write, 7 to 9 s a cycle.

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
HELD = 21  # a held minute row, after them
# The two parts, as indices into the 39 fields: the state (15) and the minute row's extremes
# (6); the minute row's start and start values (15) and the hour, day and month starts (3).
NOW = (*range(0, 15), *range(30, 36))
ROWS = (*range(15, 30), *range(36, 39))
_BATCH = 5_000


def _batches(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), _BATCH):
        yield rows[start : start + _BATCH]


def _encode(part: int, members: Sequence[tuple[int, bytes]]) -> bytes:
    """A block's value of one part from its entities' (id, packed value), in id order."""
    bases, helds = [], []
    for _, packed in members:
        if len(packed) not in {8 * NARROW, 8 * (NARROW + HELD)}:
            raise ValueError("a usage_state row is neither 312 nor 480 bytes: not at 0013")
        values = struct.unpack(f">{len(packed) // 8}q", packed)
        bases.append([values[i] for i in (NOW if part == 0 else ROWS)])
        helds.append(list(values[NARROW:]) if part == 1 else [])
    n = len(members)
    widths = [len(b) + len(h) for b, h in zip(bases, helds, strict=True)]
    words = [n, *(e for e, _ in members), *widths, *(v for b in bases for v in b)]
    words += [v for h in helds for v in h]
    return struct.pack(f">{len(words)}q", *words)


def _decode(part: int, block: int, packed: bytes) -> dict[int, list[int]]:
    """A block's entities' values of one part: by id, the part's fields then any held row."""
    words = struct.unpack(f">{len(packed) // 8}q", packed)
    n = words[0]
    ids, widths = words[1 : 1 + n], words[1 + n : 1 + 2 * n]
    base = len(NOW if part == 0 else ROWS)
    at, held = 1 + 2 * n, 1 + 2 * n + base * n
    out = {}
    for e, w in zip(ids, widths, strict=True):
        if e >> BLOCK_BITS != block or w not in {base, base + (HELD if part == 1 else 0)}:
            raise ValueError(f"usage_state block {block} is malformed")
        out[e] = list(words[at : at + base]) + list(words[held : held + w - base])
        at += base
        held += w - base
    if 8 * held != len(packed):
        raise ValueError(f"usage_state block {block} is malformed")
    return out


def _create(*key: str) -> Any:
    table = op.create_table(
        "usage_state",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        *(sa.Column(k, sa.SmallInteger() if k == "part" else sa.BigInteger(), nullable=False)
          for k in key),
        sa.Column("packed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("scope", *key, name=op.f("pk_usage_state")),
    )  # fmt: skip
    if op.get_bind().dialect.name == "postgresql":
        # Rewritten in place every cycle: room in each page for new row versions (migration
        # 0010); a block's value out of line, never compressed.
        op.execute("ALTER TABLE usage_state SET (fillfactor = 45)")
        if "block" in key:
            op.execute("ALTER TABLE usage_state ALTER COLUMN packed SET STORAGE EXTERNAL")
    return table


def upgrade() -> None:
    conn = op.get_bind()
    old = conn.execute(
        sa.text("SELECT scope, entity_id, packed FROM usage_state ORDER BY scope, entity_id")
    ).all()
    rows = [
        {"scope": scope, "part": part, "block": block,
         "packed": _encode(part, [(e, bytes(p)) for _, e, p in members])}
        for (scope, block), group in groupby(old, key=lambda r: (r[0], r[1] >> BLOCK_BITS))
        for members in [list(group)]
        for part in (0, 1)
    ]  # fmt: skip
    op.drop_table("usage_state")
    table = _create("part", "block")
    for batch in _batches(rows):
        conn.execute(table.insert(), list(batch))


def downgrade() -> None:
    conn = op.get_bind()
    parts: dict[tuple[int, int], list[int]] = {}  # (scope, id): the 39 or 60 values
    complete: set[tuple[int, int]] = set()  # with both parts
    for scope, part, block, packed in conn.execute(
        sa.text("SELECT scope, part, block, packed FROM usage_state ORDER BY part")
    ):
        for e, values in _decode(part, block, bytes(packed)).items():
            if part == 0:
                parts[scope, e] = [0] * NARROW
                for i, v in zip(NOW, values, strict=True):
                    parts[scope, e][i] = v
            else:
                if (scope, e) not in parts:
                    raise ValueError(f"usage_state holds one part of entity {e} (scope {scope})")
                for i, v in zip(ROWS, values, strict=False):
                    parts[scope, e][i] = v
                parts[scope, e] += values[len(ROWS) :]
                complete.add((scope, e))
    if complete != set(parts):
        raise ValueError("usage_state holds one part of an entity and not the other")
    rows = [
        {"scope": scope, "entity_id": e, "packed": struct.pack(f">{len(v)}q", *v)}
        for (scope, e), v in sorted(parts.items())
    ]
    op.drop_table("usage_state")
    table = _create("entity_id")
    for batch in _batches(rows):
        conn.execute(table.insert(), list(batch))
