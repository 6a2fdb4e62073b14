"""Fixtures: a real Postgres database built by the migrations, a Redis key prefix per test,
and real processes (gateway, API, Celery) started from the installed ``metering`` command."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from metering.core import database
from metering.core import redis as redis_clients
from metering.core.migrate import upgrade
from metering.core.settings import Settings, get_settings

ADMIN_DATABASE_URL = os.environ.get(
    "METERING_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("METERING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TABLES = ("api_keys", "apps", "accounts", "package_limits", "packages")


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of this test session's own, built by the Alembic migrations."""
    name = f"metering_test_{uuid.uuid4().hex[:10]}"
    admin = _libpq(ADMIN_DATABASE_URL)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    database.reset()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def _reset_caches() -> None:
    database.reset()
    redis_clients.reset_clients()
    get_settings.cache_clear()


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
    _reset_caches()
    yield Env(vars=values, settings=get_settings(), prefix=prefix, redis=redis_server)
    with database.get_engine().begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    for key in redis_server.scan_iter(match=f"{{{prefix}*", count=1000):
        redis_server.delete(key)
    _reset_caches()
