"""How the aggregator stores what it knows: counter marks apply only what a total holds
beyond them, and the migrations to the packed marks, to the minute row held in the state and
to the refusal counters, to the state in blocks and to those blocks and the marks compressed
carry the data both ways."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, inspect, text

from metering.core.database import get_engine
from metering.core.migrate import alembic_config, upgrade
from metering.gateway.sdk import Meter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import query, state
from metering.rollups.fold import APP, UNIT_CODES, codes
from metering.rollups.marks import Marks
from metering.rollups.periods import Unit
from metering.rollups.service import Aggregator, _values
from metering.rollups.state import HELD_ROW
from tests.conftest import Env
from tests.factories import tenant
from tests.rollups.seconds import Seconds
from tests.scratch import REDIS_URL, scratch_database

_HELD = [c.removeprefix("held_") for c in HELD_ROW[1:]]
_ROW_VALUES = _HELD  # a row's values after its start, as usage_rollups and the state hold them


def ints(*rows: object) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


_LAG_AT = 8 * state.LAG_COLUMN  # where an entity's value holds its lag (migration 0018)


def pack(values: dict[str, int | None]) -> bytes:
    """An entity's value as migrations 0012 to 0017 lay it out: ``state.pack``'s without the
    lag, which migration 0018 added."""
    packed = state.pack(values)
    return packed[:_LAG_AT] + packed[_LAG_AT + 8 :]


def with_lag(packed: bytes, lag: int = -1) -> bytes:
    """An entity's value of 0012 to 0017 as the code lays it out since 0018."""
    return packed[:_LAG_AT] + lag.to_bytes(8, "big", signed=True) + packed[_LAG_AT:]


def as_mapping(packed: bytes) -> dict[str, object]:
    """An entity's value of 0012 to 0017 by name (``state.as_mapping``)."""
    return state.as_mapping(with_lag(packed))


def test_only_what_a_total_holds_beyond_its_mark_is_applied() -> None:
    # Totals in FRONTEND_COUNTERS order: opened, refused, pub_n, pub_b, del_n, del_b,
    # ch_refused, msg_refused.
    marks = Marks()
    first = marks.apply(ints(7, 3), ints([1, 0, 5, 500, 0, 0, 0, 2], [2, 0, 1, 10, 1, 10, 1, 0]))
    assert first.tolist() == [[1, 0, 5, 500, 0, 0, 0, 2], [2, 0, 1, 10, 1, 10, 1, 0]]
    assert marks.apps.tolist() == [3, 7]  # kept sorted

    # The same totals again (a retried read): nothing; a later total: the difference only;
    # a total below its mark (never, for a cumulative counter): nothing, and the mark stays.
    again = marks.apply(
        ints(3, 7, 9),
        ints([2, 0, 1, 10, 1, 10, 1, 0], [4, 0, 5, 600, 0, 0, 1, 5], [1] * 8),
    )
    assert again.tolist() == [[0] * 8, [3, 0, 0, 100, 0, 0, 1, 3], [1] * 8]
    below = marks.apply(ints(7), ints([0, 0, 5, 600, 0, 0, 0, 0]))
    assert below.tolist() == [[0] * 8]
    assert marks.totals[marks.apps.tolist().index(7)].tolist() == [4, 0, 5, 600, 0, 0, 1, 5]

    stored = Marks.unpack(marks.pack())
    assert stored.apps.tolist() == [3, 7, 9]
    assert stored.totals.tolist() == marks.totals.tolist()
    assert len(marks.pack()) == 3 * 9 * 8  # per app its id and eight totals, int64 each


def test_migration_0004_packs_json_marks_and_unpacks_them_back() -> None:
    totals = {"12": [1, 2, 3, 4, 5, 6], "3": [0, 0, 7, 700, 14, 1400]}
    with scratch_database("marks") as url:
        cfg = alembic_config(url)
        command.downgrade(cfg, "0003")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO usage_marks (datacenter, incarnation, totals, retired, "
                        "updated) VALUES ('dc1', 'fe-1#a', :t, false, 0)"
                    ),
                    {"t": json.dumps(totals)},
                )
            command.upgrade(cfg, "0004")
            with engine.connect() as conn:
                packed = conn.execute(text("SELECT packed FROM usage_marks")).scalar_one()
            # 0004's packing: per app its id and six totals (0007 made it eight).
            marks = np.frombuffer(packed, dtype="<i8").reshape(-1, 7)
            assert marks[:, 0].tolist() == [3, 12]
            assert marks[:, 1:].tolist() == [totals["3"], totals["12"]]
            command.downgrade(cfg, "0003")
            with engine.connect() as conn:
                back = conn.execute(text("SELECT totals FROM usage_marks")).scalar_one()
            assert json.loads(back) == totals
        finally:
            engine.dispose()


def test_migration_0005_moves_each_latest_minute_row_into_the_state_and_back() -> None:
    figures = (
        "conns0, ws0, channels0, area0, ch_area0, opened0, refused0, ch_opened0, "
        "pub_n0, pub_b0, del_n0, del_b0, peak, peak_at, min, ws_peak, ch_peak, ch_min"
    )
    row = "1, 0, 0, 10, 0, 0, 0, 0, 5, 50, 0, 0, 3, {at}, 1, 0, 0, 0"
    with scratch_database("minute") as url:
        cfg = alembic_config(url)
        command.downgrade(cfg, "0004")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO usage_state (scope, entity_id, conns, ws, channels, since, "
                        "area, ch_area, opened, refused, ch_opened, pub_n, pub_b, del_n, del_b, "
                        "minute, hour) VALUES (1, 7, 1, 0, 0, 130, 20, 0, 0, 0, 0, 5, 50, 0, 0, "
                        "120, 0)"
                    )
                )
                for start in (60, 120):  # an older minute row, and the latest one
                    conn.execute(
                        text(
                            f"INSERT INTO usage_rollups (scope, entity_id, unit, period_start, "
                            f"{figures}) VALUES (1, 7, 1, {start}, {row.format(at=start + 1)})"
                        )
                    )
            command.upgrade(cfg, "0005")
            with engine.connect() as conn:
                kept = conn.execute(text("SELECT period_start FROM usage_rollups")).scalars()
                assert list(kept) == [60]
                state = conn.execute(text("SELECT * FROM usage_state")).mappings().one()
                assert (state["minute"], state["minute_peak"], state["minute_peak_at"]) == (
                    120,
                    3,
                    121,
                )
                assert state["minute_pub_n0"] == 5
            command.downgrade(cfg, "0004")
            with engine.connect() as conn:
                back = conn.execute(
                    text("SELECT period_start, peak_at FROM usage_rollups ORDER BY 1")
                ).all()
                assert [tuple(r) for r in back] == [(60, 61), (120, 121)]
        finally:
            engine.dispose()


