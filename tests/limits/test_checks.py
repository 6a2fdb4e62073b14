"""Usage checked against package limits, for real: a gateway's counts go through the live tick
and the aggregator into Postgres, and the levels each alert once per (account, month, metric,
level), with a delivery per channel, recorded with the rollups that show them; the hard level
of monthly messages blocks publishing (mirrored to Redis), the concurrent metrics are caught
within the tick, and two checkers racing record a level once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from sqlalchemy import func, select

from metering.accounts.models import METRICS
from metering.core.database import get_engine, unit_of_work
from metering.gateway.sdk import Meter
from metering.limits import levels, staff
from metering.limits.models import AlertDelivery, LimitAlert
from metering.limits.repository import AdmissionRow, LimitsRepository
from metering.limits.service import AfterCommit, AggregateLimits, LimitChecker, LiveLimits
from metering.limits.store import AdmissionStore
from metering.limits.wiring import sync_admission
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import query
from metering.rollups.fold import APP
from metering.rollups.periods import Unit
from metering.rollups.service import Aggregator
from tests.conftest import Env
from tests.factories import Tenant, tenant
from tests.scratch import REDIS_URL

T0 = int(datetime(2026, 11, 10, 12, 0, tzinfo=UTC).timestamp())
MONTH = "2026-11"
CHANNELS = ("email", "webhook")


@dataclass
class World:
    a1: Tenant
    a2: Tenant
    g: GlobalStore
    dc: DatacenterStore
    store: AdmissionStore
    meter: Meter
    checker: LimitChecker
    dispatched: list[int] = field(default_factory=list)
    t: int = T0

    @property
    def account(self) -> int:
        return self.a1.account_id

    def after(self) -> AfterCommit:
        return AfterCommit(self.checker, self.store, self.dispatched.extend)

    def second(self, live: LiveLimits | None = None) -> None:
        """Flush, then tick the next second (and run the post-tick check if given)."""
        self.meter.flush()
        self.t += 1
        result = tick(self.g, {"dc1": self.dc}, liveness_timeout=60, sample_retention=3600,
                      now=self.t)  # fmt: skip
        assert result.committed
        if live is not None:
            live.after_tick(result.second, result.accounts)


@pytest.fixture
def world(env: Env) -> Iterator[World]:
    a1 = tenant("stats", name="a")
    a2 = tenant("stats", account_id=a1.account_id, name="a")
    client = redis.Redis.from_url(REDIS_URL)
    dc = DatacenterStore(client, env.prefix, "dc1")
    with unit_of_work() as session:
        staff.create_package(session, "small", {"connections": (10, 20), "messages": (100, 200)})
        change = staff.set_package(session, a1.account_id, "small", by="test")
    store = AdmissionStore(client, env.prefix)
    store.write(change.admission)
    checker = LimitChecker(get_engine(), CHANNELS, refresh=0.0)
    yield World(a1, a2, GlobalStore(client, env.prefix), dc, store, Meter(dc, "fe1"), checker)
    client.close()


def alerts() -> list[tuple[str, str, int]]:
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(LimitAlert.metric, LimitAlert.level, LimitAlert.usage).order_by(LimitAlert.id)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def deliveries() -> int:
    with get_engine().connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(AlertDelivery)) or 0)


def connect(w: World, app: Tenant, n: int) -> None:
    for _ in range(abs(n)):
        (w.meter.connection_opened if n > 0 else w.meter.connection_closed)(str(app.app_id))


def test_levels_alert_once_each_from_the_accounts_peak_not_the_sum_of_its_apps(
    world: World,
) -> None:
    w = world
    aggregator = Aggregator(get_engine(), w.g, {"dc1": w.dc},
                            on_accounts=AggregateLimits(w.checker, w.after()))  # fmt: skip
    connect(w, w.a1, 6)
    connect(w, w.a2, 3)
    w.second()  # account: 9, warning (>= 8)
    connect(w, w.a1, -4)
    connect(w, w.a2, 3)
    w.second()  # a1 peaked at 6, a2 at 6: their sum, 12, would be soft; the account is at 8
    assert aggregator.run().committed
    assert alerts() == [("connections", "warning", 9)]
    assert deliveries() == 2
    assert sorted(w.dispatched) == sorted(_delivery_ids())

    for _ in range(3):  # still at the warning level: nothing new
        w.second()
        aggregator.run()
    assert len(alerts()) == 1

    connect(w, w.a2, 13)  # 21: soft and hard in one step, each alerted
    w.second()
    aggregator.run()
    assert alerts()[1:] == [("connections", "soft", 21), ("connections", "hard", 21)]
    assert deliveries() == 6

    # Messages (published + delivered, over the month) reach 200: the hard level blocks
    # publishing for the rest of the month, and the block is mirrored for the gateways.
    for _ in range(50):
        w.meter.message_published(str(w.a1.app_id), "c", 10)
        w.meter.message_delivered(str(w.a2.app_id), "c", 10, count=3)
    w.second()
    aggregator.run()
    assert alerts()[3:] == [("messages", "warning", 200), ("messages", "soft", 200),
                            ("messages", "hard", 200)]  # fmt: skip
    blocked = w.store.read()[w.account]
    assert (blocked.publish_blocked_month, blocked.publish_blocked_by) == (MONTH, "messages")
    assert blocked.connections_hard == 20  # from the package

    w.second()
    aggregator.run()
    assert len(alerts()) == 6
    assert deliveries() == 12


def _delivery_ids() -> list[int]:
    with get_engine().connect() as conn:
        return list(conn.scalars(select(AlertDelivery.id)))


def test_the_concurrent_metrics_are_caught_within_the_tick(world: World) -> None:
    w = world
    live = LiveLimits(get_engine(), w.checker, w.store, w.after(), refresh=0.0)
    connect(w, w.a1, 9)
    w.second(live)  # 9 of hard 20: below half of it, not listed for the gateways
    assert alerts() == [("connections", "warning", 9)]  # no aggregation cycle ran
    assert w.account not in w.store.read_live()
    connect(w, w.a2, 1)
    w.second(live)  # 10: the quota, and half the hard limit: listed
    assert alerts()[1:] == [("connections", "soft", 10)]
    assert w.store.read_live()[w.account] == (10, 0)
    connect(w, w.a1, -6)
    w.second(live)  # 4: no longer listed
    assert w.account not in w.store.read_live()
    assert len(alerts()) == 2
    assert deliveries() == 4


def test_two_checkers_racing_record_a_level_once(world: World) -> None:
    w = world
    checkers = [LimitChecker(get_engine(), CHANNELS, refresh=0.0) for _ in range(2)]
    usage = np.array([[12, 0, 0, 0]], dtype=np.int64)  # soft (and warning) reached
    accounts = np.array([w.account], dtype=np.int64)
    found = [c.detect(MONTH, accounts, usage) for c in checkers]
    assert [[(a.metric, a.level) for a in f] for f in found] == [
        [("connections", "warning"), ("connections", "soft")]
    ] * 2
    barrier = threading.Barrier(2)
    recorded = []

    def record(checker: LimitChecker, alerts: list) -> None:  # type: ignore[type-arg]
        with get_engine().begin() as conn:
            barrier.wait()
            recorded.append(checker.record(conn, MONTH, alerts, datetime.now(UTC)))

    threads = [
        threading.Thread(target=record, args=pair) for pair in zip(checkers, found, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r.alerts) for r in recorded) == [0, 2]  # one recorded both, one nothing
    assert sorted(len(r.deliveries) for r in recorded) == [0, 4]
    assert [a[:2] for a in alerts()] == [("connections", "warning"), ("connections", "soft")]


def test_level_arithmetic() -> None:
    assert levels.default_hard(100) == 250
    assert levels.default_hard(3) == 8  # 7.5 rounded up
    assert levels.thresholds(101, 300) == (81, 101, 300)  # 80.8 rounded up
    quota = np.array([10, 10, 10, 10, 10, 0, -1])
    hard = np.array([25, 25, 25, 25, 25, 0, -1])
    usage = np.array([7, 8, 10, 24, 25, 0, 10**9])
    assert levels.level_of(usage, quota, hard).tolist() == [0, 1, 2, 2, 3, 0, 0]
    assert METRICS == ("connections", "channels", "messages", "data")


def test_a_check_that_fails_does_not_take_the_cycles_rollups_with_it(world: World) -> None:
    w = world
    aggregator = Aggregator(get_engine(), w.g, {"dc1": w.dc},
                            on_accounts=AggregateLimits(w.checker, w.after()))  # fmt: skip
    connect(w, w.a1, 12)  # warning and soft: their deliveries cannot be written
    w.second()
    with get_engine().begin() as conn:
        conn.exec_driver_sql("ALTER TABLE alert_deliveries RENAME TO alert_deliveries_away")
    try:
        assert aggregator.run().committed
    finally:
        with get_engine().begin() as conn:
            conn.exec_driver_sql("ALTER TABLE alert_deliveries_away RENAME TO alert_deliveries")
    assert alerts() == []  # the check's savepoint rolled back whole
    with get_engine().connect() as conn:
        peak = query.periods(conn, query.Query(APP, w.a1.app_id, Unit.MINUTE, limit=1))
    assert peak[0]["connections.all.peak"] == 12  # the cycle's rollups committed

    connect(w, w.a1, 1)  # the next time the account moves, the levels are found again
    w.second()
    aggregator.run()
    assert [a[:2] for a in alerts()] == [("connections", "warning"), ("connections", "soft")]


def test_the_admission_sync_heals_the_mirror_and_lifts_blocks_of_an_ended_month(
    world: World,
) -> None:
    w = world
    with get_engine().begin() as conn:
        # Publishing blocked in a month that has ended (the account stays on its package).
        LimitsRepository(conn).set_admission(
            {w.account: AdmissionRow(20, None, "2026-10", "messages")}, datetime.now(UTC)
        )
    w.store.write({999: AdmissionRow(connections_hard=1)})  # in Redis only: drift

    assert sync_admission(get_engine(), w.store, now=datetime(2026, 11, 10, tzinfo=UTC)) == 1
    assert w.store.read() == {w.account: AdmissionRow(connections_hard=20)}
    with get_engine().connect() as conn:
        assert LimitsRepository(conn).admission() == {w.account: AdmissionRow(20)}
