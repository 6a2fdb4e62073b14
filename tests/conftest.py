"""Fixtures: a real Postgres database built by the migrations, a Redis key prefix per test,
and real processes (gateway, API, Celery) started from the installed ``metering`` command."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from metering.core import database
from metering.core.settings import Settings, get_settings
from tests import processes
from tests.scratch import REDIS_URL, delete_keys, reset_caches, scratch_database

TABLES = (
    "api_keys", "apps", "accounts", "package_limits", "packages", "package_changes",
    "usage_state", "usage_rollups", "usage_gaps", "usage_marks",
    "limit_alerts", "alert_deliveries", "alert_delivery_attempts", "account_overrides",
    "account_admission", "package_pricing", "package_prices", "billing_months", "invoices",
    "invoice_lines",
)  # fmt: skip


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of this test session's own, built by the Alembic migrations."""
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    client.close()


@dataclass
class Env:
    """The environment a test's engine runs in (also handed to its subprocesses)."""

    vars: dict[str, str]
    settings: Settings
    prefix: str
    redis: redis.Redis

    def child_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(self.vars)
        env.update(extra)
        return env

    def override(self, monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
        """Change settings for the rest of the test, here and in the processes it starts."""
        for name, value in values.items():
            monkeypatch.setenv(name, value)
            self.vars[name] = value
        reset_caches()
        self.settings = get_settings()


@pytest.fixture
def env(
    database_url: str, redis_server: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    """Settings for one test: the session's database (emptied after), a Redis prefix of its own."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    values = {
        "METERING_DATABASE_URL": database_url,
        "METERING_REDIS_URL": REDIS_URL,
        "METERING_REDIS_PREFIX": prefix,
        "METERING_DATACENTER": "dc1",
    }
    for key in [k for k in os.environ if k.startswith("METERING_") and "_TEST_" not in k]:
        monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    yield Env(vars=values, settings=get_settings(), prefix=prefix, redis=redis_server)
    with database.get_engine().begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
        conn.exec_driver_sql(
            "UPDATE usage_cursor SET second = NULL, first_second = NULL, cycle = 0, "
            "counter_cursors = '{}', horizons = '{}'"
        )
    delete_keys(redis_server, prefix)
    reset_caches()


class Admin:
    """Reads ``/admin/connection-count`` like an operator's poller."""

    def __init__(self, port: int, key: str) -> None:
        self.url = f"http://127.0.0.1:{port}/admin/connection-count"
        self.key = key

    def count(self, *, unavailable_ok: bool = False) -> int | None:
        """The count; with ``unavailable_ok``, None for the 503 given while Redis is away."""
        response = httpx.get(self.url, headers={"IM-API-KEY": self.key}, timeout=5)
        if unavailable_ok and response.status_code == 503:
            assert response.json()["error"]["code"] == "UNAVAILABLE"
            return None
        assert response.status_code == 200, response.text
        value: int = response.json()["result"]["count"]
        return value

    def wait_for(
        self,
        expected: int,
        timeout: float = 5.0,
        *,
        unavailable_ok: bool = False,
        poll: float = 0.05,
    ) -> float:
        """Seconds until the count equals ``expected``."""
        started = time.monotonic()
        seen = None
        while (elapsed := time.monotonic() - started) < timeout:
            seen = self.count(unavailable_ok=unavailable_ok)
            if seen == expected:
                return elapsed
            time.sleep(poll)
        raise AssertionError(f"count stayed {seen}, expected {expected} within {timeout}s")


@pytest.fixture
def api_port(env: Env) -> Iterator[int]:
    port = processes.free_port()
    proc = processes.api(env.child_env(), port)
    yield port
    proc.stop()


@pytest.fixture
def start_gateway(env: Env) -> Iterator[Callable[..., processes.Process]]:
    started: list[processes.Process] = []

    def start(
        frontend_id: str = "gw-1", port: int | None = None, **extra: str
    ) -> processes.Process:
        proc = processes.gateway(env.child_env(**extra), port or processes.free_port(), frontend_id)
        proc.port = int(proc.wait_for("listening on").rsplit(":", 1)[1])  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
