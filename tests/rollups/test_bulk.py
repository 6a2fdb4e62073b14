"""The bulk writes the aggregator's cycle makes: a binary COPY that Postgres reads back as
sent, writing the blocks of entity states as they now are (replaced where they exist,
inserted where not), refusing blocks of another shape, and
inserting closed minute rows (merged instead, should one be there already) on Postgres and on
SQLite alike."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from metering.core.database import make_engine
from metering.core.migrate import upgrade
from metering.rollups import bulk, state
from metering.rollups.service import _ROW_MERGE, ROW_COLUMNS
from metering.rollups.state import ALL, FIELDS, HELD_ROW, HELD_WIDTH, WIDTH, as_mapping, pack
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


def values_of(*entities: tuple[int, int, int]) -> np.ndarray:
    """Each (scope, entity id, value)'s values as the aggregator writes them: every field the
    value, the last field minus it (big-endian bytes of negative numbers, too), no held row."""
    out = np.full((len(entities), ALL), -1, dtype=np.int64)
    for i, (_, _, value) in enumerate(entities):
        out[i, : len(FIELDS)] = value
        out[i, len(FIELDS) - 1] = -value
    return out


def stored(engine: Engine) -> dict[tuple[int, int], list[int]]:
    """Every entity's values as the aggregator loads them, by (scope, id); ``select`` returns
    them in that order."""
    with engine.connect() as conn:
        scopes, ids, values = state.select(conn)
    keys = list(zip(scopes.tolist(), ids.tolist(), strict=True))
    assert keys == sorted(keys)
    return dict(zip(keys, values.tolist(), strict=True))


def write(engine: Engine, *entities: tuple[int, int, int]) -> int:
    scopes = np.array([s for s, _, _ in entities], dtype=np.int64)
    ids = np.array([e for _, e, _ in entities], dtype=np.int64)
    with engine.begin() as conn:
        return state.write(conn, scopes, ids, values_of(*entities))


def expected(*entities: tuple[int, int, int]) -> dict[tuple[int, int], list[int]]:
    return {(s, e): values_of((s, e, v))[0].tolist() for s, e, v in entities}


def test_blocks_are_written_as_they_now_are_whether_or_not_they_were_there(
    engine: Engine,
) -> None:
    """64 ids of a scope to a row: ids 1 and 63 share one, 64 begins the next, and scope 2's
    id 1 is apart from scope 1's. Each write gives every member of the blocks it touches."""
    first = ((1, 1, 10), (1, 63, 630), (1, 64, 640), (2, 1, 21))
    assert write(engine, *first) == 2 * 3  # all new: both parts of each block
    assert stored(engine) == expected(*first)

    again = ((2, 1, 22), (1, 64, 641), (1, 1, 11), (1, 63, 631))  # (any order)
    assert write(engine, *again) == 2 * 3  # all there: replaced
    assert stored(engine) == expected(*again)

    some = ((1, 1, 12), (1, 2, 20), (1, 63, 632), (1, 200, 2000))  # block 0 and a new one
    assert write(engine, *some) == 2 * 2
    assert stored(engine) == expected(*some, (1, 64, 641), (2, 1, 22))
    assert write(engine, *some) == 2 * 2  # the same again (a replay): no change
    assert stored(engine) == expected(*some, (1, 64, 641), (2, 1, 22))

    with engine.connect() as conn:  # one entity as the stats API reads it
        one = state.packed_of(conn, 1, 63)
        assert state.packed_of(conn, 1, 3) is None  # in a block, not in it
        assert state.packed_of(conn, 2, 200) is None  # no such block
        rows = conn.execute(text("SELECT scope, part, block FROM usage_state ORDER BY 1, 2, 3"))
    assert one == pack(dict.fromkeys(FIELDS[:-1], 632) | {FIELDS[-1]: -632})
    assert one[:8] == (632).to_bytes(8, "big")
    assert [tuple(r) for r in rows] == [
        (1, state.NOW, 0), (1, state.NOW, 1), (1, state.NOW, 3),
        (1, state.ROWS, 0), (1, state.ROWS, 1), (1, state.ROWS, 3),
        (2, state.NOW, 0), (2, state.ROWS, 0),
    ]  # fmt: skip


