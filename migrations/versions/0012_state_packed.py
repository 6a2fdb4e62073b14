"""Each entity's state, latest minute row and latest rows' starts in one packed value.

Revision ID: 0012
Revises: 0011

``usage_state`` (23 columns) and ``usage_starts`` (20) become one table, ``usage_state``, whose
``packed`` holds per app and per account the 39 values of ``metering.rollups.state.FIELDS``,
each a big-endian int64 (``docs/rollups.md``). On Postgres an UPDATE costs per column
written, whether it changed or not: a busy entity's row is rewritten every cycle, and at every
minute its starts row was rewritten as well, in a second UPDATE. Measured on 120 000 rows:
21 bigint columns 450 ms, 42 columns 700 ms; one ``bytea`` of 21 values 300 ms, of 42 values
375 ms.

NULL (no such row) becomes -1 in a start and in ``minute_peak``, as the aggregator holds it,
and back on the way down. From this version on, a state row may also hold a minute row that
closed and is not in ``usage_rollups`` yet (``state.HELD_ROW``, 21 values more): the
downgrade writes each such row to ``usage_rollups`` first, where the older code reads it. The rows are read, packed in Python and written back in batches:
Stop the aggregation workers first; at 120 000 entities it takes a few seconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "opened", "refused", "ch_opened", "pub_n", "pub_b", "del_n", "del_b", "ch_refused",
    "msg_refused",
)  # fmt: skip
_ROW = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
# The old tables' value columns, and the packed fields (as metering.rollups.state has them now).
STATE = ("conns", "ws", "channels", "since", "area", "ch_area", *COUNTERS)
EXTREMES = tuple(f"minute_{c}" for c in _ROW[-6:])
STARTS = ("minute", "hour", "day", "month", *(f"minute_{c}" for c in _ROW[:-6]))
FIELDS = (*STATE, "minute", *(f"minute_{c}" for c in _ROW), "hour", "day", "month")
NO_ROW = -1  # in a start, and in minute_peak
_FORMAT = struct.Struct(f">{len(FIELDS)}q")
_HELD = struct.Struct(f">{1 + len(_ROW)}q")  # a held minute row: its start, then _ROW
_KEYS = ("scope", "entity_id")
_BATCH = 5_000


def _batches(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), _BATCH):
        yield rows[start : start + _BATCH]


def _pack(row: Any) -> bytes:
    values = []
    for name in FIELDS:
        v = row[name]
        values.append(
            v if v is not None else (NO_ROW if name in (*STARTS[:4], "minute_peak") else 0)
        )
    return _FORMAT.pack(*values)


def _unpack(packed: bytes) -> dict[str, int | None]:
    values = dict(zip(FIELDS, _FORMAT.unpack(packed[: _FORMAT.size]), strict=True))
    gone: set[str] = {u for u in ("hour", "day", "month") if values[u] < 0}
    if values["minute"] < 0:  # no minute row: every field of it
        gone |= {"minute", *(f"minute_{c}" for c in _ROW)}
    elif values["minute_peak"] < 0:  # no counted second yet
        gone |= set(EXTREMES)
    return {k: None if k in gone else v for k, v in values.items()}


def _fillfactor(table: str) -> None:
    # Every busy entity's row is rewritten at once: room in each page for a new version of
    # every row in it keeps the updates HOT (migration 0010).
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {table} SET (fillfactor = 45)")


def upgrade() -> None:
    conn = op.get_bind()
    old = conn.execute(
        sa.text(
            f"SELECT {', '.join('s.' + c for c in (*_KEYS, *STATE, *EXTREMES))}, "  # noqa: S608
            f"{', '.join('t.' + c for c in STARTS)} FROM usage_state s "
            "LEFT JOIN usage_starts t ON t.scope = s.scope AND t.entity_id = s.entity_id"
        )
    ).mappings().all()  # fmt: skip
    rows = [{"scope": r["scope"], "entity_id": r["entity_id"], "packed": _pack(r)} for r in old]
    op.drop_table("usage_starts")
    op.drop_table("usage_state")
    table = op.create_table(
        "usage_state",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        sa.Column("packed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint(*_KEYS, name=op.f("pk_usage_state")),
    )
    assert table is not None
    for batch in _batches(rows):
        conn.execute(table.insert(), list(batch))
    _fillfactor("usage_state")


def downgrade() -> None:
    conn = op.get_bind()
    packed = conn.execute(sa.text("SELECT scope, entity_id, packed FROM usage_state")).all()
    rows = [{"scope": s, "entity_id": e, **_unpack(bytes(p))} for s, e, p in packed]
    held = []
    for s, e, p in packed:
        if len(p) == _FORMAT.size + _HELD.size:
            start, *values = _HELD.unpack(bytes(p)[_FORMAT.size :])
            if start >= 0:
                held.append({"scope": s, "entity_id": e, "unit": 1, "period_start": start}
                            | dict(zip(_ROW, values, strict=True)))  # fmt: skip
    if held:
        rollups = sa.table(
            "usage_rollups",
            *(sa.column(c) for c in ("scope", "entity_id", "unit", "period_start", *_ROW)),
        )
        for batch in _batches(held):
            conn.execute(rollups.insert(), list(batch))
    op.drop_table("usage_state")
    state = op.create_table(
        "usage_state",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=False) for c in STATE),
        *(sa.Column(c, sa.BigInteger(), nullable=True) for c in EXTREMES),
        sa.PrimaryKeyConstraint(*_KEYS, name=op.f("pk_usage_state")),
    )
    starts = op.create_table(
        "usage_starts",
        sa.Column("scope", sa.SmallInteger(), nullable=False),
        sa.Column("entity_id", sa.BigInteger(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), nullable=True) for c in STARTS),
        sa.PrimaryKeyConstraint(*_KEYS, name=op.f("pk_usage_starts")),
    )
    assert state is not None
    assert starts is not None
    for batch in _batches(rows):
        conn.execute(
            state.insert(), [{c: r[c] for c in (*_KEYS, *STATE, *EXTREMES)} for r in batch]
        )
        conn.execute(starts.insert(), [{c: r[c] for c in (*_KEYS, *STARTS)} for r in batch])
    _fillfactor("usage_state")
    _fillfactor("usage_starts")
