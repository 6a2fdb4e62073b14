"""Redis clients: the primary one and one per datacenter, real or the embedded stand-in."""

from __future__ import annotations

import functools
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
    return redis.Redis.from_url(
        url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
    )


def _async_client(url: str) -> AsyncRedis:
    if url == EMBEDDED_REDIS_URL:
        import fakeredis  # noqa: PLC0415

        client: AsyncRedis = fakeredis.FakeAsyncRedis(server=_embedded_server(), lua_modules=set())
        return client
    return redis.asyncio.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


_clients: dict[str, Redis] = {}


def _cached(url: str) -> Redis:
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = _sync_client(url)
    return client


def primary() -> Redis:
    """The primary Redis of the current settings (one client per URL in this process)."""
    return _cached(get_settings().redis_url)


def datacenter(name: str) -> Redis:
    return _cached(get_settings().datacenter_url(name))


def sync_client(url: str) -> Redis:
    return _cached(url)


def async_client(url: str) -> AsyncRedis:
    """A new async client: it belongs to the event loop that uses it, which closes it."""
    return _async_client(url)


def reset_clients() -> None:
    """Close and forget the cached clients (settings changed, or a process forked)."""
    for client in _clients.values():
        client.close()
    _clients.clear()
