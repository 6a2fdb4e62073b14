"""The aggregation cycle: samples and counter deltas since the watermark -> Postgres rollups.

One transaction per cycle holds the cursor row's lock, writes the changed states and rows,
the applied counter marks and the new watermark, and commits them together (DESIGN.md
invariants 3 and 4): a cycle killed anywhere before the commit leaves nothing behind and the
next one reads the same samples and the same counter totals again; a cycle that committed is
never applied twice, because the watermark and the marks moved with it. Only after the commit
are the folded samples trimmed and reaped incarnations' counters deleted, both idempotent.

The process keeps what it loaded (states, current rows, marks) between cycles, tagged with
the cycle number it reflects; a cycle that finds another number in the cursor (another worker
ran one) reloads from Postgres.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from sqlalchemy import Connection, Engine, select, text, update

from metering.accounts.models import App
from metering.core.logging import get_logger
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import bulk, source, state
from metering.rollups.fold import (
    ACCOUNT,
    APP,
    CH_OPENED,
    N_COUNTERS,
    R_CH_PEAK,
    R_COUNTERS0,
    R_EXTREMES,
    R_PEAK,
    R_START,
    R_WIDTH,
    S_CH,
    S_CONNS,
    S_COUNTERS,
    UNITS,
    Book,
    Closed,
    Coverage,
    Folder,
    Ints,
    Mask,
    codes,
    derived_rows,
    period_starts,
    split,
    sum_by,
    widen,
)
from metering.rollups.marks import Marks
from metering.rollups.models import (
    COUNTERS,
    FRONTEND_COUNTERS,
    UsageCursor,
    UsageGap,
    UsageMark,
)
from metering.rollups.periods import Unit

log = get_logger(__name__)

T = TypeVar("T")
Parts = list[tuple[int, Ints, Ints]]  # ``_row_matrix``'s: (unit index, codes, book rows)
# ``_counter_deltas``'s: apps, their counters' deltas, incarnations marked, reaped ones read.
_Deltas = tuple[Ints, Ints, set[tuple[str, str]], list[tuple[str, list[str]]]]

ROW_COLUMNS = (
    "scope", "entity_id", "unit", "period_start", "conns0", "ws0", "channels0", "area0",
    "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
_ROW_MERGE = {
    "peak_at": "CASE WHEN excluded.peak > {t}.peak THEN excluded.peak_at ELSE {t}.peak_at END",
    "peak": "{greatest}({t}.peak, excluded.peak)",
    "min": "{least}({t}.min, excluded.min)",
    "ws_peak": "{greatest}({t}.ws_peak, excluded.ws_peak)",
    "ch_peak": "{greatest}({t}.ch_peak, excluded.ch_peak)",
    "ch_min": "{least}({t}.ch_min, excluded.ch_min)",
}
_FROM_FRONTEND = [COUNTERS.index(c) for c in FRONTEND_COUNTERS]
# A closed minute row held in its state row (``state.HELD_ROW``) has moved to usage_rollups
# this many counted seconds after its minute ended: a minute's first cycle holds every busy
# entity's, and the next cycles until then (ten, at the 5 s default) move a like share each,
# with the hour, day and month rows they changed (at a month's start, three more rows each).
# Due 5 s before the entity's next minute can close: spread over as many cycles as there are,
# with one cycle's slack (a row still held then moves in the closing cycle, the longest).
HELD_WITHIN = 55
# An hour, day or month row that closed having changed since written only in the minute of
# the row the entity then held, with a copy in usage_rollups, is settled (merged) this many
# counted seconds after that minute's end at the latest, a share per cycle (``_settle``):
# at an hour's, day's or month's start every busy entity's rows close at once, and merging
# them with the held rows, over the next minute, made those cycles the longest of all (33 000
# merges in each at a month's start at 100 000 apps). Until settled, readers widen the copy
# by that minute's row (``Book.lag``).
SETTLE_WITHIN = 600


@dataclass(frozen=True, slots=True)
class CycleResult:
    committed: bool
    second: int | None = None  # the new watermark
    samples: int = 0
    states_written: int = 0
    rows_written: int = 0
    counters_applied: int = 0
    lost_seconds: int = 0
    duration: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AccountUsage:
    """Each account a cycle changed, with its usage in its latest month so far (what the
    limits are checked against): ``usage`` columns in ``USAGE_METRICS`` order."""

    accounts: Ints
    month_start: Ints  # the second each account's month began
    usage: Ints


# Peak connections and channels, messages published and delivered, and their bytes.
USAGE_METRICS = ("connections", "channels", "messages", "data")
# Called inside the cycle's transaction with the accounts it changed; what it returns runs
# after the commit (the limits check: alerts are recorded with the rollups that show them).
AccountsHook = Callable[[Connection, AccountUsage], Callable[[], None] | None]


@dataclass(slots=True)
class _Loaded:
    """What the process knows of Postgres as of ``cycle`` (see the module docstring)."""

    cycle: int
    book: Book
    coverage: Coverage
    marks: dict[tuple[str, str], Marks]
    retired: set[tuple[str, str]] = field(default_factory=set)
    # What usage_state holds of each entity's slowly changing part (``state.ROWS``, in
    # ``state.ALL`` columns), by entity index; entities past its end are in none of its rows.
    stored_rows: Ints = field(default_factory=lambda: np.zeros((0, state.ALL), np.int64))


class Aggregator:
    def __init__(
        self,
        engine: Engine,
        global_store: GlobalStore,
        datacenters: Mapping[str, DatacenterStore],
        *,
        max_samples: int = 3600,
        on_accounts: AccountsHook | None = None,
        held_within: int | None = HELD_WITHIN,
        settle_within: int | None = SETTLE_WITHIN,
    ) -> None:
        self.engine = engine
        # Counted seconds after its minute's end by which a closed minute row held in its
        # state row has moved to usage_rollups (0: in the cycle that closed it; None: only when
        # the entity's next minute row closes).
        self.held_within = held_within
        # Counted seconds after the end of the minute they lag by (``Book.lag``) by which closed
        # rows are settled (None: only when the entity's rows close again).
        self.settle_within = settle_within
        self.on_accounts = on_accounts
        self.global_store = global_store
        self.datacenters = datacenters
        self.max_samples = max_samples
        self._loaded: _Loaded | None = None
        # Tests only: hold each cycle this long just before its commit and just after it, so
        # a test can kill the worker at those two points (tests/e2e/test_exactly_once.py).
        self._test_pause = float(os.environ.get("METERING_TEST_AGGREGATE_PAUSE", "0") or 0)
        # Each app's account, sorted by app (an app never changes account: cached).
        self._owner_apps: Ints = np.zeros(0, dtype=np.int64)
        self._owner_accounts: Ints = np.zeros(0, dtype=np.int64)
        keep_freed_memory()

    def run(self) -> CycleResult:
        started = time.perf_counter()
        # The cycle makes no reference cycles worth collecting (its data are a few arrays), so
        # a collection in the middle of it would walk every object of the process for nothing.
        collecting = gc.isenabled()
        gc.disable()
        try:
            result, after_commit = self._cycle()
        except BaseException:
            self._loaded = None  # memory may be ahead of what Postgres holds
            raise
        finally:
            if collecting:
                gc.enable()
        for action in after_commit:
            try:
                action()
            except Exception:
                log.warning("rollups.cleanup_failed", exc_info=True)
        duration = time.perf_counter() - started
        if result.committed:
            log.info(
                "rollups.cycle",
                second=result.second,
                samples=result.samples,
                states=result.states_written,
                rows=result.rows_written,
                ms=round(duration * 1000, 1),
            )
        return dataclasses.replace(result, duration=duration)

    # -- the cycle ---------------------------------------------------------------------

    def _cycle(self) -> tuple[CycleResult, list[Callable[[], None]]]:
        with self.engine.begin() as conn:
            cursor = self._lock(conn)
            if cursor is None:
                return CycleResult(committed=False, reason="another cycle is running"), []
            loaded = self._load(conn, cursor)
            watermark = cursor.second
            folder = Folder(loaded.book, loaded.coverage)
            gaps_before = len(loaded.coverage.gaps())

            cursors = json.loads(cursor.counter_cursors or "{}")
            with ExitStack() as reading:
                # Redis prepares the counters, and a thread reads them and takes them from
                # the marks (NumPy and the socket let it run beside the cycle), while the
                # samples are read and folded: nothing the samples change.
                counting = loaded.coverage.last is not None  # (a second is counted)
                counters = self._counters(loaded, cursors, reading) if counting else None
                got = self._samples(folder, watermark)
                if got is None:
                    if counters is not None:  # its marks moved, and this cycle commits nothing
                        self._loaded = None  # (``reading`` waits for its thread on the way out)
                    return CycleResult(committed=False, reason="no tick yet"), []
                samples, lost = got
                for sample in samples:
                    self._fold_sample(conn, folder, sample)
                if counters is None and loaded.coverage.last is not None:
                    counters = self._counters(loaded, cursors, reading)  # the first cycle
                applied, dirty_marks, retiring = self._fold_counters(
                    conn, folder, counters.result() if counters else None
                )
            counted_upto = loaded.coverage.last
            if not folder.dirty and not dirty_marks and counted_upto == watermark:
                return CycleResult(committed=False, second=watermark, reason="nothing new"), []

            horizons = {int(k): int(v) for k, v in json.loads(cursor.horizons or "{}").items()}
            states_written, rows_written = self._write(
                conn, loaded, folder, horizons, watermark, counted_upto
            )
            new_gaps = loaded.coverage.gaps()[gaps_before:]
            if new_gaps:
                bulk.upsert(
                    conn, "usage_gaps", columns=("second", "missed"), keys=("second",),
                    rows=new_gaps, merge={"missed": "excluded.missed"},
                )  # fmt: skip
            self._write_marks(conn, loaded, dirty_marks, counted_upto or 0)
            then = self._check_accounts(conn, folder.book)
            conn.execute(
                update(UsageCursor)
                .where(UsageCursor.id == 1)
                .values(
                    second=counted_upto,
                    first_second=loaded.coverage.first,
                    cycle=cursor.cycle + 1,
                    counter_cursors=json.dumps(cursors, sort_keys=True),
                )
            )
            self._pause("before_commit")
            loaded.cycle = cursor.cycle + 1
        self._pause("after_commit")
        after: list[Callable[[], None]] = [then] if then is not None else []
        if counted_upto is not None:
            after.append(lambda: source.trim_samples(self.global_store, counted_upto))
        for dc, incs in retiring:
            after.append(functools.partial(source.forget_incarnations, self.datacenters[dc], incs))
        return (
            CycleResult(
                committed=True,
                second=counted_upto,
                samples=len(samples),
                states_written=states_written,
                rows_written=rows_written,
                counters_applied=applied,
                lost_seconds=lost,
            ),
            after,
        )

    def _check_accounts(self, conn: Connection, book: Book) -> Callable[[], None] | None:
        if self.on_accounts is None:
            return None
        usage = account_usage(book)
        return self.on_accounts(conn, usage) if len(usage.accounts) else None

    def _pause(self, stage: str) -> None:
        if self._test_pause:
            log.info("rollups.test_pause", stage=stage)
            time.sleep(self._test_pause)

    def _lock(self, conn: Connection) -> UsageCursor | None:
        """The cursor row, locked until the commit; None when another cycle holds it."""
        if conn.dialect.name == "postgresql":
            query = (
                select(UsageCursor.__table__)
                .where(UsageCursor.id == 1)
                .with_for_update(skip_locked=True)
            )
        else:
            # SQLite locks the whole database for the first write: take it now.
            conn.execute(text("UPDATE usage_cursor SET cycle = cycle WHERE id = 1"))
            query = select(UsageCursor.__table__).where(UsageCursor.id == 1)
        row = conn.execute(query).first()
        if row is None:
            if conn.execute(select(UsageCursor.id)).first() is None:
                raise RuntimeError("usage_cursor has no row: run `metering db upgrade`")
            return None
        return UsageCursor(**row._mapping)

    # -- folding -----------------------------------------------------------------------

    def _samples(
        self, folder: Folder, watermark: int | None
    ) -> tuple[list[source.Columns], int] | None:
        """The samples to fold after ``watermark`` and the seconds lost before them (none
        when the stream goes on from it). Where it does not, every value is taken from the
        live snapshot into ``folder`` instead, and there are no samples to fold; None if no
        tick has counted a second after ``watermark`` yet."""
        samples = source.samples_after(self.global_store, watermark, self.max_samples)
        if samples and samples[0].origin:
            # The stream starts at the first second this Redis counted: fold it whole.
            # (With a watermark, that means Redis restarted empty: the samples before
            # went with it, and the new ones hold every value again.)
            if watermark is not None and samples[0].second <= watermark:
                samples = [s for s in samples if s.second > watermark]
            return samples, 0
        if watermark is not None and (
            not samples or samples[0].second - samples[0].gap == watermark
        ):
            return samples, 0
        snapshot = source.live_snapshot(self.global_store)
        if snapshot.second is None or (watermark is not None and snapshot.second <= watermark):
            return None
        lost = 0
        if watermark is not None:
            lost = snapshot.second - watermark - 1
            log.error(
                "rollups.samples_lost",
                after=watermark,
                resynced_at=snapshot.second,
                seconds=lost,
                hint="the aggregator fell behind METERING_SAMPLE_RETENTION",
            )
        self._resync(folder, snapshot, watermark)
        return [], lost

    def _counters(
        self, loaded: _Loaded, cursors: dict[str, list[object]], reading: ExitStack
    ) -> _Background[_Deltas]:
        """The counter totals that moved after each datacenter's cursor, asked for now and
        taken from the marks on a thread of their own (``_counter_deltas``); ``reading``
        closes their connections once the thread is done with them."""
        requested = self._request_counters(cursors, reading)
        counters = _Background(lambda: self._counter_deltas(loaded, cursors, requested))
        reading.callback(counters.join)  # (before the connections close: callbacks run last first)
        return counters

    def _fold_counters(
        self, conn: Connection, folder: Folder, deltas: _Deltas | None
    ) -> tuple[int, set[tuple[str, str]], list[tuple[str, list[str]]]]:
        """Fold the counters' ``deltas`` at the last second counted: how many apps' counters
        moved, the incarnations whose marks moved, and the reaped incarnations read."""
        if deltas is None:
            return 0, set(), []
        apps, summed, dirty, retiring = deltas
        if len(apps):
            sums = np.zeros((len(apps), N_COUNTERS), dtype=np.int64)
            sums[:, _FROM_FRONTEND] = summed
            assert folder.coverage.last is not None
            self._count(conn, folder, folder.coverage.last, apps, sums)
        return len(apps), dirty, retiring

    def _fold_sample(self, conn: Connection, folder: Folder, sample: source.Columns) -> None:
        last, second = folder.coverage.last, sample.second
        if sample.origin and last is not None:
            # A Redis that restarted empty: its first sample holds every value there is.
            folder.coverage.advance(second, second - last - 1)
            _take_all(folder, second, sample.values)
        else:
            folder.coverage.advance(second, sample.gap - 1)
            v = sample.values
            folder.values(second, v.code, v.conns, v.ws, v.channels)
        if sample.opened.size:
            deltas = np.zeros((len(sample.opened), N_COUNTERS), dtype=np.int64)
            deltas[:, CH_OPENED] = sample.opened
            self._count(conn, folder, second, sample.opened_apps, deltas)

    def _count(
        self, conn: Connection, folder: Folder, second: int, apps: Ints, deltas: Ints
    ) -> None:
        """Add counter ``deltas`` (a row per distinct app) to the apps, and their sums to the
        apps' accounts."""
        folder.count(second, codes(APP, apps), deltas)
        owners = self._owners_of(apps, conn)
        known = owners >= 0
        if not known.any():
            return
        accounts, sums = sum_by(owners[known], deltas[known])
        folder.count(second, codes(ACCOUNT, accounts), sums)

    def _resync(self, folder: Folder, snapshot: source.Snapshot, watermark: int | None) -> None:
        """Take every value from the live snapshot (the first cycle, or samples were lost)."""
        second = snapshot.second
        assert second is not None
        folder.coverage.advance(second, 0 if watermark is None else second - watermark - 1)
        _take_all(folder, second, snapshot.values)

    def _request_counters(
        self, cursors: Mapping[str, list[object]], reading: ExitStack
    ) -> list[tuple[str, source.CounterChanges, source.PendingCounters]]:
        """Per datacenter, the incarnations whose counters moved after its cursor, and their
        totals asked for (``source.request_counters``: read by ``_counter_deltas``)."""
        requested = []
        for dc, store in self.datacenters.items():
            epoch, seq = (cursors.get(dc) or [None, 0])[:2]
            after = int(seq) if isinstance(seq, int) else 0
            changes = source.counter_changes(store, after)
            if changes.epoch is None:
                continue
            if changes.epoch != epoch:  # a new Redis: its sequence started over, read it all
                changes = source.counter_changes(store, 0)
                after = 0
            pending = source.request_counters(store, changes.incarnations, after)
            requested.append((dc, changes, reading.enter_context(pending)))
        return requested

    def _counter_deltas(
        self,
        loaded: _Loaded,
        cursors: dict[str, list[object]],
        requested: list[tuple[str, source.CounterChanges, source.PendingCounters]],
    ) -> _Deltas:
        """Read each incarnation's counter totals and move its marks up to them: the apps
        whose totals held more (sorted), what they held beyond the marks summed over the
        incarnations (``FRONTEND_COUNTERS`` order), the incarnations whose marks moved, and
        per datacenter the reaped incarnations read (its cursor moved on)."""
        moved_apps: list[Ints] = [np.zeros(0, dtype=np.int64)]
        deltas: list[Ints] = [np.zeros((0, len(FRONTEND_COUNTERS)), dtype=np.int64)]
        dirty: set[tuple[str, str]] = set()
        retiring: list[tuple[str, list[str]]] = []
        for dc, changes, pending in requested:
            for inc, (apps, totals) in pending.result().items():
                beyond = loaded.marks.setdefault((dc, inc), Marks()).apply(apps, totals)
                moved = beyond.any(axis=1)
                if moved.any():
                    dirty.add((dc, inc))
                    moved_apps.append(apps[moved])
                    deltas.append(beyond[moved])
            gone = _retirements(dc, changes, loaded, dirty)
            if gone:
                retiring.append((dc, gone))
            cursors[dc] = [changes.epoch, changes.seq]
        # The same app on several incarnations: one sum per app.
        apps, summed = sum_by(np.concatenate(moved_apps), np.concatenate(deltas))
        return apps, summed, dirty, retiring

    def _owners_of(self, apps: Ints, conn: Connection) -> Ints:
        """Each app's account, -1 for an app Postgres does not know (asked again later)."""
        pos = np.searchsorted(self._owner_apps, apps)
        found = pos < len(self._owner_apps)
        found[found] = self._owner_apps[pos[found]] == apps[found]
        missing = apps[~found]
        if missing.size:
            new: list[tuple[int, int]] = []
            for start in range(0, len(missing), 10_000):
                chunk = [int(a) for a in missing[start : start + 10_000]]
                query = select(App.id, App.account_id).where(App.id.in_(chunk))
                new += [(a, acct) for a, acct in conn.execute(query).all()]
            if new:
                pairs = np.array(new, dtype=np.int64)
                every = np.concatenate([self._owner_apps, pairs[:, 0]])
                order = np.argsort(every, kind="stable")
                self._owner_apps = every[order]
                self._owner_accounts = np.concatenate([self._owner_accounts, pairs[:, 1]])[order]
                pos = np.searchsorted(self._owner_apps, apps)
                found = pos < len(self._owner_apps)
                found[found] = self._owner_apps[pos[found]] == apps[found]
        out = np.full(len(apps), -1, dtype=np.int64)
        out[found] = self._owner_accounts[pos[found]]
        return out

    # -- loading and writing -----------------------------------------------------------

    def _load(self, conn: Connection, cursor: UsageCursor) -> _Loaded:
        loaded = self._loaded
        if loaded is not None and loaded.cycle == cursor.cycle:
            return loaded
        book = Book()
        scope, entity, packed = state.select(conn)
        idx = book.add(codes(scope, entity), 0)
        book.state[idx] = packed[:, state.STATE_COLUMNS]
        book.rows[0, idx] = packed[:, state.MINUTE_COLUMNS]
        book.rows[1:, idx, R_START] = packed[:, state.STARTS_COLUMNS].T
        book.held[idx] = packed[:, state.HELD_COLUMNS]
        book.lag[idx] = packed[:, state.LAG_COLUMN]
        # The latest hour, day and month rows: where the entities' starts say they are in
        # usage_rollups, with what the minute rows in the state rows add (``Book``).
        every = np.arange(book.size)
        holding = every[book.held[: book.size, R_START] >= 0]
        for u in range(1, len(UNITS)):
            at = every[book.rows[u, : book.size, R_START] >= 0]
            starts = book.rows[u, at, R_START]
            now, stored, found = _derived(conn, book, u, at, starts, "latest")
            book.rows[u, at] = now
            book.stored[u, at] = found
            # Changed since written (or never written): as of the oldest minute row in the
            # state row (written when it leaves, as by the cycle that changed it).
            oldest = _oldest_minute(book.held[at, R_START], book.rows[0, at, R_START])
            unsynced = ~found | (now[:, R_EXTREMES] != stored[:, R_EXTREMES]).any(axis=1)
            book.unsynced[u, at] = np.where(unsynced, oldest, -1)
            # The rows that closed changed only in the minute of the held row (``Book``):
            # those its period lies in, where they differ from their copy (or have none).
            starts = period_starts(UNITS[u], book.held[holding, R_START])
            closed = starts != book.rows[u, holding, R_START]
            at, starts = holding[closed], starts[closed]
            now, stored, found = _derived(conn, book, u, at, starts, "closed")
            deferred = ~found | (now[:, R_EXTREMES] != stored[:, R_EXTREMES]).any(axis=1)
            book.deferred[u, at[deferred]] = now[deferred]
            book.deferred_stored[u, at[deferred]] = found[deferred]
        # The rows that closed changed only in a minute whose row has left the state row since,
        # not settled yet: their copies widened by that row, read back from usage_rollups.
        _load_lagging(conn, book)
        gaps = conn.execute(select(UsageGap.second, UsageGap.missed)).all()
        coverage = Coverage(cursor.first_second, cursor.second, [(g[0], g[1]) for g in gaps])
        marks: dict[tuple[str, str], Marks] = {}
        retired: set[tuple[str, str]] = set()
        for m in conn.execute(select(UsageMark.__table__)).all():
            marks[(m.datacenter, m.incarnation)] = Marks.unpack(m.packed)
            if m.retired:
                retired.add((m.datacenter, m.incarnation))
        self._loaded = _Loaded(cursor.cycle, book, coverage, marks, retired)
        self._loaded.stored_rows = _values(book)
        return self._loaded

    def _write(  # noqa: PLR0917 (internal)
        self,
        conn: Connection,
        loaded: _Loaded,
        folder: Folder,
        horizons: Mapping[int, int],
        before: int | None,
        now: int | None,
    ) -> tuple[int, int]:
        """The changed state rows (each with its latest minute row, its latest rows' starts and
        the closed minute row it holds, if any: ``state``), the changed hour, day and month
        rows, the hour, day and month rows that closed, and the minute rows that move to
        ``usage_rollups`` (``_minute_rows``, the cycle having counted the seconds after
        ``before`` through ``now``); a closed row older than its unit's retention
        horizon is dropped, not written back."""
        book = folder.book
        moved, leaving = self._minute_rows(folder, before, now)  # (which changes states: first)
        released = _released(book, leaving)  # (then what left with them)
        closing = _closing(book, folder.closed)
        settled = _settle(book, self.settle_within, before, now)
        unwritten, written = _coarse_rows(book)  # (as the minute rows left the state rows)
        idx = np.nonzero(book.dirty_state[: book.size] | book.dirty_starts[: book.size])[0]
        begun = book.dirty_starts[idx]
        assert (book.rows[:, idx[begun], R_START] >= 0).all(), "a row began for every unit"
        # Minute rows were only ever in the state, and coarser rows never written were only
        # ever there and in memory: new to usage_rollups (inserted). The others may be there
        # already (merged).
        inserted = _row_matrix([*moved, *released, *unwritten], horizons)
        merged = _row_matrix([*written, *closing, *settled], horizons)
        # Every changed entity's fast-changing part (``state.NOW``); the slow part
        # (``state.ROWS``) of those whose slow part differs from what usage_state holds.
        # An entity in no row yet gets both (a block's two rows hold the same entities).
        values = _values(book)
        stored = loaded.stored_rows[:, state.ROWS_COLUMNS]
        differs = np.ones(book.size, dtype=np.bool_)
        differs[: len(stored)] = (values[: len(stored), state.ROWS_COLUMNS] != stored).any(axis=1)
        now_idx = np.union1d(idx, np.arange(len(stored), book.size))
        now_blocks = _blocks_of(book, now_idx, values)
        rows_idx = np.flatnonzero(differs)  # (at a minute's start, the same entities: once)
        same = np.array_equal(rows_idx, now_idx)
        state.write(conn, *now_blocks, parts=(state.NOW,))
        state.write(conn, *(now_blocks if same else _blocks_of(book, rows_idx, values)),
                    parts=(state.ROWS,))  # fmt: skip
        loaded.stored_rows = values
        for block, new in ((inserted, True), (merged, False)):
            bulk.upsert_array(
                conn, "usage_rollups", columns=ROW_COLUMNS, keys=ROW_COLUMNS[:4], rows=block,
                merge=_ROW_MERGE, new=new,
            )  # fmt: skip
        return len(idx), len(inserted) + len(merged)

    def _minute_rows(
        self, folder: Folder, before: int | None, now: int | None
    ) -> tuple[Parts, Ints]:
        """The minute rows to write to usage_rollups now (as ``_row_matrix`` parts), and the
        entities whose held row leaves their state row.

        Each entity's latest minute row that closed this cycle is held in its state row
        (``Book.held``), so that a minute's first cycle, which closes every busy entity's
        minute row, does not write them all to usage_rollups as well. What goes there: any
        row the entity held already and the others it closed this cycle (a cycle that crossed
        several minutes); then, of the rows held before this cycle, a share: each is due
        ``held_within`` counted seconds after its minute's end, and moves with the share of
        the time left until then that this cycle counted (oldest first, then block by block;
        every row past due).
        The entities whose held row moves are written back without it, in the same
        transaction: a closed row is in usage_rollups or in its state row, never in both."""
        book = folder.book
        out: Parts = []
        leaving = [np.zeros(0, dtype=np.int64)]
        held = book.held[: book.size, R_START] >= 0
        closed = [(c.codes, c.rows) for c in folder.closed if c.unit == 0]
        if closed:
            code = np.concatenate([c for c, _ in closed])
            rows = np.concatenate([r for _, r in closed])
            idx = book.find(code)
            # folder.closed is in time order: an entity's last row in it is its latest.
            _, first_from_end = np.unique(idx[::-1], return_index=True)
            last = len(idx) - 1 - first_from_end
            earlier = np.ones(len(idx), dtype=np.bool_)
            earlier[last] = False
            out.append((0, code[earlier], rows[earlier]))
            latest = idx[last]
            had = latest[held[latest]]
            out.append((0, book.codes[had], book.held[had]))  # (indexing copies)
            leaving.append(had)
            book.held[latest] = rows[last]
            book.dirty_state[latest] = True
        if self.held_within is None or now is None:
            return out, np.concatenate(leaving)
        due_at = book.held[: book.size, R_START] + 60 + self.held_within
        movable = held  # held before this cycle, and any closed this cycle already due
        if closed:
            movable[latest] = due_at[latest] <= now
        candidates = np.flatnonzero(movable)
        candidates = _due_share(book, candidates, due_at[candidates], before, now)
        out.append((0, book.codes[candidates], book.held[candidates]))
        leaving.append(candidates)
        book.held[candidates, R_START] = -1
        book.dirty_state[candidates] = True
        return out, np.unique(np.concatenate(leaving))

    def _write_marks(
        self, conn: Connection, loaded: _Loaded, dirty: set[tuple[str, str]], second: int
    ) -> None:
        rows = [
            (
                dc,
                inc,
                loaded.marks.get((dc, inc), Marks()).pack(),
                (dc, inc) in loaded.retired,
                second,
            )
            for dc, inc in sorted(dirty)
        ]
        columns = ("datacenter", "incarnation", "packed", "retired", "updated")
        bulk.upsert(
            conn, "usage_marks", columns=columns, keys=columns[:2], rows=rows,
            merge={c: f"excluded.{c}" for c in columns[2:]},
        )  # fmt: skip


