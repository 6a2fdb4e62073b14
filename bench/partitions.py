"""Partitioned ``usage_rollups`` against the plain table: retention, the aggregator's merge, a read.

Layouts, measured one after the other in one scratch database built by the migrations (a
layout's table is dropped once measured, so that only one is on disk at a time):

- plain (the baseline): one table, as migration 0002 built it.
- range-month: the whole table partitioned by RANGE (period_start), a UTC month each.
- list-month: LIST (unit); minute and hour rows sub-partitioned by RANGE (period_start), a UTC
  month each; day rows and month rows one partition each.
- list-day: the real ``usage_rollups`` of migration 0003 (``metering/rollups/partitions.py``):
  LIST (unit); minute rows by UTC day, hour rows by UTC month; retention by
  ``partitions.expire``.

All have the primary key (scope, entity_id, unit, period_start), the index (unit, period_start),
fillfactor 85, and a DEFAULT partition where split by time. The month layouts have partitions
through the month after next; list-day has those ``partitions.ensure`` makes (minute rows: a
week ahead; hour rows: the month after next).

Data: --entities entities with a row in every minute of --days days ending at 2026-11-20 00:00
UTC (1 000 x 8 days: 11.5 M minute rows), and their hour, day and month rows; written
server-side with generate_series in time order (as the aggregator writes them), then VACUUM
ANALYZE and CHECKPOINT.

- read: the stats query's two statements (``query.periods``): one entity's 100 periods of one
  unit, then its next row; median and p99 of --reads random ones per unit on one connection
  (psycopg prepares them after 5 runs, as on the API's pooled connections).
- merge: the aggregator's write: a COPY of 100 000 rows (25 000 entities x the 4 units, each
  unit's latest period) into a temporary staging table, one ``INSERT ... SELECT ... ON CONFLICT
  DO UPDATE`` (its merge expressions) into the table, commit; as new rows, then as updates of
  all of them; median of --repeat. For list-day, also without the (unit, period_start) index.
- retention of the oldest day of minute rows, as the hourly task meets it: the run at which its
  first hour is past the cutoff, then the run at which the whole day is, then the VACUUM that
  deleted rows call for (autovacuum would run it). The plain and month layouts DELETE; list-day
  drops the day's partition once wholly past the cutoff and deletes nothing from it before
  (reads stop at the cutoff). For comparison, list-day then DELETEs one hour of rows from the
  next day's partition: what retention exact to the minute would cost it at every run.

    python bench/partitions.py [--entities 1000] [--days 8] [--reads 300] [--repeat 3]
        [--layouts plain range-month list-month list-day]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import copy_and_merge, exit_on_sigterm, percentile, row, scratch_database
from metering.core.database import make_engine
from metering.rollups import partitions
from metering.rollups.models import UsageRollup
from metering.rollups.periods import Unit, next_start

MINUTE, HOUR, DAY = 60, 3600, 86_400
END = int(datetime(2026, 11, 20, tzinfo=UTC).timestamp())  # the data ends here ("now")
MONTHS = [datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)]
MONTHS.append(next_start(Unit.MONTH, MONTHS[-1]))  # the data's month and the next 2
KEY = "scope, entity_id, unit, period_start"
COLUMNS = [c.name for c in UsageRollup.__table__.columns]
MERGE_ENTITIES = 25_000  # x 4 units: 100 000 rows per merge
# The aggregator's merge of usage_rollups (service._ROW_MERGE): extremes only.
MERGE = ", ".join(
    [
        "peak_at = CASE WHEN excluded.peak > t.peak THEN excluded.peak_at ELSE t.peak_at END",
        *(f"{c} = GREATEST(t.{c}, excluded.{c})" for c in ("peak", "ws_peak", "ch_peak")),
        *(f"{c} = LEAST(t.{c}, excluded.{c})" for c in ("min", "ch_min")),
    ]
)
LAYOUTS = ("plain", "range-month", "list-month", "list-day")


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def bounds(start: datetime, unit: Unit) -> str:
    return f"FROM ({int(start.timestamp())}) TO ({int(next_start(unit, start).timestamp())})"


# -- the layouts -------------------------------------------------------------------------------


@dataclass
class Layout:
    name: str
    table: str
    # Where the oldest day's minute rows live (what a DELETE leaves dead tuples in).
    holder: str
    # Retention of minute rows before a cutoff: (rows deleted, partitions dropped).
    expire: Callable[[int], tuple[int, int]] = field(repr=False)


def create(admin: psycopg.Connection[Any], name: str, engine: Engine, days: int) -> Layout:
    """The layout's empty table, with its key, index, fillfactor and partitions."""
    ff = "WITH (fillfactor = 85)"
    if name == "list-day":
        with engine.begin() as conn:
            # The partitions the migration made around today's date go: the data's days, and
            # those ahead of its end, whenever the benchmark runs.
            for unit in partitions.SPLITS:
                partitions.expire(conn, unit, 2**62)
            covering = {Unit.MINUTE: [END - d * DAY for d in range(1, days + 1)]}
            partitions.ensure(conn, END, covering=covering | {Unit.HOUR: [END - days * DAY]})

        def expire_by_partition(cutoff: int) -> tuple[int, int]:
            with engine.begin() as conn:
                done = partitions.expire(conn, Unit.MINUTE, cutoff)
            assert done is not None
            return done.deleted, len(done.dropped)

        oldest = datetime.fromtimestamp(END - days * DAY, UTC)
        return Layout(
            name, "usage_rollups", partitions.name(Unit.MINUTE, oldest), expire_by_partition
        )
    table = {"plain": "bench_plain", "range-month": "bench_rm", "list-month": "bench_lm"}[name]
    ddl = f"CREATE TABLE {table} (LIKE usage_rollups, PRIMARY KEY ({KEY}))"
    holder = table
    if name == "plain":
        admin.execute(f"{ddl} {ff}")
    elif name == "range-month":
        admin.execute(f"{ddl} PARTITION BY RANGE (period_start)")
        admin.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT {ff}")
        for m in MONTHS:
            admin.execute(
                f"CREATE TABLE {table}_{m:%Y%m} PARTITION OF {table} "
                f"FOR VALUES {bounds(m, Unit.MONTH)} {ff}"
            )
        holder = f"{table}_{MONTHS[0]:%Y%m}"
    else:
        admin.execute(f"{ddl} PARTITION BY LIST (unit)")
        for unit, code in (("minute", 1), ("hour", 2)):
            sub = f"{table}_{unit}"
            admin.execute(
                f"CREATE TABLE {sub} PARTITION OF {table} FOR VALUES IN ({code}) "
                "PARTITION BY RANGE (period_start)"
            )
            admin.execute(f"CREATE TABLE {sub}_default PARTITION OF {sub} DEFAULT {ff}")
            for m in MONTHS:
                admin.execute(
                    f"CREATE TABLE {sub}_{m:%Y%m} PARTITION OF {sub} "
                    f"FOR VALUES {bounds(m, Unit.MONTH)} {ff}"
                )
        for unit, code in (("day", 3), ("month", 4)):
            admin.execute(
                f"CREATE TABLE {table}_{unit} PARTITION OF {table} FOR VALUES IN ({code}) {ff}"
            )
        holder = f"{table}_minute_{MONTHS[0]:%Y%m}"
    admin.execute(f"CREATE INDEX ON {table} (unit, period_start)")

    def expire_by_delete(cutoff: int) -> tuple[int, int]:
        cur = admin.execute(f"DELETE FROM {table} WHERE unit = 1 AND period_start < %s", [cutoff])
        return cur.rowcount, 0

    return Layout(name, table, holder, expire_by_delete)


