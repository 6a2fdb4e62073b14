"""Shared by the benchmarks: where Redis is, a throwaway key prefix, printing a result line."""

from __future__ import annotations

import math
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import psycopg
import redis
from sqlalchemy.engine import URL, make_url

from metering.accounts import service
from metering.accounts.store import RegistryStore
from metering.core import database
from metering.core import redis as redis_clients
from metering.core.database import unit_of_work
from metering.core.migrate import upgrade
from metering.core.settings import get_settings
from tests import processes

REDIS_URL = os.environ.get("METERING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_DATABASE_URL = os.environ.get(
    "METERING_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def scratch_prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(match=f"{{{prefix}*", count=5000):
            client.delete(key)


def row(*cells: object, widths: tuple[int, ...] = (34, 14, 14, 10)) -> str:
    return "".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


# -- a scratch engine for the benchmarks that run real processes -----------------------------


@dataclass(frozen=True)
class Scratch:
    """A migrated scratch database, a Redis key prefix, and an app with a platform key."""

    vars: dict[str, str]
    prefix: str
    app_id: int
    key: str

    def child_env(self) -> dict[str, str]:
        """The inherited environment without any other ``METERING_*``, plus ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(self.vars)
        return env


def _reset_caches() -> None:
    database.reset()
    redis_clients.reset_clients()
    get_settings.cache_clear()


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@contextmanager
def scratch_engine() -> Iterator[Scratch]:
    """Create the database and tenant, point this process at them; drop it all at the end."""
    name = f"metering_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    admin = _render(make_url(ADMIN_DATABASE_URL).set(drivername="postgresql"))  # for psycopg
    url = _render(make_url(ADMIN_DATABASE_URL).set(database=name))
    values = {
        "METERING_DATABASE_URL": url,
        "METERING_REDIS_URL": REDIS_URL,
        "METERING_REDIS_PREFIX": prefix,
        "METERING_DATACENTER": "dc1",
    }
    saved = {k: v for k, v in os.environ.items() if k.startswith("METERING_")}
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        for k in saved:
            if not k.startswith("METERING_TEST_"):
                del os.environ[k]
        os.environ.update(values)
        _reset_caches()
        with unit_of_work() as session:
            account_id = service.create_account(session, "bench").id
            app_id = service.create_app(session, account_id, "bench-app").id
            key = service.create_key(session, app_id, ["platform"]).key
        RegistryStore(redis_clients.primary(), prefix).publish({app_id: account_id})
        yield Scratch(vars=values, prefix=prefix, app_id=app_id, key=key)
    finally:
        _reset_caches()
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)
        client = redis.Redis.from_url(REDIS_URL)
        for k in client.scan_iter(match=f"{{{prefix}*", count=5000):
            client.delete(k)
        client.close()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that the cleanup (children, database, keys) runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def start(stack: ExitStack, proc: processes.Process) -> processes.Process:
    """Stop ``proc`` when ``stack`` closes (after success, an error or Ctrl-C)."""
    stack.callback(proc.stop)
    return proc


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
