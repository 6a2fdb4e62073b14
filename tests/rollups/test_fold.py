"""The column-wise folder, on hand-computed cases: a cycle across a period's end, a period
opened by a counter alone, the vectorised coverage against the scalar one, and the sums per
key that counter deltas are added up with."""

from __future__ import annotations

import random

import numpy as np

from metering.rollups.fold import (
    APP,
    N_COUNTERS,
    R_AREA0,
    R_CONNS0,
    R_COUNTERS0,
    R_MIN,
    R_PEAK,
    R_PEAK_AT,
    R_START,
    S_AREA,
    Book,
    Coverage,
    Folder,
    codes,
    sum_by,
)
from metering.rollups.models import COUNTERS

HOUR = 3600
T = 1_800_000_000 - 1_800_000_000 % HOUR + 600  # a minute's start, not an hour's
MINUTE, HOUR_UNIT = 0, 1
ONE = codes(APP, np.array([7], dtype=np.int64))


def fold_value(folder: Folder, second: int, conns: int | None) -> None:
    """One counted second; ``conns`` None: the app is not in the sample (no change)."""
    last = folder.coverage.last
    folder.coverage.advance(second, 0 if last is None else second - last - 1)
    if conns is not None:
        v = np.array([conns], dtype=np.int64)
        folder.values(second, ONE, v, v, np.zeros(1, dtype=np.int64))


def test_a_cycle_across_a_minute_end_writes_the_closed_minute_whole() -> None:
    book, cov = Book(), Coverage(None, None)
    folder = Folder(book, cov)
    series = {T - 5: 3, T - 4: 5, T - 3: 9, T - 2: 4, T - 1: 2, T: 6, T + 1: None, T + 2: 1}
    for second, conns in series.items():
        fold_value(folder, second, conns)

    [(unit, code, closed, since, stored)] = folder.closed
    assert (unit, code.tolist()) == (MINUTE, ONE.tolist())
    assert (since.tolist(), stored.tolist()) == ([T - 60], [False])  # (a minute row's own)
    old = closed[0]
    assert old[R_START] == T - 60
    assert (old[R_PEAK], old[R_PEAK_AT], old[R_MIN]) == (9, T - 3, 2)
    assert old[R_AREA0] == 0  # the first second counted is T - 5

    new = book.rows[MINUTE, 0]
    assert new[R_START] == T
    assert (new[R_CONNS0], new[R_AREA0]) == (2, 3 + 5 + 9 + 4 + 2)
    assert (new[R_PEAK], new[R_PEAK_AT], new[R_MIN]) == (6, T, 1)
    hour = book.rows[HOUR_UNIT, 0]
    assert (hour[R_START], hour[R_PEAK], hour[R_PEAK_AT], hour[R_MIN]) == (T - 600, 9, T - 3, 1)
    # The state holds the integral up to its last change (T + 2: 6 for two seconds after T).
    assert book.state[0, S_AREA] == 23 + 6 + 6
    # The hour, day and month rows began at T - 5 and are not in usage_rollups: they changed in
    # the minute starting at T - 60 (written once that minute's row leaves the state row).
    assert (book.unsynced[1:, 0] == T - 60).all()
    assert not book.stored[1:, 0].any()
    assert book.dirty_state[0]


def test_a_minute_opened_by_messages_alone_carries_the_connections_held() -> None:
    book, cov = Book(), Coverage(None, None)
    first = Folder(book, cov)
    fold_value(first, T - 2, 4)
    fold_value(first, T - 1, None)

    second = Folder(book, cov)  # the next cycle: nothing changes but messages at T
    fold_value(second, T, None)
    deltas = np.zeros((1, N_COUNTERS), dtype=np.int64)
    deltas[0, COUNTERS.index("pub_n")] = 5
    second.count(T, ONE, deltas)

    # The minute before moves to usage_rollups now (it was only ever in the state row); the
    # hour goes on.
    [(unit, _code, closed, _since, _stored)] = second.closed
    assert (unit, closed[0][R_START], closed[0][R_PEAK]) == (MINUTE, T - 60, 4)
    row = book.rows[MINUTE, 0]
    assert row[R_START] == T
    assert (row[R_PEAK], row[R_PEAK_AT], row[R_MIN]) == (4, T, 4)  # held at T, not absent
    assert row[R_COUNTERS0][COUNTERS.index("pub_n")] == 0  # the messages came in this minute
    assert book.dirty_starts[0]  # the minute row began again
    # The hour's extremes did not move: it changed in the minute before only.
    assert book.unsynced[HOUR_UNIT, 0] == T - 60


def test_vectorised_coverage_matches_the_scalar_one() -> None:
    rng = random.Random(3)
    for _ in range(50):
        cov = Coverage(None, None)
        second = rng.randrange(1000)
        cov.advance(second, 0)
        for _ in range(rng.randrange(8)):
            missed = rng.choice([0, 0, rng.randrange(1, 30)])
            second += missed + 1
            cov.advance(second, missed)
        assert cov.first is not None
        since = np.array([rng.randrange(cov.first - 20, second + 20) for _ in range(40)])
        for end in (cov.first, second, second + 1, rng.randrange(cov.first, second + 30)):
            expected = [cov.covered(int(s), end) for s in since]
            assert cov.covered_since(since.astype(np.int64), end).tolist() == expected


def test_sums_per_key_add_every_row_of_a_key_exactly() -> None:
    keys = np.array([9, 3, 9, 5, 3, 9], dtype=np.int64)
    big = 2**62  # beyond what a float holds exactly: the sums stay integers
    values = np.array([[1, big], [2, 0], [4, 1], [8, 0], [16, 0], [32, 2]], dtype=np.int64)
    distinct, sums = sum_by(keys, values)
    assert distinct.tolist() == [3, 5, 9]
    assert sums.tolist() == [[18, 0], [8, 0], [37, big + 3]]
    none, nothing = sum_by(keys[:0], values[:0])
    assert none.size == 0
    assert nothing.shape == (0, 2)
