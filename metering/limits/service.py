"""Checking usage against package limits: levels, alerts, admission.

Where checks happen (DESIGN.md, seed 004: "whenever account aggregates are calculated and
persisted ... checked against the account package limits"):

- in every aggregation cycle, inside its transaction, for the accounts it changed: the month's
  peak connections and channels, messages and data (``LimitChecker`` through the aggregator's
  ``on_accounts`` hook), so an alert is recorded with the rollups that show it or not at all;
- after every committed 1-second tick, for the accounts whose live counts moved: the
  concurrent metrics (``LiveLimits``), so a burst is seen within the second, not the cycle.

A level is recorded once per (account, month, metric, level): the unique key of
``limit_alerts`` decides, so two checkers racing (the tick's and the aggregator's) record it
once and only the one that recorded it creates its deliveries. Deliveries are rows of the
outbox written in the same transaction; they are sent after the commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine

from metering.accounts.models import METRICS
from metering.core.logging import get_logger
from metering.limits import levels
from metering.limits.levels import LEVELS, Ints
from metering.limits.repository import AdmissionRow, LimitsRepository, NewAlert, limit_matrix
from metering.limits.store import AdmissionStore
from metering.rollups import query
from metering.rollups.fold import ACCOUNT
from metering.rollups.periods import Unit
from metering.rollups.service import USAGE_METRICS, AccountUsage

log = get_logger(__name__)

PUBLISH_METRICS = ("messages", "data")


def month_of(moment: datetime | int) -> str:
    """The UTC calendar month, 'YYYY-MM', of a datetime or a second since the epoch."""
    when = datetime.fromtimestamp(moment, UTC) if isinstance(moment, int) else moment
    return when.astimezone(UTC).strftime("%Y-%m")


@dataclass(frozen=True)
class Limits:
    """Every account on a package, sorted, with its limits per metric (-1: none)."""

    accounts: Ints
    package: Ints
    quota: Ints  # (n, len(METRICS))
    hard: Ints
    rejects: np.ndarray  # the package enforces the hard level and no override holds

    def find(self, accounts: Ints) -> tuple[Ints, np.ndarray]:
        """Positions of ``accounts`` here, and which are here at all."""
        pos = np.searchsorted(self.accounts, accounts)
        found = pos < len(self.accounts)
        found[found] = self.accounts[pos[found]] == accounts[found]
        return pos, found


@dataclass
class Recorded:
    """What one check wrote in its transaction; act on it only after the commit."""

    month: str
    alerts: list[tuple[int, NewAlert]] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)
    admission: dict[int, AdmissionRow] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.alerts or self.admission)


class LimitChecker:
    """Finds the levels usage reached that are not alerted yet, and records them.

    Keeps the limits of every account (reloaded every ``refresh`` seconds) and the levels
    alerted this month in memory, so that a check that finds
    nothing new costs a few array operations and no query. The memory is a shortcut only:
    the unique key in Postgres is what makes an alert happen once.
    """

    def __init__(self, engine: Engine, channels: Sequence[str], *, refresh: float = 5.0) -> None:
        self.engine = engine
        self.channels = tuple(channels)
        self.refresh = refresh
        self._lock = threading.Lock()
        self._limits: Limits | None = None
        self._loaded_at = 0.0
        self._month = ""
        self._alerted: Ints = np.zeros((0, len(METRICS)), dtype=np.int64)

    def limits(self, month: str) -> tuple[Limits, Ints]:
        """The limits, and the highest level alerted this month per account (row) and metric:
        both from one load, so their rows line up."""
        with self._lock:
            if (
                self._limits is None
                or month != self._month
                or time.monotonic() - self._loaded_at > self.refresh
            ):
                self._load(month)
            assert self._limits is not None
            return self._limits, self._alerted

    def _load(self, month: str) -> None:
        now = datetime.now(UTC)
        with self.engine.connect() as conn:
            repo = LimitsRepository(conn)
            pairs = repo.account_packages()
            quota, hard, enforce = limit_matrix(pairs[:, 1], repo.package_limits())
            overridden = repo.overridden(now)
            alerted = repo.alerted_levels(month)
        accounts = pairs[:, 0].copy()
        free = np.isin(accounts, np.fromiter(overridden, dtype=np.int64, count=len(overridden)))
        limits = Limits(accounts, pairs[:, 1].copy(), quota, hard, enforce & ~free)
        matrix = np.zeros((len(accounts), len(METRICS)), dtype=np.int64)
        if alerted:
            who = np.array([a for a, _, _ in alerted], dtype=np.int64)
            metric = np.array([METRICS.index(m) for _, m, _ in alerted], dtype=np.int64)
            level = np.array([LEVELS.index(lv) + 1 for _, _, lv in alerted], dtype=np.int64)
            pos, found = limits.find(who)
            np.maximum.at(matrix, (pos[found], metric[found]), level[found])
        self._limits, self._alerted, self._month = limits, matrix, month
        self._loaded_at = time.monotonic()

    def detect(self, month: str, accounts: Ints, usage: Ints) -> list[NewAlert]:
        """The levels reached and not alerted yet: ``usage`` is (n, len(METRICS)), one row per
        account, -1 for a metric not measured by this caller."""
        limits, alerted_all = self.limits(month)
        pos, found = limits.find(accounts)
        if not found.any():
            return []
        pos, usage = pos[found], usage[found]
        reached = levels.level_of(usage, limits.quota[pos], limits.hard[pos])
        alerted = alerted_all[pos]
        fresh = np.argwhere(reached > alerted)
        out: list[NewAlert] = []
        for i, m in fresh:
            p = pos[i]
            quota, hard = int(limits.quota[p, m]), int(limits.hard[p, m])
            for level in range(int(alerted[i, m]) + 1, int(reached[i, m]) + 1):
                out.append(
                    NewAlert(
                        account_id=int(limits.accounts[p]),
                        metric=METRICS[m],
                        level=LEVELS[level - 1],
                        usage=int(usage[i, m]),
                        threshold=levels.thresholds(quota, hard)[level - 1],
                        quota=quota,
                        hard_limit=hard,
                        package_id=int(limits.package[p]),
                        rejects=bool(limits.rejects[p]),
                    )
                )
        # One order for every checker: two transactions inserting the same keys cannot deadlock.
        out.sort(key=lambda a: (a.account_id, a.metric, LEVELS.index(a.level)))
        return out

    def record(
        self, conn: Connection, month: str, alerts: Sequence[NewAlert], now: datetime
    ) -> Recorded:
        """Record ``alerts`` (those not recorded yet), their deliveries, and the publishing
        blocks of hard message or data levels, in the caller's transaction."""
        repo = LimitsRepository(conn)
        recorded = Recorded(month, repo.insert_alerts(month, alerts, now))
        recorded.deliveries = repo.insert_deliveries((i for i, _ in recorded.alerts), self.channels)
        for _, alert in recorded.alerts:
            log.warning(
                "limits.level_reached",
                account=alert.account_id,
                month=month,
                metric=alert.metric,
                level=alert.level,
                usage=alert.usage,
                threshold=alert.threshold,
            )
            if alert.level == "hard" and alert.metric in PUBLISH_METRICS and alert.rejects:
                row = repo.block_publishing(alert.account_id, month, alert.metric, now)
                if row is not None:
                    recorded.admission[alert.account_id] = row
        return recorded

    def committed(self, recorded: Recorded) -> None:
        """Remember what a committed check recorded (skip it next time without a query)."""
        with self._lock:
            if recorded.month != self._month or self._limits is None:
                return
            for _, alert in recorded.alerts:
                pos, found = self._limits.find(np.array([alert.account_id], dtype=np.int64))
                if found[0]:
                    m = METRICS.index(alert.metric)
                    level = LEVELS.index(alert.level) + 1
                    self._alerted[pos[0], m] = max(self._alerted[pos[0], m], level)


