"""Hour, day and month rows are written lazily: what they lack is in the state rows.

Revision ID: 0013
Revises: 0012

No table changes. From this version on, the aggregator writes an entity's latest hour, day or
month row to ``usage_rollups`` only once the minute rows that changed it have left its
``usage_state`` row, or when the period closes for it (``metering.rollups.fold.Book``): a
row that began in the minute that the state row's minute row (or held row) began with can be
absent from ``usage_rollups``, and a row there can lack the extremes of those minute rows.
Readers widen it with them. At every hour's, day's and month's start, every busy entity's new
rows began at once, and writing them there in the same cycle (and again as their extremes
moved in the next minutes) made those cycles two to three times as long as the others.

Rows written by the code before are complete, so the upgrade changes nothing. The downgrade
completes them for the code before, which reads them from ``usage_rollups`` only: for each
entity and unit, the minute rows in its state row that lie in the period of its latest row
widen that row (peak with its time, min, WebSocket peak, channel peak and min), and one that
began with it inserts it with its start values. In batches; stop the aggregation workers
first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "opened", "refused", "ch_opened", "pub_n", "pub_b", "del_n", "del_b", "ch_refused",
    "msg_refused",
)  # fmt: skip
# A row's values after its key (usage_rollups from period_start on, as migration 0012 packs
# the minute rows in the state: its start, then these).
_ROW = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
_STATE = 6 + len(COUNTERS)  # the state's own fields, before its minute row
_FIELDS = _STATE + 1 + len(_ROW) + 3  # then the hour, day and month starts
_INT = struct.Struct(">q")
_UNITS = {2: "hour", 3: "day", 4: "month"}  # unit code: its start's field
_BATCH = 5_000


def upgrade() -> None:
    pass  # rows written before are complete


def _field(packed: bytes, i: int) -> int:
    value: int = _INT.unpack_from(packed, 8 * i)[0]
    return value


def _minute_row(packed: bytes, at: int) -> dict[str, int] | None:
    """The minute row at field ``at`` (its start, then _ROW), None if there is none."""
    if 8 * (at + 1 + len(_ROW)) > len(packed):
        return None
    row = dict(
        zip(
            ("period_start", *_ROW),
            struct.unpack_from(f">{1 + len(_ROW)}q", packed, 8 * at),
            strict=True,
        )
    )
    return row if row["period_start"] >= 0 and row["peak"] >= 0 else None


def _period_start(unit: int, second: int) -> int:
    if unit == 2:
        return second - second % 3600
    if unit == 3:
        return second - second % 86400
    t = datetime.fromtimestamp(second, UTC)
    return int(datetime(t.year, t.month, 1, tzinfo=UTC).timestamp())


def _batches(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), _BATCH):
        yield rows[start : start + _BATCH]


def downgrade() -> None:
    conn = op.get_bind()
    greatest, least = ("GREATEST", "LEAST") if conn.dialect.name == "postgresql" else ("max", "min")
    widen = (
        "peak_at = CASE WHEN {new}peak > {old}peak THEN {new}peak_at ELSE {old}peak_at END, "
        f"peak = {greatest}({{old}}peak, {{new}}peak), min = {least}({{old}}min, {{new}}min), "
        f"ws_peak = {greatest}({{old}}ws_peak, {{new}}ws_peak), "
        f"ch_peak = {greatest}({{old}}ch_peak, {{new}}ch_peak), "
        f"ch_min = {least}({{old}}ch_min, {{new}}ch_min)"
    )
    columns = ("scope", "entity_id", "unit", "period_start", *_ROW)
    # A row that began with the minute row: inserted, or (there already) widened by it.
    insert = sa.text(
        f"INSERT INTO usage_rollups ({', '.join(columns)}) "  # noqa: S608
        f"VALUES ({', '.join(':' + c for c in columns)}) "
        "ON CONFLICT (scope, entity_id, unit, period_start) DO UPDATE SET "
        + widen.format(old="usage_rollups.", new="excluded.")
    )
    # A row the minute row lies in, begun before it: widened.
    update = sa.text(
        "UPDATE usage_rollups SET "  # noqa: S608
        + widen.format(old="", new=":")
        + " WHERE scope = :scope AND entity_id = :entity_id AND unit = :unit "
        "AND period_start = :period_start"
    )
    states = conn.execute(sa.text("SELECT scope, entity_id, packed FROM usage_state")).all()
    # In time order: every held row (closed), then every latest minute row.
    for at in (_FIELDS, _STATE):
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        for scope, entity, value in states:
            packed = bytes(value)
            minute = _minute_row(packed, at)
            if minute is None:
                continue
            for unit, name in _UNITS.items():
                start = _field(packed, _STATE + 1 + len(_ROW) + list(_UNITS.values()).index(name))
                if start < 0 or _period_start(unit, minute["period_start"]) != start:
                    continue
                row = {**minute, "scope": scope, "entity_id": entity, "unit": unit,
                       "period_start": start}  # fmt: skip
                (inserts if minute["period_start"] == start else updates).append(row)
        for rows, statement in ((inserts, insert), (updates, update)):
            for batch in _batches(rows):
                conn.execute(statement, list(batch))
