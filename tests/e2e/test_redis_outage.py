"""A Redis that goes away and comes back empty: gateways keep counting in memory, resync, and
the count is right again, with nothing lost or doubled."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from tests import processes
from tests.conftest import Admin, Env
from tests.e2e.test_gateway_counting import Clients, clients  # noqa: F401 (fixture)
from tests.factories import tenant
from tests.scratch import reset_caches

REDIS_SERVER = shutil.which("redis-server")


def start_redis(port: int) -> processes.Process:
    assert REDIS_SERVER, "redis-server is needed (apt-get install redis-server)"
    return processes.Process(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        {},
        ready="Ready to accept connections",
    )


@pytest.fixture
def own_redis(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[int, list[processes.Process]]]:
    port = processes.free_port()
    servers = [start_redis(port)]
    env.override(monkeypatch, METERING_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    yield port, servers
    for server in servers:
        server.stop()


def test_counts_recover_after_redis_restarts_empty(
    env: Env,
    own_redis,
    start_gateway,
    clients: Clients,  # noqa: F811
) -> None:
    port, servers = own_redis
    t = tenant("platform")
    api_proc = processes.api(env.child_env(), api_port := processes.free_port())
    try:
        admin = Admin(api_port, t.key)
        gw = start_gateway("gw-outage")
        first = clients.connect(gw.port, t.app_id, 3)
        admin.wait_for(3)

        servers[0].kill()
        # Past the API's read reuse window (METERING_COUNT_CACHE_TTL, 50 ms), an outage is a
        # clear 503, never a stale or made-up count.
        time.sleep(0.1)
        assert admin.count(unavailable_ok=True) is None
        # While Redis is away, users come and go; the gateway keeps counting in memory.
        clients.close(first[:1])
        clients.connect(gw.port, t.app_id, 2)
        time.sleep(1.0)
        servers.append(start_redis(port))  # back, and empty
        # The registry mirror is rebuilt from Postgres by the periodic sync; do it now.
        from metering.accounts.registry import sync_registry
        from metering.accounts.store import RegistryStore
        from metering.core import redis as redis_clients

        reset_caches()
        sync_registry(RegistryStore(redis_clients.primary(), env.prefix))
        admin.wait_for(4, timeout=10, unavailable_ok=True)
        time.sleep(1.0)
        assert admin.count() == 4
        assert "metering.resync" in gw.output or "flush_failed" in gw.output
    finally:
        api_proc.stop()
