"""Bulk upserts: COPY into a staging table and one merge on Postgres; executemany on SQLite.

Measured in ``bench/aggregate.py``: a text COPY built by hand plus one
``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` beats multi-row VALUES and ``unnest`` arrays
on Postgres, because the rows cross the wire once in the cheapest format and the merge runs
in one statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, text


def _merge_sql(dialect: str, table: str, merge: Mapping[str, str]) -> str:
    greatest, least = ("GREATEST", "LEAST") if dialect == "postgresql" else ("max", "min")
    return ", ".join(
        f"{col} = {expr.format(t=table, greatest=greatest, least=least)}"
        for col, expr in merge.items()
    )


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

    ``merge`` maps a column to an SQL expression in which ``excluded.col`` is the new value,
    ``{t}.col`` the stored one, and ``{greatest}`` / ``{least}`` the dialect's functions.
    """
    if not rows:
        return 0
    dialect = conn.dialect.name
    cols = ", ".join(columns)
    on_conflict = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET " + _merge_sql(
        dialect, table, merge
    )
    if dialect == "postgresql":
        stage = f"_stage_{table}"
        conn.exec_driver_sql(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table}) ON COMMIT DELETE ROWS"
        )
        raw: Any = conn.connection.driver_connection
        with raw.cursor() as cur:
            cur.execute(f"TRUNCATE {stage}")
            with cur.copy(f"COPY {stage} ({cols}) FROM STDIN") as copy:
                buf: list[str] = []
                for row in rows:
                    buf.append("\t".join(["\\N" if v is None else str(v) for v in row]))
                    if len(buf) >= 5000:
                        copy.write("\n".join(buf) + "\n")
                        buf.clear()
                if buf:
                    copy.write("\n".join(buf) + "\n")
            # Identifiers come from the code, never from input; values travel by COPY.
            merge_sql = f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} {on_conflict}"  # noqa: S608
            cur.execute(merge_sql)
        return len(rows)
    params = ", ".join(f":{c}" for c in columns)
    stmt = text(f"INSERT INTO {table} ({cols}) VALUES ({params}) {on_conflict}")  # noqa: S608
    conn.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows])
    return len(rows)