def fill(admin: psycopg.Connection[Any], layout: Layout, entities: int, days: int) -> float:
    """Minute rows day by day, then the hour, day and month rows: time order, as written.
    Returns the seconds the INSERTs took (not the VACUUM and CHECKPOINT after them)."""

    def insert(unit: int, first: int, step: int, periods: int) -> None:
        # i runs over (period, entity), period-major; values are plausible and all differ.
        admin.execute(
            f"INSERT INTO {layout.table} ({', '.join(COLUMNS)}) "
            "SELECT 1, i %% %(e)s + 1, %(unit)s, %(first)s + i / %(e)s * %(step)s, "
            "i %% 150, i %% 150, i %% 40, i * 17, i * 3, i, 0, i %% 1000, i * 5, i * 3500, "
            "i * 10, i * 7000, i %% 150 + 9, %(first)s + i / %(e)s * %(step)s + 17, i %% 150, "
            "i %% 150 + 9, i %% 40 + 3, i %% 40 "
            "FROM generate_series(0::bigint, %(n)s - 1) i",
            {"e": entities, "unit": unit, "first": first, "step": step, "n": periods * entities},
        )

    start = END - days * DAY
    started = time.perf_counter()
    for d in range(days):
        progress(f"{layout.name}: minute rows, day {d + 1}/{days} ({entities * 1440:,} rows)")
        insert(1, start + d * DAY, MINUTE, 1440)
    insert(2, start, HOUR, days * 24)
    insert(3, start, DAY, days)
    insert(4, int(MONTHS[0].timestamp()), 0, 1)
    written = time.perf_counter() - started
    progress(f"{layout.name}: VACUUM ANALYZE, CHECKPOINT")
    admin.execute(f"VACUUM ANALYZE {layout.table}")
    admin.execute("CHECKPOINT")
    return written


