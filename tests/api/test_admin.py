"""``GET /admin/connection-count`` answers exactly as seed 000 documents it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from metering.api.app import create_app
from metering.core import redis as redis_clients
from metering.gateway.sdk import Meter
from metering.live.store import DatacenterStore, Transport
from tests.conftest import Env
from tests.factories import tenant

UNAUTHORIZED = {
    "RC": 401,
    "RM": "Unauthorized",
    "error": {"code": "INVALID_API_KEY", "message": "Invalid or missing API key"},
}
FORBIDDEN = {
    "RC": 403,
    "RM": "Forbidden",
    "error": {"code": "PERMISSION_DENIED", "message": "Platform API permission required"},
}


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


def test_counts_the_keys_app_websocket_connections_only(client: TestClient, env: Env) -> None:
    mine = tenant("platform")
    other = tenant("platform", name="other")
    fe = Meter(DatacenterStore(redis_clients.primary(), env.prefix, "dc1"), "fe-1")
    for _ in range(3):
        fe.connection_opened(str(mine.app_id), Transport.WEBSOCKET)
    fe.connection_opened(str(mine.app_id), Transport.STREAMING)
    fe.connection_opened(str(mine.app_id), Transport.LONG_POLL)
    fe.connection_opened(str(other.app_id), Transport.WEBSOCKET)
    fe.flush()

    response = client.get("/admin/connection-count", headers={"IM-API-KEY": mine.key})
    assert response.status_code == 200
    assert response.json() == {"RC": 0, "RM": "OK", "result": {"count": 3}}
    assert list(response.json()) == ["RC", "RM", "result"]


def test_an_app_with_no_connections_counts_zero(client: TestClient) -> None:
    mine = tenant("platform")
    response = client.get("/admin/connection-count", headers={"IM-API-KEY": mine.key})
    assert (response.status_code, response.json()) == (
        200,
        {"RC": 0, "RM": "OK", "result": {"count": 0}},
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"IM-API-KEY": ""},
        {"IM-API-KEY": "mk_not-a-real-key"},
        {"IM-API-KEY": "x" * 10_000},
        {"IM-API-KEY": "mk_\u00e9\u00e8"},
    ],
    ids=["missing", "empty", "unknown", "huge", "non-ascii"],
)
def test_a_missing_or_unknown_key_gets_401(client: TestClient, headers: dict[str, str]) -> None:
    tenant("platform")
    response = client.get(
        "/admin/connection-count",
        headers={k: v.encode() if not v.isascii() else v for k, v in headers.items()},  # type: ignore[misc]
    )
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED


def test_a_key_without_platform_permission_gets_403(client: TestClient) -> None:
    stats_only = tenant("stats", "billing")
    response = client.get("/admin/connection-count", headers={"IM-API-KEY": stats_only.key})
    assert response.status_code == 403
    assert response.json() == FORBIDDEN


def test_a_revoked_key_is_refused(client: TestClient, env: Env) -> None:
    from metering.accounts.models import ApiKey
    from metering.core.database import unit_of_work, utcnow

    mine = tenant("platform")
    with unit_of_work() as session:
        for key in session.query(ApiKey).all():
            key.revoked_at = utcnow()
    fresh = TestClient(create_app(env.settings))  # a new process: no cached key
    with fresh:
        response = fresh.get("/admin/connection-count", headers={"IM-API-KEY": mine.key})
    assert (response.status_code, response.json()) == (401, UNAUTHORIZED)


def test_unknown_routes_and_methods_answer_in_the_envelope(client: TestClient) -> None:
    response = client.get("/admin/nope")
    assert response.status_code == 404
    assert response.json()["RC"] == 404
    response = client.post("/admin/connection-count")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


def test_the_api_publishes_its_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operation = doc["paths"]["/admin/connection-count"]["get"]
    assert set(operation["responses"]) >= {"200", "401", "403"}
    assert any(p["name"] == "IM-API-KEY" for p in operation["parameters"])
