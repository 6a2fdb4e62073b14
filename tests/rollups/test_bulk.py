"""The bulk writes the aggregator's cycle makes: a binary COPY that Postgres reads back as
sent, writing states as they now are (updated where they exist, inserted where not), and
inserting closed minute rows (merged instead, should one be there already) on Postgres and on
SQLite alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from metering.core.database import make_engine
from metering.core.migrate import upgrade
from metering.rollups import bulk
from metering.rollups.service import _ROW_MERGE, ROW_COLUMNS
from metering.rollups.state import FIELDS, HELD_ROW, HELD_WIDTH, WIDTH, as_mapping, pack
from tests.scratch import scratch_database


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'bulk.db'}"
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()
        return
    with scratch_database() as url:
        eng = make_engine(url)
        yield eng
        eng.dispose()


def states(*entities: tuple[int, int]) -> np.ndarray:
    """A packed state per (entity id, value): every field the value, the last one minus it
    (big-endian bytes of negative numbers, too)."""
    out = np.zeros((len(entities), len(FIELDS)), dtype=np.int64)
    for i, (_, value) in enumerate(entities):
        out[i] = value
        out[i, -1] = -value
    return out


def stored(engine: Engine) -> dict[int, list[int]]:
    with engine.connect() as conn:
        scope, entity, packed = bulk.select_packed(
            conn, "SELECT scope, entity_id, packed FROM usage_state", len(FIELDS)
        )
    assert set(scope.tolist()) <= {1}
    return dict(zip(entity.tolist(), packed.tolist(), strict=True))


def replace(engine: Engine, *entities: tuple[int, int]) -> None:
    ids = np.array([e for e, _ in entities], dtype=np.int64)
    with engine.begin() as conn:
        scope = np.ones(len(ids), np.int64)
        bulk.replace_packed(conn, "usage_state", [(scope, ids, bulk.Packed.of(states(*entities)))])


def test_states_are_written_as_they_now_are_whether_or_not_they_were_there(
    engine: Engine,
) -> None:
    def held(value: int) -> list[int]:
        return [value] * (len(FIELDS) - 1) + [-value]

    replace(engine, (1, 10), (2, 20))  # all new
    assert stored(engine) == {1: held(10), 2: held(20)}

    replace(engine, (2, 21), (1, 11))  # all there: updated
    assert stored(engine) == {1: held(11), 2: held(21)}

    replace(engine, (3, 30), (1, 12), (4, 40))  # some there, some new
    assert stored(engine) == {1: held(12), 2: held(21), 3: held(30), 4: held(40)}

    replace(engine, (3, 30), (1, 12), (4, 40))  # the same again (a replay): no change
    assert len(stored(engine)) == 4
    with engine.connect() as conn:  # as Postgres and SQLite store it: 8 big-endian bytes each
        blob = conn.execute(text("SELECT packed FROM usage_state WHERE entity_id = 3")).scalar()
    assert bytes(blob) == pack(dict.fromkeys(FIELDS[:-1], 30) | {FIELDS[-1]: -30})
    assert bytes(blob)[:8] == (30).to_bytes(8, "big")


def test_states_of_two_widths_go_in_one_write_and_read_back_each_as_written(
    engine: Engine,
) -> None:
    """A state row holding a closed minute row is wider (``state.HELD_ROW``): both kinds in
    one write, each read back whole, and a held row leaves when the row is written narrow."""
    narrow = states((1, 10))
    wide = np.concatenate([states((2, 20)), np.full((1, len(HELD_ROW)), 7)], axis=1)
    ones = np.ones(1, np.int64)
    with engine.begin() as conn:
        bulk.replace_packed(
            conn, "usage_state",
            [(ones, ones, bulk.Packed.of(narrow)), (ones, ones + 1, bulk.Packed.of(wide))],
        )  # fmt: skip
    with engine.connect() as conn:
        found = dict(conn.execute(text("SELECT entity_id, packed FROM usage_state")).all())
    assert len(found[1]) == WIDTH
    assert len(found[2]) == HELD_WIDTH
    assert as_mapping(bytes(found[1]))["held"] is None
    got = as_mapping(bytes(found[2]))
    assert got["held"] == 7
    assert got["held_ch_min"] == 7
    assert got["conns"] == 20

    with engine.begin() as conn:
        bulk.replace_packed(conn, "usage_state", [(ones, ones + 1, bulk.Packed.of(narrow))])
    with engine.connect() as conn:
        again = conn.execute(text("SELECT packed FROM usage_state WHERE entity_id = 2")).scalar()
    assert as_mapping(bytes(again))["held"] is None


def test_a_state_of_another_width_is_refused_with_the_migration_to_run(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO usage_state (scope, entity_id, packed) VALUES (1, 1, :p)"),
            {"p": b"\x00" * 8 * (len(FIELDS) - 1)},
        )
    with engine.connect() as conn, pytest.raises(ValueError, match="metering db upgrade"):
        bulk.select_packed(conn, "SELECT scope, entity_id, packed FROM usage_state", len(FIELDS))


def test_a_binary_copy_reads_back_as_the_matrix_it_was_built_from() -> None:
    rng = np.random.default_rng(7)
    # Over two chunks' worth, and a part of one: the chunks join into one COPY.
    rows = rng.integers(-(2**62), 2**62, size=(2 * bulk.CHUNK_ROWS + 3, 5), dtype=np.int64)
    rows[0] = [0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    chunks = list(bulk.binary_copy(rows))
    assert len(chunks) == 2 + 3  # the header, three chunks, the trailer
    assert (bulk.parse_binary_copy(b"".join(chunks), [8] * 5) == rows).all()


def minute_row(entity: int, start: int, peak: int, low: int) -> list[int]:
    """A minute row of ``usage_rollups`` (scope 1) with ``peak`` and ``min``; the rest 7."""
    values = dict.fromkeys(ROW_COLUMNS, 7) | {
        "scope": 1, "entity_id": entity, "unit": 1, "period_start": start, "peak": peak,
        "peak_at": start + 1, "min": low,
    }  # fmt: skip
    return [values[c] for c in ROW_COLUMNS]


def insert(engine: Engine, rows: list[list[int]]) -> None:
    with engine.begin() as conn:
        bulk.upsert_array(
            conn, "usage_rollups", columns=ROW_COLUMNS, keys=ROW_COLUMNS[:4],
            rows=np.array(rows, dtype=np.int64), merge=_ROW_MERGE, new=True,
        )  # fmt: skip


def rollups(engine: Engine) -> list[tuple[int, ...]]:
    with engine.connect() as conn:
        found = conn.execute(
            text(f"SELECT {', '.join(ROW_COLUMNS)} FROM usage_rollups ORDER BY entity_id")
        ).all()
    return [tuple(r) for r in found]


def test_new_minute_rows_are_inserted_as_given_and_one_already_there_is_merged(
    engine: Engine,
) -> None:
    start = 1_780_000_020 - 1_780_000_020 % 60
    big = 2**40 + 3  # a bigint column keeps what does not fit in 32 bits
    first = [minute_row(3, start, 5, 2), minute_row(1, start, big, 1)]
    insert(engine, first)
    assert rollups(engine) == [tuple(first[1]), tuple(first[0])]

    # A replay the design rules out (the row is there already): merged, the cycle not lost.
    insert(engine, [minute_row(2, start, 4, 4), minute_row(3, start, 9, 3)])
    stored = {r[1]: r for r in rollups(engine)}
    assert sorted(stored) == [1, 2, 3]
    assert stored[3][ROW_COLUMNS.index("peak")] == 9  # GREATEST
    assert stored[3][ROW_COLUMNS.index("peak_at")] == start + 1
    assert stored[3][ROW_COLUMNS.index("min")] == 2  # LEAST
    assert stored[2] == tuple(minute_row(2, start, 4, 4))


def test_a_typed_binary_copy_refuses_a_value_its_column_cannot_hold() -> None:
    rows = np.array([[1, 2**15]], dtype=np.int64)
    assert bulk.parse_binary_copy(b"".join(bulk.binary_copy(rows[:, :1], [2])), [2]) == [[1]]
    with pytest.raises(ValueError, match="outside 2-byte integers"):
        bulk.binary_copy(rows, [2, 2])
