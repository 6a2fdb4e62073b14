"""Bulk upserts: COPY into a staging table and one merge on Postgres; executemany otherwise.

Measured in ``bench/aggregate.py``: for the many rows of a cycle (states and rollup rows,
integer matrices), a COPY plus one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` beats
multi-row VALUES and ``unnest`` arrays on Postgres, because the rows cross the wire once and
the merge runs in one statement. They travel in COPY's binary format, built by NumPy a chunk
of rows at a time: no Python per value, and nothing for the server to parse. The few other
rows (gaps, counter marks) go by ``executemany``; SQLite takes everything that way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    SmallInteger,
    Table,
    text,
)

from metering.core.database import Base
from metering.core.logging import get_logger
from metering.rollups.fold import Ints

log = get_logger(__name__)

_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # header: no flags, no extension
_TRAILER = struct.pack(">h", -1)


def _merge_sql(dialect: str, table: str, merge: Mapping[str, str]) -> str:
    greatest, least = ("GREATEST", "LEAST") if dialect == "postgresql" else ("max", "min")
    return ", ".join(
        f"{col} = {expr.format(t=table, greatest=greatest, least=least)}"
        for col, expr in merge.items()
    )


def _widths(table: str, columns: Sequence[str]) -> list[int]:
    """Each integer column's width in bytes, from the model."""
    t: Table = Base.metadata.tables[table]
    out = []
    for name in columns:
        kind = t.c[name].type
        if isinstance(kind, SmallInteger):
            out.append(2)
        elif isinstance(kind, BigInteger):
            out.append(8)
        elif isinstance(kind, Integer):
            out.append(4)
        else:
            raise TypeError(f"{table}.{name} is not an integer column")
    return out


def _binary_dtype(widths: Sequence[int]) -> np.dtype[Any]:
    fields: list[tuple[str, str]] = [("n", ">i2")]
    for i, w in enumerate(widths):
        fields += [(f"l{i}", ">i4"), (f"v{i}", f">i{w}")]
    return np.dtype(fields)


# Rows per chunk of COPY data. Built in pieces of a few MB, the chunks stay in the CPU's caches
# and reuse the same memory; one buffer of a whole cycle's rows (55 MB at 100 000 state rows)
# cost four times as much per row at that size as at 12 000 rows (page faults and cache
# misses: the cycle grew faster than the rows), and the server waited for all of it first.
CHUNK_ROWS = 8192

# Fills a chunk: ``fill(out, at)`` assigns the values of the records ``at`` (a slice of them)
# to ``out``, the chunk's records (a structured view over the bytes sent).
Fill = Callable[[npt.NDArray[Any], slice], None]


def binary_copy(
    rows: npt.NDArray[np.int64], widths: Sequence[int] | None = None
) -> Iterator[bytes | bytearray]:
    """``rows`` (no NULLs) in COPY's binary format, in chunks (``CHUNK_ROWS``): every column a
    ``bigint`` or, with ``widths``, each column an integer of that many bytes (as the table's
    column is typed). All bigints: three array assignments per chunk (each field is its
    length, 8, then the value); typed: two per column."""
    n_rows, n = rows.shape
    typed = [] if widths is None or all(w == 8 for w in widths) else list(widths)
    for i, w in enumerate(typed):
        limit = 1 << (8 * w - 1)
        if w != 8 and n_rows and not (-limit <= rows[:, i].min() <= rows[:, i].max() < limit):
            raise ValueError(f"column {i} has a value outside {w}-byte integers")
    record = _binary_dtype(typed) if typed else np.dtype([("n", ">i2"), ("f", _BIGINT_FIELD, (n,))])

    def fill(out: npt.NDArray[Any], at: slice) -> None:
        out["n"] = n
        for i, w in enumerate(typed):
            out[f"l{i}"] = w
            out[f"v{i}"] = rows[at, i]
        if not typed:
            out["f"]["l"] = 8
            out["f"]["v"] = rows[at]

    return _copy_data([(record, n_rows, fill)])


_BIGINT_FIELD = np.dtype([("l", ">i4"), ("v", ">i8")])


def _copy_data(runs: Sequence[tuple[np.dtype[Any], int, Fill]]) -> Iterator[bytes | bytearray]:
    """A binary COPY of (record type, how many, fill) runs of records: the header, chunks of up
    to ``CHUNK_ROWS`` records, each a fresh buffer that ``fill`` writes into (it is what is
    sent: no concatenation), and the trailer."""
    yield _SIGNATURE
    for record, n, fill in runs:
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(n, lo + CHUNK_ROWS)
            buf = bytearray(record.itemsize * (hi - lo))
            fill(np.frombuffer(buf, dtype=record), slice(lo, hi))
            yield buf
    yield _TRAILER


