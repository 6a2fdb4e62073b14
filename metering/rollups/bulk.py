"""Bulk upserts: COPY into a staging table and one merge on Postgres; executemany otherwise.

Measured in ``bench/aggregate.py``: for the many rows of a cycle (rollup rows, integer
matrices), a COPY plus one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` beats
multi-row VALUES and ``unnest`` arrays on Postgres, because the rows cross the wire once and
the merge runs in one statement. They travel in COPY's binary format, built by NumPy a chunk
of rows at a time: no Python per value, and nothing for the server to parse. The other rows
(gaps, counter marks, ``usage_state``'s blocks) go by ``executemany``; SQLite takes
everything that way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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

    For rows that are few or big (gaps, counter marks, ``usage_state``'s blocks of entities),
    in one ``executemany``: a staging table would cost more than it saves, above all for
    values of kilobytes or megabytes, which it would store twice.

    ``merge`` maps a column to an SQL expression in which ``excluded.col`` is the new value,
    ``{t}.col`` the stored one, and ``{greatest}`` / ``{least}`` the dialect's functions.
    """
    if not rows:
        return 0
    cols = ", ".join(columns)
    on_conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET " + _merge_sql(
        conn.dialect.name, table, merge
    )
    if conn.dialect.name == "postgresql":
        # psycopg's own executemany, in one pipeline, every value in binary: a bytea value
        # travels as it is (not as hex, twice its size, to be parsed), and nothing is copied
        # into a dict per row.
        insert = f"INSERT INTO {table} ({cols}) VALUES ({', '.join(['%b'] * len(columns))}) "  # noqa: S608
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.executemany(insert + on_conflict, rows)
        return len(rows)
    params = ", ".join(f":{c}" for c in columns)
    stmt = text(f"INSERT INTO {table} ({cols}) VALUES ({params}) {on_conflict}")  # noqa: S608
    conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows])
    return len(rows)
