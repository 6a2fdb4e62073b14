"""Merges of hour, day and month rows by fill factor: how much room a page needs for HOT updates.

At a period's start every busy entity's hour, day and month rows begin, are inserted, and are
then merged (``INSERT ... ON CONFLICT DO UPDATE``, the aggregator's merge expressions) as their
extremes widen over the next minutes: every row of a page rewritten within a few cycles. An
update is HOT (the new version on the same page, no new entry in the key or the (unit,
period_start) index) only while its page has room for it (migration 0019).

Per fill factor (85, what the tables had, is the baseline; then those given), in one scratch
database: three tables shaped like ``usage_rollups`` (its key and index), one per unit (hour,
day, month), each with --entities rows of two earlier periods and of the current one, written
by COPY, then CHECKPOINT; then ten cycles, each merging a tenth of the current period's rows
of each table (a COPY into a staging table and one merge per table, committed), every one
widening its peak. Prints per fill factor the median and longest cycle, the share of HOT
updates (``pg_stat_user_tables``) and the tables' size, and the median against the baseline's.

    python bench/fillfactor.py [--entities 110000] [--fillfactors 50 70] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import MERGE, exit_on_sigterm, row, scratch_database
from metering.rollups.service import ROW_COLUMNS

BASELINE = 85
UNITS = (2, 3, 4)
CYCLES = 10
COLUMNS = ", ".join(ROW_COLUMNS)
KEY = "scope, entity_id, unit, period_start"
STARTS = (1_000, 5_000, 9_000)  # two earlier periods, then the current one


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def rows(unit: int, start: int, bump: int, lo: int, hi: int) -> Iterator[tuple[int, ...]]:
    """Rows in ``ROW_COLUMNS`` order: start values, then extremes (the peak raised by bump)."""
    middle = tuple(range(5, 5 + len(ROW_COLUMNS) - 4 - 6))
    for e in range(lo, hi):
        yield (1, e, unit, start, *middle, 100 + bump, start + 5, 3, 50, 7, 1)


def copy(conn: psycopg.Connection, table: str, data: Iterator[tuple[int, ...]]) -> None:
    with conn.cursor().copy(f"COPY {table} ({COLUMNS}) FROM STDIN") as out:
        for r in data:
            out.write_row(r)


def one(conn: psycopg.Connection, fillfactor: int, entities: int) -> tuple[list[float], float, int]:
    """The cycles' seconds, the share of HOT updates, and the tables' size (bytes)."""
    for u in UNITS:
        conn.execute(f"DROP TABLE IF EXISTS r{u}")
        columns = ", ".join(f"{c} bigint NOT NULL" for c in ROW_COLUMNS)
        conn.execute(
            f"CREATE TABLE r{u} ({columns}, PRIMARY KEY ({KEY})) WITH (fillfactor = {fillfactor})"
        )
        conn.execute(f"CREATE INDEX ON r{u} (unit, period_start)")
        for start in STARTS:
            copy(conn, f"r{u}", rows(u, start, 0, 0, entities))
    conn.commit()
    conn.execute("CHECKPOINT")
    conn.commit()
    times = []
    for k in range(CYCLES):
        lo, hi = k * entities // CYCLES, (k + 1) * entities // CYCLES
        started = time.perf_counter()
        for u in UNITS:
            copy(conn, "stage", rows(u, STARTS[-1], 10, lo, hi))
            conn.execute(
                f"INSERT INTO r{u} AS t ({COLUMNS}) SELECT {COLUMNS} FROM stage "
                f"ON CONFLICT ({KEY}) DO UPDATE SET {MERGE}"
            )
            conn.execute("TRUNCATE stage")
        conn.commit()
        times.append(time.perf_counter() - started)
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.commit()
    hot, updated = conn.execute(
        "SELECT sum(n_tup_hot_upd), sum(n_tup_upd) FROM pg_stat_user_tables "
        "WHERE relname IN ('r2', 'r3', 'r4')"
    ).fetchone() or (0, 0)
    size = conn.execute(
        "SELECT sum(pg_table_size(c)) FROM unnest(ARRAY['r2', 'r3', 'r4']::regclass[]) c"
    ).fetchone()
    return times, float(hot or 0) / max(float(updated or 0), 1), int(size[0] if size else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entities", type=int, default=110_000)
    parser.add_argument("--fillfactors", type=int, nargs="+", default=[50, 70])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    exit_on_sigterm()
    factors = [BASELINE, *(f for f in args.fillfactors if f != BASELINE)]
    medians: dict[int, list[float]] = {f: [] for f in factors}
    longest: dict[int, float] = dict.fromkeys(factors, 0.0)
    hot: dict[int, float] = {}
    size: dict[int, int] = {}
    with scratch_database("fill") as url:
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq) as conn:
            columns = ", ".join(f"{c} bigint NOT NULL" for c in ROW_COLUMNS)
            conn.execute(f"CREATE TEMP TABLE stage ({columns})")
            conn.commit()
            for r in range(args.rounds):  # the fill factors alternate: the machine drifts
                for f in factors:
                    progress(
                        f"round {r + 1}/{args.rounds}, fill factor {f}: 3 x {args.entities} "
                        f"rows x {len(STARTS)} periods, then {CYCLES} cycles of merges"
                    )
                    times, hot[f], size[f] = one(conn, f, args.entities)
                    medians[f].append(statistics.median(times))
                    longest[f] = max(longest[f], *times)
    merges = 3 * args.entities // CYCLES
    print(f"\n{merges} merges a cycle (3 tables), median of {args.rounds} rounds' median cycle")
    widths = (14, 16, 14, 10, 14, 14)
    print(row("fill factor", "cycle (median)", "longest", "HOT", "size", "vs 85", widths=widths))
    base = statistics.median(medians[BASELINE])
    for f in factors:
        m = statistics.median(medians[f])
        print(
            row(
                f, f"{m * 1000:.0f} ms", f"{longest[f] * 1000:.0f} ms", f"{hot[f]:.0%}",
                f"{size[f] / 2**20:.0f} MiB", f"{base / m:.2f}x", widths=widths,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