@dataclass
class AfterCommit:
    """What to do once a check's transaction committed: remember it, send its deliveries,
    mirror its admission changes."""

    checker: LimitChecker
    store: AdmissionStore | None
    dispatch: Callable[[list[int]], None]

    def __call__(self, recorded: Recorded) -> None:
        if not recorded:
            return
        self.checker.committed(recorded)
        if recorded.admission and self.store is not None:
            self.store.write(recorded.admission)
        if recorded.deliveries:
            self.dispatch(recorded.deliveries)


class LiveLimits:
    """After each committed tick: the concurrent metrics' levels for the accounts that moved,
    and the live counts of enforced accounts within reach of a hard limit, for gateways."""

    def __init__(
        self,
        engine: Engine,
        checker: LimitChecker,
        store: AdmissionStore,
        after: AfterCommit,
        *,
        refresh: float = 5.0,
    ) -> None:
        self.engine = engine
        self.checker = checker
        self.store = store
        self.after = after
        self.refresh = refresh
        self._admission: dict[int, AdmissionRow] = {}
        self._version: str | None = None
        self._loaded_at = 0.0

    def _enforced(self) -> dict[int, AdmissionRow]:
        if time.monotonic() - self._loaded_at > self.refresh:
            self._version, rows = self.store.read_if_changed(self._version)
            if rows is not None:
                self._admission = rows
            self._loaded_at = time.monotonic()
        return self._admission

    def after_tick(
        self, second: int, accounts: Sequence[tuple[str, tuple[int, int, int, int]]]
    ) -> Recorded:
        # The gateways' live counts first: they need them every second, whatever the check.
        self.store.write_live(self.near(accounts))
        month = month_of(second)
        if not accounts:
            return Recorded(month)
        ids = np.array([int(a) for a, _ in accounts], dtype=np.int64)
        values = np.array([v for _, v in accounts], dtype=np.int64).reshape(-1, 4)
        usage = np.full((len(ids), len(METRICS)), -1, dtype=np.int64)
        usage[:, METRICS.index("connections")] = values[:, 0] + values[:, 1] + values[:, 2]
        usage[:, METRICS.index("channels")] = values[:, 3]
        alerts = self.checker.detect(month, ids, usage)
        if not alerts:
            return Recorded(month)
        with self.engine.begin() as conn:
            recorded = self.checker.record(conn, month, alerts, datetime.now(UTC))
        self.after(recorded)
        return recorded

    def near(
        self, accounts: Sequence[tuple[str, tuple[int, int, int, int]]]
    ) -> dict[int, tuple[int, int] | None]:
        """The live counts to publish: of enforced accounts at or over half a hard limit;
        None (remove) for the other enforced accounts that moved."""
        enforced = self._enforced()
        out: dict[int, tuple[int, int] | None] = {}
        for account, (w, s, lp, ch) in accounts:
            row = enforced.get(int(account))
            if row is None:
                continue
            conns = w + s + lp
            close = (row.connections_hard is not None and 2 * conns >= row.connections_hard) or (
                row.channels_hard is not None and 2 * ch >= row.channels_hard
            )
            out[int(account)] = (conns, ch) if close else None
        return out