# -- the measurements --------------------------------------------------------------------------


def reads(
    conn: psycopg.Connection[Any], table: str, code: int, step: int, args: argparse.Namespace
) -> list[float]:
    """Seconds per stats read of 100 periods of one entity and unit, plus its next row."""
    rng = random.Random(code)
    where = "scope = %s AND entity_id = %s AND unit = %s AND period_start >= %s"
    page = f"SELECT * FROM {table} WHERE {where} AND period_start < %s ORDER BY period_start"
    nxt = f"SELECT * FROM {table} WHERE {where} ORDER BY period_start LIMIT 1"
    periods = args.days * DAY // step
    out = []
    for i in range(args.reads + 20):  # the first 20 warm up
        e = rng.randint(1, args.entities)
        lo = END - args.days * DAY + rng.randrange(periods - 100) * step
        started = time.perf_counter()
        got = conn.execute(page, [1, e, code, lo, lo + 100 * step]).fetchall()
        conn.execute(nxt, [1, e, code, lo + 100 * step]).fetchall()
        if i >= 20:
            out.append(time.perf_counter() - started)
        assert len(got) == 100, len(got)
    return out


def merge_rows(first: int, bump: int) -> list[tuple[int, ...]]:
    """``MERGE_ENTITIES`` entities from ``first``, a row in each unit's latest period."""
    latest = (END - MINUTE, END - HOUR, END - DAY, int(MONTHS[0].timestamp()))
    out = []
    for e in range(first, first + MERGE_ENTITIES):
        for code, start in enumerate(latest, 1):
            v = e % 150 + bump
            out.append(
                (1, e, code, start, v, v, 3, e * 17, e * 3, e, 0, 9, e * 5, e * 3500, e * 10,
                 e * 7000, v + 9, start + 17, v, v + 9, 12, 3)
            )  # fmt: skip
    return out


def merges(
    conn: psycopg.Connection[Any], table: str, first: int, repeat: int
) -> tuple[float, float]:
    """Median seconds of a merge of 100 000 new rows, and of updating all of them."""
    conn.execute("DROP TABLE IF EXISTS bench_stage")
    conn.execute(f"CREATE TEMP TABLE bench_stage (LIKE {table}) ON COMMIT DELETE ROWS")
    conn.commit()
    new, updated = [], []
    for r in range(repeat):
        start = first + r * MERGE_ENTITIES
        new.append(copy_and_merge(conn, table, COLUMNS, merge_rows(start, 0), MERGE))
        updated.append(copy_and_merge(conn, table, COLUMNS, merge_rows(start, 1), MERGE))
    return statistics.median(new), statistics.median(updated)


Step = tuple[float, int, int]  # a retention run: seconds, rows deleted, partitions dropped
HOURLY = 3  # hourly runs measured (median) before the run that finds the whole day past