# glibc's mallopt parameters, and the values set: a block up to 1 GiB comes from the heap,
# and freed memory at the heap's top goes back to the system only past 2 GiB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1))


def keep_freed_memory() -> None:
    """Have the C allocator keep the memory a cycle frees for the next cycle, for the rest of
    the process (glibc; elsewhere nothing changes).

    A cycle at 100 000 apps makes and drops arrays of tens of MB. By default glibc hands each
    of those to the system when it is freed (``mmap`` above a threshold, and the heap's top
    trimmed), and the next cycle's arrays fault their pages in again, each zeroed by the
    kernel: on this kind of machine that ran at 250 to 350 MB/s, so that gathering 120 000
    entities' values (``_values``, 58 MB) took 100 to 145 ms instead of 17 to 21, and a
    new month's cycle 3.3 s instead of 2.5 (line-profiled, 2026-12-01). Kept, the process's
    resident memory stays at its largest cycle's, which every cycle needs again anyway."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc's C library
        return
    for param, value in _KEEP:
        if mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            log.info("rollups.mallopt_refused", param=param, value=value)


class _Background(Generic[T]):
    """``fn()`` run on a thread of its own from now; ``result()`` waits for it, then returns
    what it returned or raises what it raised. (A thread per use, not a pool: a pool made
    before a worker process forks would be left without its thread in the child.)"""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # (raised again by ``result``)
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _values(book: Book) -> Ints:
    """Every entity's value as ``usage_state`` holds it (``state.FIELDS`` then
    ``state.HELD_ROW``, a held start of -1 where an entity holds no closed minute row), by
    entity index."""
    n = book.size
    values = np.empty((n, state.ALL), dtype=np.int64)
    values[:, state.STATE_COLUMNS] = book.state[:n]
    values[:, state.MINUTE_COLUMNS] = book.rows[0, :n]
    values[:, state.STARTS_COLUMNS] = book.rows[1:, :n, R_START].T
    values[:, state.LAG_COLUMN] = book.lag[:n]
    values[:, state.HELD_COLUMNS] = book.held[:n]
    return values


def _blocks_of(book: Book, idx: Ints, values: Ints) -> tuple[Ints, Ints, Ints]:
    """The entities of every ``usage_state`` block that holds one of the entities ``idx``
    (scopes, ids, values: ``state.write``), in (scope, id) order."""
    scopes, ids = split(book.codes[: book.size])
    blocks = codes(scopes, state.block_of(ids))  # (scope, block) in one int64, as entities'
    touched = np.unique(blocks[idx])
    at = np.minimum(np.searchsorted(touched, blocks), max(touched.size - 1, 0))
    members = np.flatnonzero(touched[at] == blocks) if touched.size else idx
    members = members[np.lexsort((ids[members], scopes[members]))]  # as encode orders them
    return scopes[members], ids[members], values[members]


def _derived(  # noqa: PLR0917 (internal)
    conn: Connection, book: Book, u: int, at: Ints, starts: Ints, which: str
) -> tuple[Ints, Ints, Mask]:
    """The rows of unit index ``u`` of the entities ``at`` (indices, ascending) in the
    periods beginning at ``starts``, as they are now (``fold.derived_rows``), their copies in
    usage_rollups, and which have one; an error if one is in neither place."""
    stored = _copies(conn, book, u, at, starts)
    found = stored[:, R_START] >= 0
    now, exists = derived_rows(UNITS[u], starts, stored, found, book.held[at], book.rows[0, at])
    if not exists.all():
        raise ValueError(
            f"{int((~exists).sum())} {which} {UNITS[u].value} rows are neither in "
            "usage_rollups nor begun with a minute row in their state row"
        )
    return now, stored, found


def _released(book: Book, leaving: Ints) -> Parts:
    """The deferred hour, day and month rows (``Book.deferred``) never written, of the entities
    whose held row leaves their state row this cycle: begun with it, inserted with it. (Those
    with a copy in usage_rollups wait to be settled: ``_settle``.)"""
    new: Parts = []
    for u in range(1, len(UNITS)):
        idx = leaving[book.deferred[u, leaving, R_START] >= 0]
        idx = idx[~book.deferred_stored[u, idx]]
        new.append((u, book.codes[idx], book.deferred[u, idx]))
        book.deferred[u, idx, R_START] = -1
    return new


def _closing(book: Book, closed: list[Closed]) -> Parts:
    """The hour, day and month rows the cycle closed that are written now (merged), after the
    minute rows moved; the others are deferred (``Book.deferred``).

    A row is deferred when the entity now holds the minute row in which it changed since
    written (its ``since``), and its copy is in usage_rollups or it began with that minute:
    then it is the copy widened by the held row, or the held row, as readers and a restarted
    aggregator find it. At an hour's, day's and month's start every busy entity's rows close
    at once: those begun with the held row are written with it over the next cycles, those
    with a copy are settled over the next minutes (``_settle``), not all in one cycle.

    An entity whose rows closed before and are not settled yet (``Book.lag``: an entity idle
    since, or settling far behind) has those written now: it lags by one minute at most."""
    out: Parts = []
    coarse = [(c, book.find(c.codes)) for c in closed if c.unit != 0]
    if coarse:
        idx = np.concatenate([i for _, i in coarse])
        out += _settled(book, np.unique(idx[book.lag[idx] >= 0]))
    for c, idx in coarse:
        held = book.held[idx, R_START]
        defer = (c.since == held) & (c.stored | (c.rows[:, R_START] == held))
        out.append((c.unit, c.codes[~defer], c.rows[~defer]))
        at, rows, stored = idx[defer], c.rows[defer], c.stored[defer]
        # (One held row per entity: a row deferred before left with the held row it came
        # with; should one still be here, it is written now, never lost.)
        pending = at[book.deferred[c.unit, at, R_START] >= 0]
        out.append((c.unit, book.codes[pending], book.deferred[c.unit, pending]))
        book.deferred[c.unit, at] = rows
        book.deferred_stored[c.unit, at] = stored
        book.lag[at[stored]] = held[defer][stored]
    return out


def _settle(book: Book, within: int | None, before: int | None, now: int | None) -> Parts:
    """The deferred rows with a copy in usage_rollups (``Book.lag``) settled this cycle, to
    merge, once the row of the minute they lag by has left the state row: each entity's are
    due ``within`` counted seconds after that minute's end, and this cycle settles the share
    of the time left until then that it counted (oldest first, then block by block; every
    entity past due; ``_due_share``), as ``_minute_rows`` moves held rows."""
    if within is None or now is None:
        return []
    lag = book.lag[: book.size]
    lagging = np.flatnonzero((lag >= 0) & (lag != book.held[: book.size, R_START]))
    if not lagging.size:
        return []
    return _settled(book, _due_share(book, lagging, lag[lagging] + 60 + within, before, now))


def _due_share(book: Book, candidates: Ints, due_at: Ints, before: int | None, now: int) -> Ints:
    """Of the entities ``candidates``, each due at the counted second ``due_at``, those this
    cycle (the seconds after ``before`` through ``now``) takes: each one's share of the time
    left until it is due that the cycle counted, summed and rounded up, every one past due
    among them. Oldest first, then by scope and id: they lie in as few usage_state blocks as
    can be, and only those blocks' slow part is rewritten."""
    counted_from = now - 1 if before is None else before
    left = np.maximum(due_at - counted_from, 1)
    budget = int(np.ceil(np.minimum((now - counted_from) / left, 1.0).sum() - 1e-9))
    if budget >= len(candidates):
        return candidates
    scopes, ids = split(book.codes[candidates])
    return candidates[np.lexsort((ids, scopes, due_at))[:budget]]


