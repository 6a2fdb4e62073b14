"""Bulk writes of the aggregator's state rows into Postgres, five ways: which is fastest.

The design says "bulk upserts: multi-row VALUES, unnest, or COPY into a staging table: measure
and pick". This measures them on the table the aggregator rewrites every cycle, ``usage_state``
(the columns of ``STATE_COLUMNS``, keyed by (scope, entity_id), fillfactor 70).

Per size N (--rows), in one scratch database built by the migrations, ``usage_state`` first
holds N entities (entity ids 1..N, every 6th of scope 2, the others of scope 1; plausible values
in every column, no NULL). Then each method writes, committed:

- steady: N changed rows, every one already there (what a steady cycle does);
- 10% new: N rows, 90 % of them entities already there (picked at random), 10 % new ones.

The methods, each timed from the NumPy matrix in hand to after the commit:

1. baseline: psycopg's COPY in text (``copy.write_row``) into a temporary staging table, then
   one ``INSERT ... SELECT ... ON CONFLICT (scope, entity_id) DO UPDATE SET c = excluded.c``
   (what bench/aggregate.py calls its baseline);
2. VALUES: multi-row ``INSERT ... VALUES (...), (...) ON CONFLICT DO UPDATE``, --batch rows per
   statement, the values as psycopg parameters. The SQL is built once per batch size with
   ``$n`` placeholders and sent as it is by a ``RawCursor`` (psycopg's default cursor parses
   the ``%s`` of a query that long again on every execute, in Python: it caches only short
   ones), every int sent as a bigint (see ``int8``);
3. unnest: ``INSERT ... SELECT * FROM unnest(%b::bigint[], ...) ON CONFLICT DO UPDATE``, one
   Python list per column (converting the NumPy columns is timed: it is the method's cost),
   sent in binary (``%b``; ``%s`` sends these arrays as text, which is slower to build);
4. bulk.upsert_array: the production code (COPY in binary, built by NumPy, into a staging
   table, then ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``) on a SQLAlchemy connection;
5. bulk.replace_array: the production code the aggregator writes ``usage_state`` with (the same
   COPY, then ``UPDATE ... FROM`` the staging table; an INSERT of the missing rows only when
   the UPDATE matched fewer than it was given).

Before each write the table is put back as it was: a CHECKPOINT (so that none falls inside the
measured write, and every method pays the same full-page images in the WAL for the pages it
first touches after one), TRUNCATE, the N rows again, VACUUM ANALYZE. After it, the whole
table is read back and compared with what the rows written say it must hold: a method that left
anything else stops the benchmark (exit status 1) before any time is reported. The methods run
in a different order in each repeat, with the garbage collector off while one is timed (the
aggregator's cycle runs so). Time: the median of --repeat; speed: the baseline's time over the
method's.

    python bench/upsert_methods.py [--rows 100000] [--repeat 3] [--batch 1000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import struct
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import exit_on_sigterm, row
from metering.core.database import make_engine
from metering.rollups import bulk
from metering.rollups.models import COUNTERS
from metering.rollups.service import STATE_COLUMNS
from tests.scratch import scratch_database

Ints = npt.NDArray[np.int64]
Write = Callable[[Ints], None]

TABLE = "usage_state"
KEYS = ("scope", "entity_id")
VALUE_COLUMNS = tuple(c for c in STATE_COLUMNS if c not in KEYS)
COLS = ", ".join(STATE_COLUMNS)
ON_CONFLICT = f"ON CONFLICT ({', '.join(KEYS)}) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in VALUE_COLUMNS
)
NEW_SHARE = 0.1
CASES = ("steady", "10% new")
NOW = int(datetime(2026, 11, 16, 12, 30, 30, tzinfo=UTC).timestamp())
MONTH = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


class Mismatch(Exception):
    pass


# -- the rows --------------------------------------------------------------------------------


def states(entity: Ints, rng: np.random.Generator, now: int) -> Ints:
    """A plausible state row per entity, in ``STATE_COLUMNS`` order, every column filled."""
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
        "scope": np.where(entity % 6 == 0, 2, 1).astype(np.int64),
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
    # A column added since this was written: some value, never NULL.
    columns = [values[c] if c in values else r(0, 1000) for c in STATE_COLUMNS]
    return np.column_stack([np.broadcast_to(c, n) for c in columns]).astype(np.int64)


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


def writers(conn: psycopg.Connection[Any], engine: Engine, batch: int) -> dict[str, Write]:
    conn.execute(f"CREATE TEMP TABLE bench_stage (LIKE {TABLE}) ON COMMIT DELETE ROWS")
    conn.commit()

    def copy_text(rows: Ints) -> None:
        with conn.cursor() as cur:
            with cur.copy(f"COPY bench_stage ({COLS}) FROM STDIN") as copy:
                for r in rows.tolist():
                    copy.write_row(r)
            cur.execute(
                f"INSERT INTO {TABLE} ({COLS}) SELECT {COLS} FROM bench_stage {ON_CONFLICT}"
            )
        conn.commit()

    statements: dict[int, str] = {}
    n_cols = len(STATE_COLUMNS)

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
                    sql = f"INSERT INTO {TABLE} ({COLS}) VALUES {', '.join(tuples)} {ON_CONFLICT}"
                    statements[len(part)] = sql
                cur.execute(sql, part.ravel().tolist())
        conn.commit()

    arrays = ", ".join(["%b::bigint[]"] * n_cols)
    unnest_sql = f"INSERT INTO {TABLE} ({COLS}) SELECT * FROM unnest({arrays}) {ON_CONFLICT}"

    def unnest(rows: Ints) -> None:
        with conn.cursor() as cur:
            int8(cur)
            cur.execute(unnest_sql, [rows[:, i].tolist() for i in range(n_cols)])
        conn.commit()

    merge = {c: f"excluded.{c}" for c in VALUE_COLUMNS}

    def upsert_array(rows: Ints) -> None:
        with engine.begin() as sa:
            bulk.upsert_array(sa, TABLE, columns=STATE_COLUMNS, keys=KEYS, rows=rows, merge=merge)

    def replace_array(rows: Ints) -> None:
        with engine.begin() as sa:
            bulk.replace_array(sa, TABLE, columns=STATE_COLUMNS, keys=KEYS, rows=rows)

    return {
        "1 baseline: COPY text + merge": copy_text,
        f"2 VALUES x{batch} + ON CONFLICT": values,
        "3 unnest arrays + ON CONFLICT": unnest,
        "4 bulk.upsert_array": upsert_array,
        "5 bulk.replace_array": replace_array,
    }


# -- the table: back as it was, read back ----------------------------------------------------


def reset(ctl: psycopg.Connection[Any], checkpoint: bool) -> None:
    if checkpoint:
        ctl.execute("CHECKPOINT")
    ctl.execute(f"TRUNCATE {TABLE}")
    ctl.execute(f"INSERT INTO {TABLE} SELECT * FROM bench_base")
    ctl.execute(f"VACUUM (ANALYZE) {TABLE}")


def contents(ctl: psycopg.Connection[Any]) -> Ints:
    """The whole table ordered by key, every column as a bigint, by a binary COPY (a NULL, a
    field of another width, or a column too many or too few makes it a Mismatch)."""
    select = ", ".join(f"{c}::bigint" for c in STATE_COLUMNS)
    sql = f"COPY (SELECT {select} FROM {TABLE} ORDER BY scope, entity_id) TO STDOUT (FORMAT BINARY)"
    data = bytearray()
    with ctl.cursor() as cur, cur.copy(sql) as copy:
        for block in copy:
            data += block
    n = len(STATE_COLUMNS)
    record = np.dtype([("n", ">i2"), ("f", [("l", ">i4"), ("v", ">i8")], (n,))])
    start = len(SIGNATURE) + 8 + struct.unpack_from(">i", data, len(SIGNATURE) + 4)[0]
    body = len(data) - start - 2
    if not data.startswith(SIGNATURE) or data[-2:] != b"\xff\xff" or body % record.itemsize:
        raise Mismatch("usage_state read back is not all non-NULL bigints (a NULL?)")
    got = np.frombuffer(data, dtype=record, count=body // record.itemsize, offset=start)
    if (got["n"] != n).any() or (got["f"]["l"] != 8).any():
        raise Mismatch("usage_state read back is not all non-NULL bigints (a NULL?)")
    return got["f"]["v"].astype(np.int64)


def check(ctl: psycopg.Connection[Any], want: Ints) -> None:
    got = contents(ctl)
    if got.shape != want.shape:
        raise Mismatch(f"usage_state holds {len(got)} rows, {len(want)} expected")
    bad = np.nonzero((got != want).any(axis=1))[0]
    if len(bad):
        i = bad[0]
        cols = ", ".join(STATE_COLUMNS[j] for j in np.nonzero(got[i] != want[i])[0])
        raise Mismatch(
            f"{len(bad)} of {len(want)} rows differ from what was written, the first "
            f"(scope {want[i, 0]}, entity_id {want[i, 1]}) in {cols}"
        )


# -- measuring -------------------------------------------------------------------------------


def measure(
    ctl: psycopg.Connection[Any],
    methods: dict[str, Write],
    *,
    n: int,
    repeat: int,
    batch: int,
    checkpoint: bool,
) -> dict[str, dict[str, float]]:
    """Median seconds per case and method."""
    rng = np.random.default_rng(n)
    entity = np.arange(1, n + 1, dtype=np.int64)
    base = states(entity, rng, NOW)
    progress(f"[{n} rows] filling usage_state with {n} entities")
    ctl.execute("TRUNCATE bench_base")
    with ctl.cursor() as cur, cur.copy(f"COPY bench_base ({COLS}) FROM STDIN") as copy:
        for r in base.tolist():
            copy.write_row(r)
    reset(ctl, checkpoint)
    try:
        check(ctl, after(base, base))
    except Mismatch as e:
        raise SystemExit(f"upsert_methods: the initial fill is wrong: {e}") from None
    for write in methods.values():  # warm-up: staging tables, connections, the VALUES SQL
        write(base[: min(n, batch)])

    names = list(methods)
    times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in names} for c in CASES}
    n_new = int(n * NEW_SHARE)
    for case in CASES:
        for k in range(repeat):
            if case == "steady":
                keys = entity
            else:
                there = np.sort(rng.choice(entity, n - n_new, replace=False))
                keys = np.concatenate([there, np.arange(n + 1, n + n_new + 1, dtype=np.int64)])
            written = states(keys, rng, NOW + 5 * (k + 1))
            want = after(base, written)
            progress(f"[{n} rows] {case} {k + 1}/{repeat}: writing {len(written)} rows 5 ways")
            done = []
            for name in names[k % len(names) :] + names[: k % len(names)]:
                reset(ctl, checkpoint)
                gc.collect()
                gc.disable()
                started = time.perf_counter()
                try:
                    methods[name](written)
                finally:
                    elapsed = time.perf_counter() - started
                    gc.enable()
                try:
                    check(ctl, want)
                except Mismatch as e:
                    raise SystemExit(
                        f"upsert_methods: {name} ({case}, {n} rows, repeat {k + 1}) wrote the "
                        f"wrong thing: {e}; no time reported"
                    ) from None
                times[case][name].append(elapsed)
                done.append(f"{name.split(' ')[1].rstrip(':')} {ms(elapsed)}")
            progress(f"[{n} rows] {case} {k + 1}/{repeat}, each verified: " + ", ".join(done))
    return {c: {m: statistics.median(ts) for m, ts in times[c].items()} for c in CASES}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms".replace(",", " ")


def report(n: int, repeat: int, figures: dict[str, dict[str, float]]) -> None:
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
                print(
                    f"bulk writes of usage_state rows ({len(STATE_COLUMNS)} columns, keyed by "
                    "scope, entity_id), committed, 5 ways"
                )
                print(
                    f"Postgres {version}: shared_buffers {shared_buffers}, synchronous_commit "
                    f"{sync}; CHECKPOINT before each write: {'yes' if checkpoint else 'no'}"
                )
                ctl.execute(f"CREATE TABLE bench_base (LIKE {TABLE})")
                methods = writers(conn, engine, args.batch)
                for n in args.rows:
                    figures[n] = measure(
                        ctl,
                        methods,
                        n=n,
                        repeat=args.repeat,
                        batch=args.batch,
                        checkpoint=checkpoint,
                    )
        finally:
            engine.dispose()
    for n, f in figures.items():
        report(n, args.repeat, f)


if __name__ == "__main__":
    main()
