"""The aggregator on SQLite, the embedded default's store of record: the same code as on
Postgres builds the same rollups, a cycle run again (by the same worker or a restarted one)
counts nothing twice, an older gateway's six counter totals count with no refusals, and a
cycle that cannot read the counters keeps nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from metering.accounts import service
from metering.accounts.store import RegistryStore
from metering.core.database import make_engine
from metering.core.migrate import upgrade
from metering.gateway.sdk import Meter
from metering.live import store
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore, Transport
from metering.rollups import query
from metering.rollups.fold import ACCOUNT, APP
from metering.rollups.periods import Unit
from metering.rollups.service import Aggregator
from tests.conftest import Env
from tests.scratch import REDIS_URL

T0 = int(datetime(2026, 5, 1, 12, 0, tzinfo=UTC).timestamp())
# Open connections and active channels at each counted second T0, T0+1, ...
CONNS = [1, 2, 3, 3, 2, 4, 4, 1, 0, 2]
CHANNELS = [{"a"}, {"a"}, {"a"}, {"a"}, {"a"}, {"a", "b"}, {"a", "b"}, {"b"}, {"b"}, {"b"}]


@dataclass
class World:
    engine: Engine
    app_id: int
    account_id: int
    global_store: GlobalStore
    dc: DatacenterStore
    meter: Meter

    def aggregator(self) -> Aggregator:
        """A new worker: it knows nothing but what the database holds."""
        return Aggregator(self.engine, self.global_store, {"dc1": self.dc})

    def count(self, second: int) -> None:
        self.meter.flush()
        result = tick(
            self.global_store, {"dc1": self.dc}, liveness_timeout=60,
            sample_retention=10_000, now=second,
        )  # fmt: skip
        assert result.committed

    def minute(self, scope: int = APP) -> dict[str, Any]:
        entity = self.app_id if scope == APP else self.account_id
        with self.engine.connect() as conn:
            [entry] = query.periods(conn, query.Query(scope, entity, Unit.MINUTE))
        return entry


@pytest.fixture
def world(env: Env, tmp_path: Path) -> Iterator[World]:
    url = f"sqlite:///{tmp_path / 'metering.db'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        account = service.create_account(session, "acme")
        app = service.create_app(session, account.id, "chat")
    client = redis.Redis.from_url(REDIS_URL)
    # The tick sums apps per account from the registry the gateways read.
    RegistryStore(client, env.prefix).publish({app.id: account.id})
    dc = DatacenterStore(client, env.prefix, "dc1")
    yield World(
        engine, app.id, account.id, GlobalStore(client, env.prefix), dc,
        Meter(dc, "fe-1", liveness_timeout=60),
    )  # fmt: skip
    client.close()
    engine.dispose()


def play(world: World, seconds: range) -> int:
    """Follow CONNS and CHANNELS over ``seconds`` (offsets from T0); the connections opened."""
    app, meter = str(world.app_id), world.meter
    opened = 0
    for x in seconds:
        now = CONNS[x - 1] if x else 0
        for _ in range(CONNS[x] - now):
            meter.connection_opened(app, Transport.WEBSOCKET)
            opened += 1
        for _ in range(now - CONNS[x]):
            meter.connection_closed(app, Transport.WEBSOCKET)
        before = CHANNELS[x - 1] if x else set()
        for channel in sorted(CHANNELS[x] - before):
            meter.channel_attached(app, channel)
        for channel in sorted(before - CHANNELS[x]):
            meter.channel_detached(app, channel)
        if x == 1:
            meter.message_published(app, "a", 10)
            meter.message_published(app, "a", 20)
        if x == 3:  # enforcement refused a channel attach, and later three messages
            meter.channel_refused(app)
        if x == 6:
            meter.message_delivered(app, "b", 30, count=5)
        if x == 7:
            meter.message_refused(app, count=3)
        world.count(T0 + x)
    return opened


EXPECTED = {
    "intervalId": "2026-05-01:12:00",
    "unit": "minute",
    "inProgress": True,
    "seconds": 10,
    "connections.all.peak": 4,
    "connections.all.peakAt": (T0 + 5) * 1000,
    "connections.all.min": 0,
    "connections.all.mean": 2.2,  # 22 connection-seconds over 10 counted seconds
    "connections.all.refused": 0,
    "connections.websocket.peak": 4,
    "channels.peak": 2,
    "channels.min": 1,
    "channels.mean": 1.2,
    "channels.opened": 2,
    "channels.refused": 1,
    "messages.published.count": 2,
    "messages.published.data": 30,
    "messages.delivered.count": 5,
    "messages.delivered.data": 150,
    "messages.all.count": 7,
    "messages.all.data": 180,
    "messages.refused": 3,
}


def test_two_cycles_on_sqlite_build_the_rollups(world: World) -> None:
    aggregator = world.aggregator()
    opened = play(world, range(5))
    first = aggregator.run()
    assert (first.committed, first.second, first.samples) == (True, T0 + 4, 5)
    opened += play(world, range(5, 10))
    second = aggregator.run()
    assert (second.committed, second.second, second.samples) == (True, T0 + 9, 5)

    assert sum(CONNS) / len(CONNS) == EXPECTED["connections.all.mean"]
    want = {**EXPECTED, "connections.all.opened": opened}
    assert opened == 7
    assert world.minute(APP) == want
    assert world.minute(ACCOUNT) == want  # the account's only app


def test_a_cycle_run_again_counts_nothing_twice(world: World) -> None:
    aggregator = world.aggregator()
    play(world, range(5))
    assert aggregator.run().committed
    play(world, range(5, 10))
    assert aggregator.run().committed
    settled = world.minute(APP)

    again = aggregator.run()
    assert (again.committed, again.reason) == (False, "nothing new")
    # A gateway repeats its last write (counts are absolute), and a restarted worker that
    # knows only the database runs the cycle once more: nothing moves.
    world.meter.flush()
    restarted = world.aggregator().run()
    assert (restarted.committed, restarted.reason) == (False, "nothing new")
    assert world.minute(APP) == settled

    # New messages after the restart are applied once, beyond the totals already applied.
    world.meter.message_published(str(world.app_id), "b", 40)
    world.count(T0 + 10)
    assert world.aggregator().run().committed
    entry = world.minute(APP)
    assert (entry["messages.published.count"], entry["messages.published.data"]) == (3, 70)
    assert entry["messages.delivered.count"] == settled["messages.delivered.count"]
    assert entry["connections.all.opened"] == settled["connections.all.opened"]
    assert (entry["channels.refused"], entry["messages.refused"]) == (1, 3)
    assert world.minute(ACCOUNT)["messages.published.count"] == 3


def test_an_older_gateways_six_totals_are_applied_with_no_refusals_and_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    aggregator = world.aggregator()
    play(world, range(5))
    assert aggregator.run().committed
    before = world.minute(APP)
    assert (before["channels.refused"], before["messages.refused"]) == (1, 0)

    # A gateway of before this version writes six totals per app through the same script:
    # opened, refused, published and delivered (count, bytes).
    monkeypatch.setattr(store, "COUNTERS_PER_APP", 6)
    totals = (2, 1, 4, 40, 0, 0)

    def old_gateway_flushes() -> None:
        status = world.dc.flush(
            "fe-old#1", full=True, timeout=60, epoch="e", conns=[], channels=[],
            counters=[(str(world.app_id), totals)],
        )  # fmt: skip
        assert status in {"ok", "replaced"}

    old_gateway_flushes()
    world.count(T0 + 5)
    assert aggregator.run().committed
    after = world.minute(APP)
    moved = {k: after[k] - before[k] for k in COUNTED}
    assert moved == {
        "connections.all.opened": 2,
        "connections.all.refused": 1,
        "messages.published.count": 4,
        "messages.published.data": 40,
        "messages.delivered.count": 0,
        "channels.refused": 0,
        "messages.refused": 0,
    }

    # Both gateways repeat their last write (absolute totals): nothing more is applied.
    old_gateway_flushes()
    world.meter.flush()
    world.count(T0 + 6)
    assert aggregator.run().committed
    assert {k: world.minute(APP)[k] for k in COUNTED} == {k: after[k] for k in COUNTED}


COUNTED = (
    "connections.all.opened", "connections.all.refused", "messages.published.count",
    "messages.published.data", "messages.delivered.count", "channels.refused", "messages.refused",
)  # fmt: skip


def test_a_cycle_that_cannot_read_the_counters_commits_nothing_and_the_next_counts_once(
    world: World,
) -> None:
    # The counters are read on a thread of their own while the samples are folded: its
    # error is the cycle's, which keeps nothing of what it folded meanwhile.
    aggregator = world.aggregator()
    opened = play(world, range(5))
    assert aggregator.run().committed
    before = world.minute(APP)
    opened += play(world, range(5, 10))
    [inc] = world.dc.client.zrange(world.dc.key("counter-changes"), 0, -1)
    counters = world.dc.key(f"fe:{inc.decode()}:counters")
    client = world.dc.client
    client.rename(counters, f"{counters}:aside")
    client.set(counters, "not a hash")  # every read of it fails (WRONGTYPE)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        aggregator.run()
    assert world.minute(APP) == before

    client.delete(counters)
    client.rename(f"{counters}:aside", counters)
    again = aggregator.run()
    assert (again.committed, again.second, again.samples) == (True, T0 + 9, 5)
    assert world.minute(APP) == {**EXPECTED, "connections.all.opened": opened}
    assert world.minute(ACCOUNT) == {**EXPECTED, "connections.all.opened": opened}
