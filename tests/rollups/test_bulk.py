"""The bulk writes the aggregator's cycle makes: a binary COPY that Postgres reads back as
sent, and writing states as they now are (updated where they exist, inserted where not) on
Postgres and on SQLite alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, text

from metering.core.database import make_engine
from metering.core.migrate import upgrade
from metering.rollups import bulk
from metering.rollups.service import STATE_COLUMNS
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
    """A state row per (entity id, value): scope 1, every other column the value."""
    out = np.zeros((len(entities), len(STATE_COLUMNS)), dtype=np.int64)
    for i, (entity, value) in enumerate(entities):
        out[i] = value
        out[i, :2] = (1, entity)
    return out


def stored(engine: Engine) -> dict[int, list[int]]:
    with engine.connect() as conn:
        found = conn.execute(text(f"SELECT {', '.join(STATE_COLUMNS)} FROM usage_state")).all()
    return {r[1]: list(r[2:]) for r in found}


def replace(engine: Engine, rows: np.ndarray) -> None:
    with engine.begin() as conn:
        bulk.replace_array(
            conn, "usage_state", columns=STATE_COLUMNS, keys=("scope", "entity_id"), rows=rows
        )


def test_states_are_written_as_they_now_are_whether_or_not_they_were_there(
    engine: Engine,
) -> None:
    width = len(STATE_COLUMNS) - 2
    replace(engine, states((1, 10), (2, 20)))  # all new
    assert stored(engine) == {1: [10] * width, 2: [20] * width}

    replace(engine, states((2, 21), (1, 11)))  # all there: updated
    assert stored(engine) == {1: [11] * width, 2: [21] * width}

    replace(engine, states((3, 30), (1, 12), (4, 40)))  # some there, some new
    assert stored(engine) == {
        1: [12] * width, 2: [21] * width, 3: [30] * width, 4: [40] * width
    }  # fmt: skip

    replace(engine, states((3, 30), (1, 12), (4, 40)))  # the same again (a replay): no change
    assert len(stored(engine)) == 4


def test_a_binary_copy_reads_back_as_the_matrix_it_was_built_from() -> None:
    rng = np.random.default_rng(7)
    rows = rng.integers(-(2**62), 2**62, size=(1000, 5), dtype=np.int64)
    rows[0] = [0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max]
    assert (bulk.parse_binary_copy(bytes(bulk.binary_copy(rows)), [8] * 5) == rows).all()