def _settled(book: Book, idx: Ints) -> Parts:
    """The deferred rows with a copy in usage_rollups of the entities ``idx``, to merge now;
    they lag no more. (Those begun with their held row go with it: ``_released``.)"""
    out: Parts = []
    for u in range(1, len(UNITS)):
        at = idx[(book.deferred[u, idx, R_START] >= 0) & book.deferred_stored[u, idx]]
        out.append((u, book.codes[at], book.deferred[u, at]))
        book.deferred[u, at, R_START] = -1
    book.lag[idx] = -1  # (its slow part changed: ``_write`` rewrites it)
    return out


def _load_lagging(conn: Connection, book: Book) -> None:
    """``Book.deferred`` of the entities that lag by a minute no longer held (``Book.lag``):
    the copies of the closed rows of the periods that minute lies in, widened by its row in
    usage_rollups, where that changes them."""
    every = np.arange(book.size)
    lag = book.lag[: book.size]
    at = every[(lag >= 0) & (lag != book.held[: book.size, R_START])]
    if not at.size:
        return
    minutes = _copies(conn, book, 0, at, lag[at])
    for u in range(1, len(UNITS)):
        starts = period_starts(UNITS[u], lag[at])
        closed = (starts != book.rows[u, at, R_START]) & (minutes[:, R_PEAK] >= 0)
        idx, starts, minute = at[closed], starts[closed], minutes[closed]
        stored = _copies(conn, book, u, idx, starts)
        now = stored.copy()
        found = stored[:, R_START] >= 0
        widen(now, minute, found)
        deferred = found & (now[:, R_EXTREMES] != stored[:, R_EXTREMES]).any(axis=1)
        book.deferred[u, idx[deferred]] = now[deferred]
        book.deferred_stored[u, idx[deferred]] = True


