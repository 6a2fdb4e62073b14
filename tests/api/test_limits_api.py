"""The limits API: staff endpoints (packages, an account's package and override, alerts) and
``GET /v1/admission``, which gateways not written in Python ask before a connect, an attach
or a publish. Every answer is in the envelope of seed 000; bad input is a 4xx, never a 500."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from metering.accounts.models import ApiKey, Package, PackageChange
from metering.api.app import create_app
from metering.core.database import unit_of_work
from metering.gateway.sdk import Meter
from metering.limits.models import AlertDelivery, LimitAlert
from metering.limits.repository import AdmissionRow, LimitsRepository
from metering.limits.service import month_of
from metering.limits.store import AdmissionStore
from metering.live.service import tick
from metering.live.wiring import datacenter_stores, global_store
from tests.conftest import Env
from tests.factories import Tenant, tenant

UNAUTHORIZED = {
    "RC": 401,
    "RM": "Unauthorized",
    "error": {"code": "INVALID_API_KEY", "message": "Invalid or missing API key"},
}


def forbidden(what: str) -> dict[str, Any]:
    return {
        "RC": 403,
        "RM": "Forbidden",
        "error": {"code": "PERMISSION_DENIED", "message": f"{what} permission required"},
    }


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


@pytest.fixture
def staff() -> Tenant:
    return tenant("staff", name="platform-staff")


def key_id(t: Tenant) -> int:
    with unit_of_work() as session:
        found: int = session.scalars(select(ApiKey.id).where(ApiKey.app_id == t.app_id)).one()
        return found


def call(
    client: TestClient, key: str | None, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    headers = {} if key is None else {"IM-API-KEY": key}
    response = client.request(method, path, headers=headers, **kwargs)
    body = response.json()
    assert set(body) in ({"RC", "RM", "result"}, {"RC", "RM", "error"}), body
    assert body["RC"] == (0 if response.status_code < 300 else response.status_code), body
    return response.status_code, body


def result(client: TestClient, key: str, method: str, path: str, **kwargs: Any) -> Any:
    status, body = call(client, key, method, path, **kwargs)
    assert status in (200, 201), body
    return body["result"]


def error(client: TestClient, key: str | None, method: str, path: str, **kw: Any) -> Any:
    status, body = call(client, key, method, path, **kw)
    assert status >= 400, body
    return status, body["error"]["code"], body["error"]["message"]


def mirror(env: Env) -> dict[int, AdmissionRow]:
    return AdmissionStore(env.redis, env.prefix).read()


def package_count() -> int:
    with unit_of_work() as session:
        return int(session.scalar(select(func.count()).select_from(Package)) or 0)


# -- permissions -------------------------------------------------------------------------------

STAFF_ENDPOINTS = [
    ("POST", "/v1/packages", {"name": "p", "limits": {"connections": {"quota": 1}}}),
    ("GET", "/v1/packages", None),
    ("PUT", "/v1/accounts/1/package", {"package": None}),
    ("GET", "/v1/accounts/1/admission", None),
    ("PUT", "/v1/accounts/1/override", {"reason": "x"}),
    ("DELETE", "/v1/accounts/1/override", None),
    ("GET", "/v1/alerts", None),
    ("POST", "/v1/alerts/1/acknowledge", None),
]


@pytest.mark.parametrize(("method", "path", "body"), STAFF_ENDPOINTS)
def test_staff_endpoints_need_a_key_with_the_staff_permission(
    client: TestClient, method: str, path: str, body: Any
) -> None:
    others = tenant("platform", "stats", "admission", "billing")
    kwargs = {} if body is None else {"json": body}
    assert call(client, None, method, path, **kwargs) == (401, UNAUTHORIZED)
    assert call(client, "mk_unknown", method, path, **kwargs) == (401, UNAUTHORIZED)
    assert call(client, others.key, method, path, **kwargs) == (403, forbidden("Staff"))
    # Checked before the body: a caller without the permission learns nothing of its shape.
    if body is not None:
        assert call(client, None, method, path, json={"nonsense": 1}) == (401, UNAUTHORIZED)
    assert package_count() == 0


def test_admission_needs_a_key_with_the_admission_permission(client: TestClient) -> None:
    staff_only = tenant("staff", "platform")
    path = f"/v1/admission?app={staff_only.app_id}&action=connect"
    assert call(client, None, "GET", path) == (401, UNAUTHORIZED)
    assert call(client, staff_only.key, "GET", path) == (403, forbidden("Admission API"))


# -- packages ----------------------------------------------------------------------------------


def test_packages_are_created_with_default_hard_limits_and_listed(
    client: TestClient, staff: Tenant
) -> None:
    status, body = call(
        client,
        staff.key,
        "POST",
        "/v1/packages",
        json={
            "name": "pro",
            "limits": {
                "connections": {"quota": 100},
                "channels": {"quota": 3},
                "messages": {"quota": 1000, "hardLimit": 1000},
            },
        },
    )
    assert status == 201
    pro = body["result"]
    assert (pro["name"], pro["enforceHard"]) == ("pro", True)
    assert pro["limits"] == {
        "connections": {"quota": 100, "hardLimit": 250},
        "channels": {"quota": 3, "hardLimit": 8},  # 7.5, rounded up
        "messages": {"quota": 1000, "hardLimit": 1000},
    }
    lenient = result(
        client,
        staff.key,
        "POST",
        "/v1/packages",
        json={"name": "lenient", "enforceHard": False, "limits": {"data": {"quota": 5}}},
    )
    assert lenient["enforceHard"] is False
    assert result(client, staff.key, "GET", "/v1/packages") == [pro, lenient]


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"name": "x", "limits": {"connections": {"quota": 10, "hardLimit": 5}}},
         "INVALID_REQUEST", "connections: the hard limit (5) must not be below the quota (10)"),
        ({"name": "x", "limits": {"messages": {"quota": -1}}},
         "INVALID_REQUEST", "messages: the quota must not be negative, got -1"),
        ({"name": "x", "limits": {"conns": {"quota": 1}}},
         "INVALID_REQUEST", "unknown metric 'conns'; choose from connections, channels, messages"),
        ({"name": "x", "limits": {"data": {"quota": 10**16}}},
         "INVALID_REQUEST", "data: the quota must be at most 1000000000000000"),
        ({"name": "x", "limits": {"data": {"quota": 10**30}}},
         "INVALID_REQUEST", "data: the quota must be at most 1000000000000000"),
        ({"name": "x", "limits": {"data": {"quota": "100"}}},
         "INVALID_REQUEST", "limits.data.quota: Input should be a valid integer"),
        ({"name": "x", "limits": {"data": {"quota": 1.5}}},
         "INVALID_REQUEST", "limits.data.quota: Input should be a valid integer"),
        ({"name": "x", "limits": {"data": {"quota": True}}},
         "INVALID_REQUEST", "limits.data.quota: Input should be a valid integer"),
        ({"name": "x", "limits": {"data": {"quota": 1, "hard": 5}}},
         "INVALID_REQUEST", "limits.data.hard: Extra inputs are not permitted"),
        ({"name": "x", "limits": {"data": {"quota": 1, "hard_limit": 5}}},
         "INVALID_REQUEST", "limits.data.hard_limit: Extra inputs are not permitted"),
        ({"name": "x", "enforceHard": "no", "limits": {}},
         "INVALID_REQUEST", "enforceHard: Input should be a valid boolean"),
        ({"name": "x"}, "INVALID_REQUEST", "limits: Field required"),
        ({"name": " ", "limits": {}}, "INVALID_REQUEST", "package name must be 1 to 100"),
        ({"name": "pro", "limits": {}}, "PACKAGE_EXISTS", "a package named 'pro' exists already"),
        ([1, 2], "INVALID_REQUEST", "Input should be a valid dictionary"),
    ],
)  # fmt: skip
def test_a_package_that_makes_no_sense_is_refused_and_nothing_is_written(
    client: TestClient, staff: Tenant, body: Any, code: str, message: str
) -> None:
    result(client, staff.key, "POST", "/v1/packages", json={"name": "pro", "limits": {}})
    status, got_code, got = error(client, staff.key, "POST", "/v1/packages", json=body)
    assert (status, got_code) == (400, code)
    assert got.startswith(message), got
    assert package_count() == 1


def test_malformed_json_and_unknown_parameters_are_400s(client: TestClient, staff: Tenant) -> None:
    headers = {"IM-API-KEY": staff.key, "content-type": "application/json"}
    response = client.post("/v1/packages", content=b'{"name": "x", ', headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_REQUEST"
    for method, path in (
        ("GET", "/v1/packages?verbose=1"),
        ("GET", "/v1/alerts?acount=1"),
        ("GET", "/v1/accounts/1/admission?x=1"),
    ):
        status, code, message = error(client, staff.key, method, path)
        assert (status, code) == (400, "INVALID_REQUEST")
        assert message.startswith("unknown parameter"), message


# -- an account's package, override and admission ----------------------------------------------


def changes(account_id: int) -> list[tuple[int | None, str]]:
    with unit_of_work() as session:
        rows = session.scalars(
            select(PackageChange)
            .where(PackageChange.account_id == account_id)
            .order_by(PackageChange.id)
        )
        return [(r.package_id, r.changed_by) for r in rows]


def create_package(client: TestClient, staff: Tenant, name: str, **limits: Any) -> Any:
    body = {"name": name, "limits": {m: {"quota": q} for m, q in limits.items()}}
    return result(client, staff.key, "POST", "/v1/packages", json=body)


def test_putting_an_account_on_a_package_is_recorded_and_mirrored(
    client: TestClient, env: Env, staff: Tenant
) -> None:
    t = tenant("platform")
    pro = create_package(client, staff, "pro", connections=100, channels=4)
    path = f"/v1/accounts/{t.account_id}/package"
    by = f"key:{key_id(staff)}"

    out = result(client, staff.key, "PUT", path, json={"package": "pro"})
    assert (out["accountId"], out["package"], out["packageId"]) == (t.account_id, "pro", pro["id"])
    assert changes(t.account_id) == [(pro["id"], by)]
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250, channels_hard=10)}
    assert result(client, staff.key, "GET", f"/v1/accounts/{t.account_id}/admission") == {
        "accountId": t.account_id,
        "connectionsHard": 250,
        "channelsHard": 10,
        "publishBlockedMonth": None,
        "publishBlockedBy": None,
        "override": None,
    }

    # By id, then none.
    assert result(client, staff.key, "PUT", path, json={"package": pro["id"]})["package"] == "pro"
    out = result(client, staff.key, "PUT", path, json={"package": None})
    assert (out["package"], out["packageId"]) == (None, None)
    assert changes(t.account_id)[-1] == (None, by)
    assert mirror(env) == {}


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "message"),
    [
        ("/v1/accounts/999/package", {"package": "pro"}, 404, "ACCOUNT_NOT_FOUND",
         "account 999 does not exist"),
        ("/v1/accounts/99999999999/package", {"package": "pro"}, 404, "ACCOUNT_NOT_FOUND",
         "account 99999999999 does not exist"),
        ("/v1/accounts/abc/package", {"package": "pro"}, 400, "INVALID_REQUEST", "account_id"),
        ("/v1/accounts/{a}/package", {"package": "gold"}, 404, "PACKAGE_NOT_FOUND",
         "no package 'gold'"),
        ("/v1/accounts/{a}/package", {"package": 99999999999}, 404, "PACKAGE_NOT_FOUND",
         "no package '99999999999'"),
        ("/v1/accounts/{a}/package", {}, 400, "INVALID_REQUEST", "package: Field required"),
        ("/v1/accounts/{a}/package", {"package": True}, 400, "INVALID_REQUEST", "package"),
        ("/v1/accounts/{a}/override", {"reason": "x", "until": "2030-01-01T00:00:00"}, 400,
         "INVALID_REQUEST", "until must carry a time zone"),
        ("/v1/accounts/{a}/override", {"reason": "x", "until": "2020-01-01T00:00:00Z"}, 400,
         "INVALID_REQUEST", "until must be in the future"),
        ("/v1/accounts/{a}/override", {"reason": "x", "until": "soon"}, 400,
         "INVALID_REQUEST", "until: Input should be a valid datetime"),
        ("/v1/accounts/{a}/override", {"reason": ""}, 400, "INVALID_REQUEST",
         "an override needs a reason of 1 to 500 characters"),
        ("/v1/accounts/{a}/override", {"until": None}, 400, "INVALID_REQUEST",
         "reason: Field required"),
        ("/v1/accounts/999/override", {"reason": "x"}, 404, "ACCOUNT_NOT_FOUND",
         "account 999 does not exist"),
    ],
)  # fmt: skip
def test_changes_to_an_account_refuse_bad_input_and_write_nothing(  # noqa: PLR0917
    client: TestClient,
    env: Env,
    staff: Tenant,
    path: str,
    body: Any,
    status: int,
    code: str,
    message: str,
) -> None:
    t = tenant("platform")
    create_package(client, staff, "pro", connections=10)
    result(
        client, staff.key, "PUT", f"/v1/accounts/{t.account_id}/package", json={"package": "pro"}
    )
    before = changes(t.account_id), mirror(env)
    got = error(client, staff.key, "PUT", path.format(a=t.account_id), json=body)
    assert got[:2] == (status, code)
    assert message in got[2], got
    assert (changes(t.account_id), mirror(env)) == before
    admission = result(client, staff.key, "GET", f"/v1/accounts/{t.account_id}/admission")
    assert (admission["connectionsHard"], admission["override"]) == (25, None)


def test_an_override_empties_what_is_enforced_until_it_is_removed(
    client: TestClient, env: Env, staff: Tenant
) -> None:
    t = tenant("platform")
    create_package(client, staff, "pro", connections=100)
    result(
        client, staff.key, "PUT", f"/v1/accounts/{t.account_id}/package", json={"package": "pro"}
    )
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250)}
    path = f"/v1/accounts/{t.account_id}/override"

    until = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    body = {"reason": "launch week", "until": until.isoformat()}
    override = result(client, staff.key, "PUT", path, json=body)
    assert override["accountId"] == t.account_id
    assert (override["reason"], override["createdBy"]) == ("launch week", f"key:{key_id(staff)}")
    assert datetime.fromisoformat(override["until"]) == until
    assert mirror(env) == {}
    admission = result(client, staff.key, "GET", f"/v1/accounts/{t.account_id}/admission")
    assert admission["connectionsHard"] is None
    assert admission["override"] == override

    restored = result(client, staff.key, "DELETE", path)
    assert (restored["connectionsHard"], restored["override"]) == (250, None)
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250)}
    assert error(client, staff.key, "DELETE", path) == (
        404,
        "OVERRIDE_NOT_FOUND",
        f"account {t.account_id} has no override",
    )
    assert error(client, staff.key, "DELETE", "/v1/accounts/999/override")[:2] == (
        404,
        "ACCOUNT_NOT_FOUND",
    )
    assert error(client, staff.key, "GET", "/v1/accounts/999/admission")[:2] == (
        404,
        "ACCOUNT_NOT_FOUND",
    )


def test_a_change_commits_even_when_redis_is_away(
    env: Env, staff: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = tenant("platform")
    env.override(monkeypatch, METERING_REDIS_URL="redis://127.0.0.1:1/0")
    with TestClient(create_app(env.settings)) as client:
        pro = create_package(client, staff, "pro", connections=100)
        path = f"/v1/accounts/{t.account_id}/package"
        # Committed; the periodic admission sync mirrors it once Redis is back.
        assert result(client, staff.key, "PUT", path, json={"package": "pro"})["package"] == "pro"
    assert changes(t.account_id) == [(pro["id"], f"key:{key_id(staff)}")]


# -- alerts ------------------------------------------------------------------------------------


def add_alerts(account_id: int, other_id: int) -> tuple[int, int, int]:
    def alert(account: int, **fields: Any) -> LimitAlert:
        values: dict[str, Any] = {
            "account_id": account, "month": "2026-04", "metric": "connections",
            "level": "soft", "usage": 120, "threshold": 100, "quota": 100, "hard_limit": 250,
            "rejects": False, "detected_at": datetime(2026, 4, 2, 10, tzinfo=UTC),
        }  # fmt: skip
        values.update(fields)
        return LimitAlert(**values)

    with unit_of_work() as session:
        soft = alert(account_id)
        hard = alert(
            account_id, level="hard", usage=260, threshold=250, rejects=True,
            detected_at=datetime(2026, 4, 9, tzinfo=UTC),
        )  # fmt: skip
        march = alert(other_id, month="2026-03", detected_at=datetime(2026, 3, 9, tzinfo=UTC))
        session.add_all([soft, hard, march])
        session.flush()
        session.add_all(
            [
                AlertDelivery(alert_id=hard.id, channel="webhook", status="sent"),
                AlertDelivery(alert_id=hard.id, channel="email", status="failed"),
            ]
        )
        return soft.id, hard.id, march.id


def test_alerts_are_listed_filtered_and_acknowledged(client: TestClient, staff: Tenant) -> None:
    t, other = tenant("platform"), tenant("platform", name="other")
    soft, hard, march = add_alerts(t.account_id, other.account_id)

    def ids(query: str = "") -> list[int]:
        return [a["id"] for a in result(client, staff.key, "GET", f"/v1/alerts{query}")]

    listed = result(client, staff.key, "GET", "/v1/alerts")
    assert [a["id"] for a in listed] == [hard, soft, march]
    assert listed[0]["deliveries"] == {"webhook": "sent", "email": "failed"}
    assert listed[1]["deliveries"] == {}
    assert (listed[0]["level"], listed[0]["rejects"], listed[0]["acknowledgedAt"]) == (
        "hard",
        True,
        None,
    )
    assert ids(f"?account={t.account_id}") == [hard, soft]
    assert ids("?month=2026-03") == [march]
    assert ids("?limit=1") == [hard]

    acked = result(client, staff.key, "POST", f"/v1/alerts/{hard}/acknowledge")
    assert acked["acknowledgedBy"] == f"key:{key_id(staff)}"
    assert acked["deliveries"] == {"webhook": "sent", "email": "failed"}
    # The first acknowledgement stays.
    again = result(client, staff.key, "POST", f"/v1/alerts/{hard}/acknowledge")
    assert again["acknowledgedAt"] == acked["acknowledgedAt"]
    assert ids("?unacknowledged=true") == [soft, march]
    assert ids(f"?unacknowledged=true&account={t.account_id}&month=2026-04") == [soft]

    for query, status, code, message in (
        ("?month=2026-13", 400, "INVALID_REQUEST", "month must be YYYY-MM, got '2026-13'"),
        ("?limit=0", 400, "INVALID_REQUEST", "limit must be between 1 and 1000, got 0"),
        ("?limit=many", 400, "INVALID_REQUEST", "limit: Input should be a valid integer"),
        ("?unacknowledged=perhaps", 400, "INVALID_REQUEST", "unacknowledged: Input should be"),
        ("?account=999", 404, "ACCOUNT_NOT_FOUND", "account 999 does not exist"),
        ("?account=99999999999", 404, "ACCOUNT_NOT_FOUND", "account 99999999999 does not"),
    ):
        got = error(client, staff.key, "GET", f"/v1/alerts{query}")
        assert got[:2] == (status, code), (query, got)
        assert got[2].startswith(message), (query, got)
    for alert_id in ("999", "99999999999"):
        assert error(client, staff.key, "POST", f"/v1/alerts/{alert_id}/acknowledge") == (
            404,
            "ALERT_NOT_FOUND",
            f"alert {alert_id} does not exist",
        )


# -- GET /v1/admission -------------------------------------------------------------------------


def decide(client: TestClient, gateway: Tenant, app: int | str, action: str) -> Any:
    return result(client, gateway.key, "GET", f"/v1/admission?app={app}&action={action}")


def wait_decision(
    client: TestClient,
    gateway: Tenant,
    app: int,
    action: str,
    *,
    until: Callable[[Any], bool],
    timeout: float = 10.0,
) -> Any:
    """Ask until the API's copy of the admission state gives the awaited answer."""
    deadline = time.monotonic() + timeout
    while True:
        decision = decide(client, gateway, app, action)
        if until(decision):
            return decision
        assert time.monotonic() < deadline, f"still {decision} after {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def gateway() -> Tenant:
    """The key a gateway asks with: it may ask about any app."""
    return tenant("admission", name="gateway")