@dataclass
class Figures:
    size: int = 0
    partitions: int = 0
    fill: float = 0.0  # seconds per million rows written by INSERT ... SELECT
    minute_reads: list[float] = field(default_factory=list)
    hour_reads: list[float] = field(default_factory=list)
    # list-day with minute partitions through the month after next (as many as hour rows get).
    far_ahead: tuple[int, list[float], list[float]] | None = None
    merge_new: float = 0.0
    merge_updated: float = 0.0
    merge_no_index: tuple[float, float] | None = None
    hourly: list[Step] = field(default_factory=list)
    whole_day: Step = (0.0, 0, 0)
    vacuum: float | None = None
    exact: list[tuple[float, int]] = field(default_factory=list)  # list-day: hours deleted

    def day_total(self) -> float:
        """Every run that removes a day of minute rows (24 hourly ones), and the VACUUM."""
        hourly = statistics.median(t for t, _, _ in self.hourly)
        return hourly * 23 + self.whole_day[0] + (self.vacuum or 0.0)


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = f()
    return time.perf_counter() - started, result


def leaves(admin: psycopg.Connection[Any], table: str) -> tuple[int, int]:
    """Bytes on disk (heap and indexes), and the number of leaf tables (0: not partitioned)."""
    size, n = admin.execute(
        "SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size(%s)), "
        "count(*) FILTER (WHERE isleaf) FROM pg_partition_tree(%s)",
        [table, table],
    ).fetchone()  # type: ignore[misc]
    return int(size), n


