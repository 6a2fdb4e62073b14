"""The JSON behind the dashboard: the key's account only, and bad input as a 4xx in the
envelope."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from metering.api.app import create_app
from tests.conftest import Env
from tests.factories import tenant


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


def test_the_dashboard_reads_only_the_keys_account(client: TestClient) -> None:
    mine = tenant("platform", name="mine")
    other = tenant("platform", name="other")
    h = {"IM-API-KEY": mine.key}
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert "plotly.min.js" in page.text
    js = client.get("/dashboard/static/plotly.min.js")
    assert (js.status_code, js.headers["content-type"][:15]) == (200, "text/javascript")
    assert len(js.content) > 1_000_000  # the library as the plotly package installed it
    view = client.get("/v1/dashboard/overview", headers=h).json()["result"]
    assert view["account"]["id"] == mine.account_id
    assert view["apps"] == [{"id": mine.app_id, "name": "mine-app"}]
    assert (view["package"], view["rejections"], view["alerts"]) == (None, [], [])
    live = client.get("/v1/dashboard/live", headers=h).json()["result"]
    assert live["connections"] == 0

    now = int(time.time() * 1000)
    window = {"unit": "minute", "start": now - 3_600_000, "end": now}
    for path, params, headers, status, code in [
        ("/v1/dashboard/overview", {}, {}, 401, "INVALID_API_KEY"),
        ("/v1/dashboard/overview", {}, {"IM-API-KEY": tenant("stats", name="s").key}, 403,
         "PERMISSION_DENIED"),
        ("/v1/dashboard/series", {**window, "app": other.app_id}, h, 403, "PERMISSION_DENIED"),
        ("/v1/dashboard/live", {"app": other.app_id}, h, 403, "PERMISSION_DENIED"),
        ("/v1/dashboard/series", {**window, "app": 99_999_999_999}, h, 403, "PERMISSION_DENIED"),
        ("/v1/dashboard/series", {**window, "unit": "week"}, h, 400, "INVALID_REQUEST"),
        ("/v1/dashboard/series", {**window, "start": now, "end": now - 1}, h, 400,
         "INVALID_REQUEST"),
        ("/v1/dashboard/series", {"unit": "minute"}, h, 400, "INVALID_REQUEST"),
        ("/v1/dashboard/series", {**window, "x": 1}, h, 400, "INVALID_REQUEST"),
        ("/dashboard/static/secrets.txt", {}, {}, 404, "NOT_FOUND"),
    ]:  # fmt: skip
        r = client.get(path, params=params, headers=headers)
        assert r.status_code == status, (path, params, r.text)
        assert r.json()["error"]["code"] == code, (path, r.text)
    assert client.get("/v1/dashboard/series", params=window, headers=h).json()["result"] == []