def _copies(conn: Connection, book: Book, u: int, at: Ints, starts: Ints) -> Ints:
    """The rows of unit index ``u`` of the entities ``at`` (indices, ascending) in the periods
    beginning at ``starts``, as usage_rollups has them (``R_START`` -1 and no counted second
    where it has none)."""
    wanted = np.column_stack([*split(book.codes[at]), starts])
    rows = bulk.select_matching(
        conn, "usage_rollups", columns=ROW_COLUMNS, keys=("scope", "entity_id",
        "period_start"), wanted=wanted, where=f"r.unit = {u + 1}",
    )  # fmt: skip
    stored = np.full((len(at), R_WIDTH), -1, dtype=np.int64)
    pos = np.searchsorted(at, book.find(codes(rows[:, 0], rows[:, 1])))
    stored[pos] = rows[:, 3:]
    return stored


def _coarse_rows(
    book: Book,
) -> tuple[Parts, Parts]:
    """The latest hour, day and month rows to write to usage_rollups now (``_row_matrix``
    parts: those never written, then those written before), after the minute rows moved
    (``Book``): those changed in a minute whose row is no longer in the state row, and those
    begun in another minute than the state row's minute rows (their start values are nowhere
    else). The others can still be read from the state row; nothing else is written before
    they close (``Folder.closed``)."""
    size = book.size
    held, minute = book.held[:size, R_START], book.rows[0, :size, R_START]
    oldest = _oldest_minute(held, minute)
    unwritten: Parts = []
    written: Parts = []
    for u in range(1, len(UNITS)):
        unsynced, start = book.unsynced[u, :size], book.rows[u, :size, R_START]
        stored = book.stored[u, :size]
        begun_with = (start == held) | (start == minute)
        due = (unsynced >= 0) & ((unsynced < oldest) | (~stored & ~begun_with))
        for out, which in ((unwritten, due & ~stored), (written, due & stored)):
            idx = np.flatnonzero(which)
            out.append((u, book.codes[idx], book.rows[u, idx]))
        book.stored[u, :size][due] = True
        book.unsynced[u, :size][due] = -1
    return unwritten, written