def measure(name: str, url: str, libpq: str, args: argparse.Namespace) -> Figures:
    f = Figures()
    engine = make_engine(url)
    with psycopg.connect(libpq, autocommit=True) as admin:
        layout = create(admin, name, engine, args.days)
        t = fill(admin, layout, args.entities, args.days)
        f.fill = t / (args.entities * args.days * (1440 + 24 + 1) + args.entities) * 1e6
        f.size, f.partitions = leaves(admin, layout.table)
        progress(f"{name}: {args.reads} reads of 100 minutes, then of 100 hours")
        f.minute_reads = reads(admin, layout.table, 1, MINUTE, args)
        f.hour_reads = reads(admin, layout.table, 2, HOUR, args)
        if name == "list-day":
            progress(f"{name}: the reads again, minute partitions through the month after next")
            days = range((int(MONTHS[-1].timestamp()) - END) // DAY + 31)
            with engine.begin() as conn:
                covering = {Unit.MINUTE: [END + d * DAY for d in days]}
                extra = partitions.ensure(conn, END, covering=covering)
            n = leaves(admin, layout.table)[1]
            minute, hour = (
                reads(admin, layout.table, c, s, args) for c, s in ((1, MINUTE), (2, HOUR))
            )
            f.far_ahead = (n, minute, hour)
            for table in extra:
                admin.execute(f"DROP TABLE {table}")
        progress(f"{name}: merges of 100 000 rows, new then updated, x{args.repeat}")
        with psycopg.connect(libpq) as conn:
            first = args.entities + 1
            f.merge_new, f.merge_updated = merges(conn, layout.table, first, args.repeat)
            if name == "list-day":
                progress(f"{name}: the same merges without the (unit, period_start) index")
                admin.execute("DROP INDEX ix_usage_rollups_unit_period_start")
                first += args.repeat * MERGE_ENTITIES
                f.merge_no_index = merges(conn, layout.table, first, args.repeat)
        progress(f"{name}: retention of the oldest day of minute rows")
        oldest = END - args.days * DAY
        for h in range(1, HOURLY + 1):
            t, (deleted, dropped) = timed(lambda h=h: layout.expire(oldest + h * HOUR))
            f.hourly.append((t, deleted, dropped))
        t, (deleted, dropped) = timed(lambda: layout.expire(oldest + DAY))
        f.whole_day = (t, deleted, dropped)
        if name == "list-day":
            for h in range(1, HOURLY + 1):
                cutoff = oldest + DAY + h * HOUR
                t, cur = timed(
                    lambda c=cutoff: admin.execute(
                        "DELETE FROM usage_rollups WHERE unit = 1 AND period_start < %s", [c]
                    )
                )
                f.exact.append((t, cur.rowcount))
        else:
            progress(f"{name}: VACUUM {layout.holder}")
            f.vacuum, _ = timed(lambda: admin.execute(f"VACUUM {layout.holder}"))
        admin.execute(f"{'TRUNCATE' if name == 'list-day' else 'DROP TABLE'} {layout.table}")
    engine.dispose()
    return f


# -- the report --------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f} / {percentile(values, 99) * 1e3:.2f} ms"


def report(figures: dict[str, Figures], args: argparse.Namespace) -> None:
    minute_rows = args.entities * args.days * 1440
    print(
        f"\n{args.entities} entities x {args.days} days: {minute_rows:,} minute rows, "
        f"{args.entities * args.days * 24:,} hour rows, {args.entities * args.days:,} day rows"
    )
    base = figures.get("plain")
    nd = figures.get("list-day")
    print(
        "\nlayout: size on disk (heap + indexes), leaf tables, INSERT ... SELECT per million rows"
    )
    for name, f in figures.items():
        cells = (f"{f.size / 2**30:.2f} GiB", f.partitions or "", f"{f.fill:.1f} s")
        print(row(f"  {name}", *cells, widths=(20, 12, 6, 8)))

    print("\nread: one entity's 100 periods of one unit + its next row (median / p99)")
    widths = (50, 22, 22)
    print(row("", "100 minutes", "100 hours", widths=widths))
    for name, f in figures.items():
        print(row(f"  {name}", spread(f.minute_reads), spread(f.hour_reads), widths=widths))
    if nd is not None and nd.far_ahead is not None:
        n, minute, hour = nd.far_ahead
        label = f"  list-day, minute days to month+2 ({n} leaves)"
        print(row(label, spread(minute), spread(hour), widths=widths))

    n = 4 * MERGE_ENTITIES
    print(
        f"\nmerge: COPY {n:,} rows (4 units) + INSERT ... ON CONFLICT DO UPDATE + commit (median)"
    )
    widths = (50, 12, 10, 12, 10)
    print(row("", "new rows", "vs plain", "updates", "vs plain", widths=widths))
    lines = [(name, f.merge_new, f.merge_updated) for name, f in figures.items()]
    if nd is not None and nd.merge_no_index is not None:
        lines.append(("list-day, no (unit, period_start) index", *nd.merge_no_index))
    for label, new, upd in lines:
        vs = (
            (f"{new / base.merge_new:.2f}", f"{upd / base.merge_updated:.2f}") if base else ("", "")
        )
        print(row(f"  {label}", ms(new), vs[0], ms(upd), vs[1], widths=widths))

    print(f"\nretention of the oldest day of minute rows ({args.entities * 1440:,} rows)")
    widths = (16, 26, 30, 12, 12)
    header = ("", f"hourly run (median of {HOURLY})", "run finding the day past", "VACUUM")
    print(row(*header, "day total", widths=widths))

    def cell(step: Step) -> str:
        t, deleted, dropped = step
        return f"{ms(t)} ({f'{dropped} dropped' if dropped else f'{deleted:,} deleted'})"

    for name, f in figures.items():
        hourly = min(f.hourly, key=lambda s: abs(s[0] - statistics.median(x[0] for x in f.hourly)))
        vac = ms(f.vacuum) if f.vacuum is not None else "none"
        cells = (cell(hourly), cell(f.whole_day), vac, ms(f.day_total()))
        print(row(f"  {name}", *cells, widths=widths))
    print("  (day total: 23 hourly runs, the run finding the day past, the VACUUM)")
    if nd is not None and nd.exact:
        t = statistics.median(t for t, _ in nd.exact)
        rows = statistics.median(r for _, r in nd.exact)
        print(
            f"  list-day with retention exact to the minute instead: every hourly run DELETEs "
            f"from the partition holding the cutoff: {ms(t)} for {rows:,.0f} rows (median of "
            f"{HOURLY}), {t / rows * 1e6:.2f} µs per row"
        )
    if base is not None and nd is not None:
        ratio = base.day_total() / nd.day_total()
        print(
            f"  a day of expired minute rows: plain {ms(base.day_total())}, "
            f"list-day {ms(nd.day_total())} ({ratio:,.0f}x less)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entities", type=int, default=1000)
    parser.add_argument("--days", type=int, default=8, help="of minute rows (at least 5)")
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    args = parser.parse_args()
    if args.days < 5:
        parser.error("--days must be at least 5 (a read covers 100 hours)")
    exit_on_sigterm()
    print(
        f"usage_rollups layouts: plain (baseline) against {', '.join(args.layouts[1:]) or '-'}",
        flush=True,
    )
    figures: dict[str, Figures] = {}
    started = time.perf_counter()
    with scratch_database("bench") as url:
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        for name in args.layouts:
            figures[name] = measure(name, url, libpq, args)
    report(figures, args)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