@contextmanager
def _database(dialect: str, tmp_path: Path) -> Iterator[str]:
    """A database of its own built by the migrations: Postgres (partitioned rollups) or SQLite."""
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
        upgrade(url)
        yield url
    else:
        with scratch_database("refused") as url:
            yield url


@contextmanager
def _migrated(dialect: str, tmp_path: Path, revision: str) -> Iterator[tuple[Config, Engine]]:
    """Alembic's config and an engine of a database of its own (``_database``) taken down to
    ``revision``."""
    with _database(dialect, tmp_path) as url:
        cfg = alembic_config(url)
        command.downgrade(cfg, revision)
        engine = create_engine(url)
        try:
            yield cfg, engine
        finally:
            engine.dispose()


def _columns(conn: Connection, table: str) -> dict[str, tuple[str, bool, object]]:
    """Each column's (type, nullable, server default) as the database declares it."""
    found = inspect(conn).get_columns(table)
    return {c["name"]: (str(c["type"]), c["nullable"], c["default"]) for c in found}


def _rollup_tables(conn: Connection) -> list[str]:
    """usage_rollups and, on Postgres, every partition under it (the DEFAULT ones too)."""
    if conn.dialect.name != "postgresql":
        return ["usage_rollups"]
    tree = conn.execute(
        text("SELECT relid::regclass::text FROM pg_partition_tree('usage_rollups')")
    ).scalars()
    return sorted(tree)


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0007_adds_the_refusal_counters_at_zero_and_repacks_the_marks_both_ways(
    dialect: str, tmp_path: Path
) -> None:
    now = int(time.time())
    # (scope, entity, unit, start): minute rows long ago (the DEFAULT partition on Postgres)
    # and now (a day's partition), an hour row long ago (DEFAULT), a day and a month row.
    rows = [(1, 7, 1, 60), (1, 7, 1, now - now % 60), (1, 7, 2, 3600), (2, 9, 3, 0), (2, 9, 4, 0)]
    figures = (
        "conns0, ws0, channels0, area0, ch_area0, opened0, refused0, ch_opened0, pub_n0, "
        "pub_b0, del_n0, del_b0, peak, peak_at, min, ws_peak, ch_peak, ch_min"
    )
    totals = (
        "opened, refused, ch_opened, pub_n, pub_b, del_n, del_b, since, area, ch_area, conns, "
        "ws, channels"
    )
    # Marks as 0006 packs them: per app its id and six totals.
    old = np.array([[3, 0, 0, 7, 700, 14, 1400], [12, 1, 2, 3, 4, 5, 6]], dtype="<i8")
    with _migrated(dialect, tmp_path, "0006") as (cfg, engine):
        with engine.begin() as conn:
            # Entity (1, 7) holds its latest minute row in its state; (2, 9) holds none.
            conn.execute(
                text(
                    f"INSERT INTO usage_state (scope, entity_id, {totals}, minute, "
                    "minute_refused0, minute_peak) VALUES "
                    "(1, 7, 5, 2, 0, 1, 10, 0, 0, 0, 0, 0, 1, 0, 0, 120, 2, 3), "
                    "(2, 9, 5, 2, 0, 1, 10, 0, 0, 0, 0, 0, 1, 0, 0, NULL, NULL, NULL)"
                )
            )
            for scope, entity, unit, start in rows:
                conn.execute(
                    text(
                        f"INSERT INTO usage_rollups (scope, entity_id, unit, period_start, "
                        f"{figures}) VALUES ({scope}, {entity}, {unit}, {start}, "
                        "1, 0, 0, 10, 0, 0, 1, 0, 5, 50, 0, 0, 3, 61, 1, 0, 0, 0)"
                    )
                )
            conn.execute(
                text(
                    "INSERT INTO usage_marks (datacenter, incarnation, packed, retired, "
                    "updated) VALUES ('dc1', 'fe-1#a', :p, false, 0)"
                ),
                {"p": old.tobytes()},
            )

        command.upgrade(cfg, "0007")
        with engine.connect() as conn:
            state = conn.execute(
                text(
                    "SELECT entity_id, refused, ch_refused, msg_refused, minute_refused0, "
                    "minute_ch_refused0, minute_msg_refused0 FROM usage_state ORDER BY 1"
                )
            ).all()
            assert [tuple(r) for r in state] == [
                (7, 2, 0, 0, 2, 0, 0),
                (9, 2, 0, 0, None, None, None),
            ]
            stored = conn.execute(
                text("SELECT pub_b0, peak_at, ch_refused0, msg_refused0 FROM usage_rollups")
            ).all()
            assert [tuple(r) for r in stored] == [(50, 61, 0, 0)] * len(rows)
            packed = conn.execute(text("SELECT packed FROM usage_marks")).scalar_one()
            marks = np.frombuffer(packed, dtype="<i8").reshape(-1, 9)  # as 0007 packs them
            assert marks[:, 0].tolist() == [3, 12]
            assert marks[:, 1:].tolist() == [[*r[1:], 0, 0] for r in old.tolist()]
            # Declared exactly as the counters beside them, on every partition.
            declared = _columns(conn, "usage_state")
            for c in ("ch_refused", "msg_refused"):
                assert declared[c] == declared["refused"]
                assert declared[f"minute_{c}0"] == declared["minute_refused0"]
            tables = _rollup_tables(conn)
            if dialect == "postgresql":
                assert {"usage_rollups_minute_default", "usage_rollups_hour_default"} <= set(tables)
            for table in tables:
                declared = _columns(conn, table)
                for c in ("ch_refused0", "msg_refused0"):
                    assert declared[c] == declared["refused0"], (table, c)
        since = np.arange(8)  # counted since, per total
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE usage_marks SET packed = :p"),
                {"p": np.column_stack([marks[:, 0], marks[:, 1:] + since]).tobytes()},
            )

        command.downgrade(cfg, "0006")
        with engine.connect() as conn:
            packed = conn.execute(text("SELECT packed FROM usage_marks")).scalar_one()
            back = np.frombuffer(packed, dtype="<i8").reshape(-1, 7)
            # The six totals of before, as counted since; the refusals are gone.
            assert back[:, 0].tolist() == [3, 12]
            assert back[:, 1:].tolist() == (old[:, 1:] + since[:6]).tolist()
            for table in ["usage_state", *_rollup_tables(conn)]:
                gone = {c for c in _columns(conn, table) if "ch_refused" in c or "msg_ref" in c}
                assert not gone, table


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0009_moves_the_latest_rows_starts_out_of_the_state_and_back(
    dialect: str, tmp_path: Path
) -> None:
    totals = (
        "conns, ws, channels, since, area, ch_area, opened, refused, ch_opened, pub_n, pub_b, "
        "del_n, del_b, ch_refused, msg_refused"
    )
    starts = (
        "minute, hour, day, month, minute_conns0, minute_ws0, minute_channels0, minute_area0, "
        "minute_ch_area0, minute_opened0, minute_refused0, minute_ch_opened0, minute_pub_n0, "
        "minute_pub_b0, minute_del_n0, minute_del_b0, minute_ch_refused0, minute_msg_refused0"
    )
    extremes = (
        "minute_peak, minute_peak_at, minute_min, minute_ws_peak, minute_ch_peak, minute_ch_min"
    )
    # Entity (1, 7) holds a minute row; (2, 9) has only an hour row's start, no minute row.
    held = {
        (1, 7): (tuple(range(100, 118)), (9, 125, 1, 8, 3, 0)),
        (2, 9): ((None, 3600, None, None, *[None] * 14), (None,) * 6),
    }
    with _migrated(dialect, tmp_path, "0007") as (cfg, engine):
        with engine.begin() as conn:
            for (scope, entity), (begun, ext) in held.items():
                conn.execute(
                    text(
                        f"INSERT INTO usage_state (scope, entity_id, {totals}, {starts}, "
                        f"{extremes}) VALUES ({scope}, {entity}, "
                        + ", ".join(["5"] * 15 + [f":v{i}" for i in range(24)])
                        + ")"
                    ),
                    {f"v{i}": v for i, v in enumerate((*begun, *ext))},
                )

        command.upgrade(cfg, "0009")
        with engine.connect() as conn:
            moved = conn.execute(
                text(f"SELECT scope, entity_id, {starts} FROM usage_starts ORDER BY 1")
            ).all()
            assert [tuple(r) for r in moved] == [(*k, *v[0]) for k, v in held.items()]
            state = conn.execute(
                text(f"SELECT scope, entity_id, {totals}, {extremes} FROM usage_state ORDER BY 1")
            ).all()
            assert [tuple(r) for r in state] == [(*k, *[5] * 15, *v[1]) for k, v in held.items()]
            assert not set(starts.split(", ")) & set(_columns(conn, "usage_state"))

        command.downgrade(cfg, "0007")
        with engine.connect() as conn:
            back = conn.execute(
                text(f"SELECT scope, entity_id, {starts}, {extremes} FROM usage_state ORDER BY 1")
            ).all()
            assert [tuple(r) for r in back] == [(*k, *v[0], *v[1]) for k, v in held.items()]
            assert "usage_starts" not in inspect(conn).get_table_names()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0012_packs_the_state_and_starts_rows_into_one_value_and_back(
    dialect: str, tmp_path: Path
) -> None:
    totals = (
        "conns, ws, channels, since, area, ch_area, opened, refused, ch_opened, pub_n, pub_b, "
        "del_n, del_b, ch_refused, msg_refused"
    )
    extremes = (
        "minute_peak, minute_peak_at, minute_min, minute_ws_peak, minute_ch_peak, minute_ch_min"
    )
    starts = (
        "minute, hour, day, month, minute_conns0, minute_ws0, minute_channels0, minute_area0, "
        "minute_ch_area0, minute_opened0, minute_refused0, minute_ch_opened0, minute_pub_n0, "
        "minute_pub_b0, minute_del_n0, minute_del_b0, minute_ch_refused0, minute_msg_refused0"
    )
    # (1, 7): a minute row and every unit's start, totals beyond 2**32; (2, 9): an hour row's
    # start only, no minute row; (1, 8): a state with no starts row at all.
    big = 5 * 2**40
    held: dict[tuple[int, int], tuple[tuple[int | None, ...], ...]] = {
        (1, 7): (
            (*range(100, 114), big),
            (9, 125, 1, 8, 3, 0),
            (120, 0, 0, 0, *range(200, 214)),
        ),
        (1, 8): ((3,) * 15, (None,) * 6, ()),
        (2, 9): ((4,) * 15, (None,) * 6, (None, 3600, None, None, *[None] * 14)),
    }
    with _migrated(dialect, tmp_path, "0011") as (cfg, engine):
        with engine.begin() as conn:
            for (scope, entity), (values, ext, begun) in held.items():
                params = {f"v{i}": v for i, v in enumerate((*values, *ext))}
                conn.execute(
                    text(
                        f"INSERT INTO usage_state (scope, entity_id, {totals}, {extremes}) "
                        f"VALUES ({scope}, {entity}, "
                        + ", ".join(f":v{i}" for i in range(len(params)))
                        + ")"
                    ),
                    params,
                )
                if begun:
                    conn.execute(
                        text(
                            f"INSERT INTO usage_starts (scope, entity_id, {starts}) VALUES "
                            f"({scope}, {entity}, "
                            + ", ".join(f":s{i}" for i in range(len(begun)))
                            + ")"
                        ),
                        {f"s{i}": v for i, v in enumerate(begun)},
                    )

        command.upgrade(cfg, "0012")
        with engine.connect() as conn:
            assert "usage_starts" not in inspect(conn).get_table_names()
            assert set(_columns(conn, "usage_state")) == {"scope", "entity_id", "packed"}
            found = {
                (r.scope, r.entity_id): as_mapping(bytes(r.packed))
                for r in conn.execute(text("SELECT * FROM usage_state"))
            }
        assert set(found) == set(held)
        for key, (values, ext, begun) in held.items():
            got = found[key]
            assert [got[c] for c in totals.split(", ")] == list(values)
            names = starts.split(", ")
            if key == (1, 7):  # the minute row whole, every unit's start
                assert [got[c] for c in names] == list(begun)
                assert [got[c] for c in extremes.split(", ")] == list(ext)
            else:  # no minute row: None, as the reads take it
                assert got["minute"] is None
                assert got["minute_peak"] is None
                assert got["minute_pub_n0"] is None
            assert got["hour"] == (3600 if key == (2, 9) else 0 if key == (1, 7) else None)
            assert got["day"] == (0 if key == (1, 7) else None)

        # A state row holding a closed minute row (what the aggregator writes from 0012
        # on): the downgrade puts that row in usage_rollups, where the older code reads it.
        with engine.begin() as conn:
            wide = dict(found[(1, 7)]) | {"held": 60} | {f"held_{c}": 1 for c in _HELD}
            conn.execute(
                text("UPDATE usage_state SET packed = :p WHERE entity_id = 7"),
                {"p": pack(wide)},
            )
        command.downgrade(cfg, "0011")
        with engine.connect() as conn:
            minute_rows = conn.execute(
                text("SELECT scope, entity_id, unit, period_start, pub_n0, ch_min "
                     "FROM usage_rollups")
            ).all()  # fmt: skip
            assert [tuple(r) for r in minute_rows] == [(1, 7, 1, 60, 1, 1)]
            back = {
                (r[0], r[1]): tuple(r[2:])
                for r in conn.execute(
                    text(f"SELECT scope, entity_id, {totals}, {extremes} FROM usage_state")
                )
            }
            back_starts = {
                (r[0], r[1]): tuple(r[2:])
                for r in conn.execute(text(f"SELECT scope, entity_id, {starts} FROM usage_starts"))
            }
        assert back == {k: (*v[0], *v[1]) for k, v in held.items()}
        # Every state row has its starts row again (NULL where it had none).
        assert back_starts == {k: v[2] or (None,) * 18 for k, v in held.items()}


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0013_writes_the_coarser_rows_the_state_rows_complete_on_the_way_down(
    dialect: str, tmp_path: Path
) -> None:
    """From 0013 on an hour, day or month row may be in no table but the state row (begun
    with its minute row) or lack the extremes of the minute rows there; the downgrade writes
    them as the code before reads them."""
    month = 1775001600  # 2026-04-01 00:00 UTC
    hour = month + 10 * 3600
    figures = ("conns0", "pub_n0", "peak", "peak_at", "min", "ch_peak", "ch_min")

    def minute(start: int, *values: int) -> dict[str, int]:
        return dict(zip(("period_start", *figures), (start, *values), strict=True))

    def fields(prefix: str, row: dict[str, int]) -> dict[str, int]:
        named = {f"{prefix}_{k}": v for k, v in row.items() if k != "period_start"}
        return {prefix: row["period_start"], **named}

    # (1, 7): its first minute of April, in no row of usage_rollups yet; (1, 8): stored hour,
    # day and month rows, and a held and a latest minute row in its hour that widen them.
    first = minute(month, 4, 100, 9, month + 5, 2, 3, 1)
    held, latest = (
        minute(hour + 60, 6, 50, 8, hour + 70, 1, 2, 2),
        minute(hour + 120, 7, 60, 8, hour + 130, 5, 4, 0),
    )
    states = {
        7: {**fields("minute", first), "hour": month, "day": month, "month": month},
        8: {**fields("minute", latest), **fields("held", held), "hour": hour, "day": month,
            "month": month},
    }  # fmt: skip
    stored = {  # (unit, start): conns0, pub_n0, peak, peak_at, min, ch_peak, ch_min
        (2, hour): (5, 40, 5, hour + 10, 3, 1, 1),
        (3, month): (1, 10, 20, month + 99, 3, 1, 1),
        (4, month): (1, 10, 20, month + 99, 3, 9, 1),
    }
    with _migrated(dialect, tmp_path, "0013") as (cfg, engine):
        with engine.begin() as conn:
            for entity, values in states.items():
                conn.execute(
                    text("INSERT INTO usage_state (scope, entity_id, packed) VALUES (1, :e, :p)"),
                    {"e": entity, "p": pack(values)},
                )
            zero = ", ".join(c for c in _ROW_VALUES if c not in figures)
            for (unit, start), values in stored.items():
                conn.execute(
                    text(
                        f"INSERT INTO usage_rollups (scope, entity_id, unit, period_start, "
                        f"{', '.join(figures)}, {zero}) VALUES (1, 8, :u, :s, "
                        + ", ".join(f":v{i}" for i in range(len(values)))
                        + ", "
                        + ", ".join("0" for _ in zero.split(", "))
                        + ")"
                    ),
                    {"u": unit, "s": start, **{f"v{i}": v for i, v in enumerate(values)}},
                )
        command.downgrade(cfg, "0012")
        with engine.connect() as conn:
            found = {
                (r[0], r[1], r[2]): tuple(r[3:])
                for r in conn.execute(
                    text(
                        f"SELECT entity_id, unit, period_start, {', '.join(figures)} "
                        "FROM usage_rollups"
                    )
                )
            }
        row7 = tuple(first[c] for c in figures)
        assert found == {
            # Begun with its minute row: that row's start values and extremes.
            (7, 2, month): row7, (7, 3, month): row7, (7, 4, month): row7,
            # Widened by the held row, then the latest (its peak ties: the first time
            # stays), start values as stored.
            (8, 2, hour): (5, 40, 8, hour + 70, 1, 4, 0),
            (8, 3, month): (1, 10, 20, month + 99, 1, 4, 0),
            (8, 4, month): (1, 10, 20, month + 99, 1, 9, 0),
        }  # fmt: skip
        command.upgrade(cfg, "head")  # nothing to change on the way up


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0014_puts_64_entities_of_a_scope_in_two_rows_and_gives_each_its_own_back(
    dialect: str, tmp_path: Path
) -> None:
    """Ids on both sides of a block's edge (63, 64), both scopes (app 1 and account 1 apart),
    entities with and without a held minute row: the blocks, two parts each, read back as
    every entity's value was, and the downgrade gives each its row back byte for byte."""
    month = 1775001600  # 2026-04-01 00:00 UTC

    def value(entity: int, *, held: bool) -> bytes:
        fields = {"conns": entity, "since": month, "minute": month, "minute_peak": 2 * entity,
                  "minute_peak_at": month + entity, "month": month}  # fmt: skip
        if held:
            fields |= {"held": month - 60, "held_peak": entity + 1, "held_ch_min": -entity}
        return pack(fields)

    before = {
        (1, 1): value(1, held=False), (1, 63): value(63, held=True),
        (1, 64): value(64, held=False), (1, 200): value(200, held=True),
        (2, 1): value(1001, held=True),
    }  # fmt: skip
    with _migrated(dialect, tmp_path, "0013") as (cfg, engine):
        with engine.begin() as conn:
            for (scope, entity), packed in before.items():
                conn.execute(
                    text("INSERT INTO usage_state (scope, entity_id, packed) VALUES (:s, :e, :p)"),
                    {"s": scope, "e": entity, "p": packed},
                )
        command.upgrade(cfg, "0014")
        with engine.connect() as conn:
            blocks = conn.execute(
                text("SELECT scope, block, part, length(packed) FROM usage_state ORDER BY 1, 2, 3")
            ).all()
            if dialect == "postgresql":  # out of line, never compressed
                assert _packed_storage(conn) == ("e", "")
        command.upgrade(cfg, "head")  # (the code reads the blocks as they are stored now)
        with engine.connect() as conn:
            scopes, ids, values = state.select(conn)
            one = {key: state.packed_of(conn, *key) for key in before}
        # Per block, two rows: the 21 fields that change whenever an entity does, then the 18
        # that change when a row begins, with the held rows (21 values each).
        now, slow, held = 21, 18, len(HELD_ROW)
        assert len(pack({})) // 8 == now + slow
        assert [tuple(b) for b in blocks] == [
            (1, 0, state.NOW, 8 * (1 + 2 * 2 + 2 * now)),  # 1 and 63
            (1, 0, state.ROWS, 8 * (1 + 2 * 2 + 2 * slow + held)),  # 63 holds a row
            (1, 1, state.NOW, 8 * (1 + 2 + now)),  # 64
            (1, 1, state.ROWS, 8 * (1 + 2 + slow)),
            (1, 3, state.NOW, 8 * (1 + 2 + now)),  # 200
            (1, 3, state.ROWS, 8 * (1 + 2 + slow + held)),
            (2, 0, state.NOW, 8 * (1 + 2 + now)),  # the account
            (2, 0, state.ROWS, 8 * (1 + 2 + slow + held)),
        ]
        assert list(zip(scopes.tolist(), ids.tolist(), strict=True)) == list(before)
        now_too = {key: with_lag(packed) for key, packed in before.items()}  # (0018: no lag)
        assert one == now_too
        for key, row in zip(before, values, strict=True):  # as loaded
            width = len(now_too[key]) // 8
            assert row[:width].astype(">i8").tobytes() == now_too[key]
            assert (row[width:] == -1).all()  # no held row: -1, as the aggregator has it

        command.downgrade(cfg, "0013")
        with engine.connect() as conn:
            back = {
                (r.scope, r.entity_id): bytes(r.packed)
                for r in conn.execute(text("SELECT * FROM usage_state"))
            }
        assert back == before
        command.upgrade(cfg, "head")