def test_entities_of_two_widths_share_a_block_and_read_back_each_as_written(
    engine: Engine,
) -> None:
    """An entity holding a closed minute row is wider (``state.HELD_ROW``): both kinds in one
    block, each read back whole, and a held row leaves when the entity is written without it."""
    wide = values_of((1, 2, 20))
    wide[0, len(FIELDS) :] = 7
    both = np.concatenate([values_of((1, 1, 10)), wide, values_of((1, 5, 50))])
    with engine.begin() as conn:
        state.write(conn, np.ones(3, np.int64), np.array([1, 2, 5]), both)
    with engine.connect() as conn:
        found = {e: state.packed_of(conn, 1, e) for e in (1, 2, 5)}
        sizes = dict(conn.execute(text("SELECT part, length(packed) FROM usage_state")).all())
    # Per part: the count, 3 ids, 3 widths, each entity's fields of the part (21 that change
    # whenever it does, 19 that change when a row begins or closed rows are settled), and the
    # held row with the latter.
    assert sizes == {
        state.NOW: 8 * (1 + 2 * 3 + 3 * 21),
        state.ROWS: 8 * (1 + 2 * 3 + 3 * 19 + len(HELD_ROW)),
    }
    assert [len(found[e] or b"") for e in (1, 2, 5)] == [WIDTH, HELD_WIDTH, WIDTH]
    assert as_mapping(found[1] or b"")["held"] is None
    got = as_mapping(found[2] or b"")
    assert (got["held"], got["held_ch_min"], got["conns"]) == (7, 7, 20)
    assert as_mapping(found[5] or b"")["conns"] == 50
    assert stored(engine)[(1, 2)] == both[1].tolist()

    with engine.begin() as conn:
        state.write(
            conn,
            np.ones(3, np.int64),
            np.array([1, 2, 5]),
            values_of((1, 1, 10), (1, 2, 20), (1, 5, 50)),
        )
    with engine.connect() as conn:
        assert as_mapping(state.packed_of(conn, 1, 2) or b"")["held"] is None


def test_an_entity_given_twice_is_refused_before_anything_is_written(engine: Engine) -> None:
    twice = ((1, 5, 50), (1, 1, 10), (1, 5, 51))
    with pytest.raises(ValueError, match="twice"):
        write(engine, *twice)
    assert stored(engine) == {}


def _block(*words: int) -> bytes:
    """A usage_state value of these words, as it is stored (byte planes)."""
    return state.planes(struct.pack(f">{len(words)}q", *words))


@pytest.mark.parametrize(
    ("part", "value", "what"),
    [
        (state.NOW, _block(1, 1, 21, *range(21))[:-3], "a length that is not words"),
        (state.NOW, _block(1, 1, 21, *range(20)), "a value short of a field"),
        (state.NOW, _block(1, 1, 22, *range(22)), "a width of neither kind"),
        (state.ROWS, _block(1, 1, 20, *range(20)), "a width of neither kind"),
        (state.NOW, _block(0), "no entity"),
        (state.NOW, _block(1, 64, 21, *range(21)), "an id of another block"),
        (state.NOW, _block(2, 3, 1, 21, 21, *range(42)), "ids out of order"),
        (state.NOW, b"\x00" * 8 * len(FIELDS), "one entity's value, as before migration 0014"),
        (state.NOW, state.words(_block(1, 1, 21, *range(21))), "words, as before migration 0015"),
        (state.NOW, _block(1, 1, 21, *range(21)), "one part of an entity and not the other"),
    ],
)
def test_a_block_of_another_shape_is_refused_with_the_migration_to_run(
    engine: Engine, part: int, value: bytes, what: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO usage_state (scope, part, block, packed) VALUES (1, :t, 0, :p)"),
            {"t": part, "p": value},
        )
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="metering db upgrade"):
            state.select(conn)
        with pytest.raises(ValueError, match="metering db upgrade"):
            state.packed_of(conn, 1, 1)


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
