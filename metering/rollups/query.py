"""Reading rollups: an entity's periods of one unit, with their figures.

A period without a row is one in which nothing happened to the entity: its value carried
through it (the value at the start of the entity's next row, or its current value). Sums of a
period with a row are the difference of the running totals at its end and at its start; the
total at its end is taken from the next row (carried back over the periods without rows) or,
for the latest row, from the entity's state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from metering.core.errors import ValidationError
from metering.rollups import bulk
from metering.rollups import state as entity_state
from metering.rollups.fold import (
    R_CH0,
    R_CH_PEAK,
    R_CONNS0,
    R_COUNTERS0,
    R_PEAK,
    R_PEAK_AT,
    R_START,
    R_WIDTH,
    UNIT_CODES,
    Coverage,
    derived_rows,
    period_end,
    period_start,
    period_starts,
    widen,
)
from metering.rollups.models import (
    COUNTERS,
    UsageCursor,
    UsageGap,
    UsageRollup,
)
from metering.rollups.periods import Unit, interval_id

MAX_LIMIT = 1000
# usage_rollups' columns after its key, as usage_state holds them for the latest minute row.
_ROW_FIGURES = tuple(
    c.name
    for c in UsageRollup.__table__.columns
    if c.name not in {"scope", "entity_id", "unit", "period_start"}
)


@dataclass(frozen=True, slots=True)
class _Point:
    """What an entity carried at some moment: values, and running totals."""

    conns: int
    ws: int
    channels: int
    area: int
    ch_area: int
    counters: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Query:
    scope: int
    entity_id: int
    unit: Unit
    start: int | None = None  # seconds, inclusive
    end: int | None = None  # seconds, exclusive
    limit: int = 100
    backwards: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValidationError(f"limit must be between 1 and {MAX_LIMIT}, got {self.limit}")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValidationError("start must be before end")


class Context:
    """The aggregator's coverage (up to its watermark) and retention horizons, read once."""

    def __init__(self, conn: Connection) -> None:
        cursor = conn.execute(select(UsageCursor.__table__).where(UsageCursor.id == 1)).one()
        gaps = conn.execute(select(UsageGap.second, UsageGap.missed)).all()
        self.coverage = Coverage(cursor.first_second, cursor.second, [(g[0], g[1]) for g in gaps])
        self.horizons = {int(k): int(v) for k, v in json.loads(cursor.horizons or "{}").items()}


def periods(conn: Connection, query: Query, ctx: Context | None = None) -> list[dict[str, Any]]:
    """The entity's periods in ``[start, end)`` with their figures, newest first by default."""
    ctx = ctx or Context(conn)
    cov, unit, code = ctx.coverage, query.unit, UNIT_CODES[query.unit]
    if cov.first is None or cov.last is None:
        return []
    lo = max(period_start(unit, cov.first), ctx.horizons.get(code, 0))
    if query.start is not None:
        lo = max(lo, period_start(unit, query.start))
    hi = cov.last + 1
    if query.end is not None:
        hi = min(hi, query.end)
    if hi <= lo:
        return []
    t = UsageRollup.__table__
    where = (t.c.scope == query.scope) & (t.c.entity_id == query.entity_id) & (t.c.unit == code)
    rows: list[Any] = list(
        conn.execute(
            select(t).where(where & (t.c.period_start >= lo) & (t.c.period_start < hi))
            .order_by(t.c.period_start)
        ).mappings()
    )  # fmt: skip
    nxt: Any = (
        conn.execute(
            select(t).where(where & (t.c.period_start >= hi)).order_by(t.c.period_start).limit(1)
        )
        .mappings()
        .first()
    )
    # The entity's state, with its latest minute row and its latest rows' starts.
    packed = entity_state.packed_of(conn, query.scope, query.entity_id)
    state = entity_state.as_mapping(packed) if packed is not None else None
    rows, nxt = _with_state(unit, rows, nxt, state, lo, hi, _lag_row(conn, query, state))
    now = _now_point(state, cov)
    out: list[dict[str, Any]] = []
    walk = _walk(unit, lo, hi, rows, nxt, state, now, cov, backwards=query.backwards)
    for entry in walk:
        out.append(entry)
        if len(out) >= query.limit:
            break
    return out


