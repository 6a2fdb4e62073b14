"""Retention deletes old rows per unit, and a deleted period never reads as a carried value."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from sqlalchemy import text

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
from tests.rollups.seconds import Seconds
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


def test_minute_rows_that_closed_rows_lag_by_stay_until_those_are_settled(env: Env) -> None:
    """An app's hour closes having changed since written only in its last minute (a new
    peak, 3 connections, at 09:59:40), and is not settled (``Book.lag``): its copy in
    usage_rollups says 1 (written by the first cycle), and reads widen it by that minute's
    row, moved there since. Ten days later retention
    keeps that minute's day of minute rows, so the hour still reads 3; once the aggregator
    has settled the hour, the day goes, and the hour still reads 3."""
    t = tenant("stats")
    client = redis.Redis.from_url(REDIS_URL)
    g, dc = GlobalStore(client, env.prefix), DatacenterStore(client, env.prefix, "dc1")
    meter = Meter(dc, "fe-r", liveness_timeout=10**6)
    app = str(t.app_id)
    hour = 1_800_000_000 - 1_800_000_000 % DAY - 20 * DAY + 10 * 3600  # 10:00, 20 days ago
    with get_engine().begin() as conn:
        partitions.ensure(conn, hour)
    aggregator = Aggregator(get_engine(), g, {"dc1": dc}, settle_within=None)

    seconds = Seconds(app, meter, g, dc, aggregator)
    at = seconds.at

    at(hour - 110, opened=1)  # 09:58:10, the hour's first minute
    at(hour - 50, opened=1)  # 09:59:10: 09:58 has left the state row, the hour is written
    at(hour - 20, opened=1)  # 09:59:40: a new peak in the hour's last minute
    at(hour + 5, closed=1)  # 10:00:05: the hour closes, lagging by 09:59, held
    at(hour + 60)  # 10:01: 09:59's row has left the state row for usage_rollups

    def hour_peak() -> int:
        with get_engine().connect() as conn:
            q = query.Query(APP, t.app_id, Unit.HOUR, start=hour - 3600, end=hour, limit=10)
            [entry] = query.periods(conn, q)
        return int(entry["connections.all.peak"])

    with get_engine().connect() as conn:
        copy = conn.execute(
            text(
                "SELECT peak FROM usage_rollups WHERE scope = 1 AND entity_id = :e "
                "AND unit = 2 AND period_start = :p"
            ),
            {"e": t.app_id, "p": hour - 3600},
        ).scalar_one()
    assert copy == 1
    assert hour_peak() == 3
    now = hour + 10 * DAY
    kept = {Unit.MINUTE: 7 * DAY, Unit.HOUR: 90 * DAY, Unit.DAY: None, Unit.MONTH: None}
    old_day = partitions.name(Unit.MINUTE, datetime.fromtimestamp(hour - hour % DAY, UTC))
    result = enforce_retention(get_engine(), {"dc1": dc}, kept, now=now)
    assert old_day not in result.dropped["minute"]
    assert hour_peak() == 3

    seconds.aggregator = Aggregator(get_engine(), g, {"dc1": dc}, settle_within=0)
    at(hour + 61)  # its next cycle settles the hour (due at 09:59's end)
    result = enforce_retention(get_engine(), {"dc1": dc}, kept, now=now)
    assert old_day in result.dropped["minute"]
    assert hour_peak() == 3
    client.close()
