"""Scratch resources shared by the test suite and the benchmarks: a migrated database of
one's own, and resetting what this process cached from the settings."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import redis
from sqlalchemy.engine import make_url

from metering.core import database
from metering.core import redis as redis_clients
from metering.core.migrate import upgrade
from metering.core.settings import get_settings

ADMIN_DATABASE_URL = os.environ.get(
    "METERING_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("METERING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def reset_caches() -> None:
    """Forget the engine, Redis clients and settings, after the METERING_* variables change."""
    database.reset()
    redis_clients.reset_clients()
    get_settings.cache_clear()


@contextmanager
def scratch_database(kind: str = "test") -> Iterator[str]:
    """A new database built by the migrations, dropped at the end; yields its URL."""
    name = f"metering_{kind}_{uuid.uuid4().hex[:10]}"
    admin = make_url(ADMIN_DATABASE_URL)
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    url = admin.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        yield url
    finally:
        database.reset()
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Every key under a Redis key prefix (both hash-tag groups: global and datacenters)."""
    for key in client.scan_iter(match=f"{{{prefix}*", count=5000):
        client.delete(key)