def _lag_row(conn: Connection, query: Query, state: Any) -> dict[str, Any] | None:
    """The minute row (from usage_rollups) by which the entity's closed hour, day and month
    rows may lag (``fold.Book.lag``), when it is no longer held in its state row."""
    if query.unit is Unit.MINUTE or state is None or state["lag"] is None:
        return None
    if state["lag"] == state["held"]:
        return None  # (widened by the held row)
    t = UsageRollup.__table__
    row = (
        conn.execute(
            select(t).where(
                (t.c.scope == query.scope) & (t.c.entity_id == query.entity_id)
                & (t.c.unit == UNIT_CODES[Unit.MINUTE]) & (t.c.period_start == state["lag"])
            )
        )
        .mappings()
        .first()
    )  # fmt: skip
    return dict(row) if row is not None else None


def _with_state(  # noqa: PLR0917 (internal)
    unit: Unit, rows: list[Any], nxt: Any, state: Any, lo: int, hi: int, lag: Any
) -> tuple[list[Any], Any]:
    """The rows in [lo, hi) and the next one with what the entity's state row adds: its minute
    rows not in usage_rollups (the closed one it holds, then its latest) are rows of their
    own, and for a coarser unit they widen the row of their period, or begin it, when it is
    not written yet (``fold.Book``: an hour, day or month row is written lazily). ``lag``, the
    minute row the entity's closed rows may lack (``_lag_row``), widens the row of its period
    first (one with a copy here: never begun by it)."""
    by_start = {r["period_start"]: r for r in rows}
    if lag is not None:
        start = period_start(unit, lag["period_start"])
        if start in by_start:
            by_start[start] = _widened(by_start[start], lag)
    for minute in (_minute_row(state, "held"), _minute_row(state, "minute")):
        if minute is None:
            continue
        start = period_start(unit, minute["period_start"])
        if start < lo:
            continue
        if start >= hi:
            if nxt is None or start < nxt["period_start"]:
                nxt = _begun_with(minute, start)
            continue
        row = by_start.get(start)
        by_start[start] = _begun_with(minute, start) if row is None else _widened(row, minute)
    return [by_start[k] for k in sorted(by_start)], nxt


def _begun_with(minute: dict[str, Any], start: int) -> dict[str, Any]:
    """A row not in usage_rollups: the minute row it began with (its start values, and its
    extremes so far)."""
    if minute["period_start"] != start:
        raise RuntimeError(
            f"the row of the period starting at {start} is neither in usage_rollups nor begun "
            f"with the minute row at {minute['period_start']} in the entity's state row"
        )
    return minute


def _widened(row: Any, later: dict[str, Any]) -> dict[str, Any]:
    """``row``'s extremes widened by those of a later row of its period (``fold.widen``)."""
    names = ("period_start", *_ROW_FIGURES)  # a row as fold has it
    rows, after = (np.array([[r[c] for c in names]], dtype=np.int64) for r in (row, later))
    widen(rows, after, np.ones(1, dtype=np.bool_))
    return dict(zip(names, rows[0].tolist(), strict=True))


def _minute_row(state: Any, prefix: str) -> dict[str, Any] | None:
    """A minute row the state row holds (``minute``: the latest; ``held``: one that closed),
    shaped like a ``usage_rollups`` row."""
    if state is None or state[prefix] is None:
        return None
    row = {c: state[f"{prefix}_{c}"] for c in _ROW_FIGURES}
    row["period_start"] = state[prefix]
    return row


def _start_point(row: Any) -> _Point:
    return _Point(
        row["conns0"], row["ws0"], row["channels0"], row["area0"], row["ch_area0"],
        tuple(row[f"{c}0"] for c in COUNTERS),
    )  # fmt: skip


def _now_point(state: Any, cov: Coverage) -> _Point | None:
    """The entity's running totals as of the watermark."""
    if state is None or cov.last is None:
        return None
    n = cov.covered(state["since"], cov.last + 1)
    return _Point(
        state["conns"], state["ws"], state["channels"],
        state["area"] + state["conns"] * n, state["ch_area"] + state["channels"] * n,
        tuple(state[c] for c in COUNTERS),
    )  # fmt: skip