def parse_binary_copy(data: bytes, widths: Sequence[int]) -> npt.NDArray[np.int64]:
    """What ``COPY ... TO STDOUT (FORMAT BINARY)`` of non-NULL integer columns sent."""
    body = memoryview(data)[len(_SIGNATURE) : len(data) - len(_TRAILER)]
    parsed = np.frombuffer(body, dtype=_binary_dtype(widths))
    out = np.empty((len(parsed), len(widths)), dtype=np.int64)
    for i in range(len(widths)):
        out[:, i] = parsed[f"v{i}"]
    return out


def select_array(
    conn: Connection, sql: str, table: str, columns: Sequence[str]
) -> npt.NDArray[np.int64]:
    """The rows of ``sql`` (integer columns typed like ``table``'s ``columns``, no NULLs) as a
    matrix: a binary COPY on Postgres."""
    if conn.dialect.name != "postgresql":
        found = conn.exec_driver_sql(sql).all()
        return np.array(found, dtype=np.int64).reshape(len(found), len(columns))
    raw: Any = conn.connection.driver_connection
    data = bytearray()
    with raw.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as copy:
        for block in copy:
            data += block
    if not data:
        return np.zeros((0, len(columns)), dtype=np.int64)
    return parse_binary_copy(bytes(data), _widths(table, columns))


def select_matching(
    conn: Connection,
    table: str,
    *,
    columns: Sequence[str],
    keys: Sequence[str],
    wanted: npt.NDArray[np.int64],
    where: str = "TRUE",
) -> npt.NDArray[np.int64]:
    """The ``columns`` of ``table``'s rows whose ``keys`` are a row of ``wanted`` and which
    meet ``where`` (SQL on ``r``, the table: a constant condition, such as the partition): the
    keys travel into a temporary table (by binary COPY on Postgres, then ANALYZE, so that the
    planner knows how few they are against the table), and one join reads the rows."""
    if not len(wanted):
        return np.zeros((0, len(columns)), dtype=np.int64)
    match = " AND ".join(f"r.{k} = w.{k}" for k in keys)
    cols = ", ".join("r." + c for c in columns)
    select = f"SELECT {cols} FROM {table} r JOIN {{w}} w ON {match} WHERE {where}"  # noqa: S608
    if conn.dialect.name == "postgresql":
        with _staged(conn, table, keys, wanted, kind="keys") as (cur, stage):
            cur.execute(f"ANALYZE {stage}")
            return select_array(conn, select.format(w=stage), table, columns)
    stage = f"_wanted_{table}"
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({', '.join(k + ' bigint' for k in keys)})"
    )
    conn.exec_driver_sql(f"DELETE FROM {stage}")  # noqa: S608 (our own names)
    params = ", ".join(f":{k}" for k in keys)
    conn.execute(
        text(f"INSERT INTO {stage} ({', '.join(keys)}) VALUES ({params})"),  # noqa: S608
        [dict(zip(keys, row, strict=True)) for row in wanted.tolist()],
    )
    return select_array(conn, select.format(w=stage), table, columns)


def upsert_array(
    conn: Connection,
    table: str,
    *,
    columns: Sequence[str],
    keys: Sequence[str],
    rows: npt.NDArray[np.int64],
    merge: Mapping[str, str],
    new: bool = False,
) -> int:
    """``upsert`` of an integer matrix (one row per record, ``columns`` order, no NULLs).

    ``new``: the records are expected not to be there yet. On Postgres they then go by a
    binary COPY straight into ``table``, typed as its columns: no staging table, no statement,
    no speculative insertion per row (120 000 closed minute rows: about 0.6 s, against 1.0 s
    staged and merged). Should one be there after all (a replay that the caller's design rules
    out), a savepoint takes the COPY back and the rows are merged as usual: slower, never
    wrong, and logged.
    """
    if not len(rows):
        return 0
    if conn.dialect.name != "postgresql":
        return upsert(conn, table, columns=columns, keys=keys, rows=rows.tolist(), merge=merge)
    if new:
        data = binary_copy(rows, _widths(table, columns))
        try:
            with conn.begin_nested():
                raw: Any = conn.connection.driver_connection
                sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
                with raw.cursor() as cur, cur.copy(sql) as copy:
                    for chunk in data:
                        copy.write(chunk)
            return len(rows)
        except psycopg.errors.UniqueViolation as exc:
            log.warning("bulk.new_rows_found", table=table, rows=len(rows), error=str(exc))
    with _staged(conn, table, columns, rows) as (cur, stage):
        cur.execute(_merge_from(conn.dialect.name, table, stage, columns, keys, merge))
    return len(rows)


