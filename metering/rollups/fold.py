"""Folding 1-second samples and counter deltas into entity state and period rows, in memory.

Pure: no I/O. ``metering.rollups.service`` loads what it needs into a ``Book``, runs a
``Folder`` over one cycle's events in time order, and writes back exactly the states and rows
it marked dirty.

The book is column-wise (NumPy): one int64 matrix of states and one of current rows per unit,
an entity being a row index. A second's sample is folded for all the entities in it at once,
so a cycle costs a few array operations per second and per unit, not Python per entity, and
the garbage collector has a handful of arrays to walk instead of millions of objects.

Definitions (DESIGN.md): the value of an entity at a counted second is the tick's sample (an
entity absent from a sample kept its value). Peak and min are the extremes over the counted
seconds of a period; ``area`` is the sum of the value over the counted seconds, so the mean is
``area / seconds counted``. Seconds no tick counted (a paused worker) are in ``Coverage`` as
gaps: they add nothing, and they are not in the divisor either.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from metering.rollups.models import COUNTERS
from metering.rollups.periods import Unit, next_start, start_of

APP = 1
ACCOUNT = 2
SCOPES = {"app": APP, "account": ACCOUNT}

# Unit codes in the tables, finest first.
UNIT_CODES: dict[Unit, int] = {Unit.MINUTE: 1, Unit.HOUR: 2, Unit.DAY: 3, Unit.MONTH: 4}
UNITS = tuple(UNIT_CODES)
N_COUNTERS = len(COUNTERS)
CH_OPENED = COUNTERS.index("ch_opened")

Ints = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

# The columns of the state matrix (``models.UsageState`` without its key and unit columns).
S_CONNS, S_WS, S_CH, S_SINCE, S_AREA, S_CH_AREA = range(6)
S_COUNTERS = slice(6, 6 + N_COUNTERS)
S_WIDTH = 6 + N_COUNTERS
# The columns of a row matrix (``models.UsageRollup`` from ``period_start`` on, in its order).
R_START, R_CONNS0, R_WS0, R_CH0, R_AREA0, R_CH_AREA0 = range(6)
R_COUNTERS0 = slice(6, 6 + N_COUNTERS)
R_PEAK, R_PEAK_AT, R_MIN, R_WS_PEAK, R_CH_PEAK, R_CH_MIN = range(6 + N_COUNTERS, 12 + N_COUNTERS)
R_EXTREMES = slice(R_PEAK, R_CH_MIN + 1)
R_WIDTH = 12 + N_COUNTERS


def codes(scope: int | Ints, ids: Ints) -> Ints:
    """Entity codes: the id and the scope in one int64 (ids stay far below 2**61)."""
    return ids * 4 + scope


def split(code: Ints) -> tuple[Ints, Ints]:
    """(scopes, ids) of entity codes."""
    return code % 4, code // 4


def sum_by(keys: Ints, values: Ints) -> tuple[Ints, Ints]:
    """The distinct ``keys``, sorted, and per key the sum of the rows of ``values`` (a row per
    key) that have it: one sort and one ``add.reduceat`` (``np.add.at`` costs several times
    more), in integers."""
    if not keys.size:
        return keys, values
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    sums: Ints = np.add.reduceat(values, first, axis=0)
    return keys[first], sums


def period_start(unit: Unit, second: int) -> int:
    """The start (a second) of the period of ``unit`` containing ``second``."""
    if unit is Unit.MINUTE:
        return second - second % 60
    if unit is Unit.HOUR:
        return second - second % 3600
    if unit is Unit.DAY:
        return second - second % 86400
    return int(start_of(unit, datetime.fromtimestamp(second, UTC)).timestamp())


def period_starts(unit: Unit, seconds: Ints) -> Ints:
    """``period_start`` of each of ``seconds`` (-1 stays -1)."""
    if unit is Unit.MONTH:
        months = seconds.astype("datetime64[s]").astype("datetime64[M]")
        out: Ints = months.astype("datetime64[s]").astype(np.int64)
    else:
        length = {Unit.MINUTE: 60, Unit.HOUR: 3600, Unit.DAY: 86400}[unit]
        out = seconds - seconds % length
    return np.where(seconds < 0, -1, out)


def widen(rows: Ints, later: Ints, where: Mask) -> None:
    """Widen the extremes of ``rows`` (in place), where ``where``, by those of ``later``: rows
    of the same entities over later seconds (the peak's time stays the first it was reached).
    A row with no counted second (``R_PEAK`` -1) adds nothing, and takes the other's."""
    where = where & (later[:, R_PEAK] >= 0)
    fresh = where & (rows[:, R_PEAK] < 0)
    rows[fresh, R_EXTREMES] = later[fresh, R_EXTREMES]
    both = where & ~fresh
    a, b = rows[both], later[both]
    up = b[:, R_PEAK] > a[:, R_PEAK]
    a[up, R_PEAK] = b[up, R_PEAK]
    a[up, R_PEAK_AT] = b[up, R_PEAK_AT]
    a[:, R_MIN] = np.minimum(a[:, R_MIN], b[:, R_MIN])
    a[:, R_WS_PEAK] = np.maximum(a[:, R_WS_PEAK], b[:, R_WS_PEAK])
    a[:, R_CH_PEAK] = np.maximum(a[:, R_CH_PEAK], b[:, R_CH_PEAK])
    a[:, R_CH_MIN] = np.minimum(a[:, R_CH_MIN], b[:, R_CH_MIN])
    rows[both] = a


def derived_rows(  # noqa: PLR0917 (the parts of one row, in order)
    unit: Unit, starts: Ints, stored: Ints, found: Mask, held: Ints, minute: Ints
) -> tuple[Ints, Mask]:
    """Rows of ``unit`` (one per entity, the periods starting at ``starts``) as they are now:
    the copy in ``usage_rollups`` (``stored``, where ``found``), or else the start values of the
    entity's minute row in its state row that began with it (``held``, the closed one it
    holds, or ``minute``, its latest), widened by those minute rows that lie in the period
    (``Book``: an hour, day or month row is written lazily). Also which rows exist: found, or
    begun with one of those minute rows."""
    out = stored.copy()
    out[:, R_START] = starts
    began = starts >= 0
    by_held = ~found & began & (held[:, R_START] == starts)
    by_minute = ~found & began & ~by_held & (minute[:, R_START] == starts)
    out[by_held] = held[by_held]
    out[by_minute] = minute[by_minute]
    exists = found | by_held | by_minute
    # In time order: the copy (or the minute row it began with), the held row, the latest.
    widen(out, held, exists & ~by_held & (period_starts(unit, held[:, R_START]) == starts))
    widen(out, minute, exists & ~by_minute & (period_starts(unit, minute[:, R_START]) == starts))
    return out, exists


def period_end(unit: Unit, start: int) -> int:
    if unit is Unit.MINUTE:
        return start + 60
    if unit is Unit.HOUR:
        return start + 3600
    if unit is Unit.DAY:
        return start + 86400
    return int(next_start(unit, datetime.fromtimestamp(start, UTC)).timestamp())


class Coverage:
    """Which seconds a tick counted: every second from ``first`` through ``last``, except gaps.

    ``gaps`` are (second, missed): the counted ``second`` came after ``missed`` seconds nobody
    counted, ``second - missed`` through ``second - 1``. Gaps are rare (a paused worker), so
    they are kept whole in memory.
    """

    def __init__(
        self, first: int | None, last: int | None, gaps: Iterable[tuple[int, int]] = ()
    ) -> None:
        self.first = first
        self.last = last
        self._ends: list[int] = []
        self._missed: list[int] = []
        for second, missed in sorted(gaps):
            self._ends.append(second)
            self._missed.append(missed)

    def advance(self, second: int, missed: int) -> None:
        """Count ``second``, after ``missed`` uncounted seconds."""
        if self.first is None:
            self.first = second
        elif missed > 0:
            self._ends.append(second)
            self._missed.append(missed)
        self.last = second

    def covered(self, start: int, end: int) -> int:
        """How many counted seconds lie in ``[start, end)``."""
        if self.first is None or self.last is None:
            return 0
        a, b = max(start, self.first), min(end, self.last + 1)
        if b <= a:
            return 0
        n = b - a
        i = bisect.bisect_right(self._ends, a)
        while i < len(self._ends):
            gap_end = self._ends[i]
            gap_start = gap_end - self._missed[i]
            if gap_start >= b:
                break
            n -= max(0, min(gap_end, b) - max(gap_start, a))
            i += 1
        return n

    def first_covered(self, start: int, end: int) -> int | None:
        """The first counted second in ``[start, end)``, if any."""
        if self.first is None or self.last is None:
            return None
        a, b = max(start, self.first), min(end, self.last + 1)
        while a < b:
            i = bisect.bisect_right(self._ends, a)
            if i < len(self._ends) and self._ends[i] - self._missed[i] <= a:
                a = self._ends[i]  # inside a gap: jump to the counted second that ends it
                continue
            return a
        return None

    def last_covered(self, start: int, end: int) -> int | None:
        """The last counted second in ``[start, end)``, if any."""
        if self.first is None or self.last is None:
            return None
        a, b = max(start, self.first), min(end, self.last + 1) - 1
        while b >= a:
            i = bisect.bisect_right(self._ends, b)
            if i < len(self._ends) and self._ends[i] - self._missed[i] <= b:
                b = self._ends[i] - self._missed[i] - 1  # inside a gap: go to before it
                continue
            return b
        return None

    def gaps(self) -> list[tuple[int, int]]:
        return list(zip(self._ends, self._missed, strict=True))

    def counted_before(self, x: Ints) -> Ints:
        """Per element of ``x``: how many counted seconds lie before it (vectorised)."""
        if self.first is None or self.last is None:
            return np.zeros_like(x)
        at = np.clip(x, self.first, self.last + 1)
        n = at - self.first
        if self._ends:
            ends = np.asarray(self._ends, dtype=np.int64)
            missed = np.asarray(self._missed, dtype=np.int64)
            starts = ends - missed
            before = np.concatenate(([0], np.cumsum(missed)))
            k = np.searchsorted(ends, at, side="right")  # gaps wholly before ``at``
            n -= before[k]
            inside = np.minimum(k, len(ends) - 1)  # the gap ``at`` may lie in
            n -= np.where((k < len(ends)) & (starts[inside] < at), at - starts[inside], 0)
        return n

    def covered_since(self, since: Ints, end: int) -> Ints:
        """Per element of ``since``: the counted seconds in ``[since, end)`` (vectorised)."""
        bound = np.array([end], dtype=np.int64)
        counted: Ints = np.maximum(self.counted_before(bound) - self.counted_before(since), 0)
        return counted


class Book:
    """Every entity the aggregator knows: its state and its latest row per unit.

    Entity ``i`` is row ``i`` of ``state`` (``S_*`` columns) and of ``rows[u]`` (``R_*``
    columns) for each unit ``u``, finest first; a row whose ``R_START`` is -1 does not exist
    yet, one whose ``R_PEAK`` is -1 has no counted second yet. ``held[i]`` is a minute row
    of the entity that closed and is not in Postgres's ``usage_rollups`` yet, but in its state
    row (``R_START`` -1: none; ``service.Aggregator`` moves them). ``dirty_state`` and
    ``dirty_starts`` (a latest row began: its start and start values) mark what a cycle
    changed (``Folder`` clears them when it starts).

    An hour, day or month row (``u`` >= 1) is written to ``usage_rollups`` lazily: what it
    holds beyond the copy there can be read from the minute rows in the state row, because a
    coarser row's extremes are those of its minute rows, and a row that began in the minute
    the state's minute row (or held row) began has that row's start values
    (``derived_rows``). ``stored[u, i]``: the entity's latest row of unit ``u`` is in
    ``usage_rollups`` (its start values, and its extremes as of ``unsynced``);
    ``unsynced[u, i]``: the start of the earliest minute in which it changed since it was
    written (-1: it has not). The aggregator writes it when that minute's row is no longer in
    the state row, or when it closes (``Folder.closed``).

    A row that closed is read the same way: ``deferred[u, i]`` is an hour, day or month row of
    the entity that closed having changed since written only in the minute of its held row
    (or begun with it), not written when it closes (``R_START`` -1: none). One begun with
    that minute (no copy in ``usage_rollups``) is inserted with the held row, and is the held
    row until then. One with a copy there (``deferred_stored[u, i]``) is that copy widened by
    the minute's row, and is settled (merged) later, a share per cycle: ``lag[i]`` is the
    start of that minute (-1: nothing to settle), kept in the state row, so that readers and
    a restarted aggregator widen the copies of the periods it lies in by its row, from the
    state row while it is held, from ``usage_rollups`` after.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.size = 0
        self.codes: Ints = np.zeros(capacity, dtype=np.int64)
        self.state: Ints = np.zeros((capacity, S_WIDTH), dtype=np.int64)
        self.rows: Ints = np.zeros((len(UNITS), capacity, R_WIDTH), dtype=np.int64)
        self.rows[:, :, R_START] = -1
        self.rows[:, :, R_PEAK] = -1
        self.held: Ints = np.zeros((capacity, R_WIDTH), dtype=np.int64)
        self.held[:, R_START] = -1
        self.deferred: Ints = np.zeros((len(UNITS), capacity, R_WIDTH), dtype=np.int64)
        self.deferred[:, :, R_START] = -1
        self.deferred_stored: Mask = np.zeros((len(UNITS), capacity), dtype=np.bool_)
        self.lag: Ints = np.full(capacity, -1, dtype=np.int64)
        self.dirty_state: Mask = np.zeros(capacity, dtype=np.bool_)
        self.dirty_starts: Mask = np.zeros(capacity, dtype=np.bool_)
        self.stored: Mask = np.zeros((len(UNITS), capacity), dtype=np.bool_)
        self.unsynced: Ints = np.full((len(UNITS), capacity), -1, dtype=np.int64)
        self._sorted: Ints = np.zeros(0, dtype=np.int64)  # codes, sorted
        self._order: Ints = np.zeros(0, dtype=np.int64)  # their entity indices

    def find(self, code: Ints) -> Ints:
        """The entity index of each code, -1 for an unknown one."""
        if not self._sorted.size:
            return np.full(code.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._sorted, code), self._sorted.size - 1)
        return np.where(self._sorted[pos] == code, self._order[pos], -1)

    def index(self, code: Ints, since: int) -> Ints:
        """The entity index of each (distinct) code, adding the unknown ones as of ``since``."""
        idx = self.find(code)
        new = idx < 0
        if new.any():
            idx[new] = self.add(code[new], since)
        return idx

    def add(self, code: Ints, since: int) -> Ints:
        """Add entities (new, distinct codes) holding nothing since ``since``; each one's index.

        A batch is added in code order, so that the entities of a sample (sorted by code) lie
        in the order of their indices, and folding it walks the matrices forwards."""
        start, end = self.size, self.size + len(code)
        self._grow(end)
        order = np.argsort(code, kind="stable")
        self.codes[start:end] = code[order]
        self.state[start:end] = 0
        self.state[start:end, S_SINCE] = since
        self.size = end
        self._sorted = self.codes[:end].copy()
        self._order = np.argsort(self._sorted, kind="stable").astype(np.int64)
        self._sorted = self._sorted[self._order]
        idx = np.empty(len(code), dtype=np.int64)
        idx[order] = np.arange(start, end, dtype=np.int64)
        return idx

    def _grow(self, needed: int) -> None:
        capacity = len(self.codes)
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        extra = capacity - len(self.codes)
        self.codes = np.concatenate([self.codes, np.zeros(extra, dtype=np.int64)])
        self.state = np.concatenate([self.state, np.zeros((extra, S_WIDTH), dtype=np.int64)])
        more = np.zeros((len(UNITS), extra, R_WIDTH), dtype=np.int64)
        more[:, :, R_START] = -1
        more[:, :, R_PEAK] = -1
        self.rows = np.concatenate([self.rows, more], axis=1)
        self.held = np.concatenate([self.held, more[0]])
        self.deferred = np.concatenate([self.deferred, more], axis=1)
        self.deferred_stored = np.concatenate(
            [self.deferred_stored, np.zeros((len(UNITS), extra), dtype=np.bool_)], axis=1
        )
        self.lag = np.concatenate([self.lag, np.full(extra, -1, dtype=np.int64)])
        self.dirty_state = np.concatenate([self.dirty_state, np.zeros(extra, dtype=np.bool_)])
        self.dirty_starts = np.concatenate([self.dirty_starts, np.zeros(extra, dtype=np.bool_)])
        self.stored = np.concatenate(
            [self.stored, np.zeros((len(UNITS), extra), dtype=np.bool_)], axis=1
        )
        self.unsynced = np.concatenate(
            [self.unsynced, np.full((len(UNITS), extra), -1, dtype=np.int64)], axis=1
        )


class Closed(NamedTuple):
    """Rows of unit index ``unit`` that a cycle closed, as they were then: the entities'
    ``codes`` and ``rows``; ``since``, the start of the earliest minute in which each changed
    since written (``Book.unsynced``; a minute row's own start), and ``stored``, whether
    ``usage_rollups`` has a copy of it (``Book.stored``; never for a minute row)."""

    unit: int
    codes: Ints
    rows: Ints
    since: Ints
    stored: Mask


class Folder:
    """Applies one cycle's events, in time order, to a ``Book``.

    Rows a cycle closed (a period ended for the entity: its first event in a later one) are kept
    in ``closed`` as they were when closed, every minute row and the other rows with changes
    not in ``usage_rollups`` (``Book.unsynced``); the book then holds the entity's new row.
    """

    def __init__(self, book: Book, coverage: Coverage) -> None:
        self.book = book
        self.coverage = coverage
        book.dirty_state[:] = False
        book.dirty_starts[:] = False
        self.closed: list[Closed] = []
        self._starts_second = -1
        self._starts: tuple[int, ...] = ()

    @property
    def dirty(self) -> bool:
        return bool(self.closed) or bool(self.book.dirty_state.any())

    def starts(self, second: int) -> tuple[int, ...]:
        if second != self._starts_second:
            self._starts_second = second
            self._starts = tuple(period_start(u, second) for u in UNITS)
        return self._starts

    def values(self, second: int, code: Ints, conns: Ints, ws: Ints, channels: Ints) -> None:
        """The entities' (distinct codes) values at the counted ``second`` (a sample)."""
        if not code.size:
            return
        book = self.book
        idx = book.index(code, second)
        s = book.state
        # Each gather below reads the entities' state rows whole (one gather of the columns
        # needed, not one per column): at 100 000 entities the matrices are far bigger than the
        # CPU's caches, and what a cycle costs per entity is mostly memory traffic.
        held = s[idx, S_CONNS : S_CH + 1]
        changing = (held[:, 0] != conns) | (held[:, 1] != ws) | (held[:, 2] != channels)
        self._touch(idx, second, changing)
        if not changing.any():
            return
        idx = idx[changing]
        conns, ws, channels = conns[changing], ws[changing], channels[changing]
        now = s[idx, : S_CH_AREA + 1]  # the values held, since when, their integrals
        n = self.coverage.covered_since(now[:, S_SINCE], second)
        now[:, S_AREA] += now[:, S_CONNS] * n
        now[:, S_CH_AREA] += now[:, S_CH] * n
        now[:, S_SINCE] = second
        now[:, S_CONNS] = conns
        now[:, S_WS] = ws
        now[:, S_CH] = channels
        s[idx, : S_CH_AREA + 1] = now
        book.dirty_state[idx] = True
        # A coarser row's extremes contain its finer rows' (the hour's range holds the minute's):
        # a value that moves no minute extreme moves no hour, day or month one either.
        rows = book.rows
        for u in range(len(UNITS)):
            # A row whose period starts where the finer unit's does (at an hour's start, the
            # hour and its first minute) began with the same event and has had the same counted
            # seconds: its extremes are the finer row's, and move with them (``idx`` moved there).
            like = rows[u, idx, R_START] == rows[u - 1, idx, R_START] if u else None
            if like is None or not like.any():
                moved = self._include(u, idx, conns, ws, channels, second)
            else:
                moved = like.copy()
                rows[u, idx[like], R_EXTREMES] = rows[u - 1, idx[like], R_EXTREMES]
                other = ~like
                if other.any():
                    moved[other] = self._include(
                        u, idx[other], conns[other], ws[other], channels[other], second
                    )
            if not moved.any():
                break
            self._changed(u, idx[moved], second)
            if not moved.all():
                idx, conns, ws, channels = idx[moved], conns[moved], ws[moved], channels[moved]

    def count(self, second: int, code: Ints, deltas: Ints) -> None:
        """Add counter ``deltas`` (one row per distinct code, ``COUNTERS`` order) at ``second``."""
        if not code.size:
            return
        book = self.book
        idx = book.index(code, second)
        self._touch(idx, second, np.zeros(len(idx), dtype=np.bool_))
        book.state[idx, S_COUNTERS] += deltas
        book.dirty_state[idx] = True

    def _touch(self, idx: Ints, second: int, changing: Mask) -> None:
        """Make sure the entities have a row for each period containing ``second``."""
        book, cov, s = self.book, self.coverage, self.book.state
        starts = self.starts(second)
        for u, start in enumerate(starts):
            rows = book.rows[u]
            rolling = rows[idx, R_START] != start
            if not rolling.any():
                # Units finest first: an entity whose latest row of one unit is of the period
                # containing ``second`` was touched in that period, so its coarser latest rows
                # are of the periods containing ``second`` too (only the entities that began a
                # period of one unit are looked at for the next).
                return
            # The same entities begin a period with the same start as in the finer unit (at
            # an hour's start, its hour and its minute; at a month's, all four): the row just
            # begun there is this one too, start values and carried extremes alike.
            like_finer = u > 0 and starts[u - 1] == start and bool(rolling.all())
            ir = idx = idx[rolling]
            changing = changing[rolling]
            # The rows this closes: all minute rows (they were only ever in the state) and
            # the other units' rows that changed since written (the others are in Postgres as
            # they are).
            if u == 0:
                done = ir[rows[ir, R_START] >= 0]
                since, stored = rows[done, R_START], np.zeros(done.size, dtype=np.bool_)
            else:
                done = ir[book.unsynced[u, ir] >= 0]
                since, stored = book.unsynced[u, done], book.stored[u, done]
            if done.size:
                self.closed.append(Closed(u, book.codes[done], rows[done], since, stored))
            if like_finer:
                rows[ir] = book.rows[u - 1, ir]
                book.stored[u, ir] = False
                book.unsynced[u, ir] = -1
                self._changed(u, ir, second)
                continue
            n = cov.covered_since(s[ir, S_SINCE], start)
            new = np.zeros((len(ir), R_WIDTH), dtype=np.int64)
            new[:, R_START] = start
            new[:, R_CONNS0] = s[ir, S_CONNS]
            new[:, R_WS0] = s[ir, S_WS]
            new[:, R_CH0] = s[ir, S_CH]
            new[:, R_AREA0] = s[ir, S_AREA] + s[ir, S_CONNS] * n
            new[:, R_CH_AREA0] = s[ir, S_CH_AREA] + s[ir, S_CH] * n
            new[:, R_COUNTERS0] = s[ir, S_COUNTERS]
            new[:, R_PEAK] = -1
            rows[ir] = new
            book.stored[u, ir] = False
            book.unsynced[u, ir] = -1
            self._changed(u, ir, second)
            book.dirty_state[ir] = True  # its latest row moved on
            book.dirty_starts[ir] = True
            # The carried value held at the period's counted seconds before this event (and
            # at this second too, for an entity whose value does not change in it).
            for which, first in (
                (changing, cov.first_covered(start, second)),
                (~changing, cov.first_covered(start, second + 1)),
            ):
                sel = ir[which]
                if first is not None and sel.size:
                    self._include(u, sel, s[sel, S_CONNS], s[sel, S_WS], s[sel, S_CH], first)

    def _include(  # noqa: PLR0917 (internal, called with the columns in order)
        self, u: int, idx: Ints, conns: Ints, ws: Ints, channels: Ints, at: int
    ) -> Mask:
        """Take values held at the counted second ``at`` into the rows' extremes; which moved.

        Which move is decided first, from the extremes as they are: after a period's first
        seconds most values move none, and only the rows of those that do are rewritten."""
        rows = self.book.rows[u]
        old = rows[idx, R_EXTREMES]
        fresh = old[:, 0] < 0  # no counted second yet: the value is every extreme
        moved: Mask = (
            fresh
            | (conns > old[:, 0])
            | (conns < old[:, 2])
            | (ws > old[:, 3])
            | (channels > old[:, 4])
            | (channels < old[:, 5])
        )
        sel = np.flatnonzero(moved)
        if not sel.size:
            return moved
        new, fresh = old[sel], fresh[sel]
        conns, ws, channels = conns[sel], ws[sel], channels[sel]
        up = fresh | (conns > new[:, 0])
        new[:, 0] = np.where(up, conns, new[:, 0])
        new[:, 1] = np.where(up, at, new[:, 1])
        new[:, 2] = np.where(fresh, conns, np.minimum(new[:, 2], conns))
        new[:, 3] = np.where(fresh, ws, np.maximum(new[:, 3], ws))
        new[:, 4] = np.where(fresh, channels, np.maximum(new[:, 4], channels))
        new[:, 5] = np.where(fresh, channels, np.minimum(new[:, 5], channels))
        rows[idx[sel], R_EXTREMES] = new
        return moved

    def _changed(self, u: int, idx: Ints, second: int) -> None:
        """The entities' latest rows of unit ``u`` changed at ``second``: for an hour, day or
        month row not changed since written, note the minute (``Book.unsynced``)."""
        if u == 0 or not idx.size:
            return
        unsynced = self.book.unsynced[u]
        first = idx[unsynced[idx] < 0]
        unsynced[first] = self.starts(second)[0]
