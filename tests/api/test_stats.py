"""``GET /v1/stats``: an app's or its account's rollups period by period, and a clear 4xx in
the seed's envelope for every bad request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from metering.api.app import create_app
from metering.core.database import get_engine
from metering.gateway.sdk import Meter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore, Transport
from metering.rollups.service import Aggregator
from tests.conftest import Env
from tests.factories import Tenant, tenant
from tests.scratch import REDIS_URL

T0 = int(datetime(2026, 3, 31, 23, 57, tzinfo=UTC).timestamp())
M0, M1, M2 = "2026-03-31:23:57", "2026-03-31:23:58", "2026-03-31:23:59"


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


@pytest.fixture
def keys(env: Env) -> Tenant:
    return tenant("stats")


def get(client: TestClient, key: str | None, **params: Any) -> Any:
    headers = {"IM-API-KEY": key} if key is not None else {}
    return client.get("/v1/stats", params=params, headers=headers)


def assert_error(response: Any, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["RC", "RM", "error"], body
    assert body["RC"] == status
    assert isinstance(body["RM"], str)
    assert body["RM"]
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    for word in words:
        assert word in body["error"]["message"], body


# -- bad requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"start": 2_000_000, "end": 1_000_000}, ("start must be before end",)),
        ({"start": 1_000_000, "end": 1_000_000}, ("start must be before end",)),
        # Inverted by less than a second: refused, not rounded into a second-long range.
        ({"start": 1_000_500, "end": 1_000_200}, ("start must be before end",)),
        ({"unit": "week"}, ("unknown unit 'week'", "minute, hour, day, month")),
        ({"unit": ""}, ("unknown unit ''",)),
        ({"direction": "sideways"}, ("direction must be backwards or forwards", "'sideways'")),
        ({"scope": "org"}, ("scope must be app or account", "'org'")),
        ({"limit": 0}, ("limit must be between 1 and 1000, got 0",)),
        ({"limit": 1001}, ("limit must be between 1 and 1000, got 1001",)),
        ({"limit": 10**30}, ("limit must be between 1 and 1000",)),
        ({"limit": -1}, ("limit must be between 1 and 1000, got -1",)),
        ({"limit": "ten"}, ("limit", "valid integer")),
        ({"limit": "1.5"}, ("limit", "valid integer")),
        ({"start": "yesterday"}, ("start", "valid integer")),
        ({"end": "2026-03-31T23:57"}, ("end", "valid integer")),
        ({"start": -1}, ("start must be milliseconds since the epoch, got -1",)),
        ({"end": 10**16}, ("end must be milliseconds since the epoch",)),
        ({"app": "mine"}, ("app", "valid integer")),
    ],
    ids=[
        "inverted-range", "empty-range", "inverted-within-a-second", "unknown-unit",
        "empty-unit", "unknown-direction", "unknown-scope", "limit-0", "limit-1001",
        "limit-huge", "limit-negative", "limit-word", "limit-fraction", "start-word", "end-iso",
        "start-negative", "end-far", "app-word",
    ],
)  # fmt: skip
def test_a_bad_parameter_is_a_400_that_names_it(
    client: TestClient, keys: Tenant, params: dict[str, Any], words: tuple[str, ...]
) -> None:
    response = get(client, keys.key, **params)
    assert_error(response, 400, "INVALID_REQUEST", *words)
    assert response.json()["RM"] == "Bad Request"


def test_an_app_of_another_account_is_forbidden(client: TestClient, keys: Tenant) -> None:
    other = tenant("stats", name="other")
    for scope in ("app", "account"):
        response = get(client, keys.key, app=other.app_id, scope=scope)
        assert_error(
            response, 403, "PERMISSION_DENIED", f"app {other.app_id} is not an app of this key"
        )
    # An app that does not exist is not one of the account's either (and is not confirmed).
    assert_error(get(client, keys.key, app=999_999), 403, "PERMISSION_DENIED", "app 999999")
    big = 99_999_999_999  # past the 32-bit id column: no such app either, not a 500
    assert_error(get(client, keys.key, app=big), 403, "PERMISSION_DENIED", f"app {big}")


def test_a_sibling_app_of_the_same_account_is_allowed(client: TestClient, keys: Tenant) -> None:
    sibling = tenant("platform", account_id=keys.account_id, name="sibling")
    response = get(client, keys.key, app=sibling.app_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"RC": 0, "RM": "OK", "result": []}


def test_a_key_without_the_stats_permission_is_forbidden(client: TestClient) -> None:
    platform_only = tenant("platform", "admission")
    response = get(client, platform_only.key)
    assert_error(response, 403, "PERMISSION_DENIED", "Stats API permission required")
    assert response.json()["RM"] == "Forbidden"


@pytest.mark.parametrize(
    "key", [None, "", "mk_not-a-real-key"], ids=["missing", "empty", "unknown"]
)
def test_a_missing_or_unknown_key_is_a_401(
    client: TestClient, keys: Tenant, key: str | None
) -> None:
    response = get(client, key)
    assert_error(response, 401, "INVALID_API_KEY", "Invalid or missing API key")
    assert response.json()["RM"] == "Unauthorized"


def test_the_key_is_checked_before_the_parameters(client: TestClient) -> None:
    # A caller without a key learns nothing, not even which parameter is wrong.
    assert_error(get(client, None, unit="week", limit=0), 401, "INVALID_API_KEY")


# -- a scenario ---------------------------------------------------------------------------


@dataclass
class World:
    a1: Tenant  # the key's app
    a2: Tenant  # another app of the same account
    global_store: GlobalStore
    dc: DatacenterStore


@pytest.fixture
def world(env: Env) -> Iterator[World]:
    a1 = tenant("stats", name="a")
    a2 = tenant("stats", account_id=a1.account_id, name="a")
    client = redis.Redis.from_url(REDIS_URL)
    yield World(a1, a2, GlobalStore(client, env.prefix), DatacenterStore(client, env.prefix, "dc1"))
    client.close()


def drive(world: World) -> None:
    """Three minutes, 23:57 to 23:59 UTC; a tick counts only the seconds listed below.

    | second | a1 (WebSocket) | a2 (streaming) | account |
    |--------|----------------|----------------|---------|
    | T0     | 2              | 1              | 3       |
    | T0+1   | 3              | 1              | 4       |
    | T0+2   | 1              | 1              | 2       |   aggregation: counters land here
    | T0+60  | 4              | 1              | 5       |
    | T0+61  | 4              | 1              | 5       |
    | T0+120 | 2              | 0              | 2       |   aggregation: counters land here

    a1 has one channel from T0 on. Before the first aggregation a1 publishes one message of
    100 bytes, delivered three times, and refuses one connection and one channel attach, and
    a2 refuses two messages; before the second, a1 publishes one of 50 bytes and refuses
    three.
    """
    a1, a2 = str(world.a1.app_id), str(world.a2.app_id)
    fe = Meter(world.dc, "fe-1", liveness_timeout=60)
    aggregator = Aggregator(get_engine(), world.global_store, {"dc1": world.dc})

    def count(second: int) -> None:
        fe.flush()
        result = tick(
            world.global_store, {"dc1": world.dc}, liveness_timeout=60,
            sample_retention=10_000, now=second,
        )  # fmt: skip
        assert result.committed

    for _ in range(2):
        fe.connection_opened(a1, Transport.WEBSOCKET)
    fe.connection_opened(a2, Transport.STREAMING)
    fe.channel_attached(a1, "chat")
    fe.message_published(a1, "chat", 100)
    fe.message_delivered(a1, "chat", 100, count=3)
    count(T0)
    fe.connection_opened(a1, Transport.WEBSOCKET)
    count(T0 + 1)
    for _ in range(2):
        fe.connection_closed(a1, Transport.WEBSOCKET)
    fe.connection_refused(a1)
    fe.channel_refused(a1)
    fe.message_refused(a2, count=2)
    count(T0 + 2)
    assert aggregator.run().second == T0 + 2

    for _ in range(3):
        fe.connection_opened(a1, Transport.WEBSOCKET)
    fe.message_published(a1, "chat", 50)
    fe.message_refused(a1, count=3)
    count(T0 + 60)
    count(T0 + 61)
    for _ in range(2):
        fe.connection_closed(a1, Transport.WEBSOCKET)
    fe.connection_closed(a2, Transport.STREAMING)
    count(T0 + 120)
    result = aggregator.run()
    assert (result.committed, result.second) == (True, T0 + 120)


def figures(
    seconds: int, *, peak: int, at: int, low: int, mean: float, ws: int, **counts: int
) -> dict[str, Any]:
    """A minute's expected entry: a1 held one channel throughout; ``counts`` by short name."""
    out: dict[str, Any] = {
        "seconds": seconds,
        "connections.all.peak": peak,
        "connections.all.peakAt": at * 1000,
        "connections.all.min": low,
        "connections.all.mean": mean,
        "connections.websocket.peak": ws,
        "channels.peak": 1,
        "channels.min": 1,
        "channels.mean": 1.0,
    }
    names = {
        "opened": "connections.all.opened",
        "refused": "connections.all.refused",
        "ch_opened": "channels.opened",
        "ch_refused": "channels.refused",
        "pub_n": "messages.published.count",
        "pub_b": "messages.published.data",
        "del_n": "messages.delivered.count",
        "del_b": "messages.delivered.data",
        "msg_refused": "messages.refused",
    }
    for short, name in names.items():
        out[name] = counts.get(short, 0)
    out["messages.all.count"] = out["messages.published.count"] + out["messages.delivered.count"]
    out["messages.all.data"] = out["messages.published.data"] + out["messages.delivered.data"]
    return out


