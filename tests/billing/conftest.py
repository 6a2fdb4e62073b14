"""A month of usage for real: gateways' counts go through the live tick and the aggregator
into Postgres on a controlled clock, over the end of October 2026, for accounts that existed
all month (their creation is backdated: the clock of the accounts table is the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from billing import service
from metering.accounts.models import Account
from metering.core.database import get_engine, unit_of_work
from metering.core.migrate import upgrade
from metering.gateway.sdk import Meter
from metering.limits import staff
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups.service import Aggregator
from tests.conftest import Env
from tests.factories import Tenant, tenant
from tests.scratch import REDIS_URL

MONTH = "2026-10"
END = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())  # October's end, exclusive
OCT = datetime(2026, 10, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class World:
    a1: Tenant  # account A's two apps
    a2: Tenant
    b: Tenant  # account B: on a package, no usage at all
    n: Tenant  # account N: on no package
    g: GlobalStore
    dc: DatacenterStore
    meter: Meter
    aggregator: Aggregator
    t: int = END - 10
    seen: list[int] = field(default_factory=list)

    @property
    def a(self) -> int:
        return self.a1.account_id

    def second(self) -> None:
        """Flush, then tick the next second."""
        self.meter.flush()
        self.t += 1
        result = tick(self.g, {"dc1": self.dc}, liveness_timeout=60, sample_retention=3600,
                      now=self.t)  # fmt: skip
        assert result.committed

    def until(self, second: int) -> None:
        while self.t < second:
            self.second()

    def connect(self, app: Tenant, n: int) -> None:
        for _ in range(abs(n)):
            (self.meter.connection_opened if n > 0 else self.meter.connection_closed)(
                str(app.app_id)
            )

    def aggregate(self) -> None:
        assert self.aggregator.run().committed


@pytest.fixture(params=["postgres"])
def backend(
    request: pytest.FixtureRequest, env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """The store of record: the session's Postgres, or (parametrized ``sqlite``) a SQLite
    file built by the migrations, as in the embedded default."""
    if request.param == "postgres":
        yield "postgres"
        return
    before = env.vars["METERING_DATABASE_URL"]
    url = f"sqlite:///{tmp_path / 'metering.db'}"
    upgrade(url)
    env.override(monkeypatch, METERING_DATABASE_URL=url)
    yield "sqlite"
    env.override(monkeypatch, METERING_DATABASE_URL=before)


@pytest.fixture
def world(env: Env, backend: str) -> Iterator[World]:
    a1 = tenant("billing", name="a")
    a2 = tenant("billing", account_id=a1.account_id, name="a")
    b, n = tenant("billing", name="b"), tenant("billing", name="n")
    with unit_of_work() as session:
        session.execute(update(Account).values(created_at=OCT))
        staff.create_package(session, "small", {"connections": (1000, 2000)})
        staff.create_package(session, "large", {"connections": (1000, 2000)})
        # A: small from the month's start, large from the 20th (in force at the end), small
        # again just after the month: October is billed on large, listing the change.
        staff.set_package(session, a1.account_id, "small", by="ops", now=at("2026-10-01 00:00"))
        staff.set_package(session, a1.account_id, "large", by="sales", now=at("2026-10-20 12:00"))
        staff.set_package(session, a1.account_id, "small", by="ops", now=at("2026-11-01 00:00:05"))
        staff.set_package(session, b.account_id, "large", by="ops", now=at("2026-10-01 00:00"))
    with get_engine().begin() as conn:
        price = service.parse_price
        service.set_prices(
            conn, "large", currency="USD", base_fee="49.00", by="finance",
            prices=dict(
                price(p) for p in (
                    "connections=5:1.50", "channels=2:0.25", "messages=99:0.005",
                    "data=0:0.01:1000",
                )
            ),
        )  # fmt: skip
        service.set_prices(conn, "small", currency="USD", base_fee="9.00", by="finance", prices={})
    client = redis.Redis.from_url(REDIS_URL)
    dc = DatacenterStore(client, env.prefix, "dc1")
    g = GlobalStore(client, env.prefix)
    yield World(a1, a2, b, n, g, dc, Meter(dc, "fe1"), Aggregator(get_engine(), g, {"dc1": dc}))
    client.close()


def october(w: World) -> None:
    """Account A's end of October, hand-computed (the tests assert these figures):

    - connections: a1 6 and a2 3 at 23:59:51 (the account: 9), then a1 2 and a2 6 (8): each
      app peaked at 6, their sum would be 12; the account's peak is 9, at 23:59:51;
    - channels: a1 two, a2 one, then a2 two at 23:59:52: the account's peak is 4, first
      reached in the hour starting 23:00;
    - messages: 50 published on a1 (10 bytes each), 50 delivered three times each on a2:
      200 messages, 2 000 bytes, folded by a cycle in October; 7 more published in November
      are not October's.
    """
    w.connect(w.a1, 6)
    w.connect(w.a2, 3)
    w.meter.channel_attached(str(w.a1.app_id), "x")
    w.meter.channel_attached(str(w.a1.app_id), "y")
    w.meter.channel_attached(str(w.a2.app_id), "z")
    w.second()  # 23:59:51
    w.connect(w.a1, -4)
    w.connect(w.a2, 3)
    w.meter.channel_attached(str(w.a2.app_id), "w")
    for _ in range(50):
        w.meter.message_published(str(w.a1.app_id), "x", 10)
        w.meter.message_delivered(str(w.a2.app_id), "z", 10, count=3)
    w.second()  # 23:59:52
    # Messages count in the period of the last second their cycle counted (docs/rollups.md):
    # this cycle's is October's.
    w.aggregate()
    w.until(END + 1)
    for _ in range(7):
        w.meter.message_published(str(w.a1.app_id), "x", 10)
    w.until(END + 3)