def _totals_at(second: int, after_row: Any, now: _Point | None, cov: Coverage) -> _Point | None:
    """Running totals at ``second``, when nothing changed between it and ``after_row``'s start
    (or the watermark, when there is no later row)."""
    if after_row is not None:
        p = _start_point(after_row)
        n = cov.covered(second, after_row["period_start"])
        return _Point(
            p.conns, p.ws, p.channels, p.area - p.conns * n, p.ch_area - p.channels * n,
            p.counters,
        )  # fmt: skip
    if now is None:
        return None
    n = cov.covered(second, (cov.last or 0) + 1)
    return _Point(
        now.conns, now.ws, now.channels, now.area - now.conns * n, now.ch_area - now.channels * n,
        now.counters,
    )  # fmt: skip


def _walk(  # noqa: PLR0917 (one internal caller, all arguments named there)
    unit: Unit,
    lo: int,
    hi: int,
    rows: list[Any],
    nxt: Any,
    state: Any,
    now: _Point | None,
    cov: Coverage,
    *,
    backwards: bool,
) -> Iterator[dict[str, Any]]:
    """Entries for the periods in [lo, hi): rows as stored, and carried periods between them."""
    # Segments in time order: (first period start, end, row or None, the row after).
    segments: list[tuple[int, int, Any, Any]] = []
    cursor = lo
    for i, row in enumerate(rows):
        start = row["period_start"]
        if start > cursor:
            segments.append((cursor, start, None, row))
        after = rows[i + 1] if i + 1 < len(rows) else nxt
        segments.append((start, period_end(unit, start), row, after))
        cursor = period_end(unit, start)
    if cursor < hi:
        segments.append((cursor, hi, None, nxt))
    for seg_start, seg_end, row, after in reversed(segments) if backwards else segments:
        if row is not None:
            yield _entry(unit, row["period_start"], row, after, now, cov)
            continue
        carried = _start_point(after) if after is not None else now
        if carried is None or not (carried.conns or carried.channels):
            continue  # nothing was open: no activity to report
        for start in _counted_periods(unit, seg_start, min(seg_end, hi), cov, backwards=backwards):
            yield _carried_entry(unit, start, carried, cov)


def _counted_periods(
    unit: Unit, start: int, end: int, cov: Coverage, *, backwards: bool
) -> Iterator[int]:
    """Starts of the periods in [start, end) with a counted second, skipping uncounted spans."""
    while start < end:
        second = cov.last_covered(start, end) if backwards else cov.first_covered(start, end)
        if second is None:
            return
        p = period_start(unit, second)
        yield p
        if backwards:
            end = p
        else:
            start = period_end(unit, p)


def _entry(  # noqa: PLR0917 (internal)
    unit: Unit, start: int, row: Any, after: Any, now: _Point | None, cov: Coverage
) -> dict[str, Any]:
    end = period_end(unit, start)
    seconds = cov.covered(start, end)
    begin = _start_point(row)
    finish = _totals_at(end, after, now, cov) if after is not None or now is not None else begin
    assert finish is not None
    area = finish.area - begin.area
    ch_area = finish.ch_area - begin.ch_area
    counts = [b - a for a, b in zip(begin.counters, finish.counters, strict=True)]
    by = dict(zip(COUNTERS, counts, strict=True))
    return _figures(
        unit, start, cov, seconds,
        peak=row["peak"], peak_at=row["peak_at"], low=row["min"],
        mean=area / seconds if seconds else 0.0,
        ws_peak=row["ws_peak"], ch_peak=row["ch_peak"], ch_min=row["ch_min"],
        ch_mean=ch_area / seconds if seconds else 0.0, counts=by,
    )  # fmt: skip


def _carried_entry(unit: Unit, start: int, p: _Point, cov: Coverage) -> dict[str, Any]:
    end = period_end(unit, start)
    seconds = cov.covered(start, end)
    first = cov.first_covered(start, end)
    return _figures(
        unit, start, cov, seconds,
        peak=p.conns, peak_at=first if first is not None else start, low=p.conns,
        mean=float(p.conns),
        ws_peak=p.ws, ch_peak=p.channels, ch_min=p.channels, ch_mean=float(p.channels),
        counts=dict.fromkeys(COUNTERS, 0),
    )  # fmt: skip