# Counters land at the second each aggregation counted up to: T0+2 (minute 23:57) and T0+120.
FIRST = {"opened": 3, "refused": 1, "ch_opened": 1, "ch_refused": 1, "pub_n": 1, "pub_b": 100}
FIRST |= {"del_n": 3, "del_b": 300}
SECOND = {"opened": 3, "pub_n": 1, "pub_b": 50, "msg_refused": 3}
APP_FIGURES = {
    M0: figures(3, peak=3, at=T0 + 1, low=1, mean=2.0, ws=3, **FIRST),
    M1: figures(2, peak=4, at=T0 + 60, low=4, mean=4.0, ws=4),
    M2: figures(1, peak=2, at=T0 + 120, low=2, mean=2.0, ws=2, **SECOND),
}
# a2's streaming connection and refused messages too.
FIRST_ACCOUNT = {**FIRST, "opened": 4, "msg_refused": 2}
ACCOUNT_FIGURES = {
    M0: figures(3, peak=4, at=T0 + 1, low=2, mean=3.0, ws=3, **FIRST_ACCOUNT),
    M1: figures(2, peak=5, at=T0 + 60, low=5, mean=5.0, ws=4),
    M2: figures(1, peak=2, at=T0 + 120, low=2, mean=2.0, ws=2, **SECOND),
}