def _packed_storage(conn: Connection, table: str = "usage_state") -> tuple[str, str]:
    """``table``.packed's storage and compression (pg_attribute: '' is the default)."""
    found = conn.execute(
        text(
            "SELECT attstorage, attcompression FROM pg_attribute WHERE attrelid = "
            f"'{table}'::regclass AND attname = 'packed'"
        )
    ).one()
    return str(found[0]), str(found[1])


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0015_stores_the_blocks_as_byte_planes_compressed_and_back(
    dialect: str, tmp_path: Path
) -> None:
    """A full block (64 apps, half of them holding a minute row) and an account's block of
    one: at 0015 each block is stored as its words' byte planes, and on Postgres compressed
    with lz4 to less than half its size; 0014 has the same words back, uncompressed, and the
    way up again reads as every entity's value was."""
    rng = np.random.default_rng(15)
    month = 1775001600  # 2026-04-01 00:00 UTC
    ids = np.concatenate([np.arange(64, 128), [7]]).astype(np.int64)
    scopes = np.array([1] * 64 + [2], dtype=np.int64)
    values = rng.integers(0, 10**9, size=(len(ids), state.ALL)).astype(np.int64)
    for name in ("since", "minute", "hour", "day", "month"):
        values[:, state.column(name)] = month + rng.integers(0, 3600, len(ids))
    values[::2, state.column("held")] = -1
    with _migrated(dialect, tmp_path, "0014") as (cfg, engine):
        command.upgrade(cfg, "0015")
        with engine.begin() as conn:
            state.write(conn, scopes, ids, values)

        def stored() -> dict[tuple[int, int, int], bytes]:
            with engine.connect() as conn:
                found = conn.execute(text("SELECT scope, part, block, packed FROM usage_state"))
                return {(s, p, b): bytes(v) for s, p, b, v in found}

        planes = stored()
        assert len(planes) == 4
        words = {key: state.words(v) for key, v in planes.items()}
        for key, v in words.items():  # big-endian words, as 0014 read them
            assert int.from_bytes(v[:8], "big") == (64 if key[0] == 1 else 1)
            assert state.planes(v) == planes[key]
        if dialect == "postgresql":
            with engine.connect() as conn:
                assert _packed_storage(conn) == ("x", "l")
                sizes = conn.execute(
                    text(
                        "SELECT pg_column_compression(packed), pg_column_size(packed), "
                        "length(packed) FROM usage_state WHERE scope = 1"
                    )
                ).all()
            assert [c for c, _, _ in sizes] == ["lz4", "lz4"]
            assert all(size < length / 2 for _, size, length in sizes)

        command.downgrade(cfg, "0014")
        assert stored() == words
        if dialect == "postgresql":
            with engine.connect() as conn:
                assert _packed_storage(conn) == ("e", "")
        command.upgrade(cfg, "0015")
        assert stored() == planes
        with engine.connect() as conn:
            got_scopes, got_ids, got = state.select(conn)
        order = np.lexsort((ids, scopes))
        assert (got_scopes == scopes[order]).all()
        assert (got_ids == ids[order]).all()
        expected = values[order]
        held = expected[:, state.column("held")] >= 0
        expected[~held, len(state.FIELDS) :] = -1
        assert (got == expected).all()
        # (The blocks are in the layout of the code, which writes them, not 0015's: the way
        # up from there is migration 0018's test.)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM usage_state"))
        command.upgrade(cfg, "head")


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0016_writes_the_closed_rows_the_held_rows_complete_on_the_way_down(
    dialect: str, tmp_path: Path
) -> None:
    """App 5 holds the last minute of a closed hour, whose copy in usage_rollups lacks that
    minute's peak; account 6 holds the first minute of a closed hour that began with it and is
    nowhere else. The code before writes a closed row only when it closes: the downgrade
    widens the first and inserts the second, and leaves the latest rows (the day and month the
    held minutes lie in, read with them by the code before) alone."""
    month = 1775001600  # 2026-04-01 00:00 UTC
    figures = [c.removeprefix("held_") for c in HELD_ROW[1:]]
    values = np.full((2, state.ALL), 0, dtype=np.int64)
    for i, (held, hour) in enumerate(((month + 3540, month + 3600), (month + 3600, month + 7200))):
        row = values[i]
        row[state.column("minute")], row[state.column("minute_peak")] = hour, 1
        row[state.column("hour")], row[state.column("day")] = hour, month
        row[state.column("month")], row[state.column("held")] = month, held
        row[state.column("lag")] = -1
        for name, v in {"peak": 50, "peak_at": held + 7, "min": 3, "ws_peak": 40,
                        "ch_peak": 9, "ch_min": 2, "conns0": 11, "pub_n0": 70}.items():  # fmt: skip
            row[state.column(f"held_{name}")] = v
    copy = {"scope": 1, "entity_id": 5, "unit": 2, "period_start": month,
            **dict.fromkeys(figures, 0), "peak": 10, "peak_at": month + 5, "min": 1,
            "ws_peak": 10, "ch_peak": 20, "ch_min": 1}  # fmt: skip
    columns = list(copy)
    with _migrated(dialect, tmp_path, "head") as (cfg, engine):
        with engine.begin() as conn:
            state.write(conn, ints(1, 2), ints(5, 6), values)
            conn.execute(
                text(
                    f"INSERT INTO usage_rollups ({', '.join(columns)}) "
                    f"VALUES ({', '.join(':' + c for c in columns)})"
                ),
                copy,
            )
        command.downgrade(cfg, "0015")
        with engine.connect() as conn:
            found = conn.execute(
                text(
                    f"SELECT scope, entity_id, unit, period_start, {', '.join(figures)} "
                    "FROM usage_rollups ORDER BY scope, unit"
                )
            ).all()
        widened = {**copy, "peak": 50, "peak_at": month + 3540 + 7, "ws_peak": 40, "ch_peak": 20}
        inserted = {
            "scope": 2, "entity_id": 6, "unit": 2, "period_start": month + 3600,
            **{f: int(values[1, state.column(f"held_{f}")]) for f in figures},
        }  # fmt: skip
        assert [r._asdict() for r in found] == [
            {c: widened[c] for c in ("scope", "entity_id", "unit", "period_start", *figures)},
            inserted,
        ]
        command.upgrade(cfg, "head")