def _figures(
    unit: Unit,
    start: int,
    cov: Coverage,
    seconds: int,
    *,
    peak: int,
    peak_at: int,
    low: int,
    mean: float,
    ws_peak: int,
    ch_peak: int,
    ch_min: int,
    ch_mean: float,
    counts: dict[str, int],
) -> dict[str, Any]:
    end = period_end(unit, start)
    entry: dict[str, Any] = {
        "intervalId": interval_id(unit, datetime.fromtimestamp(start, UTC)),
        "unit": unit.value,
    }
    if cov.last is None or cov.last + 1 < end:
        entry["inProgress"] = True
    entry.update(
        {
            "seconds": seconds,
            "connections.all.peak": peak,
            "connections.all.peakAt": peak_at * 1000,
            "connections.all.min": low,
            "connections.all.mean": round(mean, 3),
            "connections.all.opened": counts["opened"],
            "connections.all.refused": counts["refused"],
            "connections.websocket.peak": ws_peak,
            "channels.peak": ch_peak,
            "channels.min": ch_min,
            "channels.mean": round(ch_mean, 3),
            "channels.opened": counts["ch_opened"],
            "channels.refused": counts["ch_refused"],
            "messages.published.count": counts["pub_n"],
            "messages.published.data": counts["pub_b"],
            "messages.delivered.count": counts["del_n"],
            "messages.delivered.data": counts["del_b"],
            "messages.all.count": counts["pub_n"] + counts["del_n"],
            "messages.all.data": counts["pub_b"] + counts["del_b"],
            "messages.refused": counts["msg_refused"],
        }
    )
    return entry


def parse_unit(value: str) -> Unit:
    try:
        return Unit(value)
    except ValueError:
        known = ", ".join(u.value for u in Unit)
        raise ValidationError(f"unknown unit {value!r} (one of {known})") from None


def parse_direction(value: str) -> bool:
    """True for backwards (newest first)."""
    if value not in {"backwards", "forwards"}:
        raise ValidationError(f"direction must be backwards or forwards, got {value!r}")
    return value == "backwards"


