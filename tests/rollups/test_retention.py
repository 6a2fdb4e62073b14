"""Retention deletes old rows per unit, and a deleted period never reads as a carried value."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from metering.core.database import get_engine
from metering.gateway.sdk import Meter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import partitions, query
from metering.rollups.fold import APP
from metering.rollups.periods import Unit
from metering.rollups.retention import enforce_retention
from metering.rollups.service import Aggregator
from tests.conftest import Env
from tests.factories import tenant
from tests.scratch import REDIS_URL

DAY = 86_400


def test_old_minute_rows_go_and_stay_gone_while_hours_are_kept(env: Env) -> None:
    t = tenant("stats")
    client = redis.Redis.from_url(REDIS_URL)
    g, dc = GlobalStore(client, env.prefix), DatacenterStore(client, env.prefix, "dc1")
    meter = Meter(dc, "fe-r", liveness_timeout=60)
    aggregator = Aggregator(get_engine(), g, {"dc1": dc})
    now = 1_800_000_000 - 1_800_000_000 % DAY + 12 * 3600
    old = now - 10 * DAY
    app = str(t.app_id)
    with get_engine().begin() as conn:
        partitions.ensure(conn, old)  # the old minute rows get a day's partition of their own
    for second in (old, old + 1, old + 2, now - 2, now - 1, now):
        meter.connection_opened(app)
        meter.flush()
        tick(g, {"dc1": dc}, liveness_timeout=60, sample_retention=100, now=second)
    # The gap of ten days between is missed seconds: the app held 3 connections, uncounted.
    assert aggregator.run().committed

    def minutes() -> list[str]:
        with get_engine().connect() as conn:
            q = query.Query(APP, t.app_id, Unit.MINUTE, limit=1000)
            return [e["intervalId"] for e in query.periods(conn, q)]

    def hours() -> list[str]:
        with get_engine().connect() as conn:
            q = query.Query(APP, t.app_id, Unit.HOUR, limit=1000)
            return [e["intervalId"] for e in query.periods(conn, q)]

    before_minutes, before_hours = minutes(), hours()
    assert len(before_minutes) == 3  # 12:00, 11:59 today and 12:00 ten days ago
    result = enforce_retention(
        get_engine(),
        {"dc1": dc},
        {Unit.MINUTE: 7 * DAY, Unit.HOUR: 90 * DAY, Unit.DAY: None, Unit.MONTH: None},
        now=now,
    )
    # The old minute rows (the app's and its account's) went with their day's partition;
    # nothing was deleted row by row.
    old_day = partitions.name(Unit.MINUTE, datetime.fromtimestamp(old - old % DAY, UTC))
    assert old_day in result.dropped["minute"]
    assert result.dropped["hour"] == []
    assert result.deleted == {"minute": 0, "hour": 0}
    assert minutes() == before_minutes[:2]  # the recent minutes; the old one is gone
    assert hours() == before_hours
    client.close()