def test_a_cycle_rewrites_the_slow_part_of_a_block_only_when_a_row_began_in_it(env: Env) -> None:
    """Mid-minute, a busy entity's state and extremes change and nothing else: a cycle
    rewrites its blocks' ``NOW`` rows, not their ``ROWS`` rows (Postgres gives a rewritten row
    a new ``xmin``). The next minute's first cycle begins a minute row for it: both rows. The
    rows then hold what the running worker holds."""
    t = tenant("stats")
    client = redis.Redis.from_url(REDIS_URL)
    g, dc = GlobalStore(client, env.prefix), DatacenterStore(client, env.prefix, "dc1")
    meter = Meter(dc, "fe-s", liveness_timeout=60)
    aggregator = Aggregator(get_engine(), g, {"dc1": dc})
    start = 1_800_000_000 - 1_800_000_000 % 60 + 10

    def second(at: int) -> dict[tuple[int, int, int], str]:
        meter.connection_opened(str(t.app_id))
        meter.flush()
        tick(g, {"dc1": dc}, liveness_timeout=60, sample_retention=100, now=at)
        assert aggregator.run().committed
        with get_engine().connect() as conn:
            found = conn.execute(text("SELECT scope, part, block, xmin::text FROM usage_state"))
            return {(s, p, b): x for s, p, b, x in found}

    first = second(start)
    assert {(s, p) for s, p, _ in first} == {(s, p) for s in (1, 2) for p in state.PARTS}
    steady = second(start + 1)
    assert [k for k in first if first[k] != steady[k]] == [k for k in first if k[1] == state.NOW]
    begun = second(start + 60)  # the next minute
    assert all(begun[k] != steady[k] for k in first)
    with get_engine().connect() as conn:
        scopes, ids, values = state.select(conn)
    assert aggregator._loaded is not None
    book = aggregator._loaded.book
    live = _values(book)[book.find(codes(scopes, ids))]
    assert (values == live).all()  # what a worker started now loads: what this one holds
    assert sorted(zip(scopes.tolist(), ids.tolist(), strict=True)) == [
        (1, t.app_id),
        (2, t.account_id),
    ]
    minute = values[:, state.column("minute")]
    assert minute.tolist() == [start - 10 + 60] * 2  # both hold the new minute's row
    assert (values[:, state.column("held")] == start - 10).all()  # and the one that closed
    client.close()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0017_stores_the_marks_as_column_planes_compressed_and_back(
    dialect: str, tmp_path: Path
) -> None:
    """Two incarnations' marks as 0016 packs them (per app its id and eight totals): at 0017
    the code reads every total back, Postgres stores them compressed with lz4 to less than
    half their size (random totals of up to 10**7), 0016 has the same bytes back, and marks
    as 0016 packs them are an error for the code of 0017, never misread."""
    rng = np.random.default_rng(17)
    before: dict[str, bytes] = {}
    expected: dict[str, tuple[list[int], list[list[int]]]] = {}
    for inc, n in (("fe-1#a", 3000), ("fe-2#b", 1)):
        apps = np.sort(rng.choice(np.arange(1, 100_000), n, replace=False)).astype(np.int64)
        totals = rng.integers(0, 10**7, size=(n, 8)).astype(np.int64)
        before[inc] = np.column_stack([apps, totals]).astype("<i8").tobytes()
        expected[inc] = (apps.tolist(), totals.tolist())

    def stored(engine: Engine) -> dict[str, bytes]:
        with engine.connect() as conn:
            found = conn.execute(text("SELECT incarnation, packed FROM usage_marks"))
            return {inc: bytes(p) for inc, p in found}

    with _migrated(dialect, tmp_path, "0016") as (cfg, engine):
        with engine.begin() as conn:
            for inc, packed in before.items():
                conn.execute(
                    text(
                        "INSERT INTO usage_marks (datacenter, incarnation, packed, retired, "
                        "updated) VALUES ('dc1', :inc, :p, false, 0)"
                    ),
                    {"inc": inc, "p": packed},
                )
        command.upgrade(cfg, "0017")
        after = stored(engine)
        for inc, packed in after.items():
            marks = Marks.unpack(packed)
            assert (marks.apps.tolist(), marks.totals.tolist()) == expected[inc]
            assert Marks(marks.apps, marks.totals).pack() == packed
        if dialect == "postgresql":
            with engine.connect() as conn:
                assert _packed_storage(conn, "usage_marks") == ("x", "l")
                compression, size, length = conn.execute(
                    text(
                        "SELECT pg_column_compression(packed), pg_column_size(packed), "
                        "length(packed) FROM usage_marks WHERE incarnation = 'fe-1#a'"
                    )
                ).one()
            assert compression == "lz4"
            assert size < length / 2

        command.downgrade(cfg, "0016")
        assert stored(engine) == before
        if dialect == "postgresql":
            with engine.connect() as conn:
                assert _packed_storage(conn, "usage_marks") == ("e", "")
        with pytest.raises(ValueError, match="run `metering db upgrade`"):
            Marks.unpack(before["fe-1#a"])
        command.upgrade(cfg, "head")
        assert stored(engine) == after


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0018_settles_what_lags_on_the_way_down_and_adds_the_lag_on_the_way_up(
    dialect: str, tmp_path: Path
) -> None:
    """App 5's closed hour lags by the minute 00:59, whose row is in usage_rollups and no
    longer held (it holds 01:00's): its copy lacks that minute's peak. Account 6 lags by the
    minute it holds, and app 7 by none. The way down widens app 5's closed hour by its minute
    row (and leaves its latest day and month rows, and account 6's, for the code before to
    read with the held rows), and the blocks lose the lag field; the way up gives every entity
    its value back, lagging by none."""
    month = 1775001600  # 2026-04-01 00:00 UTC
    figures = [c.removeprefix("held_") for c in HELD_ROW[1:]]
    values = np.zeros((3, state.ALL), dtype=np.int64)
    for i, lag in enumerate((month + 3540, month + 3600, -1)):
        row = values[i]
        row[state.column("minute")], row[state.column("minute_peak")] = month + 3660, 1
        row[state.column("hour")], row[state.column("day")] = month + 3600, month
        row[state.column("month")], row[state.column("held")] = month, month + 3600
        row[state.column("held_peak")], row[state.column("lag")] = 4, lag
    copy = {"scope": 1, "entity_id": 5, "unit": 2, "period_start": month,
            **dict.fromkeys(figures, 0), "peak": 10, "peak_at": month + 5, "min": 1,
            "ws_peak": 10, "ch_peak": 20, "ch_min": 1}  # fmt: skip
    minute = {**copy, "unit": 1, "period_start": month + 3540, "peak": 50,
              "peak_at": month + 3547, "min": 3, "ws_peak": 40, "ch_peak": 9,
              "ch_min": 2}  # fmt: skip
    columns = list(copy)
    key = ("scope", "entity_id", "unit", "period_start")
    with _migrated(dialect, tmp_path, "head") as (cfg, engine):
        with engine.begin() as conn:
            state.write(conn, ints(1, 2, 1), ints(5, 6, 7), values)
            for row in (copy, minute):
                conn.execute(
                    text(
                        f"INSERT INTO usage_rollups ({', '.join(columns)}) "
                        f"VALUES ({', '.join(':' + c for c in columns)})"
                    ),
                    row,
                )
        command.downgrade(cfg, "0017")
        with engine.connect() as conn:
            found = conn.execute(
                text(
                    f"SELECT {', '.join(columns)} FROM usage_rollups "
                    "ORDER BY scope, entity_id, unit"
                )
            ).all()
            blocks = conn.execute(
                text("SELECT scope, packed FROM usage_state WHERE part = 1 ORDER BY scope")
            ).all()
        widened = {**copy, "peak": 50, "peak_at": month + 3547, "ws_peak": 40}
        assert [r._asdict() for r in found] == [minute, widened]
        # 0017's slow part: 18 fields an entity, then the held rows (21 values each).
        for scope, packed in blocks:
            words = np.frombuffer(state.words(bytes(packed)), dtype=">i8").tolist()
            n = words[0]
            assert words[1 + n : 1 + 2 * n] == [18 + 21] * n, scope
            assert len(words) == 1 + 2 * n + (18 + 21) * n
        assert [k for k in columns if widened[k] != copy[k]] == ["peak", "peak_at", "ws_peak"]
        assert all(widened[k] == minute[k] for k in key[:2])

        command.upgrade(cfg, "0018")
        with engine.connect() as conn:
            scopes, ids, got = state.select(conn)
        assert list(zip(scopes.tolist(), ids.tolist(), strict=True)) == [(1, 5), (1, 7), (2, 6)]
        expected = values[[0, 2, 1]]
        expected[:, state.column("lag")] = -1
        assert (got == expected).all()