def parse_millis(name: str, value: int | None, *, round_up: bool = False) -> int | None:
    """Milliseconds since the epoch to whole seconds. Periods start on whole seconds: a start
    rounds down; an exclusive end rounds up (``round_up``), so that a period starting any time
    before it is in the range."""
    if value is None:
        return None
    if not 0 <= value <= 253_402_300_799_999:  # year 9999
        raise ValidationError(f"{name} must be milliseconds since the epoch, got {value}")
    return -(-value // 1000) if round_up else value // 1000


def parse_range(
    start: int | None,
    end: int | None,
    names: tuple[str, str] = ("start", "end"),
    given: tuple[str, str] | None = None,
) -> tuple[int | None, int | None]:
    """A range ``[start, end)`` in milliseconds since the epoch, as whole seconds (rounded as
    ``parse_millis`` does). Its order is checked before the rounding: a start even a
    millisecond after the end is refused, not rounded into a range of one second. ``given``:
    the values as the user wrote them, named in that refusal."""
    lo = parse_millis(names[0], start)
    hi = parse_millis(names[1], end, round_up=True)
    if start is not None and end is not None and start >= end:
        a, b = names if given is None else (f"{names[0]} ({given[0]})", f"{names[1]} ({given[1]})")
        raise ValidationError(f"{a} must be before {b}")
    return lo, hi


@dataclass(frozen=True, slots=True)
class MonthUsage:
    """Column-wise, per entity of a scope with activity in one month (sorted by id): the
    figures a month's bill is built on, equal to those ``periods`` gives for the month.

    ``row``: the entity has a month row (else its value carried through the month: its peaks
    are that value, at the month's first counted second, and it counted nothing).
    ``after``: the start of the month row the totals at the month's end were read from, or -1
    for the entity's state row."""

    ids: npt.NDArray[np.int64]
    peak: npt.NDArray[np.int64]
    peak_at: npt.NDArray[np.int64]
    ch_peak: npt.NDArray[np.int64]
    messages: npt.NDArray[np.int64]  # published + delivered
    data: npt.NDArray[np.int64]  # their bytes
    row: npt.NDArray[np.bool_]
    after: npt.NDArray[np.int64]

    def find(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Indices of ``ids`` here, -1 for those without activity in the month."""
        at = np.searchsorted(self.ids, ids)
        at = np.minimum(at, max(len(self.ids) - 1, 0))
        hit = (self.ids[at] == ids) if len(self.ids) else np.zeros(len(ids), np.bool_)
        return np.where(hit, at, -1)


_STATE_COLUMNS = ("conns", "channels", "pub_n", "pub_b", "del_n", "del_b")
# Where a row (``fold.R_*``) holds the values of _STATE_COLUMNS at its start.
_END_OF_ROW = [
    R_CONNS0,
    R_CH0,
    *(R_COUNTERS0.start + COUNTERS.index(c) for c in _STATE_COLUMNS[2:]),
]


def _lagging(
    conn: Connection,
    scope: int,
    entity: npt.NDArray[np.int64],
    packed: npt.NDArray[np.int64],
    month_start: int,
) -> npt.NDArray[np.int64]:
    """The minute rows (the id, then the row) by which the entities' month rows of the month
    may lag (``fold.Book.lag``), where that minute lies in the month, which is over for them,
    and its row is no longer held in their state rows: from usage_rollups."""
    lag = packed[:, entity_state.LAG_COLUMN]
    held = packed[:, entity_state.column("held")]
    latest = packed[:, entity_state.column("month")]
    sel = (lag >= 0) & (lag != held) & (latest != month_start)
    sel &= period_starts(Unit.MONTH, lag) == month_start
    wanted = np.column_stack([np.full(int(sel.sum()), scope, np.int64), entity[sel], lag[sel]])
    rows = bulk.select_matching(
        conn, "usage_rollups", columns=("entity_id", "period_start", *_ROW_FIGURES),
        keys=("scope", "entity_id", "period_start"), wanted=wanted,
        where=f"r.unit = {UNIT_CODES[Unit.MINUTE]}",
    )  # fmt: skip
    return rows[np.argsort(rows[:, 0])]


def _month_rows_with_state(  # noqa: PLR0917 (internal)
    entity: npt.NDArray[np.int64],
    packed: npt.NDArray[np.int64],
    month_start: int,
    rows: npt.NDArray[np.int64],
    nxt: npt.NDArray[np.int64],
    lagging: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The entities' month rows of the month (``rows``: the id, then the row) and their next
    month rows (``nxt``) with what their state rows add (``entity`` ids, sorted, and their
    ``packed`` values; ``fold.Book``: a month row is written lazily): the month rows widened by
    the minute rows they lag by (``lagging``, ``_lagging``) and by those in the state rows,
    or begun with one; a next row not written yet begun with one."""
    held, minute = packed[:, entity_state.HELD_COLUMNS], packed[:, entity_state.MINUTE_COLUMNS]
    out = []
    latest = packed[:, entity_state.column("month")]
    for table in (rows, nxt):
        at = np.searchsorted(entity, table[:, 0])
        at = np.minimum(at, max(len(entity) - 1, 0))
        has_state = (entity[at] == table[:, 0]) if len(entity) else np.zeros(len(at), np.bool_)
        stored = np.full((len(entity), R_WIDTH), -1, np.int64)
        found = np.zeros(len(entity), np.bool_)
        stored[at[has_state]], found[at[has_state]] = table[has_state, 1:], True
        if table is rows and len(lagging):
            lag = np.full((len(entity), R_WIDTH), -1, np.int64)
            lag[np.searchsorted(entity, lagging[:, 0])] = lagging[:, 1:]
            widen(stored, lag, found)
        starts = np.full(len(entity), month_start, np.int64)
        if table is nxt:  # the row after the month: the stored one, else the latest if later
            starts = np.where(found, stored[:, R_START], np.where(latest > month_start, latest, -1))
        now, exists = derived_rows(Unit.MONTH, starts, stored, found, held, minute)
        derived = np.column_stack([entity, now])[exists]
        out.append(np.concatenate([table[~has_state], derived]))
    return out[0][np.argsort(out[0][:, 0])], out[1][np.argsort(out[1][:, 0])]


def month_usage(
    conn: Connection, scope: int, month_start: int, ctx: Context | None = None
) -> MonthUsage:
    """Every entity of ``scope`` with activity in the month starting at ``month_start``, in
    three bulk reads (its month row, its next month row, its state), not three per entity."""
    ctx = ctx or Context(conn)
    cov, code = ctx.coverage, UNIT_CODES[Unit.MONTH]
    first = cov.first_covered(month_start, period_end(Unit.MONTH, month_start))
    if first is None:
        empty = np.zeros(0, np.int64)
        return MonthUsage(empty, empty, empty, empty, empty, empty, np.zeros(0, np.bool_), empty)
    of = f"scope = {int(scope)} AND unit = {code}"
    columns = ("entity_id", "period_start", *_ROW_FIGURES)  # the id, then a row as fold has it
    rows = bulk.select_array(
        conn,
        f"SELECT {', '.join(columns)} FROM usage_rollups "  # noqa: S608
        f"WHERE {of} AND period_start = {int(month_start)} ORDER BY entity_id",
        "usage_rollups",
        columns,
    )
    nxt = bulk.select_array(
        conn,
        f"SELECT {', '.join('r.' + c for c in columns)} "  # noqa: S608
        f"FROM usage_rollups r JOIN (SELECT entity_id, MIN(period_start) AS period_start "
        f"FROM usage_rollups WHERE {of} AND period_start > {int(month_start)} "
        f"GROUP BY entity_id) n ON r.entity_id = n.entity_id "
        f"AND r.period_start = n.period_start WHERE r.{of.replace(' AND ', ' AND r.')} "
        "ORDER BY r.entity_id",
        "usage_rollups",
        columns,
    )
    _, entity, packed = entity_state.select(conn, f"scope = {int(scope)}")
    order = np.argsort(entity)
    entity, packed = entity[order], packed[order]
    lagging = _lagging(conn, scope, entity, packed, month_start)
    rows, nxt = _month_rows_with_state(entity, packed, month_start, rows, nxt, lagging)
    states = np.column_stack([entity, packed[:, [entity_state.column(c) for c in _STATE_COLUMNS]]])
    ids = np.union1d(np.union1d(rows[:, 0], nxt[:, 0]), states[:, 0])
    n = len(ids)
    # The values and totals at the month's end: from the next row's start, else the state.
    end = np.zeros((n, len(_STATE_COLUMNS)), np.int64)
    after = np.full(n, -1, np.int64)
    known = np.zeros(n, np.bool_)
    s_at = np.searchsorted(ids, states[:, 0])
    end[s_at] = states[:, 1:]
    known[s_at] = True
    n_at = np.searchsorted(ids, nxt[:, 0])
    end[n_at] = nxt[:, 1:][:, _END_OF_ROW]
    after[n_at] = nxt[:, 1 + R_START]
    known[n_at] = True
    row = np.zeros(n, np.bool_)
    r_at = np.searchsorted(ids, rows[:, 0])
    row[r_at] = True
    # Carried through the month: the value held, which covers every counted second of it.
    peak, peak_at, ch_peak = end[:, 0].copy(), np.full(n, first, np.int64), end[:, 1].copy()
    messages, data = np.zeros(n, np.int64), np.zeros(n, np.int64)
    month = rows[:, 1:]
    peak[r_at], peak_at[r_at], ch_peak[r_at] = (month[:, R_PEAK], month[:, R_PEAK_AT],
                                                month[:, R_CH_PEAK])  # fmt: skip
    start = month[:, _END_OF_ROW][:, 2:6]  # pub_n0, pub_b0, del_n0, del_b0
    fin = end[r_at, 2:6]
    messages[r_at] = (fin[:, 0] - start[:, 0]) + (fin[:, 2] - start[:, 2])
    data[r_at] = (fin[:, 1] - start[:, 1]) + (fin[:, 3] - start[:, 3])
    active = row | (known & ((end[:, 0] != 0) | (end[:, 1] != 0)))
    return MonthUsage(
        ids[active], peak[active], peak_at[active], ch_peak[active], messages[active],
        data[active], row[active], after[active],
    )  # fmt: skip
