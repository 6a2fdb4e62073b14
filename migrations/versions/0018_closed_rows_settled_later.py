"""Closed hour, day and month rows with a copy are settled minutes later; the state says by what.

Revision ID: 0018
Revises: 0017

An hour, day or month row that closes having changed since written only in the minute whose
row the entity then holds in its state row was written, merged into its copy in
``usage_rollups``, when that held row left the state row, within 55 s (migration 0016). At a
month's start at 100 000 apps that was 33 000 merges in each cycle of the first minute, the
longest cycles of all (up to 2.2 s). From this version on, such a row with a copy is settled
later, a share per cycle, within ten minutes of that minute's end
(``metering.rollups.service.SETTLE_WITHIN``), and the state row says which minute the
entity's closed rows may lack until then: ``lag``, one more field of the slow part of each
entity (``usage_state`` part 1, migration 0014), after its hour, day and month starts (19
fields instead of 18; -1: none). Readers (``/v1/stats``, ``metering stats``, the bills'
``month_usage``) and a restarted aggregator widen the copies of the periods that minute lies
in by its row, from the state row while it is held there, from ``usage_rollups`` after; the
retention task keeps minute rows from the oldest ``lag`` on.

The upgrade adds the field, -1 (nothing to settle: the code before wrote such rows with the
held row), to every entity. The downgrade first settles what lags by a minute no longer held
(the closed rows of the periods that minute lies in are widened by its row: peak with its
time, min, WebSocket peak, channel peak and min), then removes the field: what lags by the
held row is what the code before writes with it. Stop the aggregation workers first.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ``metering.rollups.state``'s slow part as of this revision and the one before, copied: a
# migration keeps meaning what it meant when the code changes. Per entity its base fields (its
# minute row's start and start values (15), its hour, day and month starts, and from this
# revision on its lag), then, for one that holds one, the held minute row (21).
_ROWS_PART, _HELD = 1, 21
_BEFORE, _AFTER = 18, 19
_UNITS = {2: 15, 3: 16, 4: 17}  # unit code: its latest row's start among the base fields
_BATCH = 1_000
_EXTREMES = ("peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min")


def _planes(packed: bytes) -> bytes:
    return b"".join(packed[k::8] for k in range(8))


def _words(stored: bytes) -> bytes:
    n = len(stored) // 8
    out = bytearray(len(stored))
    for k in range(8):
        out[k::8] = stored[k * n : (k + 1) * n]
    return bytes(out)


def _entities(stored: bytes, base: int) -> Iterator[tuple[int, list[int], list[int]]]:
    """A slow part's entities: each one's id, its ``base`` fields and its held row (or [])."""
    words = struct.unpack(f">{len(stored) // 8}q", _words(stored))
    n = words[0]
    ids, widths = words[1 : 1 + n], words[1 + n : 1 + 2 * n]
    fields, held = 1 + 2 * n, 1 + 2 * n + base * n
    if len(words) != held + sum(w - base for w in widths):
        raise ValueError(f"a usage_state block is malformed: not {base} fields an entity")
    for e, w in zip(ids, widths, strict=True):
        if w not in {base, base + _HELD}:
            raise ValueError(f"a usage_state block is malformed: not {base} fields an entity")
        yield e, list(words[fields : fields + base]), list(words[held : held + w - base])
        fields += base
        held += w - base


def _block(entities: list[tuple[int, list[int], list[int]]], base: int) -> bytes:
    ids = [e for e, _, _ in entities]
    widths = [base + len(h) for _, _, h in entities]
    words = [len(entities), *ids, *widths]
    for _, fields, _ in entities:
        words += fields
    for _, _, held in entities:
        words += held
    return _planes(struct.pack(f">{len(words)}q", *words))


def _blocks() -> list[tuple[int, int, bytes]]:
    """(scope, block, stored) of every slow part."""
    rows = op.get_bind().execute(
        sa.text("SELECT scope, block, packed FROM usage_state WHERE part = :part"),
        {"part": _ROWS_PART},
    )
    return [(s, b, bytes(p)) for s, b, p in rows.all()]


def _rewrite(
    blocks: list[tuple[int, int, bytes]],
    convert: Callable[[list[int]], list[int]],
    before: int,
    after: int,
) -> None:
    update = sa.text(
        "UPDATE usage_state SET packed = :packed "
        "WHERE scope = :scope AND part = :part AND block = :block"
    )
    changed = [
        {
            "scope": scope,
            "part": _ROWS_PART,
            "block": block,
            "packed": _block([(e, convert(f), h) for e, f, h in _entities(stored, before)], after),
        }
        for scope, block, stored in blocks
    ]
    for start in range(0, len(changed), _BATCH):
        op.get_bind().execute(update, changed[start : start + _BATCH])


def upgrade() -> None:
    _rewrite(_blocks(), lambda fields: [*fields, -1], _BEFORE, _AFTER)


def _period_start(unit: int, second: int) -> int:
    if unit == 2:
        return second - second % 3600
    if unit == 3:
        return second - second % 86400
    t = datetime.fromtimestamp(second, UTC)
    return int(datetime(t.year, t.month, 1, tzinfo=UTC).timestamp())


def downgrade() -> None:
    conn = op.get_bind()
    blocks = _blocks()
    # What lags by a minute no longer held: (scope, entity, lag, its latest starts by unit).
    lagging: list[tuple[int, int, int, dict[int, int]]] = []
    for scope, _, stored in blocks:
        for entity, fields, held in _entities(stored, _AFTER):
            lag = fields[_AFTER - 1]
            if lag >= 0 and (not held or held[0] != lag):
                lagging.append((scope, entity, lag, {u: fields[i] for u, i in _UNITS.items()}))
    minutes: dict[tuple[int, int, int], dict[str, Any]] = {}
    wanted = sorted({lag for _, _, lag, _ in lagging})
    for start in range(0, len(wanted), _BATCH):
        found = conn.execute(
            sa.text(
                f"SELECT scope, entity_id, period_start, {', '.join(_EXTREMES)} "  # noqa: S608
                "FROM usage_rollups WHERE unit = 1 AND period_start IN :starts"
            ).bindparams(sa.bindparam("starts", expanding=True)),
            {"starts": wanted[start : start + _BATCH]},
        )
        for r in found.mappings():
            minutes[(r["scope"], r["entity_id"], r["period_start"])] = dict(r)
    greatest, least = ("GREATEST", "LEAST") if conn.dialect.name == "postgresql" else ("max", "min")
    update = sa.text(
        "UPDATE usage_rollups SET "  # noqa: S608 (the functions' names, not input)
        "peak_at = CASE WHEN :peak > peak THEN :peak_at ELSE peak_at END, "
        f"peak = {greatest}(peak, :peak), min = {least}(min, :min), "
        f"ws_peak = {greatest}(ws_peak, :ws_peak), ch_peak = {greatest}(ch_peak, :ch_peak), "
        f"ch_min = {least}(ch_min, :ch_min) "
        "WHERE scope = :scope AND entity_id = :entity_id AND unit = :unit "
        "AND period_start = :period_start"
    )
    settled = []
    for scope, entity, lag, latest in lagging:
        minute = minutes.get((scope, entity, lag))
        if minute is None or minute["peak"] < 0:
            continue  # (gone with its unit's retention, or no counted second: nothing to add)
        for unit in _UNITS:
            start = _period_start(unit, lag)
            if start != latest[unit]:  # a closed row: the latest is read with its minute rows
                settled.append({**minute, "scope": scope, "entity_id": entity, "unit": unit,
                                "period_start": start})  # fmt: skip
    for start in range(0, len(settled), _BATCH):
        conn.execute(update, settled[start : start + _BATCH])
    _rewrite(blocks, lambda fields: fields[:_BEFORE], _AFTER, _BEFORE)
