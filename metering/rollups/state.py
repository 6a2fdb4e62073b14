"""``usage_state.packed``: what the aggregator knows of one entity, in one value.

Per app and per account, ``FIELDS`` in order, each a big-endian int64 (312 bytes):

- the state: the value held now and since when, the running totals since the entity was first
  seen (``fold.S_*``);
- its latest minute row, whole (``fold.R_*``: its start, the values carried in and totals at
  its start, its extremes so far);
- where its latest hour, day and month rows start;
- and, for a while after a minute ends for the entity, the minute row that closed
  (``HELD_ROW``, laid out as the minute row): a row becomes 480 bytes instead of 312. The
  aggregator moves held rows to ``usage_rollups`` a share per cycle, so that a minute's first
  cycle, which closes every busy entity's minute row at once, does not also write them all
  there; a held row is the entity's, read with its other minute rows, until then.

Migration 0012 packed what were 23 columns of ``usage_state`` and 20 of ``usage_starts``.
On Postgres every column of a rewritten row costs its share of the UPDATE, whether it changed
or not: measured on 120 000 rows, 21 bigint columns took 450 ms and 42 took 700, where one
``bytea`` of 21 values took 300 ms and of 42 values 375. A busy entity's row is rewritten
every cycle, and at every minute its minute row begins again, which the separate starts table
cost as a second UPDATE of every busy entity.

"No such row" is -1 in a start (``minute``, ``hour``, ``day``, ``month``) and in
``minute_peak`` (no counted second yet), as in the aggregator's book. Big-endian, so that
Postgres can read a field itself: field ``i`` is
``('x' || encode(substring(packed from 8 * i + 1 for 8), 'hex'))::bit(64)::bigint``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import Connection

from metering.rollups import bulk
from metering.rollups.models import COUNTERS

_ROW = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
STATE = ("conns", "ws", "channels", "since", "area", "ch_area", *COUNTERS)
MINUTE_ROW = ("minute", *(f"minute_{c}" for c in _ROW))
COARSER_STARTS = ("hour", "day", "month")
FIELDS = (*STATE, *MINUTE_ROW, *COARSER_STARTS)
HELD_ROW = ("held", *(f"held_{c}" for c in _ROW))
WIDTH = 8 * len(FIELDS)
HELD_WIDTH = WIDTH + 8 * len(HELD_ROW)  # a row that holds a closed minute row
DTYPE = np.dtype(">i8")
_AT = {name: i for i, name in enumerate((*FIELDS, *HELD_ROW))}
# Where each part lies in a packed matrix's columns.
STATE_COLUMNS = slice(0, len(STATE))
MINUTE_COLUMNS = slice(len(STATE), len(STATE) + len(MINUTE_ROW))
STARTS_COLUMNS = slice(len(STATE) + len(MINUTE_ROW), len(FIELDS))
HELD_COLUMNS = slice(len(FIELDS), len(FIELDS) + len(HELD_ROW))


def column(name: str) -> int:
    return _AT[name]


def select(conn: Connection, where: str = "TRUE") -> tuple[Any, Any, Any]:
    """The state rows that meet ``where`` (SQL on ``usage_state``): scopes, entity ids, and
    their values as one int64 matrix of ``FIELDS`` then ``HELD_ROW`` (a held start of -1
    where a row holds none, and a minute start of -1 where the minute row has no counted
    second, as ``as_mapping`` reads them). A row of another width is an error, never
    misread."""
    widths = (len(FIELDS), len(FIELDS) + len(HELD_ROW))
    others = conn.exec_driver_sql(
        f"SELECT count(*) FROM usage_state WHERE ({where}) AND length(packed) NOT IN "  # noqa: S608
        f"({', '.join(str(8 * w) for w in widths)})"
    ).scalar()
    if others:
        raise ValueError(
            f"{others} usage_state rows are of another width: the database and the code "
            "are at different migrations (run `metering db upgrade`)"
        )
    parts = [
        bulk.select_packed(
            conn,
            f"SELECT scope, entity_id, packed FROM usage_state "  # noqa: S608
            f"WHERE ({where}) AND length(packed) = {8 * width} ORDER BY scope, entity_id",
            width,
        )
        for width in widths
    ]
    narrow = np.full((len(parts[0][2]), widths[1]), -1, dtype=np.int64)
    narrow[:, : widths[0]] = parts[0][2]
    scopes = np.concatenate([parts[0][0], parts[1][0]])
    ids = np.concatenate([parts[0][1], parts[1][1]])
    values = np.concatenate([narrow, parts[1][2]])
    values[values[:, _AT["minute_peak"]] < 0, _AT["minute"]] = -1
    return scopes, ids, values


def as_mapping(blob: bytes) -> dict[str, Any]:
    """One entity's fields by name (``FIELDS``, then ``HELD_ROW``), None where there is no
    such row (its start is -1: every field of the minute row or of the held row, or that
    unit's start)."""
    if len(blob) not in {WIDTH, HELD_WIDTH}:
        raise ValueError(
            f"a usage_state row holds {len(blob)} bytes, not {WIDTH} or {HELD_WIDTH}: the "
            "database and the code are at different migrations (run `metering db upgrade`)"
        )
    values = np.frombuffer(blob, dtype=DTYPE).tolist()
    out: dict[str, Any] = dict(zip((*FIELDS, *HELD_ROW), values, strict=False))
    out.update(dict.fromkeys(HELD_ROW[len(values) - len(FIELDS) :]))
    if out["minute"] < 0 or out["minute_peak"] < 0:
        out.update(dict.fromkeys(MINUTE_ROW))
    if out["held"] is not None and out["held"] < 0:
        out.update(dict.fromkeys(HELD_ROW))
    for unit in COARSER_STARTS:
        if out[unit] < 0:
            out[unit] = None
    return out


def pack(values: dict[str, int | None]) -> bytes:
    """One entity's packed value from its fields by name (None or absent: no such row; with
    a ``held`` start, the held row too)."""
    held = values.get("held") is not None
    row = np.zeros(len(FIELDS) + (len(HELD_ROW) if held else 0), dtype=DTYPE)
    for name in (*MINUTE_ROW[:1], "minute_peak", *COARSER_STARTS):
        row[_AT[name]] = -1
    for name, value in values.items():
        if value is not None:
            row[_AT[name]] = value
    return row.tobytes()
