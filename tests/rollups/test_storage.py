"""How the aggregator stores what it knows: counter marks apply only what a total holds
beyond them, and the migrations to the packed marks and to the minute row held in the state
carry the data both ways."""

from __future__ import annotations

import json

import numpy as np
from alembic import command
from sqlalchemy import create_engine, text

from metering.core.migrate import alembic_config
from metering.rollups.marks import Marks
from tests.scratch import scratch_database


def ints(*rows: object) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def test_only_what_a_total_holds_beyond_its_mark_is_applied() -> None:
    marks = Marks()
    first = marks.apply(ints(7, 3), ints([1, 0, 5, 500, 0, 0], [2, 0, 1, 10, 1, 10]))
    assert first.tolist() == [[1, 0, 5, 500, 0, 0], [2, 0, 1, 10, 1, 10]]
    assert marks.apps.tolist() == [3, 7]  # kept sorted

    # The same totals again (a retried read): nothing; a later total: the difference only;
    # a total below its mark (never, for a cumulative counter): nothing, and the mark stays.
    again = marks.apply(ints(3, 7, 9), ints([2, 0, 1, 10, 1, 10], [4, 0, 5, 600, 0, 0], [1] * 6))
    assert again.tolist() == [[0] * 6, [3, 0, 0, 100, 0, 0], [1] * 6]
    below = marks.apply(ints(7), ints([0, 0, 5, 600, 0, 0]))
    assert below.tolist() == [[0] * 6]
    assert marks.totals[marks.apps.tolist().index(7)].tolist() == [4, 0, 5, 600, 0, 0]

    stored = Marks.unpack(marks.pack())
    assert stored.apps.tolist() == [3, 7, 9]
    assert stored.totals.tolist() == marks.totals.tolist()


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
            marks = Marks.unpack(packed)
            assert marks.apps.tolist() == [3, 12]
            assert marks.totals.tolist() == [totals["3"], totals["12"]]
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