def _oldest_minute(held: Ints, minute: Ints) -> Ints:
    """The start of the oldest minute row in each state row (the held one, else the latest;
    past every second where it has neither)."""
    none = np.iinfo(np.int64).max
    return np.where(held >= 0, held, np.where(minute >= 0, minute, none))


def _row_matrix(parts: Parts, horizons: Mapping[int, int]) -> Ints:
    """Rows of ``usage_rollups`` (``ROW_COLUMNS``) from (unit index, codes, book rows) parts,
    without those older than their unit's retention horizon (dropped, not written back)."""
    blocks = [
        np.column_stack([*split(code), np.full(len(code), u + 1, dtype=np.int64), rows])
        for u, code, rows in parts
        if len(code)
    ]
    rows = np.concatenate(blocks) if blocks else np.zeros((0, len(ROW_COLUMNS)), np.int64)
    if horizons and len(rows):
        horizon = np.array([horizons.get(u + 1, 0) for u in range(len(UNITS))], np.int64)
        rows = rows[rows[:, 3] >= horizon[rows[:, 2] - 1]]
    return rows


def account_usage(book: Book) -> AccountUsage:
    """The usage of the accounts whose state the cycle changed, in their latest month."""
    idx = np.nonzero(book.dirty_state[: book.size])[0]
    idx = idx[book.codes[idx] % 4 == ACCOUNT]
    month = book.rows[UNITS.index(Unit.MONTH), idx]
    counted = book.state[idx, S_COUNTERS] - month[:, R_COUNTERS0]
    c = {name: i for i, name in enumerate(COUNTERS)}
    usage = np.column_stack(
        [
            np.maximum(month[:, R_PEAK], 0),
            np.maximum(month[:, R_CH_PEAK], 0),
            counted[:, c["pub_n"]] + counted[:, c["del_n"]],
            counted[:, c["pub_b"]] + counted[:, c["del_b"]],
        ]
    )
    return AccountUsage(book.codes[idx] // 4, month[:, R_START].copy(), usage.astype(np.int64))


def _take_all(folder: Folder, second: int, values: source.Values) -> None:
    """Every value there is at ``second``: what is absent from ``values`` is zero now."""
    folder.values(second, values.code, values.conns, values.ws, values.channels)
    book = folder.book
    present = np.zeros(book.size, dtype=np.bool_)
    present[book.find(values.code)] = True
    held = book.state[: book.size]
    gone = np.nonzero(~present & ((held[:, S_CONNS] != 0) | (held[:, S_CH] != 0)))[0]
    zeros = np.zeros(len(gone), dtype=np.int64)
    folder.values(second, book.codes[gone], zeros, zeros, zeros)


def _retirements(
    dc: str, changes: source.CounterChanges, loaded: _Loaded, dirty: set[tuple[str, str]]
) -> list[str]:
    """The reaped incarnations read this cycle (their marks now final), and un-retire any
    that came back (reaped after a pause, its next flush re-registered it): its marks must
    stay for as long as it counts."""
    gone = []
    for inc in changes.incarnations:
        if inc in changes.retired:
            gone.append(inc)
            loaded.retired.add((dc, inc))
            dirty.add((dc, inc))
        elif (dc, inc) in loaded.retired:
            loaded.retired.discard((dc, inc))
            dirty.add((dc, inc))
    return gone


__all__ = ["UNITS", "Aggregator", "CycleResult"]
