"""Closed hour, day and month rows are written with the held minute row they changed in.

Revision ID: 0016
Revises: 0015

No table changes. From this version on, an hour, day or month row that closes having changed
since written only in the minute whose row the entity now holds in its state row (or that
began with that minute) is written to ``usage_rollups`` when the held row leaves the state
row, up to 55 s later, not when it closes (``metering.rollups.fold.Book.deferred``). Until
then the copy in ``usage_rollups`` lacks the held row's extremes, or there is none: readers
widen it with the held row, as they do the latest rows (migration 0013). At every hour's,
day's and month's start every busy entity's rows close at once, and writing them all in that
cycle made it the longest of all (120 000 rows, 0.7 to 0.9 s of a 3.5 s cycle at 100 000
apps).

The upgrade changes nothing. The downgrade completes those rows for the code before, which
writes a closed row when it closes and never after: for each entity holding a minute row,
the rows of the hour, day and month it lies in, where those periods are over for the entity,
are widened by it (peak with its time, min, WebSocket peak, channel peak and min), or
inserted with its start values where they began with it. Stop the aggregation workers first.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = (
    "opened", "refused", "ch_opened", "pub_n", "pub_b", "del_n", "del_b", "ch_refused",
    "msg_refused",
)  # fmt: skip
# A row's values after its key and start (usage_rollups from period_start on).
_ROW = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
# A block's slow part (migration 0014, part 1) holds per entity 18 fields: its minute row's
# start and start values (15), then its hour, day and month starts; then, of those that hold
# one, the held minute row (its start, then _ROW).
_ROWS_PART, _BASE, _HELD = 1, 18, 1 + len(_ROW)
_UNITS = {2: 15, 3: 16, 4: 17}  # unit code: its latest row's start among the 18
_BATCH = 5_000


def upgrade() -> None:
    pass  # the code before wrote every closed row when it closed


# ``metering.rollups.state.words`` as of this revision, copied: a migration keeps meaning what
# it meant when the code changes.
def _words(stored: bytes) -> bytes:
    n = len(stored) // 8
    out = bytearray(len(stored))
    for k in range(8):
        out[k::8] = stored[k * n : (k + 1) * n]
    return bytes(out)


def _entities(stored: bytes) -> Iterator[tuple[int, list[int], list[int]]]:
    """A slow part's entities: each one's id, its 18 fields and its held row (or [])."""
    words = struct.unpack(f">{len(stored) // 8}q", _words(stored))
    n = words[0]
    ids, widths = words[1 : 1 + n], words[1 + n : 1 + 2 * n]
    fields, held = 1 + 2 * n, 1 + 2 * n + _BASE * n
    for e, w in zip(ids, widths, strict=True):
        if w not in {_BASE, _BASE + _HELD}:
            raise ValueError("a usage_state block is malformed: not at 0016")
        yield e, list(words[fields : fields + _BASE]), list(words[held : held + w - _BASE])
        fields += _BASE
        held += w - _BASE


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
    # A row that began with the held row: inserted, or (there already) widened by it.
    insert = sa.text(
        f"INSERT INTO usage_rollups ({', '.join(columns)}) "  # noqa: S608
        f"VALUES ({', '.join(':' + c for c in columns)}) "
        "ON CONFLICT (scope, entity_id, unit, period_start) DO UPDATE SET "
        + widen.format(old="usage_rollups.", new="excluded.")
    )
    # A row the held row lies in, begun before it: widened.
    update = sa.text(
        "UPDATE usage_rollups SET "  # noqa: S608
        + widen.format(old="", new=":")
        + " WHERE scope = :scope AND entity_id = :entity_id AND unit = :unit "
        "AND period_start = :period_start"
    )
    blocks = conn.execute(
        sa.text("SELECT scope, packed FROM usage_state WHERE part = :part"), {"part": _ROWS_PART}
    ).all()
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for scope, stored in blocks:
        for entity, fields, held in _entities(bytes(stored)):
            if not held or held[0] < 0:
                continue
            row = dict(zip(("period_start", *_ROW), held, strict=True))
            if row["peak"] < 0:  # no counted second: it widens nothing
                continue
            for unit, latest in _UNITS.items():
                start = _period_start(unit, row["period_start"])
                if start == fields[latest]:
                    continue  # the latest row: read with its minute rows by the code before
                done = {**row, "scope": scope, "entity_id": entity, "unit": unit,
                        "period_start": start}  # fmt: skip
                (inserts if row["period_start"] == start else updates).append(done)
    for rows, statement in ((inserts, insert), (updates, update)):
        for batch in _batches(rows):
            conn.execute(statement, list(batch))