def _packed_dtype(width: int) -> np.dtype[Any]:
    """A binary COPY record of (scope smallint, entity_id bigint, packed bytea of ``width``
    big-endian int64)."""
    return np.dtype(
        [("n", ">i2"), ("l0", ">i4"), ("scope", ">i2"), ("l1", ">i4"), ("entity", ">i8"),
         ("l2", ">i4"), ("packed", ">i8", (width,))]
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Packed:
    """``n`` records' packed values, ``width`` int64 each, written where they go by
    ``fill(out, at)``: ``out`` is an (records ``at``) x ``width`` view to assign the values of
    records ``at`` (a slice) to. The values need never be one matrix of all the records."""

    width: int
    n: int
    fill: Fill

    @classmethod
    def of(cls, values: npt.NDArray[np.int64]) -> Packed:
        def fill(out: npt.NDArray[Any], at: slice) -> None:
            out[...] = values[at]

        return cls(values.shape[1], len(values), fill)

    def matrix(self) -> npt.NDArray[np.int64]:
        out = np.empty((self.n, self.width), dtype=np.int64)
        self.fill(out, slice(0, self.n))
        return out


def replace_packed(conn: Connection, table: str, parts: Sequence[tuple[Ints, Ints, Packed]]) -> int:
    """Write records keyed by (scope, entity_id) as they now are: their one other column,
    ``packed``, set to a row of int64 values as big-endian bytes; records not there yet
    inserted (``usage_state``, ``metering.rollups.state``). ``parts``: (scopes, entity ids,
    values) of records, each part's values of one width.

    For records that are nearly all there already: on Postgres the rows travel by binary COPY
    into a staging table, in chunks that ``Packed.fill`` writes straight into, then one
    ``UPDATE ... FROM`` it, which joins it once, and costs less than an ``INSERT ... ON
    CONFLICT DO UPDATE`` (an index probe and a speculative insertion per row;
    ``bench/upsert_methods.py``). Only when it updated fewer records than it was given are the
    missing ones inserted."""
    parts = [p for p in parts if p[2].n]
    n = sum(p[2].n for p in parts)
    if not n:
        return 0
    if conn.dialect.name != "postgresql":
        params = []
        for scope, entity, packed in parts:
            blobs = np.ascontiguousarray(packed.matrix(), dtype=">i8")
            params += [
                {"scope": int(s), "entity_id": int(e), "packed": blobs[i].tobytes()}
                for i, (s, e) in enumerate(zip(scope.tolist(), entity.tolist(), strict=True))
            ]
        conn.execute(
            text(
                f"INSERT INTO {table} (scope, entity_id, packed) "  # noqa: S608
                "VALUES (:scope, :entity_id, :packed) "
                "ON CONFLICT (scope, entity_id) DO UPDATE SET packed = excluded.packed"
            ),
            params,
        )
        return n
    runs = [
        (_packed_dtype(packed.width), packed.n, _packed_fill(scope, entity, packed))
        for scope, entity, packed in parts
    ]
    stage = f"_stage_{table}_packed"
    definition = "scope smallint, entity_id bigint, packed bytea"
    columns = ("scope", "entity_id", "packed")
    width = max(p[2].width for p in parts)
    with _copied(conn, stage, definition, columns, _copy_data(runs)) as cur:
        # The join hashes the staged rows: in memory in one batch, not spilled in several
        # to temporary files (at 100 000 states with the default 4 MB, 8 batches, and the
        # UPDATE took 15 % longer). For the rest of this transaction only.
        cur.execute(f"SET LOCAL work_mem = '{_hash_memory_kb(n, width + 2)}kB'")
        match = "t.scope = s.scope AND t.entity_id = s.entity_id"
        cur.execute(f"UPDATE {table} t SET packed = s.packed FROM {stage} s WHERE {match}")  # noqa: S608
        if cur.rowcount < n:
            cur.execute(
                f"INSERT INTO {table} (scope, entity_id, packed) "  # noqa: S608
                f"SELECT scope, entity_id, packed FROM {stage} s "
                f"WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match}) "
                "ON CONFLICT (scope, entity_id) DO UPDATE SET packed = excluded.packed"
            )
    return n


def _packed_fill(scope: Ints, entity: Ints, packed: Packed) -> Fill:
    def fill(out: npt.NDArray[Any], at: slice) -> None:
        out["n"], out["l0"], out["l1"], out["l2"] = 3, 2, 8, 8 * packed.width
        out["scope"] = scope[at]
        out["entity"] = entity[at]
        packed.fill(out["packed"], at)

    return fill


def select_packed(
    conn: Connection, sql: str, width: int
) -> tuple[Ints, Ints, npt.NDArray[np.int64]]:
    """The (scope smallint, entity_id bigint, packed) rows of ``sql``: scopes, entity ids,
    and the packed values as an int64 matrix of ``width`` columns (a binary COPY on
    Postgres). A row of another shape is an error, never misread."""
    if conn.dialect.name != "postgresql":
        found = conn.exec_driver_sql(sql).all()
        blobs = [bytes(r[2]) for r in found]
        if any(len(b) != 8 * width for b in blobs):
            raise ValueError(_WIDTH_ERROR.format(width=8 * width))
        values = np.frombuffer(b"".join(blobs), dtype=">i8").reshape(len(found), width)
        keys = np.array([(r[0], r[1]) for r in found], dtype=np.int64).reshape(len(found), 2)
        return keys[:, 0], keys[:, 1], values.astype(np.int64)
    raw: Any = conn.connection.driver_connection
    data = bytearray()
    with raw.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT BINARY)") as copy:
        for block in copy:
            data += block
    body = memoryview(data)[len(_SIGNATURE) : max(len(data) - len(_TRAILER), len(_SIGNATURE))]
    record = _packed_dtype(width)
    if len(body) % record.itemsize:
        raise ValueError(_WIDTH_ERROR.format(width=8 * width))
    parsed = np.frombuffer(body, dtype=record)
    shape = (parsed["n"] != 3) | (parsed["l0"] != 2) | (parsed["l1"] != 8)
    if shape.any() or (parsed["l2"] != 8 * width).any():
        raise ValueError(_WIDTH_ERROR.format(width=8 * width))
    return (
        parsed["scope"].astype(np.int64),
        parsed["entity"].astype(np.int64),
        parsed["packed"].astype(np.int64),
    )


