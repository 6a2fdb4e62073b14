"""Aggregation cycle time against the number of active apps, beside a raw COPY + merge.

Per size: a scratch database built by the migrations (the apps and their accounts inserted in
bulk, 5 apps per account) and a Redis key prefix (the same apps in the registry). 20 frontend
incarnations each hold 15 % of the apps (every app is on 3 of them, as in bench/tick.py) with
WebSocket connections and cumulative message counters (opened, pub_n, pub_b, del_n, del_b).
Each cycle drives 5 seconds through the real ``DatacenterStore.flush`` and ``tick`` on a
controlled clock, then times ``Aggregator(engine, global_store, {"dc1": store}).run()`` with the
limits check production hooks into every cycle (every account is on a package; none reaches a
level):

- steady, all changed: every app's count and counters moved in each of the 5 seconds, mid-minute
  (the worst case);
- steady, 10 % changed: 10 % of the apps moved in each second;
- cold: every app changed, run by a fresh Aggregator (it loads states, rows, marks from Postgres);
- new minute: every app moved, and the 5 seconds cross a minute boundary (every entity's
  minute row closes and is held in its state row, and a new one begins there); once per minute
  boundary, up to --repeat of them, from 3 minutes before a month's end;
- new month: every app moved across the month's first second, where every unit's rows begin
  (minute, hour, day and month: the worst boundary; an hour's or a day's is a part of it),
  after a new peak for every app in the month's last minute (its hour, day and month rows
  close with a change not written yet);
- the 180 s after it (max): every app moved in every cycle of the 180 seconds after the new
  month's, which move to usage_rollups what it held (the first minute's rows with the hour,
  day and month rows that began with them, then the next minutes' with those rows again, as
  their ranges widen); the longest of them.

The world starts at the end of the minute before the measured one: the first tick, then every
app up by 30 connections and down by 60 on one frontend (so the hour, day and month so far have
wider extremes than the measured seconds' walk reaches, as in a world that did not start a
minute ago), then the aggregator's first cycle ("first": every entity is new) and a warm-up
cycle that opens the measured minute; neither is measured. The steady figures are the median
of --repeat cycles, or of fewer when they add up to more than 10 s (one cycle that slow is not
noise); so is the new-minute figure. Seconds between the cold cycle and a new-minute one, and
between those and the new month's, are ticked with nothing changed and aggregated unmeasured.
The world's own Python objects are frozen out of the garbage collector (``gc.freeze``): they
are the benchmark's, not the aggregator's.

Baseline, in the same run: 100 000 rows shaped like ``usage_rollups``, a psycopg COPY
(``write_row``) into a temporary staging table plus one ``INSERT ... SELECT ... ON CONFLICT DO
UPDATE`` into a copy of ``usage_rollups``, committed; once as new rows, once updating all of
them (median of --repeat). Speed per row: a cycle's rows written (``states_written +
rows_written``) per second, against the baseline's. Targets: every cycle at 100 000 apps
<= 2 s (the interval is 5 s; not the first nor a cold one, once per process), >= 0.5 of the
baseline's speed per row, growth no faster than linear. Each step's growth is printed beside
the baseline's over the same sizes (as many rows as apps), each measured just before its
size's cycles: Postgres's own cost per row moves with the size (its buffers, the CPU's caches)
and with the machine's speed over the run, and the cycle can do no better than it.

    python bench/aggregate.py [--apps 1000 10000 100000] [--repeat 3] [--profile]

--profile times each size's first new-minute cycle per stage, and adds an all-changed and a
10 %-changed cycle timed per stage, then prints each stage's growth per app from one size to
the next (what grows faster than the apps); the largest size's stage tables (with the
garbage collector's share) and an all-changed cycle under cProfile follow.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import pstats
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import psycopg
import redis
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import (
    MERGE,
    REDIS_URL,
    copy_and_merge,
    exit_on_sigterm,
    row,
    scratch_database,
    scratch_prefix,
)
from metering.core.database import make_engine
from metering.core.logging import configure
from metering.limits.service import AfterCommit, AggregateLimits, LimitChecker
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import bulk, service, source, state
from metering.rollups.service import ROW_COLUMNS, Aggregator, CycleResult

FRONTENDS = 20
PER_APP = 3  # frontends holding each app: 15 % of the apps on each, as in bench/tick.py
APPS_PER_ACCOUNT = 5
CYCLE = 5  # seconds folded per cycle: the default aggregation interval
TARGET_SECONDS = 2.0  # every kind of cycle at 100 000 apps (not the first, nor a cold one)
TARGET_RATIO = 0.5  # of the baseline's speed per row
BUDGET = 10.0  # seconds: no more repeats of a kind of cycle once its cycles took this long
# The month the "new month" cycle begins (every unit's rows begin: minute, hour, day, month),
# and the first minute boundary a "new minute" cycle crosses (3 minutes before it: not an
# hour's, only minute rows begin).
MONTH_START = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
BOUNDARY = MONTH_START - 180
# Seconds after a new month's first second whose cycles (every app changed) are measured too:
# they move the rows the new month's first cycles held (docs/rollups.md: due 55 s after their
# minute), the first minute's with the hour, day and month rows that began with it, the
# second's with those rows again (merged: their ranges widened).
AFTER_MONTH = 180
# Before the measured minute (BOUNDARY - 60 on), every app swings up and down by this much on
# one frontend: the hour, day and month so far have seen wider extremes than the walk of the
# measured seconds reaches, as they have in a world that did not start a minute ago.
SWING = 30
# Seconds before the month's end at which every app reaches a new peak for its hour, day and
# month (``new_month_cycle``).
LAST_PEAK = 30
TIMEOUT = 3600.0  # liveness: no frontend is reaped during the run


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


# -- the baseline ------------------------------------------------------------------------------


def baseline_rows(n: int, rng: random.Random) -> list[tuple[int, ...]]:
    """``n`` minute rows in ``ROW_COLUMNS`` order, one per app, with plausible values."""
    out = []
    for e in range(1, n + 1):
        conns = rng.randint(1, 150)
        pub_n = rng.randint(0, 10**6)
        out.append(
            (
                1, e, 1, BOUNDARY - 60, conns, conns, 0, conns * 10**6, 0,
                rng.randint(0, 10**5), 0, 0, pub_n, pub_n * 700, 2 * pub_n, 1400 * pub_n, 0, 0,
                conns + rng.randint(0, 9), BOUNDARY - rng.randint(1, 59), max(0, conns - 9),
                conns + 9, 0, 0,
            )
        )  # fmt: skip
    return out


def baseline(n: int, repeat: int) -> tuple[float, float]:
    """Median seconds to COPY + merge ``n`` rows: as new rows, and as updates of all of them."""
    rng = random.Random(2)
    new, updated = [], []
    with scratch_database("bench") as url:
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq) as conn:
            conn.execute("CREATE TABLE bench_rollups (LIKE usage_rollups INCLUDING ALL)")
            conn.execute("CREATE TEMP TABLE bench_stage (LIKE usage_rollups) ON COMMIT DELETE ROWS")
            conn.commit()
            for i in range(repeat):
                progress(f"baseline {i + 1}/{repeat}: COPY + merge of {n} new rows, then updates")
                first, second = baseline_rows(n, rng), baseline_rows(n, rng)
                conn.execute("TRUNCATE bench_rollups")
                conn.commit()
                new.append(copy_and_merge(conn, "bench_rollups", ROW_COLUMNS, first, MERGE))
                updated.append(copy_and_merge(conn, "bench_rollups", ROW_COLUMNS, second, MERGE))
    return statistics.median(new), statistics.median(updated)


def limits_check(engine: Engine) -> AggregateLimits:
    """The limits check production runs in every cycle (no alert channel: none alerts)."""
    checker = LimitChecker(engine, ())
    return AggregateLimits(checker, AfterCommit(checker, None, lambda _ids: None))


# -- the world: apps, frontends, the clock -----------------------------------------------------


@dataclass
class World:
    """A scratch database and Redis prefix with ``apps`` apps on 20 frontends."""

    apps: int
    engine: Engine
    g: GlobalStore
    dc: DatacenterStore
    rng: random.Random
    # Per app (index = app id): the frontends holding it.
    holders: list[list[int]] = field(default_factory=list)
    # Per frontend: app -> WebSocket connections, and app -> [opened, pub_n, pub_b, del_n, del_b].
    conns: list[dict[int, int]] = field(default_factory=list)
    counters: list[dict[int, list[int]]] = field(default_factory=list)

    def register(self) -> None:
        """The apps and their accounts: in Postgres (the aggregator's owners) and in Redis."""
        accounts = -(-self.apps // APPS_PER_ACCOUNT)
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO accounts (id, name, created_at) "
                    "SELECT g, 'bench ' || g, now() FROM generate_series(1, :n) g"
                ),
                {"n": accounts},
            )
            # Every account on a package whose limits the usage stays far below: each cycle
            # checks them all (as in production), and none alerts.
            conn.execute(
                text(
                    "INSERT INTO packages (id, name, enforce_hard, created_at) "
                    "VALUES (1, 'bench', true, now())"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO package_limits (package_id, metric, quota, hard_limit) "
                    "SELECT 1, m, 1000000000000, 2000000000000 "
                    "FROM unnest(ARRAY['connections', 'channels', 'messages', 'data']) m"
                )
            )
            conn.execute(text("UPDATE accounts SET package_id = 1"))
            conn.execute(
                text(
                    "INSERT INTO apps (id, account_id, name, created_at) "
                    "SELECT g, (g - 1) / :per + 1, 'bench ' || g, now() "
                    "FROM generate_series(1, :n) g"
                ),
                {"n": self.apps, "per": APPS_PER_ACCOUNT},
            )
        self.g.client.hset(
            self.g.key("apps"),
            mapping={str(a): str((a - 1) // APPS_PER_ACCOUNT + 1) for a in range(1, self.apps + 1)},
        )

    def populate(self) -> None:
        """Every frontend's first (full) flush."""
        rng = self.rng
        self.holders = [[]]
        self.conns = [{} for _ in range(FRONTENDS)]
        self.counters = [{} for _ in range(FRONTENDS)]
        for a in range(1, self.apps + 1):
            fes = rng.sample(range(FRONTENDS), PER_APP)
            self.holders.append(fes)
            for f in fes:
                n = rng.randint(SWING, SWING + 50)
                msgs = rng.randint(0, 1000)
                self.conns[f][a] = n
                self.counters[f][a] = [n, msgs, msgs * 700, 2 * msgs, 1400 * msgs]
        for f in range(FRONTENDS):
            self.flush(f, list(self.conns[f]), full=True)

    def flush(self, f: int, apps: list[int], *, full: bool) -> None:
        conns, counters = self.conns[f], self.counters[f]
        # Per app, the eight totals in FRONTEND_COUNTERS order (this bench refuses nothing).
        ctr: list[tuple[str, tuple[int, ...]]] = []
        for a in apps:
            opened, pub_n, pub_b, del_n, del_b = counters[a]
            ctr.append((str(a), (opened, 0, pub_n, pub_b, del_n, del_b, 0, 0)))
        status = self.dc.flush(
            f"fe-{f}#bench",
            full=full,
            timeout=TIMEOUT,
            epoch="e",
            conns=[(f"{a}|w", conns[a]) for a in apps],
            channels=[],
            counters=ctr,
        )
        assert status == "ok", status

    def flush_and_tick(self, second: int, per_frontend: list[list[int]]) -> None:
        """Each frontend flushes the apps that moved on it, then the tick counts ``second``."""
        for f, apps in enumerate(per_frontend):
            if apps:
                self.flush(f, apps, full=False)
        result = tick(
            self.g, {"dc1": self.dc}, liveness_timeout=TIMEOUT, sample_retention=3600, now=second
        )
        assert result.committed, result

    def swing(self, second: int, delta: int) -> None:
        """Every app's count moves by ``delta`` on its first frontend, then the tick."""
        per_frontend: list[list[int]] = [[] for _ in range(FRONTENDS)]
        for a in range(1, self.apps + 1):
            f = self.holders[a][0]
            self.conns[f][a] += delta
            per_frontend[f].append(a)
        self.flush_and_tick(second, per_frontend)

    def second(self, second: int, share: float) -> None:
        """One second: ``share`` of the apps move on one of their frontends, then the tick."""
        rng = self.rng
        if share >= 1:
            changed: Sequence[int] = range(1, self.apps + 1)
        else:
            changed = rng.sample(range(1, self.apps + 1), int(self.apps * share))
        per_frontend: list[list[int]] = [[] for _ in range(FRONTENDS)]
        for a in changed:
            f = self.holders[a][rng.randrange(PER_APP)]
            totals = self.counters[f][a]
            n = self.conns[f][a]
            if n > 1 and rng.random() < 0.5:
                self.conns[f][a] = n - 1
            else:
                self.conns[f][a] = n + 1
                totals[0] += 1
            msgs, size = rng.randint(1, 20), rng.randint(50, 2000)
            totals[1] += msgs
            totals[2] += msgs * size
            totals[3] += 2 * msgs
            totals[4] += 2 * msgs * size
            per_frontend[f].append(a)
        self.flush_and_tick(second, per_frontend)

    def cycle(
        self, agg: Aggregator, seconds: Sequence[int], share: float, *, samples: int = 0
    ) -> CycleResult:
        for s in seconds:
            self.second(s, share)
        result = agg.run()
        assert result.committed, result
        assert result.samples == (samples or len(seconds)), result
        assert result.second == seconds[-1], result
        return result


@contextmanager
def world(client: redis.Redis, apps: int, rng: random.Random) -> Iterator[World]:
    with scratch_database("bench") as url, scratch_prefix(client) as prefix:
        engine = make_engine(url)
        try:
            yield World(
                apps,
                engine,
                GlobalStore(client, prefix),
                DatacenterStore(client, prefix, "dc1"),
                rng,
            )
        finally:
            engine.dispose()


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Figures:
    first: CycleResult
    steady_all: list[CycleResult]
    steady_some: list[CycleResult]
    cold: CycleResult
    new_minutes: list[CycleResult]
    new_month: CycleResult
    after_month: list[CycleResult]  # the cycles of the AFTER_MONTH seconds that follow it
    profile: str = ""
    # With --profile: each profiled kind of cycle's seconds per stage.
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


def slowest(results: list[CycleResult]) -> CycleResult:
    return max(results, key=lambda r: r.duration)


def median_cycle(results: list[CycleResult]) -> CycleResult:
    return sorted(results, key=lambda r: r.duration)[(len(results) - 1) // 2]


def written(r: CycleResult) -> int:
    return r.states_written + r.rows_written


def describe(r: CycleResult) -> str:
    return (
        f"{r.duration * 1000:.0f} ms: {r.states_written} states + {r.rows_written} rows, "
        f"{r.counters_applied} apps' counters"
    )


def measure(w: World, repeat: int, profile: bool, report: bool) -> Figures:
    """The figures at one size; with ``profile``, cycles timed per stage too (their tables in
    the figures' ``profile`` only with ``report``: the largest size's)."""
    # Consecutive seconds: the first tick and the swing at the end of the minute before the
    # measured one; in the measured minute, a warm-up cycle (it opens the minute's rows), the
    # steady cycles and the cold one; then the new-minute cycle across BOUNDARY (its last 2
    # seconds are the new minute).
    assert CYCLE * (2 * repeat + 2) <= 60 - 3, "the cycles fit in the measured minute"
    clock = Clock(BOUNDARY - 60 - 3)
    seconds = clock.seconds

    progress(f"[{w.apps} apps] registering apps and accounts (Postgres, Redis)")
    w.register()
    progress(f"[{w.apps} apps] first flush of {FRONTENDS} frontends, first tick")
    w.populate()
    # The world's own bookkeeping (millions of Python objects) is not the aggregator's: out of
    # the collector's way, so that a collection in a cycle walks only what the cycle holds.
    gc.collect()
    gc.freeze()
    first_second, up, down = seconds(3)
    w.second(first_second, 0.0)
    progress(f"[{w.apps} apps] the hour's extremes: every app +{SWING}, then -{SWING}")
    w.swing(up, SWING)
    w.swing(down, -2 * SWING)
    agg = Aggregator(w.engine, w.g, {"dc1": w.dc}, on_accounts=limits_check(w.engine))
    first = agg.run()
    assert first.committed, first
    assert first.second == down, first
    progress(f"[{w.apps} apps] first cycle (bootstrap, not measured): {describe(first)}")
    back, *rest = seconds()
    w.swing(back, SWING)
    warm = w.cycle(agg, rest, 1.0, samples=CYCLE)
    progress(f"[{w.apps} apps] warm-up, the measured minute's rows open: {describe(warm)}")

    steady_all: list[CycleResult] = []
    steady_some: list[CycleResult] = []
    for share, results in ((1.0, steady_all), (0.1, steady_some)):
        while len(results) < repeat and sum(r.duration for r in results) < BUDGET:
            r = w.cycle(agg, seconds(), share)
            results.append(r)
            progress(f"[{w.apps} apps] steady, {share:.0%} changed, #{len(results)}: {describe(r)}")

    agg = Aggregator(w.engine, w.g, {"dc1": w.dc}, on_accounts=limits_check(w.engine))
    cold = w.cycle(agg, seconds(), 1.0)
    progress(f"[{w.apps} apps] cold (a fresh Aggregator), 100% changed: {describe(cold)}")

    stages: dict[str, dict[str, float]] = {}
    new_minutes, staged = new_minute_cycles(w, agg, clock, repeat, stages if profile else None)
    new_month, staged_month = new_month_cycle(w, agg, clock, stages if profile else None)
    after_month = []
    while clock.now < MONTH_START + AFTER_MONTH:
        after_month.append(w.cycle(agg, seconds(), 1.0))
        at = clock.now - MONTH_START
        progress(
            f"[{w.apps} apps] {at} s into the month, 100% changed: {describe(after_month[-1])}"
        )
    longest = max(after_month, key=lambda r: r.duration)
    progress(
        f"[{w.apps} apps] the {len(after_month)} cycles of the {AFTER_MONTH} s after it, every "
        f"app changed: median {ms(median_cycle(after_month).duration)}, longest {describe(longest)}"
    )
    staged += staged_month
    if profile:
        staged += profile_cycles(w, agg, seconds, stages, cprofile=report)
    return Figures(
        first, steady_all, steady_some, cold, new_minutes, new_month, after_month,
        staged if report else "", stages,
    )  # fmt: skip


@dataclass
class Clock:
    """The world's seconds, handed out in order."""

    now: int

    def seconds(self, n: int = CYCLE) -> list[int]:
        self.now += n
        return list(range(self.now - n, self.now))


def new_minute_cycles(
    w: World,
    agg: Aggregator,
    clock: Clock,
    repeat: int,
    stages: dict[str, dict[str, float]] | None,
) -> tuple[list[CycleResult], str]:
    """One new-minute cycle per minute boundary from BOUNDARY on (the seconds between them
    ticked with nothing changed, aggregated unmeasured), up to ``repeat`` of them or BUDGET;
    with ``stages``, the first one timed per stage (into it, and its table returned)."""
    new_minutes: list[CycleResult] = []
    staged = ""
    while len(new_minutes) < repeat and sum(r.duration for r in new_minutes) < BUDGET:
        boundary = BOUNDARY + 60 * len(new_minutes)
        idle = boundary - 3 - clock.now
        if idle:
            progress(f"[{w.apps} apps] {idle} seconds with nothing changed, aggregated unmeasured")
        while idle > 0:
            w.cycle(agg, clock.seconds(min(idle, CYCLE)), 0.0)
            idle = boundary - 3 - clock.now
        crossing = clock.seconds()
        assert crossing[0] < boundary <= crossing[-1], crossing
        if stages is not None and not new_minutes:
            title = f"new minute at {w.apps} apps, 100% changed"
            r, staged, own = timed_stages(lambda c=crossing: w.cycle(agg, c, 1.0), title)
            stages["new minute"] = own
        else:
            r = w.cycle(agg, crossing, 1.0)
        new_minutes.append(r)
        progress(f"[{w.apps} apps] new minute, 100% changed, #{len(new_minutes)}: {describe(r)}")

    return new_minutes, staged


def new_month_cycle(
    w: World, agg: Aggregator, clock: Clock, stages: dict[str, dict[str, float]] | None
) -> tuple[CycleResult, str]:
    """The cycle across MONTH_START, every app changed; with ``stages``, timed per stage.

    Before it, aggregated unmeasured: seconds with nothing changed, then, in the month's last
    minute, every app up by 2 * SWING at once (a new peak for its hour, day and month, whose
    rows then close with a change of their last minute: the worst case), then nothing again.
    (Without that second, the crossing cycle would also close every app's minute row of two
    minutes before, left open while nothing changed, and move it at once: 120 000 rows more
    that a world busy until the month's end does not have.)"""

    def idle_until(second: int) -> None:
        while clock.now < second:
            w.cycle(agg, clock.seconds(min(second - clock.now, CYCLE)), 0.0)

    progress(
        f"[{w.apps} apps] {MONTH_START - 3 - clock.now} seconds to the month's end, unmeasured: "
        f"nothing changed, but every app +{2 * SWING} at {LAST_PEAK} s before it"
    )
    idle_until(MONTH_START - LAST_PEAK)
    [peak] = clock.seconds(1)
    w.swing(peak, 2 * SWING)
    assert agg.run().committed
    idle_until(MONTH_START - 3)
    crossing = clock.seconds()
    assert crossing[0] < MONTH_START <= crossing[-1], crossing
    staged = ""
    if stages is None:
        r = w.cycle(agg, crossing, 1.0)
    else:
        title = f"new month at {w.apps} apps, 100% changed"
        r, staged, stages["new month"] = timed_stages(lambda: w.cycle(agg, crossing, 1.0), title)
    progress(f"[{w.apps} apps] new month (minute, hour, day, month), 100% changed: {describe(r)}")
    return r, staged


# -- --profile: where a steady all-changed cycle's time goes ------------------------------------


class Stages:
    """Exclusive wall-clock time per stage of a cycle (a stage's own time, minus its children),
    and how much of it the garbage collector took (it runs in whichever stage allocates).
    The stages of another thread than the cycle's are timed apart, marked "(thread)": their
    time overlaps the others'."""

    def __init__(self) -> None:
        self.own: dict[str, float] = defaultdict(float)
        self.gc: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._main = threading.get_ident()
        self._gc_started = 0.0

    @property
    def _stack(self) -> list[tuple[str, list[float]]]:
        stack: list[tuple[str, list[float]]] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def wrap(self, label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = label if isinstance(label, str) else label(*args)
            if threading.get_ident() != self._main:
                name = f"{name} (thread)"
            if name.startswith("COPY"):  # which table's COPY: the write it is part of
                table = next((n for n, _ in reversed(self._stack) if n.startswith("write ")), "")
                name = f"{name} {table.split(':')[0].removeprefix('write ')}".rstrip()
            children = [0.0]
            self._stack.append((name, children))
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self._stack.pop()
                self.own[name] += elapsed - children[0]
                if self._stack:
                    self._stack[-1][1][0] += elapsed

        return timed

    def on_gc(self, phase: str, _info: dict[str, int]) -> None:
        if threading.get_ident() != self._main:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._stack:  # not the world's own seconds, driven before the cycle
            self.gc[self._stack[-1][0]] += time.perf_counter() - self._gc_started


def _sql(_cursor: Any, query: Any, *_rest: Any) -> str:
    q = str(query)
    if q.startswith("INSERT INTO") and " FROM _stage_" in q:
        return f"merge SQL into {q.split()[2]} (INSERT ... ON CONFLICT, server)"
    if q.startswith("UPDATE") and " FROM _stage_" in q:
        return f"merge SQL into {q.split()[1]} (UPDATE ... FROM, server)"
    return "other SQL (lock, cursor update, stage setup)"


STAGES: list[tuple[Any, str, str | Callable[..., str]]] = [
    (Aggregator, "run", "other Python"),
    (Aggregator, "_load", "load from Postgres (cold only)"),
    (source, "samples_after", "read samples (XRANGE, hiredis)"),
    (source, "parse_sample", "parse samples (column-wise, NumPy)"),
    (Aggregator, "_fold_sample", "fold samples (Folder.values, NumPy)"),
    (source, "counter_changes", "read counters (which incarnations)"),
    (source, "request_counters", "read counters: ask (ZCOUNT, then send HGETALL or ZRANGEBYSCORE)"),
    (source.PendingCounters, "result", "read counters: replies (HGETALL or ZRANGEBYSCORE + HMGET)"),
    (Aggregator, "_counter_deltas", "counter totals beyond the marks, summed (NumPy)"),
    (Aggregator, "_count", "fold counters (Folder.count, NumPy)"),
    (service._Background, "result", "wait for the counters' thread"),
    (Aggregator, "_owners_of", "owners of apps"),
    (Aggregator, "_write", "build state and row matrices (NumPy)"),
    (service, "_values", "state: every entity's values, by index (NumPy)"),
    (service, "_blocks_of", "state blocks: gather their entities (NumPy)"),
    (state, "encode", "state blocks: encode (NumPy)"),
    (bulk, "binary_copy", "binary COPY building (NumPy)"),
    (bulk, "upsert_array", lambda _conn, table, *_rest: f"write {table}: upsert_array (Python)"),
    (bulk, "upsert", lambda _conn, table, *_rest: f"executemany upsert into {table}"),
    (psycopg.Copy, "write", "COPY data sent (psycopg)"),
    (psycopg.Copy, "__exit__", "COPY end (server ingests the rest)"),
    (psycopg.Cursor, "execute", _sql),
    (
        psycopg.Cursor,
        "executemany",
        lambda _cur, q, *_r: f"executemany {str(q).split()[2]} (server)",
    ),
    (psycopg.Connection, "commit", "commit"),
    (Aggregator, "_write_marks", "marks packed (NumPy)"),
    (source, "trim_samples", "trim samples (after commit)"),
]


def timed_stages(
    cycle: Callable[[], CycleResult], title: str
) -> tuple[CycleResult, str, dict[str, float]]:
    """Run one cycle with each stage timed; the result, the table and each stage's seconds."""
    out = io.StringIO()
    widths = (62, 10, 8, 10)
    stages = Stages()
    with ExitStack() as stack:
        for owner, name, label in STAGES:
            timed = stages.wrap(label, getattr(owner, name))
            stack.enter_context(mock.patch.object(owner, name, timed))
        gc.callbacks.append(stages.on_gc)
        stack.callback(gc.callbacks.remove, stages.on_gc)
        r = cycle()
    out.write(f"\nprofile, {title}: {describe(r)}\n")
    out.write(row("stage (own time, wall clock)", "ms", "share", "of it GC", widths=widths))
    for name, t in sorted(stages.own.items(), key=lambda kv: -kv[1]):
        gc_ms = stages.gc.get(name, 0) * 1000
        cells = (f"{t * 1000:.0f}", f"{t / r.duration:.0%}", f"{gc_ms:.0f}")
        out.write("\n" + row(name, *cells, widths=widths))
    total_gc = sum(stages.gc.values())
    out.write(f"\ngarbage collection in all: {total_gc * 1000:.0f} ms")
    out.write(f" ({total_gc / r.duration:.0%})\n")
    return r, out.getvalue(), dict(stages.own)


def profile_cycles(
    w: World,
    agg: Aggregator,
    seconds: Callable[[], list[int]],
    stages: dict[str, dict[str, float]],
    *,
    cprofile: bool,
) -> str:
    """Two more steady cycles: every app changed and 10 % changed, each timed per stage
    (the second shows what costs in proportion to all apps, not to the changed ones; both
    into ``stages``), then with ``cprofile`` every app changed again under cProfile."""
    out = io.StringIO()
    for share in (1.0, 0.1):
        title = f"{w.apps} apps, steady, {share:.0%} changed"
        _, table, own = timed_stages(lambda s=share: w.cycle(agg, seconds(), s), title)
        out.write(table)
        stages[f"{share:.0%} changed"] = own
    if not cprofile:
        return out.getvalue()

    profiler = cProfile.Profile()
    for s in seconds():
        w.second(s, 1.0)
    profiler.enable()
    r = agg.run()
    profiler.disable()
    assert r.committed
    out.write(f"\ncProfile of the next one (times inflated by profiling): {describe(r)}\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


# -- main --------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms".replace(",", " ")


def print_growth(figures: dict[int, Figures], baselines: dict[int, float]) -> None:
    """Each step's growth in cycle time, and the cost per app beside the baseline's per row."""
    sizes = list(figures)
    for label, pick in (
        ("all changed", lambda f: median_cycle(f.steady_all)),
        ("10% changed", lambda f: median_cycle(f.steady_some)),
        ("new minute", lambda f: median_cycle(f.new_minutes)),
    ):
        for a, b in itertools.pairwise(sizes):
            growth = pick(figures[b]).duration / pick(figures[a]).duration
            verdict = "linear or better" if growth <= b / a else "FASTER than linear"
            # Postgres's own cost per row moves with the size too (caches, buffers): the same
            # COPY + merge at both sizes, in this run, is what the cycle can do no better than.
            theirs = baselines[b] / baselines[a]
            print(
                f"growth, {label}, {a} to {b} apps: time x{growth:.1f} for apps x{b / a:g} "
                f"({verdict}); the baseline's x{theirs:.1f} for rows x{b / a:g}, "
                f"the cycle's beside it x{growth / theirs * b / a:.1f}"
            )
    if len(sizes) < 2:
        return
    print("cost per app, all changed, beside the baseline's per row (updating as many rows):")
    for apps in sizes:
        ours = median_cycle(figures[apps].steady_all).duration / apps * 1e6
        theirs = baselines[apps] / apps * 1e6
        print(f"  {apps:>7} apps: {ours:6.2f} µs per app; baseline {theirs:6.2f} µs per row")


def print_stage_growth(figures: dict[int, Figures]) -> None:
    """Per kind of profiled cycle, each stage's milliseconds at each size and its growth per
    app from one size to the next (1.0: in proportion to the apps; above: faster)."""
    sizes = list(figures)
    for kind in figures[sizes[-1]].stages:
        per_size = [figures[n].stages.get(kind, {}) for n in sizes]
        names = sorted(per_size[-1], key=lambda k: -per_size[-1][k])
        steps = list(itertools.pairwise(range(len(sizes))))
        widths = (62, *(12,) * len(sizes), *(22,) * len(steps))
        print(f"\nstages of the profiled {kind} cycle at each size, and their growth per app")
        header = [f"{n} apps" for n in sizes]
        header += [f"per app {sizes[a]}->{sizes[b]}" for a, b in steps]
        print(row("stage (own time, ms)", *header, widths=widths))
        for name in [*names, "all"]:
            t = [sum(p.values()) if name == "all" else p.get(name, 0.0) for p in per_size]
            if name != "all" and t[-1] < 0.01 * sum(per_size[-1].values()):
                continue  # under 1 % of the cycle
            cells = [f"{x * 1000:.0f}" for x in t]
            for a, b in steps:
                grew = t[b] / t[a] / (sizes[b] / sizes[a]) if t[a] > 0 else float("nan")
                cells.append(f"x{grew:.2f}")
            print(row(name, *cells, widths=widths))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3, choices=range(1, 5))
    parser.add_argument("--baseline-rows", type=int, default=100_000)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="time every size's cycles per stage (the tables and cProfile: the largest's)",
    )
    args = parser.parse_args()
    exit_on_sigterm()
    configure("WARNING")  # not a line per cycle; warnings (lost samples, gaps) still show
    client = redis.Redis.from_url(REDIS_URL)
    rng = random.Random(1)
    print(
        f"aggregation cycle benchmark: {CYCLE} s of samples per cycle, {FRONTENDS} frontends "
        f"(each app on {PER_APP}), {APPS_PER_ACCOUNT} apps per account"
    )
    print(f"Redis {REDIS_URL}")
    new, updated = baseline(args.baseline_rows, args.repeat)
    per_row = {"new": new / args.baseline_rows, "update": updated / args.baseline_rows}
    # The same baseline at each size (as many rows as apps), measured just before that size's
    # cycles: how Postgres's own cost per row moves with the size, beside the cycle's growth,
    # and with the machine's speed as it drifts over the run (minutes between sizes).
    scaled: dict[int, float] = {}

    figures: dict[int, Figures] = {}
    for apps in args.apps:
        scaled[apps] = baseline(apps, args.repeat)[1]
        with world(client, apps, rng) as w:
            figures[apps] = measure(w, args.repeat, args.profile, apps == max(args.apps))

    n = args.baseline_rows
    print(f"\nbaseline: COPY of {n} rows shaped like usage_rollups + one merge + commit")
    widths = (34, 12, 12, 14)
    print(row("", "time", "per row", "rows/s", widths=widths))
    for label, t in (("new rows", new), ("updates of all of them", updated)):
        print(row(f"  {label}", ms(t), f"{t / n * 1e6:.2f} µs", f"{n / t:,.0f}", widths=widths))

    print(
        f"\ncycle time ({CYCLE} s of samples; steady and new minute: median of up to {args.repeat})"
    )
    widths = (10, 14, 13, 13, 13, 13, 17, 12)
    header = ("apps", "first (boot)", "all changed", "10% changed", "new minute", "new month",
              f"{AFTER_MONTH} s after (max)", "cold")  # fmt: skip
    print(row(*header, widths=widths))
    for apps, f in figures.items():
        cells = (
            f.first, median_cycle(f.steady_all), median_cycle(f.steady_some),
            median_cycle(f.new_minutes), f.new_month, slowest(f.after_month), f.cold,
        )  # fmt: skip
        print(row(apps, *(ms(c.duration) for c in cells), widths=widths))

    print_growth(figures, scaled)
    if args.profile:
        print_stage_growth(figures)

    largest = max(figures)
    f = figures[largest]
    print(f"\nat {largest} apps: speed per row written against the baseline (≥ {TARGET_RATIO})")
    widths = (20, 12, 18, 11, 12, 12)
    print(row("cycle", "time", "states + rows", "per row", "vs new", "vs updates", widths=widths))
    for label, r in (
        ("all changed", median_cycle(f.steady_all)),
        ("10% changed", median_cycle(f.steady_some)),
        ("new minute", median_cycle(f.new_minutes)),
        ("new month", f.new_month),
        (f"{AFTER_MONTH} s after (max)", slowest(f.after_month)),
        ("cold", f.cold),
    ):
        ours = r.duration / written(r)
        print(
            row(
                label, ms(r.duration), f"{r.states_written} + {r.rows_written}",
                f"{ours * 1e6:.2f} µs", f"{per_row['new'] / ours:.2f}",
                f"{per_row['update'] / ours:.2f}", widths=widths,
            )
        )  # fmt: skip
    steady = median_cycle(f.steady_all)
    every = [*f.steady_all, *f.steady_some, *f.new_minutes, f.new_month, *f.after_month]
    worst = slowest(every)
    verdict = "met" if worst.duration <= TARGET_SECONDS else "NOT met"
    print(
        f"target: every cycle ≤ {TARGET_SECONDS:g} s at 100000 apps (steady, new minute, new "
        f"month and the {AFTER_MONTH} s after it; not the first nor a cold one): the longest of "
        f"{len(every)} at {largest} apps took {worst.duration:.2f} s, {verdict}"
    )
    ratio = per_row["update"] * written(steady) / steady.duration
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(
        f"target: ≥ {TARGET_RATIO} of the baseline's speed per row (all changed, against "
        f"updates, as nearly all its rows are): {ratio:.2f}, {verdict}"
    )
    print(f.profile, end="")


if __name__ == "__main__":
    main()
