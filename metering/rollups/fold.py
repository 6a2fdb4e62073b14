"""Folding 1-second samples and counter deltas into entity state and period rows, in memory.

Pure: no I/O. ``metering.rollups.service`` loads what it needs, runs a ``Folder`` over one
cycle's events in time order, and writes back exactly the states and rows it marked dirty.

Definitions (DESIGN.md): the value of an entity at a counted second is the tick's sample (an
entity absent from a sample kept its value). Peak and min are the extremes over the counted
seconds of a period; ``area`` is the sum of the value over the counted seconds, so the mean is
``area / seconds counted``. Seconds no tick counted (a paused worker) are in ``Coverage`` as
gaps: they add nothing, and they are not in the divisor either.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

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

Key = tuple[int, int]  # (scope, entity id)


def period_start(unit: Unit, second: int) -> int:
    """The start (a second) of the period of ``unit`` containing ``second``."""
    if unit is Unit.MINUTE:
        return second - second % 60
    if unit is Unit.HOUR:
        return second - second % 3600
    if unit is Unit.DAY:
        return second - second % 86400
    return int(start_of(unit, datetime.fromtimestamp(second, UTC)).timestamp())


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


@dataclass(slots=True)
class Row:
    """One period row: what was carried in at its start, and its extremes so far."""

    start: int
    conns0: int
    ws0: int
    channels0: int
    area0: int
    ch_area0: int
    counters0: list[int]
    peak: int = -1  # -1: no counted second yet
    peak_at: int = 0
    min: int = 0
    ws_peak: int = 0
    ch_peak: int = 0
    ch_min: int = 0

    def include(self, conns: int, ws: int, channels: int, at: int) -> bool:
        """Take the value held at the counted second ``at`` into the extremes; True if moved."""
        if self.peak < 0:
            self.peak, self.peak_at, self.min = conns, at, conns
            self.ws_peak, self.ch_peak, self.ch_min = ws, channels, channels
            return True
        moved = False
        if conns > self.peak:
            self.peak, self.peak_at, moved = conns, at, True
        if conns < self.min:
            self.min, moved = conns, True
        if ws > self.ws_peak:
            self.ws_peak, moved = ws, True
        if channels > self.ch_peak:
            self.ch_peak, moved = channels, True
        if channels < self.ch_min:
            self.ch_min, moved = channels, True
        return moved


@dataclass(slots=True)
class State:
    """An app's or account's value now, and its running totals (see ``models.UsageState``)."""

    conns: int = 0
    ws: int = 0
    channels: int = 0
    since: int = 0
    area: int = 0
    ch_area: int = 0
    counters: list[int] = field(default_factory=lambda: [0] * N_COUNTERS)
    # The latest row per unit (finest first); None: none yet.
    rows: list[Row | None] = field(default_factory=lambda: [None] * len(UNITS))


@dataclass(slots=True)
class Dirty:
    states: set[Key] = field(default_factory=set)
    # Every row written to in this cycle, by (key, unit index, period start): a cycle that
    # crosses a period's end writes both the row it closed and the one it opened.
    rows: dict[tuple[Key, int, int], Row] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.states or self.rows)


class Folder:
    """Applies events in time order to ``states``, recording what it changed in ``dirty``."""

    def __init__(self, states: dict[Key, State], coverage: Coverage) -> None:
        self.states = states
        self.coverage = coverage
        self.dirty = Dirty()
        self._starts_second = -1
        self._starts: tuple[int, ...] = ()

    def starts(self, second: int) -> tuple[int, ...]:
        if second != self._starts_second:
            self._starts_second = second
            self._starts = tuple(period_start(u, second) for u in UNITS)
        return self._starts

    def _state(self, key: Key, second: int) -> State:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = State(since=second)
        return state

    def _touch(self, key: Key, state: State, second: int, *, changing: bool) -> None:
        """Make sure the entity has a row for each period containing ``second``."""
        cov = self.coverage
        for i, start in enumerate(self.starts(second)):
            row = state.rows[i]
            if row is not None and row.start == start:
                continue
            n = cov.covered(state.since, start)
            row = Row(
                start=start,
                conns0=state.conns,
                ws0=state.ws,
                channels0=state.channels,
                area0=state.area + state.conns * n,
                ch_area0=state.ch_area + state.channels * n,
                counters0=list(state.counters),
            )
            # The carried value held at the period's counted seconds before this event.
            first = cov.first_covered(start, second if changing else second + 1)
            if first is not None:
                row.include(state.conns, state.ws, state.channels, first)
            state.rows[i] = row
            self.dirty.rows[(key, i, start)] = row
            self.dirty.states.add(key)  # its latest row moved on

    def value(self, key: Key, second: int, conns: int, ws: int, channels: int) -> None:
        """The entity's value at the counted ``second`` (a sample)."""
        state = self._state(key, second)
        changing = (conns, ws, channels) != (state.conns, state.ws, state.channels)
        self._touch(key, state, second, changing=changing)
        if not changing:
            return
        n = self.coverage.covered(state.since, second)
        state.area += state.conns * n
        state.ch_area += state.channels * n
        state.since = second
        state.conns, state.ws, state.channels = conns, ws, channels
        for i, row in enumerate(state.rows):
            if row is not None and row.include(conns, ws, channels, second):
                self.dirty.rows[(key, i, row.start)] = row
        self.dirty.states.add(key)

    def count(self, key: Key, second: int, deltas: Sequence[int]) -> None:
        """Add counter ``deltas`` (in ``COUNTERS`` order) at the counted ``second``."""
        state = self._state(key, second)
        self._touch(key, state, second, changing=False)
        counters = state.counters
        for i, d in enumerate(deltas):
            counters[i] += d
        self.dirty.states.add(key)
