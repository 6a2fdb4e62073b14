"""Redis clients: the primary one and one per datacenter, real or the embedded stand-in."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from metering.core.settings import EMBEDDED_REDIS_URL, get_settings

Redis = redis.Redis
AsyncRedis = redis.asyncio.Redis


@functools.cache
def _embedded_server() -> Any:
    # One in-process server shared by every client of this process (the API, the gateway and
    # the in-process beat all run in the embedded default's single process).
    import fakeredis  # noqa: PLC0415 (only the embedded default needs it)

    return fakeredis.FakeServer()


def _sync_client(url: str) -> Redis:
    if url == EMBEDDED_REDIS_URL:
        import fakeredis  # noqa: PLC0415

        client: Redis = fakeredis.FakeRedis(server=_embedded_server(), lua_modules=set())
        return client
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)


def _async_client(url: str) -> AsyncRedis:
    if url == EMBEDDED_REDIS_URL:
        import fakeredis  # noqa: PLC0415

        client: AsyncRedis = fakeredis.FakeAsyncRedis(server=_embedded_server(), lua_modules=set())
        return client
    return redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


@functools.cache
def primary() -> Redis:
    return _sync_client(get_settings().redis_url)


@functools.cache
def datacenter(name: str) -> Redis:
    return _sync_client(get_settings().datacenter_urls[name])


@functools.cache
def async_datacenter(name: str) -> AsyncRedis:
    return _async_client(get_settings().datacenter_urls[name])


def sync_client(url: str) -> Redis:
    return _sync_client(url)


def async_client(url: str) -> AsyncRedis:
    return _async_client(url)


def reset_clients() -> None:
    """Forget cached clients (tests that change settings, forked processes)."""
    primary.cache_clear()
    datacenter.cache_clear()
    async_datacenter.cache_clear()


class Script:
    """A Lua script from a ``.lua`` file beside its store, loaded once and called by SHA."""

    def __init__(self, path: Path) -> None:
        self.source = path.read_text()
        self.name = path.stem

    def __call__(self, client: Redis, keys: list[str], args: list[Any]) -> Any:
        return client.register_script(self.source)(keys=keys, args=args)

    async def acall(self, client: AsyncRedis, keys: list[str], args: list[Any]) -> Any:
        return await client.register_script(self.source)(keys=keys, args=args)