def test_an_account_with_nothing_enforced_is_allowed_everything(
    client: TestClient, gateway: Tenant
) -> None:
    t = tenant("platform")
    for action in ("connect", "attach", "publish"):
        response = client.get(
            f"/v1/admission?app={t.app_id}&action={action}", headers={"IM-API-KEY": gateway.key}
        )
        assert response.status_code == 200
        assert response.json() == {
            "RC": 0,
            "RM": "OK",
            "result": {"appId": t.app_id, "action": action, "allowed": True},
        }


def test_publishing_is_refused_for_the_rest_of_the_month_once_blocked(
    client: TestClient, env: Env, staff: Tenant, gateway: Tenant
) -> None:
    t = tenant("platform")
    create_package(client, staff, "pro", messages=1000)
    result(
        client, staff.key, "PUT", f"/v1/accounts/{t.account_id}/package", json={"package": "pro"}
    )
    assert decide(client, gateway, t.app_id, "publish")["allowed"] is True

    now = datetime.now(UTC)
    with unit_of_work() as session:
        repo = LimitsRepository(session.connection())
        assert repo.block_publishing(t.account_id, month_of(now), "messages", now)
        rows = repo.admission([t.account_id])
    AdmissionStore(env.redis, env.prefix).write(rows)

    refused = wait_decision(client, gateway, t.app_id, "publish", until=lambda d: not d["allowed"])
    retry_after = refused.pop("retryAfter")
    assert refused == {
        "appId": t.app_id,
        "action": "publish",
        "allowed": False,
        "code": 40112,
        "reason": "account restricted (monthly messages limit exceeded)",
    }
    month_end = (now.replace(day=28) + timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    assert 0 < retry_after <= (month_end - now).total_seconds() + 2
    # Connections and channels are not limited by this package.
    assert decide(client, gateway, t.app_id, "connect")["allowed"] is True
    assert decide(client, gateway, t.app_id, "attach")["allowed"] is True


def test_connects_and_attaches_are_refused_at_the_live_hard_limit_and_lift_below_it(
    client: TestClient, env: Env, staff: Tenant, gateway: Tenant
) -> None:
    t = tenant("platform")
    body = {"name": "small", "limits": {"connections": {"quota": 2, "hardLimit": 4},
                                        "channels": {"quota": 1, "hardLimit": 2}}}  # fmt: skip
    result(client, staff.key, "POST", "/v1/packages", json=body)
    result(
        client, staff.key, "PUT", f"/v1/accounts/{t.account_id}/package", json={"package": "small"}
    )
    # A gateway holds the account at both limits, and a tick counted it.
    dc = datacenter_stores(env.settings)["dc1"]
    gw = Meter(dc, "gw-1", flush_interval=0.1)
    for _ in range(4):
        gw.connection_opened(str(t.app_id))
    gw.channel_attached(str(t.app_id), "a")
    gw.channel_attached(str(t.app_id), "b")
    gw.start()
    store = AdmissionStore(env.redis, env.prefix)

    def counted() -> None:  # a tick, and what it tells the gateways
        time.sleep(1.01 - time.time() % 1)
        tick(global_store(env.settings), {"dc1": dc}, liveness_timeout=3, sample_retention=9)
        value = global_store(env.settings).account_value(str(t.account_id))
        store.write_live({t.account_id: (value.connections, value.channels)})

    try:
        counted()
        refused = wait_decision(
            client, gateway, t.app_id, "connect", until=lambda d: not d["allowed"]
        )
        assert refused == {
            "appId": t.app_id,
            "action": "connect",
            "allowed": False,
            "code": 40111,
            "reason": "account restricted (connection limits exceeded)",
        }
        attach = decide(client, gateway, t.app_id, "attach")
        assert (attach["allowed"], attach["code"], "retryAfter" in attach) == (False, 40114, False)
        assert decide(client, gateway, t.app_id, "publish")["allowed"] is True

        # One closes: one more may open. Refused again once the gateway holds it: the
        # process answering holds no connections, so a grant is evidence once it is open.
        gw.connection_closed(str(t.app_id))
        counted()
        wait_decision(client, gateway, t.app_id, "connect", until=lambda d: d["allowed"])
        gw.connection_opened(str(t.app_id))
        gw.flush()
        assert decide(client, gateway, t.app_id, "connect")["code"] == 40111
    finally:
        gw.close()


def test_bad_admission_questions_are_400s_and_unknown_apps_404s(
    client: TestClient, gateway: Tenant
) -> None:
    app = gateway.app_id
    for query, message in (
        (f"?app={app}&action=subscribe", "action must be connect, attach or publish"),
        (f"?app={app}", "action must be connect, attach or publish"),
        ("?action=connect", "app must be an app id (digits), got ''"),
        ("?app=chat&action=connect", "app must be an app id (digits), got 'chat'"),
        (f"?app={'9' * 30}&action=connect", "app must be an app id (digits)"),
        (f"?app={app}&action=connect&verbose=1", "unknown parameter 'verbose'"),
    ):
        got = error(client, gateway.key, "GET", f"/v1/admission{query}")
        assert got[:2] == (400, "INVALID_REQUEST"), (query, got)
        assert got[2].startswith(message), (query, got)
    assert error(client, gateway.key, "GET", "/v1/admission?app=987654&action=connect") == (
        404,
        "APP_NOT_FOUND",
        "unknown app 987654",
    )
