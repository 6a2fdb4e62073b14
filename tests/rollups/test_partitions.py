"""Partitions of usage_rollups on Postgres (migration 0003, metering/rollups/partitions.py): rows
land where they belong, the aggregator's merge works through the parent, retention drops whole
partitions and deletes only the expired rows left, maintenance is idempotent, rows in DEFAULT
move when their partition is created, and the migration carries the rows both ways.

A database of this module's own: the tests create and drop partitions at dates of their
choosing, which the session's database must not inherit.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from metering.core.database import make_engine
from metering.core.migrate import alembic_config, upgrade
from metering.rollups import bulk, partitions
from metering.rollups.models import UsageRollup
from metering.rollups.periods import Unit
from metering.rollups.retention import enforce_retention
from tests.scratch import ADMIN_DATABASE_URL, scratch_database

MINUTE, HOUR, DAY = 60, 3600, 86_400
T = int(datetime(2030, 3, 15, 12, 0, tzinfo=UTC).timestamp())
COLUMNS = [c.name for c in UsageRollup.__table__.columns]
# As migrations 0002 and 0003 made the table (0007 added the refusal counters).
COLUMNS_0003 = [c for c in COLUMNS if c not in {"ch_refused0", "msg_refused0"}]
KEPT = {Unit.MINUTE: 7 * DAY, Unit.HOUR: 90 * DAY, Unit.DAY: None, Unit.MONTH: None}
MERGE = {  # as the aggregator merges extremes
    "peak_at": "CASE WHEN excluded.peak > {t}.peak THEN excluded.peak_at ELSE {t}.peak_at END",
    "peak": "{greatest}({t}.peak, excluded.peak)",
    "min": "{least}({t}.min, excluded.min)",
}


def at(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def module_engine() -> Iterator[Engine]:
    with scratch_database("parts") as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def engine(module_engine: Engine) -> Engine:
    """No dated partition (those the migration made for today go too), no rows, no horizon."""
    with module_engine.begin() as conn:
        for unit in partitions.SPLITS:
            partitions.expire(conn, unit, 2**62)
        conn.exec_driver_sql("TRUNCATE usage_rollups")
        conn.exec_driver_sql("UPDATE usage_cursor SET horizons = '{}'")
    return module_engine


def put(
    conn: Connection,
    unit: int,
    start: int,
    entity: int = 1,
    peak: int = 5,
    *,
    columns: Sequence[str] = tuple(COLUMNS),
) -> None:
    values = dict.fromkeys(columns, 0) | {
        "scope": 1, "entity_id": entity, "unit": unit, "period_start": start,
        "peak": peak, "peak_at": start + 1, "min": peak,
    }  # fmt: skip
    cols = ", ".join(columns)
    conn.execute(
        text(f"INSERT INTO usage_rollups ({cols}) VALUES (:{', :'.join(columns)})"), values
    )


def where(conn: Connection) -> dict[tuple[int, int], str]:
    """(unit, period_start) -> the partition holding the row."""
    rows = conn.exec_driver_sql(
        "SELECT unit, period_start, tableoid::regclass::text FROM usage_rollups"
    ).all()
    return {(u, s): table for u, s, table in rows}


def ensure(engine: Engine, now: int, **covering: list[int]) -> list[str]:
    with engine.begin() as conn:
        return partitions.ensure(conn, now, covering={Unit(k): v for k, v in covering.items()})


def test_rows_of_each_unit_land_in_their_partition(engine: Engine) -> None:
    ensure(engine, T)
    with engine.begin() as conn:
        put(conn, 1, T)
        put(conn, 1, T + 3 * DAY + 59 * MINUTE)
        put(conn, 1, T - 40 * DAY)  # no partition for that day
        put(conn, 2, at(2030, 3, 15, 12))
        put(conn, 2, at(2030, 5, 31, 23))
        put(conn, 3, at(2030, 3, 15))
        put(conn, 3, at(2001, 1, 1))
        put(conn, 4, at(2030, 3, 1))
        assert where(conn) == {
            (1, T): "usage_rollups_minute_20300315",
            (1, T + 3 * DAY + 59 * MINUTE): "usage_rollups_minute_20300318",
            (1, T - 40 * DAY): "usage_rollups_minute_default",
            (2, at(2030, 3, 15, 12)): "usage_rollups_hour_203003",
            (2, at(2030, 5, 31, 23)): "usage_rollups_hour_203005",
            (3, at(2030, 3, 15)): "usage_rollups_day",
            (3, at(2001, 1, 1)): "usage_rollups_day",
            (4, at(2030, 3, 1)): "usage_rollups_month",
        }


def _copy_and_merge(engine: Engine, rows: list[tuple[int, ...]]) -> None:
    """The aggregator's bulk write: COPY into a staging table made LIKE the table, and one
    INSERT ... SELECT ... ON CONFLICT DO UPDATE into the (partitioned) parent."""
    with engine.begin() as conn:
        bulk.upsert(
            conn, "usage_rollups", columns=COLUMNS, rows=rows, merge=MERGE,
            keys=("scope", "entity_id", "unit", "period_start"),
        )  # fmt: skip


def test_the_aggregators_merge_into_the_parent_merges_in_every_partition(engine: Engine) -> None:
    ensure(engine, T)
    starts = {1: T, 2: at(2030, 3, 15, 12), 3: at(2030, 3, 15), 4: at(2030, 3, 1)}
    far = at(2031, 1, 1)  # minute rows there go to DEFAULT: merged there too

    def rows(peak: int, low: int) -> list[tuple[int, ...]]:
        out = []
        for e in (1, 2):
            for unit, start in [*starts.items(), (1, far)]:
                values = dict.fromkeys(COLUMNS, 0) | {
                    "scope": 1, "entity_id": e, "unit": unit, "period_start": start,
                    "conns0": 7, "peak": peak, "peak_at": start + peak, "min": low,
                }  # fmt: skip
                out.append(tuple(values[c] for c in COLUMNS))
        return out

    _copy_and_merge(engine, rows(peak=10, low=5))
    _copy_and_merge(engine, rows(peak=12, low=6))  # a higher peak; a min that is not lower
    _copy_and_merge(engine, rows(peak=11, low=3))  # a lower min; a peak that is not higher
    with engine.connect() as conn:
        got = conn.exec_driver_sql(
            "SELECT entity_id, unit, period_start, conns0, peak, peak_at, min, "
            "tableoid::regclass::text FROM usage_rollups ORDER BY 1, 2, 3"
        ).all()
    names = {
        1: "usage_rollups_minute_20300315", 2: "usage_rollups_hour_203003",
        3: "usage_rollups_day", 4: "usage_rollups_month",
    }  # fmt: skip
    expected = []
    for e in (1, 2):
        for unit, start in sorted([*starts.items(), (1, far)]):
            table = "usage_rollups_minute_default" if start == far else names[unit]
            expected.append((e, unit, start, 7, 12, start + 12, 3, table))
    assert [tuple(r) for r in got] == expected


def test_retention_drops_expired_partitions_and_deletes_only_the_expired_rows_left(
    engine: Engine,
) -> None:
    minute_cutoff, hour_cutoff = T - 7 * DAY, at(2029, 12, 15, 12)  # the hour holding T - 90 d
    ensure(engine, T - 10 * DAY, hour=[at(2029, 11, 1), at(2029, 12, 1)])
    ensure(engine, T)
    expired = [
        (1, at(2030, 3, 5, 10)),  # in partitions wholly before the cutoff: dropped
        (1, at(2030, 3, 7, 23, 59)),
        (1, at(2030, 2, 1)),  # in DEFAULT (no partition for that day): deleted
        (2, at(2029, 11, 20, 5)),
        (2, at(2029, 10, 3, 4)),
    ]
    straddling = [  # before the cutoff, in the partition holding it: they go with it later
        (1, at(2030, 3, 8)),
        (1, minute_cutoff - MINUTE),
        (2, hour_cutoff - HOUR),
    ]
    kept = [
        (1, minute_cutoff),
        (1, T),
        (1, at(2030, 6, 1)),  # in DEFAULT, but in the future
        (2, hour_cutoff),
        (2, at(2030, 3, 15, 12)),
        (3, at(2001, 1, 1)),  # day and month rows are kept for ever
        (4, at(2001, 1, 1)),
    ]
    with engine.begin() as conn:
        for unit, start in expired + straddling + kept:
            put(conn, unit, start)
            put(conn, unit, start, entity=2)
        assert where(conn)[(1, at(2030, 2, 1))] == "usage_rollups_minute_default"
        assert where(conn)[(2, at(2029, 10, 3, 4))] == "usage_rollups_hour_default"

    result = enforce_retention(engine, {}, KEPT, now=T)

    assert result.dropped == {
        "minute": [f"usage_rollups_minute_2030030{d}" for d in (5, 6, 7)],
        "hour": ["usage_rollups_hour_202911"],
    }
    assert result.deleted == {"minute": 2, "hour": 2}  # both entities' row in DEFAULT
    with engine.connect() as conn:
        assert set(where(conn)) == set(straddling + kept)
        assert conn.exec_driver_sql("SELECT count(*) FROM usage_rollups").scalar() == 2 * len(
            straddling + kept
        )
        horizons = json.loads(conn.exec_driver_sql("SELECT horizons FROM usage_cursor").scalar())
    # Reads start at the cutoff: the straddling rows are never served.
    assert horizons == {"1": minute_cutoff, "2": hour_cutoff}

    again = enforce_retention(engine, {}, KEPT, now=T)
    assert again.dropped == {"minute": [], "hour": []}
    assert again.deleted == {"minute": 0, "hour": 0}
    assert again.created == []
    with engine.connect() as conn:
        assert set(where(conn)) == set(straddling + kept)


def test_maintenance_creates_partitions_ahead_and_is_idempotent_even_when_run_twice_at_once(
    engine: Engine,
) -> None:
    minutes = [f"usage_rollups_minute_203003{d}" for d in range(15, 23)]
    hours = ["usage_rollups_hour_203003", "usage_rollups_hour_203004", "usage_rollups_hour_203005"]
    assert ensure(engine, T) == minutes + hours
    assert ensure(engine, T) == []
    assert ensure(engine, T + 3 * HOUR) == []
    with engine.connect() as conn:
        got = partitions.partitions(conn, Unit.MINUTE)
        assert [p.name for p in got] == minutes
        assert [(p.start, p.end) for p in got] == [
            (at(2030, 3, d), at(2030, 3, d + 1)) for d in range(15, 23)
        ]
        assert [p.end for p in partitions.partitions(conn, Unit.HOUR)] == [
            at(2030, 4, 1), at(2030, 5, 1), at(2030, 6, 1)
        ]  # fmt: skip
    # The next day adds one day of minute rows; two maintainers at once create it once.
    barrier, results, errors = threading.Barrier(2), [], []

    def run() -> None:
        try:
            with engine.begin() as conn:
                barrier.wait()
                results.append(partitions.ensure(conn, T + DAY))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert sorted(results) == [[], ["usage_rollups_minute_20300323"]]


def test_the_period_index_is_where_rows_are_read_by_period_and_not_on_the_days_of_minutes(
    engine: Engine,
) -> None:
    """Migration 0011: (unit, period_start) indexes the hour, day and month rows and the
    minute rows' DEFAULT partition (retention deletes there), not the daily minute partitions
    (read per entity, dropped whole); partitions made later follow the same rule."""
    ensure(engine, T)
    with engine.connect() as conn:
        indexed = {
            table: sorted(cols)
            for table, cols in conn.exec_driver_sql(
                "SELECT c.relname, array_agg(a.attname::text) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indrelid "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) "
                "WHERE c.relname LIKE 'usage_rollups%%' AND NOT i.indisprimary "
                "GROUP BY c.relname, i.indexrelid"
            ).all()
        }
    assert indexed == {
        table: ["period_start", "unit"]
        for table in (
            "usage_rollups_hour", "usage_rollups_hour_default", "usage_rollups_hour_203003",
            "usage_rollups_hour_203004", "usage_rollups_hour_203005", "usage_rollups_day",
            "usage_rollups_month", "usage_rollups_minute_default",
        )
    }  # fmt: skip
    # Retention still finds the expired minute rows left in DEFAULT, and the hour rows read by
    # period still use an index.
    with engine.begin() as conn:
        put(conn, 1, at(2020, 1, 1, 0, 1))
        assert partitions.expire(conn, Unit.MINUTE, at(2021, 1, 1)) == partitions.Expired([], 1)
        plan = conn.exec_driver_sql(
            "EXPLAIN SELECT * FROM usage_rollups WHERE unit = 2 AND period_start >= 0 "
            "AND period_start < 10"
        ).all()
    assert any("Index" in line[0] for line in plan), plan


def test_a_row_far_outside_waits_in_default_and_moves_when_its_partition_is_created(
    engine: Engine,
) -> None:
    ensure(engine, T)
    later = at(2030, 10, 1, 8, 30)
    with engine.begin() as conn:
        put(conn, 1, later, peak=4)
        put(conn, 1, later + DAY, peak=4)  # the day after: stays in DEFAULT
        put(conn, 2, at(2031, 3, 1))
        assert set(where(conn).values()) == {
            "usage_rollups_minute_default", "usage_rollups_hour_default"
        }  # fmt: skip
    # Writes still merge in DEFAULT.
    row = dict.fromkeys(COLUMNS, 0) | {
        "scope": 1, "entity_id": 1, "unit": 1, "period_start": later,
        "peak": 9, "peak_at": later + 5, "min": 4,
    }  # fmt: skip
    _copy_and_merge(engine, [tuple(row[c] for c in COLUMNS)])

    created = ensure(engine, later - 7 * DAY)  # the week before it, up to its day
    assert "usage_rollups_minute_20301001" in created
    assert "usage_rollups_minute_20301002" not in created
    with engine.connect() as conn:
        assert where(conn) == {
            (1, later): "usage_rollups_minute_20301001",
            (1, later + DAY): "usage_rollups_minute_default",
            (2, at(2031, 3, 1)): "usage_rollups_hour_default",
        }
        moved = conn.exec_driver_sql(
            f"SELECT peak, peak_at, min FROM usage_rollups WHERE period_start = {later}"
        ).one()
        assert tuple(moved) == (9, later + 5, 4)
    ensure(engine, at(2031, 1, 15))  # hour partitions through March 2031
    with engine.connect() as conn:
        assert where(conn)[(2, at(2031, 3, 1))] == "usage_rollups_hour_203103"
        assert where(conn)[(1, later + DAY)] == "usage_rollups_minute_default"


@contextmanager
def empty_database() -> Iterator[str]:
    name = f"metering_test_{uuid.uuid4().hex[:10]}"
    admin = make_url(ADMIN_DATABASE_URL)
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_migration_moves_the_rows_into_partitions_and_back() -> None:
    with empty_database() as url:
        upgrade(url, "0002")
        engine = make_engine(url)
        now = int(datetime.now(UTC).timestamp())
        with engine.begin() as conn:
            for unit, step, n in ((1, MINUTE, 3 * 1440), (2, HOUR, 100 * 24), (3, DAY, 400)):
                for i in range(0, n, 7):
                    put(conn, unit, now - now % step - i * step, peak=i, columns=COLUMNS_0003)
            put(conn, 4, at(2025, 1, 1), columns=COLUMNS_0003)
            put(conn, 1, at(2100, 1, 1), columns=COLUMNS_0003)
            put(conn, 1, at(1971, 1, 1), columns=COLUMNS_0003)
            before = conn.exec_driver_sql("SELECT * FROM usage_rollups ORDER BY 1, 2, 3, 4").all()

        upgrade(url, "0003")
        with engine.connect() as conn:
            after = conn.exec_driver_sql("SELECT * FROM usage_rollups ORDER BY 1, 2, 3, 4").all()
            assert after == before
            # Every day and month with rows got its partition: nothing waits in DEFAULT.
            for unit in partitions.SPLITS:
                n = conn.exec_driver_sql(f"SELECT count(*) FROM {partitions.default(unit)}")
                assert n.scalar() == 0
            assert where(conn)[(1, at(2100, 1, 1))] == "usage_rollups_minute_21000101"
            # And those ahead of today.
            assert len(partitions.partitions(conn, Unit.MINUTE)) >= 3 + 7 + 2

        command.downgrade(alembic_config(url), "0002")
        with engine.connect() as conn:
            back = conn.exec_driver_sql("SELECT * FROM usage_rollups ORDER BY 1, 2, 3, 4").all()
            assert back == before
            kind = conn.exec_driver_sql(
                "SELECT relkind, reloptions FROM pg_class WHERE relname = 'usage_rollups'"
            ).one()
            assert tuple(kind) == ("r", ["fillfactor=85"])
        engine.dispose()


def test_on_sqlite_nothing_is_partitioned_and_retention_deletes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        assert not partitions.is_partitioned(conn)
        assert partitions.ensure(conn, T) == []
        assert partitions.expire(conn, Unit.MINUTE, T) is None
        for unit, start in ((1, T - 8 * DAY), (1, T), (2, T - 100 * DAY), (3, T - 1000 * DAY)):
            put(conn, unit, start)
    result = enforce_retention(engine, {}, KEPT, now=T)
    assert (result.deleted, result.dropped, result.created) == ({"minute": 1, "hour": 1}, {}, [])
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT unit, period_start FROM usage_rollups").all()
    assert sorted(rows) == [(1, T), (3, T - 1000 * DAY)]
    engine.dispose()


def test_migration_0019_leaves_room_for_updates_of_coarser_rows_and_none_in_minute_pages() -> None:
    """Every table that holds rows: the minute partitions full (100), the hour partitions and
    the day and month tables half (50); a partition made later gets its unit's; the downgrade
    gives all of them 85 again."""

    def fillfactors(conn: Connection) -> dict[str, int]:
        found = conn.execute(
            text(
                "SELECT relid::regclass::text, (SELECT option_value FROM "
                "pg_options_to_table(c.reloptions) WHERE option_name = 'fillfactor') "
                "FROM pg_partition_tree('usage_rollups') JOIN pg_class c ON c.oid = relid "
                "WHERE isleaf"
            )
        )
        return {table: int(ff) for table, ff in found.all()}

    def unit_of(table: str) -> str:
        return table.split("_")[2]

    with scratch_database("fill") as url:
        engine = make_engine(url)
        try:
            with engine.begin() as conn:
                now = fillfactors(conn)
                partitions.ensure(conn, T, covering={Unit.MINUTE: [T], Unit.HOUR: [T]})
                later = fillfactors(conn)
            made = {"usage_rollups_minute_20300315", "usage_rollups_hour_203003"}
            assert made <= set(later) - set(now)
            want = {"minute": 100, "hour": 50, "day": 50, "month": 50}
            assert {t: want[unit_of(t)] for t in later} == later
            assert {unit_of(t) for t in later} == set(want)
            command.downgrade(alembic_config(url), "0018")
            with engine.connect() as conn:
                assert set(fillfactors(conn).values()) == {85}
        finally:
            engine.dispose()
