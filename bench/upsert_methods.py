"""Bulk writes of the aggregator's state rows into Postgres, five ways: which is fastest.

The design says "bulk upserts: multi-row VALUES, unnest, or COPY into a staging table: measure
and pick". The aggregator rewrites every busy entity's state in ``usage_state`` every cycle.
Since migration 0012 an entity's state is the 39 values of ``metering.rollups.state.FIELDS``
(40 since migration 0018 added its lag: the state, the latest minute row whole, the latest
hour, day and month rows' starts), each a big-endian int64 (312 bytes, then 320), packed in one
``bytea``; since migration 0014 ``usage_state`` is ``(scope, part, block, packed)``: the
entities of one scope whose ids share all but their low ``state.BLOCK_BITS`` bits (up to 64) in
two rows, one per part of their values, each ``packed`` their count, ids and widths, then each
one's fields of the part (``state.encode``), stored out of line uncompressed (``STORAGE
EXTERNAL``). Part ``state.NOW`` (0) is what changes whenever the entity does: the state and the
minute row's extremes, 21 fields, the very values of ``COLUMNS`` below; part ``state.ROWS`` (1)
what changes only when a row begins: the minute row's start and start values and the hour, day
and month starts, 18 fields (19 with the lag; and a held minute row, none here). It was 23
columns (the keys, the state, the minute row's extremes), with the rest in ``usage_starts``,
rewritten at every minute in a second UPDATE. Packed, because on Postgres an UPDATE costs per
column written, whether it changed or not: measured elsewhere on 120 000 rows, 21 bigint
columns took 450 ms and 42 took 700 ms, one ``bytea`` of 21 values 300 ms and of 42 values 375
ms; in blocks, because it also costs per row rewritten.

So this measures the four ways of writing the column-shaped table, and the production write of
the blocks, on the same entities. In one scratch database built by the migrations:

- ``bench_state_columns``, which the benchmark creates: ``usage_state``'s columns before
  migration 0012 (``COLUMNS``: scope smallint, entity_id and the 21 values bigint, NOT NULL),
  primary key (scope, entity_id), fillfactor 45, as that table was;
- ``usage_state`` as the migrations leave it (scope, part, block, packed; fillfactor 45,
  ``packed`` STORAGE EXTERNAL).

Per size N (--rows), each first holds N entities (entity ids 1..N; those of every 6th run of 64
ids, ``id >> 6`` a multiple of 6, of scope 2, the others of scope 1, so that, as apps and
accounts, whose ids are counted apart, each scope's ids fill its blocks; plausible values in
every field, no NULL; in ``usage_state`` every one of the 39 fields, the minute row and the
starts included, both parts of every block, and no held minute row). Then each method writes,
committed, rows of the same minute (5 to 15 s later), as a steady cycle does after the
minute's first: the entities already there change every field of their fast part (``NOW``)
and keep their slow part (``ROWS``) as the table holds it (``same_minute``; the generator
draws the minute row's start values anew on each call, the starts are the same);

- steady: N changed rows, every one already there;
- 10% new: N rows, 90 % of them entities already there (picked at random), 10 % new ones
  (every field theirs).

The methods, each timed from the NumPy matrix in hand to after the commit:

1. baseline: psycopg's COPY in text (``copy.write_row``) into a temporary staging table, then
   one ``INSERT ... SELECT ... ON CONFLICT (scope, entity_id) DO UPDATE SET c = excluded.c``
   (what bench/aggregate.py calls its baseline), into ``bench_state_columns``;
2. VALUES: multi-row ``INSERT ... VALUES (...), (...) ON CONFLICT DO UPDATE``, --batch rows per
   statement, the values as psycopg parameters. The SQL is built once per batch size with
   ``$n`` placeholders and sent as it is by a ``RawCursor`` (psycopg's default cursor parses
   the ``%s`` of a query that long again on every execute, in Python: it caches only short
   ones), every int sent as a bigint (see ``int8``); into ``bench_state_columns``;
3. unnest: ``INSERT ... SELECT * FROM unnest(%b::bigint[], ...) ON CONFLICT DO UPDATE``, one
   Python list per column (converting the NumPy columns is timed: it is the method's cost),
   sent in binary (``%b``; ``%s`` sends these arrays as text, which is slower to build); into
   ``bench_state_columns``;
4. bulk.upsert_array: the production code for the rollup rows (COPY in binary, built by NumPy,
   into a staging table, then ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``) on a SQLAlchemy
   connection, into ``bench_state_columns``;
5. state.write: the production code the aggregator writes ``usage_state`` with, called as
   its cycle calls it (``service``, ``cycle`` here): ``state.write(..., parts=(state.NOW,))``
   for the blocks holding an entity written, then ``parts=(state.ROWS,)`` for the blocks
   holding one whose slow part differs from the table's or that is new (a new entity needs
   both parts), skipped when there is none; both in one transaction on a SQLAlchemy
   connection (``state.encode`` builds each block's part by NumPy, then psycopg's
   ``executemany`` of ``INSERT ... ON CONFLICT (scope, part, block) DO UPDATE``, a row per
   block and part, in one pipeline, in binary). A block's part is written whole, so it is
   given, as the aggregator gives it (``service._blocks_of``, not timed, nor the comparison
   of slow parts), every entity of every block that holds one to write. In steady: part NOW
   of every block, the same N entities (21 values each, as methods 1-4), no part ROWS (no
   slow part changed: what the production steady cycle writes). In 10% new: part NOW of
   every block, N + N/10 entities (the 10 % not written share their blocks with those
   written, and go too), and part ROWS (18 values each) of the blocks holding the N/10 new
   entities, with the old entities in those blocks (the speed and per-row figures still
   count N). Not measured: a minute's first cycle, which writes both parts of nearly every
   block. The values as the aggregator holds them, a big-endian int64 matrix of
   ``state.ALL`` columns (a held start of -1: no held row).

Before each write both tables are put back as they were: a CHECKPOINT (so that none falls
inside the measured write, and every method pays the same full-page images in the WAL for the
pages it first touches after one), TRUNCATE, the N rows (both parts of the blocks of the N
entities, built by ``block_rows``, not by the code measured) again, VACUUM ANALYZE. After it,
the whole table written is read back (``bench_state_columns`` by a binary COPY,
``usage_state`` by ``state.select``, both parts of every block, every entity with its values)
and compared with what the rows written say it must hold, the slow part included (a part
ROWS missing for a new entity's block is an error of ``state.select``, one written wrong a
difference): a method that left anything else stops the benchmark (exit status 1) before any
time is reported. The methods run in a different order in each repeat, with the garbage
collector off while one is timed (the aggregator's cycle runs so). Time: the median of
--repeat; speed: the baseline's time over the method's.

    python bench/upsert_methods.py [--rows 100000] [--repeat 3] [--batch 1000]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import struct
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import exit_on_sigterm, row
from metering.core.database import make_engine
from metering.rollups import bulk, state
from metering.rollups.models import COUNTERS
from metering.rollups.state import BLOCK_BITS, FIELDS, HELD_ROW
from tests.scratch import scratch_database

Ints = npt.NDArray[np.int64]
Write = Callable[[Any], None]  # a layout's rows: ``shaped``

PACKED_TABLE = "usage_state"  # (scope, part, block, packed): the production table
COLUMNS_TABLE = "bench_state_columns"
KEYS = ("scope", "entity_id")
# usage_state's columns before migration 0012: the state, then its latest minute row's extremes.
COLUMNS = (
    *KEYS, "conns", "ws", "channels", "since", "area", "ch_area", *COUNTERS,
    "minute_peak", "minute_peak_at", "minute_min", "minute_ws_peak", "minute_ch_peak",
    "minute_ch_min",
)  # fmt: skip
VALUE_COLUMNS = COLUMNS[len(KEYS) :]
COLS = ", ".join(COLUMNS)
ON_CONFLICT = f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in VALUE_COLUMNS
)
# The rows generated: the keys, then the packed fields; the column layout is a part of them.
ALL = (*KEYS, *FIELDS)
AT_COLUMNS = [ALL.index(c) for c in COLUMNS]
# The two parts of an entity's value, each in usage_state rows of its own, as migration 0014
# states them (indices into FIELDS): what changes whenever the entity does (the state and the
# minute row's extremes: the columns above, those methods 1-4 write), and what changes only
# when a row begins (the minute row's start and start values, the hour, day and month starts).
PART_FIELDS = {
    state.NOW: (*range(0, 15), *range(30, 36)),
    state.ROWS: (*range(15, 30), *range(36, len(FIELDS))),  # (39: the lag, migration 0018)
}
assert [FIELDS[i] for i in PART_FIELDS[state.NOW]] == list(VALUE_COLUMNS), "parts moved"
SLOW = [len(KEYS) + i for i in PART_FIELDS[state.ROWS]]  # the slow part, in ALL order
# usage_state read back (state.select): the keys, the fields, then the held row (none: -1).
BLOCK_COLUMNS = (*ALL, *HELD_ROW)
LAYOUTS = ("columns", "blocks")
NEW_SHARE = 0.1
CASES = ("steady", "10% new")
NOW = int(datetime(2026, 11, 16, 12, 30, 30, tzinfo=UTC).timestamp())
MONTH = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


class Mismatch(Exception):
    pass


class Method(NamedTuple):
    layout: str  # which table it writes: "columns" (bench_state_columns) or "blocks"
    write: Write  # the rows in that layout's shape (``shaped``)


class Book(NamedTuple):
    """Entities as the aggregator hands them to ``state.write`` (``service._blocks_of``):
    every member of each block, in (scope, id) order, and the parts to write of their blocks."""

    parts: tuple[int, ...]  # state.NOW, state.ROWS or both
    scopes: Ints
    ids: Ints
    values: npt.NDArray[Any]  # big-endian int64, ``FIELDS`` then ``HELD_ROW`` (held start -1)


# -- the rows --------------------------------------------------------------------------------


def states(entity: Ints, rng: np.random.Generator, now: int) -> Ints:
    """A plausible row per entity, in ``ALL`` order (the keys, then every packed field: the
    state, the latest minute row, the latest hour, day and month rows' starts), all filled."""
    n = len(entity)

    def r(low: int, high: int | Ints) -> Ints:
        return rng.integers(low, high, n, dtype=np.int64, endpoint=True)

    conns = r(1, 150)
    ws = r(0, conns)
    channels = r(0, 40)
    counters = {
        "opened": r(0, 10**5),
        "refused": r(0, 100),
        "ch_opened": r(0, 10**4),
        "ch_refused": r(0, 100),
        "msg_refused": r(0, 1000),
        "pub_n": r(0, 10**6),
    }
    counters["pub_b"] = counters["pub_n"] * r(50, 2000)
    counters["del_n"] = 2 * counters["pub_n"]
    counters["del_b"] = 2 * counters["pub_b"]
    area, ch_area = conns * r(10**3, 10**6), channels * r(10**3, 10**6)
    minute = now - now % 60
    conns0 = np.maximum(conns - r(0, 5), 0)
    values: dict[str, Ints | int] = {
        "scope": np.where((entity >> BLOCK_BITS) % 6 == 0, 2, 1).astype(np.int64),
        "entity_id": entity,
        "conns": conns,
        "ws": ws,
        "channels": channels,
        "since": now - r(0, 59),
        "area": area,
        "ch_area": ch_area,
        **counters,
        "minute": minute,
        "hour": now - now % 3600,
        "day": now - now % 86400,
        "month": MONTH,
        "minute_conns0": conns0,
        "minute_ws0": np.minimum(ws, conns0),
        "minute_channels0": channels,
        "minute_area0": area - conns * r(0, 59),
        "minute_ch_area0": ch_area - channels * r(0, 59),
        **{f"minute_{c}0": v - np.minimum(v, r(0, 100)) for c, v in counters.items()},
        "minute_peak": conns + r(0, 9),
        "minute_peak_at": minute + r(0, 29),
        "minute_min": np.maximum(conns0 - r(0, 9), 0),
        "minute_ws_peak": ws + r(0, 9),
        "minute_ch_peak": channels + r(0, 3),
        "minute_ch_min": np.maximum(channels - r(0, 3), 0),
    }
    assert set(COUNTERS) == set(counters), "a counter this benchmark does not fill"
    missing = set(ALL) - set(values)
    assert not missing, f"fields this benchmark does not fill: {sorted(missing)}"
    return np.column_stack([np.broadcast_to(values[c], n) for c in ALL]).astype(np.int64)


def shaped(layout: str, rows: Ints) -> Ints | list[Book]:
    """``rows`` (``ALL`` order) as a method of ``layout`` takes them: ``COLUMNS``, or, for the
    blocks, one ``Book`` writing both parts (``rows`` must then be every member of each block
    they touch, in key order: ``after``)."""
    if layout == "columns":
        return np.ascontiguousarray(rows[:, AT_COLUMNS])
    return [book(state.PARTS, rows)]


def book(parts: tuple[int, ...], rows: Ints) -> Book:
    """``rows`` (``ALL`` order, every member of each block they touch, in key order) as the
    aggregator gives them to ``state.write`` to write ``parts`` of their blocks."""
    values = np.full((len(rows), state.ALL), -1, dtype=state.DTYPE)
    values[:, : len(FIELDS)] = rows[:, len(KEYS) :]
    return Book(parts, rows[:, 0].copy(), rows[:, 1].copy(), values)


def found_in(stored: Ints, rows: Ints) -> tuple[npt.NDArray[np.bool_], Ints]:
    """Per row of ``rows``, whether ``stored`` holds its key, and where (if it does)."""
    if not len(stored):
        return np.zeros(len(rows), np.bool_), np.zeros(len(rows), np.int64)
    codes = stored[:, 1] * 4 + stored[:, 0]  # a key as one int (scope 1 or 2)
    order = np.argsort(codes)
    wanted = rows[:, 1] * 4 + rows[:, 0]
    at = np.minimum(np.searchsorted(codes[order], wanted), len(stored) - 1)
    return codes[order][at] == wanted, order[at]


def same_minute(stored: Ints, written: Ints) -> Ints:
    """``written`` as a steady cycle writes it, within the minute of ``stored`` (``NOW``): the
    entities ``stored`` holds changed in their fast part only, their slow part (``SLOW``: the
    minute row's start and start values, the coarser rows' starts) as ``stored`` holds it.
    (``states`` draws the start values anew on each call; the starts themselves are the same
    within a minute.)"""
    found, at = found_in(stored, written)
    out = written.copy()
    out[np.ix_(found, SLOW)] = stored[np.ix_(at[found], SLOW)]
    return out


def cycle(stored: Ints, written: Ints, want: Ints) -> list[Book]:
    """What the aggregator's cycle (``service``) hands ``state.write`` once ``written`` went
    over ``stored`` (``want``: ``after``): part ``NOW`` of every block that holds an entity
    written; part ``ROWS`` of every block that holds one whose slow part (``SLOW``) differs
    from what ``stored`` holds, or that ``stored`` does not hold (a new entity needs both);
    each block whole, every member of it from ``want`` (``service._blocks_of``)."""
    blocks = (want[:, 1] >> BLOCK_BITS) * 4 + want[:, 0]
    written_too, _ = found_in(written, want)
    found, at = found_in(stored, want)
    differs = ~found
    differs[found] = (want[found][:, SLOW] != stored[at[found]][:, SLOW]).any(axis=1)
    return [
        book((part,), want[np.isin(blocks, blocks[which])])
        for part, which in ((state.NOW, written_too), (state.ROWS, differs))
        if which.any()
    ]


def unpacked(rows: Ints) -> Ints:
    """``rows`` (``ALL`` order) as ``state.select`` reads them back: ``BLOCK_COLUMNS``, the
    held row's columns -1."""
    return np.column_stack([rows, np.full((len(rows), len(HELD_ROW)), -1, dtype=np.int64)])


def block_rows(rows: Ints) -> list[tuple[int, int, int, bytes]]:
    """The ``usage_state`` rows (scope, part, block, packed) of ``rows`` (``ALL`` order,
    ordered by key), both parts of every block, built here, not by the code measured
    (``state.encode``): the layout as migration 0014 states it (per part: the count, the ids,
    the widths, then each entity's fields of the part, ``PART_FIELDS``), each entity narrow
    (no held row: the width of its part's fields)."""
    keys = rows[:, :2].tolist()
    fields = {
        part: np.ascontiguousarray(rows[:, [len(KEYS) + i for i in at]], dtype=">i8")
        for part, at in PART_FIELDS.items()
    }
    out = []
    for (scope, block), group in itertools.groupby(
        range(len(rows)), key=lambda i: (keys[i][0], keys[i][1] >> BLOCK_BITS)
    ):
        members = list(group)
        ids = [keys[i][1] for i in members]
        for part, at in PART_FIELDS.items():
            head = struct.pack(f">{1 + 2 * len(ids)}q", len(ids), *ids, *[len(at)] * len(ids))
            out.append((scope, part, block, head + fields[part][members].tobytes()))
    return out


def blocks_in(scopes: Ints, ids: Ints) -> int:
    """The blocks the entities (``scopes``, ``ids``) lie in."""
    return len(np.unique((ids >> BLOCK_BITS) * 4 + scopes))


def after(base: Ints, written: Ints) -> Ints:
    """What the table must hold once ``written`` went over ``base``, ordered by key."""
    both = np.concatenate([written, base])  # the first of a key wins: the written one
    _, first = np.unique(both[:, :2], axis=0, return_index=True)
    return both[first]


# -- the methods -----------------------------------------------------------------------------


def int8(cur: psycopg.RawCursor[Any] | psycopg.Cursor[Any]) -> None:
    """Every Python int sent as a bigint: by default psycopg picks a type per value (smallint,
    integer, bigint or numeric), which costs a look at each value and gives each batch of
    VALUES a statement of its own types for the server to plan."""
    cur.adapters.register_dumper(int, Int8Dumper)
    cur.adapters.register_dumper(int, Int8BinaryDumper)


def writers(conn: psycopg.Connection[Any], engine: Engine, batch: int) -> dict[str, Method]:
    conn.execute(f"CREATE TEMP TABLE bench_stage (LIKE {COLUMNS_TABLE}) ON COMMIT DELETE ROWS")
    conn.commit()

    def copy_text(rows: Ints) -> None:
        with conn.cursor() as cur:
            with cur.copy(f"COPY bench_stage ({COLS}) FROM STDIN") as copy:
                for r in rows.tolist():
                    copy.write_row(r)
            cur.execute(
                f"INSERT INTO {COLUMNS_TABLE} ({COLS}) SELECT {COLS} FROM bench_stage {ON_CONFLICT}"
            )
        conn.commit()

    statements: dict[int, str] = {}
    n_cols = len(COLUMNS)

    def values(rows: Ints) -> None:
        with psycopg.RawCursor(conn) as cur:
            int8(cur)
            for start in range(0, len(rows), batch):
                part = rows[start : start + batch]
                sql = statements.get(len(part))
                if sql is None:
                    tuples = (
                        "(" + ", ".join(f"${i * n_cols + j + 1}" for j in range(n_cols)) + ")"
                        for i in range(len(part))
                    )
                    sql = (
                        f"INSERT INTO {COLUMNS_TABLE} ({COLS}) VALUES {', '.join(tuples)} "
                        f"{ON_CONFLICT}"
                    )
                    statements[len(part)] = sql
                cur.execute(sql, part.ravel().tolist())
        conn.commit()

    arrays = ", ".join(["%b::bigint[]"] * n_cols)
    unnest_sql = (
        f"INSERT INTO {COLUMNS_TABLE} ({COLS}) SELECT * FROM unnest({arrays}) {ON_CONFLICT}"
    )

    def unnest(rows: Ints) -> None:
        with conn.cursor() as cur:
            int8(cur)
            cur.execute(unnest_sql, [rows[:, i].tolist() for i in range(n_cols)])
        conn.commit()

    merge = {c: f"excluded.{c}" for c in VALUE_COLUMNS}

    def upsert_array(rows: Ints) -> None:
        with engine.begin() as sa:
            bulk.upsert_array(sa, COLUMNS_TABLE, columns=COLUMNS, keys=KEYS, rows=rows, merge=merge)

    def write_blocks(books: list[Book]) -> None:
        with engine.begin() as sa:
            for b in books:
                state.write(sa, b.scopes, b.ids, b.values, parts=b.parts)

    return {
        "1 baseline: COPY text + merge": Method("columns", copy_text),
        f"2 VALUES x{batch} + ON CONFLICT": Method("columns", values),
        "3 unnest arrays + ON CONFLICT": Method("columns", unnest),
        "4 bulk.upsert_array": Method("columns", upsert_array),
        "5 state.write (blocks of 64)": Method("blocks", write_blocks),
    }


# -- the tables: back as they were, read back ------------------------------------------------


def create_tables(ctl: psycopg.Connection[Any]) -> None:
    """The column-shaped state table, and a copy of each table's initial rows."""
    values = ", ".join(f"{c} bigint NOT NULL" for c in VALUE_COLUMNS)
    ctl.execute(
        f"CREATE TABLE {COLUMNS_TABLE} (scope smallint NOT NULL, entity_id bigint NOT NULL, "
        f"{values}, PRIMARY KEY (scope, entity_id)) WITH (fillfactor = 45)"
    )
    ctl.execute(f"CREATE TABLE bench_base_columns (LIKE {COLUMNS_TABLE})")
    ctl.execute(f"CREATE TABLE bench_base_packed (LIKE {PACKED_TABLE} INCLUDING STORAGE)")


def fill_base(ctl: psycopg.Connection[Any], base: Ints) -> None:
    """Each table's initial rows, by COPY (``base`` ordered by key; the blocks built here, not
    by the code measured: the initial check then tests ``state.select`` against them)."""
    ctl.execute("TRUNCATE bench_base_columns, bench_base_packed")
    with ctl.cursor() as cur, cur.copy(f"COPY bench_base_columns ({COLS}) FROM STDIN") as copy:
        for r in base[:, AT_COLUMNS].tolist():
            copy.write_row(r)
    sql = "COPY bench_base_packed (scope, part, block, packed) FROM STDIN (FORMAT BINARY)"
    with ctl.cursor() as cur, cur.copy(sql) as copy:
        copy.set_types(["int2", "int2", "int8", "bytea"])
        for r in block_rows(base):
            copy.write_row(r)


def reset(ctl: psycopg.Connection[Any], checkpoint: bool) -> None:
    if checkpoint:
        ctl.execute("CHECKPOINT")
    ctl.execute(f"TRUNCATE {COLUMNS_TABLE}, {PACKED_TABLE}")
    ctl.execute(f"INSERT INTO {COLUMNS_TABLE} SELECT * FROM bench_base_columns")
    ctl.execute(f"INSERT INTO {PACKED_TABLE} SELECT * FROM bench_base_packed")
    ctl.execute(f"VACUUM (ANALYZE) {COLUMNS_TABLE}, {PACKED_TABLE}")


def column_contents(ctl: psycopg.Connection[Any]) -> Ints:
    """``bench_state_columns`` ordered by key, every column as a bigint, by a binary COPY (a
    NULL, a field of another width, or a column too many or too few makes it a Mismatch)."""
    select = ", ".join(f"{c}::bigint" for c in COLUMNS)
    sql = (
        f"COPY (SELECT {select} FROM {COLUMNS_TABLE} ORDER BY scope, entity_id) "
        "TO STDOUT (FORMAT BINARY)"
    )
    data = bytearray()
    with ctl.cursor() as cur, cur.copy(sql) as copy:
        for block in copy:
            data += block
    n = len(COLUMNS)
    record = np.dtype([("n", ">i2"), ("f", [("l", ">i4"), ("v", ">i8")], (n,))])
    start = len(SIGNATURE) + 8 + struct.unpack_from(">i", data, len(SIGNATURE) + 4)[0]
    body = len(data) - start - 2
    if not data.startswith(SIGNATURE) or data[-2:] != b"\xff\xff" or body % record.itemsize:
        raise Mismatch(f"{COLUMNS_TABLE} read back is not all non-NULL bigints (a NULL?)")
    got = np.frombuffer(data, dtype=record, count=body // record.itemsize, offset=start)
    if (got["n"] != n).any() or (got["f"]["l"] != 8).any():
        raise Mismatch(f"{COLUMNS_TABLE} read back is not all non-NULL bigints (a NULL?)")
    return got["f"]["v"].astype(np.int64)


def block_contents(engine: Engine) -> Ints:
    """Every entity in ``usage_state``, ordered by key, as the aggregator reads them
    (``state.select``): the keys, the fields and the held row, ``BLOCK_COLUMNS`` order (a
    block that is not one, e.g. a NULL, a value of another width, ids out of order or out of
    their block, makes it a Mismatch)."""
    with engine.connect() as sa:
        try:
            scope, entity, values = state.select(sa)
        except (ValueError, TypeError) as e:
            raise Mismatch(f"{PACKED_TABLE} read back: {e}") from None
    return np.column_stack([scope, entity, values]).astype(np.int64)


def check(ctl: psycopg.Connection[Any], engine: Engine, layout: str, want: Ints) -> None:
    """The table ``layout`` names holds ``want`` (``ALL`` order, ordered by key), or Mismatch."""
    names: tuple[str, ...]
    if layout == "columns":
        table, unit, names, got = COLUMNS_TABLE, "rows", COLUMNS, column_contents(ctl)
        want = np.ascontiguousarray(want[:, AT_COLUMNS])
    else:
        table, unit, names = PACKED_TABLE, "entities", BLOCK_COLUMNS
        got, want = block_contents(engine), unpacked(want)
    if got.shape != want.shape:
        raise Mismatch(f"{table} holds {len(got)} {unit}, {len(want)} expected")
    bad = np.nonzero((got != want).any(axis=1))[0]
    if len(bad):
        i = bad[0]
        cols = ", ".join(names[j] for j in np.nonzero(got[i] != want[i])[0])
        raise Mismatch(
            f"{len(bad)} of {len(want)} {unit} of {table} differ from what was written, the "
            f"first (scope {want[i, 0]}, entity_id {want[i, 1]}) in {cols}"
        )


# -- measuring -------------------------------------------------------------------------------


def measure(
    ctl: psycopg.Connection[Any],
    engine: Engine,
    methods: dict[str, Method],
    *,
    n: int,
    repeat: int,
    batch: int,
    checkpoint: bool,
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Median seconds per case and method; per case, what the blocks' writer wrote."""
    rng = np.random.default_rng(n)
    entity = np.arange(1, n + 1, dtype=np.int64)
    base = states(entity, rng, NOW)
    initial = after(base, base)  # ordered by key
    progress(
        f"[{n} rows] filling {COLUMNS_TABLE} and {PACKED_TABLE} with {n} entities each "
        f"({blocks_in(initial[:, 0], initial[:, 1])} blocks: "
        f"{len(block_rows(initial))} {PACKED_TABLE} rows)"
    )
    fill_base(ctl, initial)
    reset(ctl, checkpoint)
    try:
        for layout in LAYOUTS:
            check(ctl, engine, layout, initial)
    except Mismatch as e:
        raise SystemExit(f"upsert_methods: the initial fill is wrong: {e}") from None
    # Warm-up: staging tables, connections, the VALUES SQL; for the blocks, whole blocks, both
    # parts.
    whole = initial[state.block_of(initial[:, 1]) < max(1, min(n, batch) >> BLOCK_BITS)]
    for method in methods.values():
        part = base[: min(n, batch)] if method.layout == "columns" else whole
        method.write(shaped(method.layout, part))

    names = list(methods)
    times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in names} for c in CASES}
    wrote: dict[str, str] = {}
    n_new = int(n * NEW_SHARE)
    for case in CASES:
        for k in range(repeat):
            if case == "steady":
                keys = entity
            else:
                there = np.sort(rng.choice(entity, n - n_new, replace=False))
                keys = np.concatenate([there, np.arange(n + 1, n + n_new + 1, dtype=np.int64)])
            # Within the minute of base: the entities there change their fast part only.
            written = same_minute(base, states(keys, rng, NOW + 5 * (k + 1)))
            want = after(base, written)
            # The blocks' writer rewrites each block's part whole: every entity there.
            books = cycle(base, written, want)
            rows = {"columns": shaped("columns", written), "blocks": books}
            wrote[case] = "; ".join(
                f"part {'NOW' if b.parts == (state.NOW,) else 'ROWS'} of "
                f"{blocks_in(b.scopes, b.ids)} blocks ({len(b.ids)} entities)"
                for b in books
            )
            progress(
                f"[{n} rows] {case} {k + 1}/{repeat}: writing {len(written)} rows {len(names)} ways"
            )
            done = []
            for name in names[k % len(names) :] + names[: k % len(names)]:
                method = methods[name]
                reset(ctl, checkpoint)
                gc.collect()
                gc.disable()
                started = time.perf_counter()
                try:
                    method.write(rows[method.layout])
                finally:
                    elapsed = time.perf_counter() - started
                    gc.enable()
                try:
                    check(ctl, engine, method.layout, want)
                except Mismatch as e:
                    raise SystemExit(
                        f"upsert_methods: {name} ({case}, {n} rows, repeat {k + 1}) wrote the "
                        f"wrong thing: {e}; no time reported"
                    ) from None
                times[case][name].append(elapsed)
                done.append(f"{name.split(' ')[1].rstrip(':')} {ms(elapsed)}")
            progress(f"[{n} rows] {case} {k + 1}/{repeat}, each verified: " + ", ".join(done))
    medians = {c: {m: statistics.median(ts) for m, ts in times[c].items()} for c in CASES}
    return medians, wrote


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms".replace(",", " ")


def report(
    n: int, repeat: int, figures: dict[str, dict[str, float]], wrote: dict[str, str]
) -> None:
    widths = (36, 12, 12, 12)
    fastest = {}
    for case in CASES:
        what = "all already there" if case == "steady" else f"{NEW_SHARE:.0%} new entities"
        print(f"\n{case}: {n} rows written, {what} (median of {repeat})")
        print(row("method", "time", "per row", "speed", widths=widths))
        base = next(iter(figures[case].values()))
        for name, t in figures[case].items():
            cells = (f"{t / n * 1e6:.2f} µs", f"x{base / t:.2f}")
            print(row(f"  {name}", ms(t), *cells, widths=widths))
        print(f"  (5 wrote, each block's part whole: {wrote[case]}; per row: per the {n} written)")
        name = min(figures[case], key=figures[case].__getitem__)
        fastest[case] = (name, base / figures[case][name])
    names = {name for name, _ in fastest.values()}
    speeds = "; ".join(f"{c}: x{s:.2f} the baseline" for c, (_, s) in fastest.items())
    if len(names) == 1:
        print(f"\nfastest at {n} rows: {names.pop()} in both cases ({speeds})")
    else:
        each = "; ".join(f"{c}: {name} (x{s:.2f})" for c, (name, s) in fastest.items())
        print(f"\nfastest at {n} rows: {each}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000], help="sizes N")
    parser.add_argument("--repeat", type=int, default=3, choices=range(1, 10))
    parser.add_argument("--batch", type=int, default=1000, help="rows per VALUES statement")
    args = parser.parse_args()
    if min(args.rows) < 10 or args.batch < 1:
        parser.error("--rows must be at least 10, --batch at least 1")
    exit_on_sigterm()

    figures = {}
    with scratch_database("bench") as url:
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        engine = make_engine(url)
        try:
            with (
                psycopg.connect(libpq) as conn,
                psycopg.connect(libpq, autocommit=True) as ctl,
            ):
                settings = ctl.execute(
                    "SELECT current_setting('server_version'), current_setting('shared_buffers'),"
                    " current_setting('synchronous_commit'), rolsuper FROM pg_roles "
                    "WHERE rolname = current_user"
                ).fetchone()
                assert settings is not None
                version, shared_buffers, sync, checkpoint = settings
                create_tables(ctl)
                fill: dict[str, str | None] = dict(
                    ctl.execute(
                        "SELECT relname, array_to_string(reloptions, ', ') FROM pg_class "
                        "WHERE relname = ANY(%s)",
                        ([COLUMNS_TABLE, PACKED_TABLE],),
                    ).fetchall()
                )
                storage = ctl.execute(
                    "SELECT attstorage FROM pg_attribute WHERE attrelid = %s::regclass "
                    "AND attname = 'packed'",
                    (PACKED_TABLE,),
                ).fetchone()
                external = storage is not None and storage[0] == "e"
                print(
                    "bulk writes of the aggregator's entity states (keyed by scope, entity_id), "
                    "committed, 5 ways:"
                )
                print(
                    f"1-4 into {COLUMNS_TABLE}: the keys and {len(VALUE_COLUMNS)} bigint columns "
                    "(usage_state's before migration 0012), "
                    f"{fill.get(COLUMNS_TABLE) or 'default fillfactor'}"
                )
                print(
                    f"5 into {PACKED_TABLE}: blocks of up to {state.BLOCK} entities of a scope "
                    "in two rows (scope, part, block, packed), part NOW "
                    f"{len(PART_FIELDS[state.NOW])} int64 an entity (the same entities and "
                    f"values), part ROWS {len(PART_FIELDS[state.ROWS])} (the minute row's start "
                    "and start values, the starts; written where they change), "
                    f"{fill.get(PACKED_TABLE) or 'default fillfactor'}, packed "
                    f"{'STORAGE EXTERNAL' if external else 'compressible (not EXTERNAL)'}"
                )
                print(
                    f"Postgres {version}: shared_buffers {shared_buffers}, synchronous_commit "
                    f"{sync}; CHECKPOINT before each write: {'yes' if checkpoint else 'no'}"
                )
                methods = writers(conn, engine, args.batch)
                for n in args.rows:
                    figures[n] = measure(
                        ctl,
                        engine,
                        methods,
                        n=n,
                        repeat=args.repeat,
                        batch=args.batch,
                        checkpoint=checkpoint,
                    )
        finally:
            engine.dispose()
    for n, (f, wrote) in figures.items():
        report(n, args.repeat, f, wrote)


if __name__ == "__main__":
    main()