def month_entry(conn: Connection, account_id: int, month: str) -> dict[str, Any] | None:
    """The account's month rollup entry (as ``GET /v1/stats`` gives it), None without one."""
    entries = query.periods(
        conn, query.Query(scope=ACCOUNT, entity_id=account_id, unit=Unit.MONTH, limit=1)
    )
    return entries[0] if entries and entries[0]["intervalId"] == month else None


def month_usage(conn: Connection, account_id: int, month: str) -> dict[str, int]:
    """The account's usage in ``month`` so far, per metric, from its rollups."""
    return usage_of(month_entry(conn, account_id, month))


def usage_of(e: dict[str, Any] | None) -> dict[str, int]:
    """Per metric, the usage a month entry shows (zero without one)."""
    if e is None:
        return dict.fromkeys(METRICS, 0)
    return {
        "connections": int(e["connections.all.peak"]),
        "channels": int(e["channels.peak"]),
        "messages": int(e["messages.all.count"]),
        "data": int(e["messages.all.data"]),
    }


def desired_admission(
    conn: Connection, account_ids: Sequence[int], now: datetime
) -> dict[int, AdmissionRow]:
    """What gateways must enforce for each account now: its package's hard limits for the
    concurrent metrics, and a publishing block if the month's messages or data are at or
    over the hard limit; nothing under a staff override or with a package that only notifies.
    Accounts that do not exist are left out."""
    repo = LimitsRepository(conn)
    packages = repo.accounts_with_packages(account_ids)
    overridden = repo.overridden(now)
    month = month_of(now)
    out: dict[int, AdmissionRow] = {}
    for account_id, package_id in packages.items():
        enforce, limits = (False, {}) if package_id is None else repo.limits_of(package_id)
        if not enforce or account_id in overridden:
            out[account_id] = AdmissionRow()
            continue
        blocked_by = None
        if any(m in limits for m in PUBLISH_METRICS):
            usage = month_usage(conn, account_id, month)
            over = [m for m in PUBLISH_METRICS if m in limits and 0 < usage[m] >= limits[m][1]]
            blocked_by = over[0] if over else None
        out[account_id] = AdmissionRow(
            connections_hard=limits["connections"][1] if "connections" in limits else None,
            channels_hard=limits["channels"][1] if "channels" in limits else None,
            publish_blocked_month=month if blocked_by else None,
            publish_blocked_by=blocked_by,
        )
    return out


class AggregateLimits:
    """The aggregator's ``on_accounts`` hook: the accounts a cycle changed are checked in its
    transaction, and what was recorded is acted on after its commit."""

    def __init__(self, checker: LimitChecker, after: AfterCommit) -> None:
        assert USAGE_METRICS == METRICS, "the aggregator's usage columns are the limits' metrics"
        self.checker = checker
        self.after = after

    def __call__(self, conn: Connection, usage: AccountUsage) -> Callable[[], None] | None:
        now = datetime.now(UTC)
        recorded: list[Recorded] = []
        try:
            # In a savepoint: a check that fails (limits unreadable, a table gone) must not
            # take the cycle's rollups down with it. The levels are found again from the
            # month's usage the next time the account's usage moves.
            with conn.begin_nested():
                for start in np.unique(usage.month_start):
                    month = month_of(int(start))
                    sel = usage.month_start == start
                    alerts = self.checker.detect(month, usage.accounts[sel], usage.usage[sel])
                    if alerts:
                        recorded.append(self.checker.record(conn, month, alerts, now))
        except Exception:
            log.exception("limits.check_failed", accounts=len(usage.accounts))
            return None
        if not recorded:
            return None

        def then() -> None:
            for r in recorded:
                self.after(r)

        return then