def ok_result(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert (list(body), body["RC"], body["RM"]) == (["RC", "RM", "result"], 0, "OK")
    result: list[dict[str, Any]] = body["result"]
    return result


def test_an_apps_minutes_newest_first(client: TestClient, world: World) -> None:
    drive(world)
    entries = ok_result(get(client, world.a1.key))  # every default: app, minute, backwards

    assert [e["intervalId"] for e in entries] == [M2, M1, M0]
    for entry in entries:
        assert entry["unit"] == "minute"
        assert entry["appId"] == world.a1.app_id
        assert "accountId" not in entry
        assert entry.items() >= APP_FIGURES[entry["intervalId"]].items(), entry["intervalId"]
    # The watermark is at 23:59:00: that minute is still being counted, the others are done.
    assert entries[0]["inProgress"] is True
    assert all("inProgress" not in e for e in entries[1:])


def test_the_account_scope_sums_its_apps_second_by_second(client: TestClient, world: World) -> None:
    drive(world)
    entries = ok_result(get(client, world.a1.key, scope="account", direction="forwards"))

    assert [e["intervalId"] for e in entries] == [M0, M1, M2]
    for entry in entries:
        assert entry["accountId"] == world.a1.account_id
        assert "appId" not in entry
        assert entry.items() >= ACCOUNT_FIGURES[entry["intervalId"]].items(), entry["intervalId"]
    # The account's peak (4 at T0+1) is below the sum of its apps' peaks (3 + 1).
    assert entries[0]["connections.all.peak"] == 4
    # Another app of the account, named by the key of the first.
    other = ok_result(get(client, world.a1.key, app=world.a2.app_id, direction="forwards"))
    assert [(e["appId"], e["connections.all.peak"], e["messages.refused"]) for e in other] == [
        (world.a2.app_id, 1, 2),
        (world.a2.app_id, 1, 0),
        (world.a2.app_id, 0, 0),  # its connection closed at 23:59:00, the first second counted
    ]


def test_limit_and_direction(client: TestClient, world: World) -> None:
    drive(world)

    def intervals(**params: Any) -> list[str]:
        return [e["intervalId"] for e in ok_result(get(client, world.a1.key, **params))]

    assert intervals(limit=2) == [M2, M1]
    assert intervals(limit=2, direction="backwards") == [M2, M1]
    assert intervals(limit=2, direction="forwards") == [M0, M1]
    assert intervals(limit=1, direction="forwards") == [M0]
    assert intervals(limit=1000, direction="forwards") == [M0, M1, M2]


def test_start_and_end_filter_the_periods(client: TestClient, world: World) -> None:
    drive(world)

    def intervals(**params: Any) -> list[str]:
        return [e["intervalId"] for e in ok_result(get(client, world.a1.key, **params))]

    ms = 1000
    assert intervals(start=(T0 + 60) * ms) == [M2, M1]  # start is inclusive
    assert intervals(end=(T0 + 60) * ms) == [M0]  # end is exclusive
    assert intervals(start=(T0 + 60) * ms, end=(T0 + 120) * ms) == [M1]
    # A start inside a period takes that whole period.
    assert intervals(start=(T0 + 90) * ms, direction="forwards") == [M1, M2]
    assert intervals(start=(T0 + 180) * ms) == []  # after the watermark
    assert intervals(end=T0 * ms) == []  # before anything was counted
    # The same range, by the hour: one period, in progress, with every minute's figures.
    [hour] = ok_result(get(client, world.a1.key, unit="hour", start=T0 * ms))
    assert hour["intervalId"] == "2026-03-31:23"
    assert hour["inProgress"] is True
    assert (hour["seconds"], hour["connections.all.peak"], hour["connections.all.min"]) == (
        6,
        4,
        1,
    )
    assert hour["connections.all.mean"] == round((2 + 3 + 1 + 4 + 4 + 2) / 6, 3)
    assert hour["messages.published.count"] == 2
    assert hour["messages.published.data"] == 150
    assert (hour["channels.refused"], hour["messages.refused"]) == (1, 3)


def test_an_end_a_millisecond_after_a_period_starts_takes_that_period(
    client: TestClient, world: World
) -> None:
    drive(world)
    entries = ok_result(get(client, world.a1.key, end=(T0 + 60) * 1000 + 1))
    assert [e["intervalId"] for e in entries] == [M1, M0]