_WIDTH_ERROR = (
    "usage_state rows are not {width} bytes: the database and the code are at different "
    "migrations (run `metering db upgrade`)"
)


def _hash_memory_kb(rows: int, values: int) -> int:
    """Room for a hash table of ``rows`` of ``values`` each (a tuple's header, 8 bytes a
    value, the bucket): at least Postgres's default 4 MB, at most 256 MB."""
    needed = rows * (values * 8 + 64) * 3 // 2 // 1024
    return int(min(max(needed, 4096), 256 * 1024))


@contextmanager
def _staged(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    rows: npt.NDArray[np.int64],
    kind: str = "bigint",
) -> Iterator[tuple[Any, str]]:
    """A raw cursor and the name of a temporary table holding ``rows``, sent by binary COPY
    (one staging table per ``table`` and ``kind`` of use, for a transaction may use several).

    The staging table is all bigints (the values cast on the way into ``table``): every field
    of the COPY the same width, so NumPy builds it in one piece."""
    stage = f"_stage_{table}_{kind}"
    definition = ", ".join(c + " bigint" for c in columns)
    with _copied(conn, stage, definition, columns, binary_copy(rows)) as cur:
        yield cur, stage


@contextmanager
def _copied(
    conn: Connection,
    stage: str,
    definition: str,
    columns: Sequence[str],
    data: Iterable[bytes | bytearray],
) -> Iterator[Any]:
    """A raw cursor, once ``data`` (a binary COPY of ``columns``, in chunks) is in the
    temporary table ``stage`` (made if need be, emptied first; its rows go at the commit)."""
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {stage} ({definition}) ON COMMIT DELETE ROWS"
    )
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(f"TRUNCATE {stage}")
        with cur.copy(f"COPY {stage} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            for chunk in data:
                copy.write(chunk)
        yield cur


def _merge_from(  # noqa: PLR0917 (internal)
    dialect: str,
    table: str,
    stage: str,
    columns: Sequence[str],
    keys: Sequence[str],
    merge: Mapping[str, str],
) -> str:
    cols = ", ".join(columns)
    on_conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET " + _merge_sql(
        dialect, table, merge
    )
    # Identifiers come from the code, never from input; values travel by COPY.
    return f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} {on_conflict}"  # noqa: S608


def upsert(
    conn: Connection,
    table: str,
    *,
    columns: Sequence[str],
    keys: Sequence[str],
    rows: Sequence[Sequence[Any]],
    merge: Mapping[str, str],
) -> int:
    """Insert ``rows`` (tuples in ``columns`` order); on a key conflict set ``merge``.

    For a few rows (gaps, counter marks), in one ``executemany``: a staging table would cost
    more than it saves, above all for a mark of megabytes, which it would store twice.

    ``merge`` maps a column to an SQL expression in which ``excluded.col`` is the new value,
    ``{t}.col`` the stored one, and ``{greatest}`` / ``{least}`` the dialect's functions.
    """
    if not rows:
        return 0
    cols = ", ".join(columns)
    on_conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET " + _merge_sql(
        conn.dialect.name, table, merge
    )
    params = ", ".join(f":{c}" for c in columns)
    stmt = text(f"INSERT INTO {table} ({cols}) VALUES ({params}) {on_conflict}")  # noqa: S608
    conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows])
    return len(rows)
