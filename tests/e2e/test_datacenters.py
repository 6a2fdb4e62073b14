"""Two datacenters, each with a Redis of its own: the admin endpoint counts both, and the tick
sums the app and its account across them."""

from __future__ import annotations

import time

import pytest
import redis

from metering.live.service import tick
from metering.live.wiring import datacenter_stores, global_store
from tests import processes
from tests.conftest import Admin, Env
from tests.e2e.test_gateway_counting import Clients, clients  # noqa: F401 (fixture)
from tests.factories import tenant
from tests.scratch import REDIS_URL, delete_keys

OTHER_DB = REDIS_URL.rsplit("/", 1)[0] + "/2"


def test_counts_and_ticks_span_datacenters(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    clients: Clients,  # noqa: F811
) -> None:
    env.override(monkeypatch, METERING_DATACENTERS=f"eu={REDIS_URL},us={OTHER_DB}")
    t = tenant("platform")
    other = redis.Redis.from_url(OTHER_DB)
    started: list[processes.Process] = []
    try:
        api_port = processes.free_port()
        started.append(processes.api(env.child_env(), api_port))
        admin = Admin(api_port, t.key)
        for frontend, dc, n in (("gw-eu", "eu", 3), ("gw-us", "us", 2)):
            gw = processes.gateway(env.child_env(), processes.free_port(), frontend, dc)
            started.append(gw)
            port = int(gw.wait_for("listening on").rsplit(":", 1)[1])
            (ws, *_) = clients.connect(port, t.app_id, n)
            clients.request(ws, '{"action": "attach", "channel": "shared"}')
        admin.wait_for(5)
        # Each datacenter's Redis holds only its own share.
        assert int(other.hget(f"{{{env.prefix}:us}}:conns:w", str(t.app_id)) or 0) == 2
        assert env.redis.hget(f"{{{env.prefix}:us}}:conns:w", str(t.app_id)) is None

        result = tick(
            global_store(env.settings),
            datacenter_stores(env.settings),
            liveness_timeout=3,
            sample_retention=100,
            now=time.time(),
        )
        assert result.committed
        value = global_store(env.settings).app_value(str(t.app_id))
        assert (value.websocket, value.channels) == (5, 1)  # one channel, attached in both
        assert global_store(env.settings).account_value(str(t.account_id)).websocket == 5
    finally:
        for proc in started:
            proc.stop()
        delete_keys(other, env.prefix)
        other.close()