def test_closed_rows_not_settled_are_settled_when_the_entity_closes_rows_again(env: Env) -> None:
    """Closed rows wait to be settled (``Book.lag``; here, never by share): an app's 23:00 hour
    and its day close lagging by 23:59 (a new peak, 3, then), and their copies in usage_rollups
    say 1. When its 00:00 hour closes lagging by 00:59 (a new peak, 5), the hour and the day
    before are settled in that cycle (their copies say 3), and the 00:00 hour's copy lacks the
    5 (it says 3): every hour and day reads whole."""
    t = tenant("stats")
    client = redis.Redis.from_url(REDIS_URL)
    g, dc = GlobalStore(client, env.prefix), DatacenterStore(client, env.prefix, "dc1")
    meter = Meter(dc, "fe-l", liveness_timeout=10**6)
    app = str(t.app_id)
    midnight = 1_800_000_000 - 1_800_000_000 % 86_400  # 2027-01-15, not a month's first day
    aggregator = Aggregator(get_engine(), g, {"dc1": dc}, settle_within=None)

    at = Seconds(app, meter, g, dc, aggregator).at

    def copies(unit: Unit) -> dict[int, int]:
        with get_engine().connect() as conn:
            found = conn.execute(
                text(
                    "SELECT period_start, peak FROM usage_rollups WHERE scope = 1 "
                    "AND entity_id = :e AND unit = :u"
                ),
                {"e": t.app_id, "u": UNIT_CODES[unit]},
            )
            return dict(found.all())

    def peaks(unit: Unit) -> dict[str, int]:
        with get_engine().connect() as conn:
            q = query.Query(APP, t.app_id, unit, limit=10)
            return {e["intervalId"]: e["connections.all.peak"] for e in query.periods(conn, q)}

    def lag() -> int:
        with get_engine().connect() as conn:
            _, ids, values = state.select(conn, f"scope = 1 AND block = {t.app_id >> 6}")
        return int(values[ids == t.app_id, state.LAG_COLUMN][0])

    at(midnight - 110, opened=1)
    at(midnight - 50, opened=1)
    at(midnight - 20, opened=1)  # 23:59:40: 3
    at(midnight + 5, closed=1)  # 00:00:05: the 23:00 hour and the day close, lagging by 23:59
    at(midnight + 60)  # 23:59's row has left the state row
    day, hour = midnight - 86_400, midnight - 3600
    assert (copies(Unit.HOUR)[hour], copies(Unit.DAY)[day]) == (1, 1)
    assert lag() == midnight - 60
    assert peaks(Unit.HOUR) == {"2027-01-14:23": 3, "2027-01-15:00": 2}
    assert peaks(Unit.DAY) == {"2027-01-14": 3, "2027-01-15": 2}
    at(midnight + 1810, opened=1)  # 00:30:10: 3 (00:00's row leaves: its hour is written)
    at(midnight + 3570, opened=2)  # 00:59:30: 5
    at(midnight + 3605, closed=1)  # 01:00:05: the 00:00 hour closes, lagging by 00:59
    assert copies(Unit.HOUR) == {hour: 3, midnight: 3}
    assert copies(Unit.DAY)[day] == 3
    assert lag() == midnight + 3540
    assert peaks(Unit.HOUR) == {"2027-01-14:23": 3, "2027-01-15:00": 5, "2027-01-15:01": 4}
    assert peaks(Unit.DAY) == {"2027-01-14": 3, "2027-01-15": 5}
    client.close()
