"""Stores built from settings, for the composition roots (API, workers, CLI)."""

from __future__ import annotations

from metering.core import redis as redis_clients
from metering.core.settings import Settings
from metering.live.store import AsyncDatacenterReader, DatacenterStore, GlobalStore


def global_store(settings: Settings) -> GlobalStore:
    return GlobalStore(redis_clients.primary(), settings.redis_prefix)


def datacenter_stores(settings: Settings) -> dict[str, DatacenterStore]:
    return {
        name: DatacenterStore(redis_clients.datacenter(name), settings.redis_prefix, name)
        for name in settings.datacenter_urls
    }


def datacenter_readers(settings: Settings) -> dict[str, AsyncDatacenterReader]:
    """Readers on new async clients: the caller's event loop owns them and closes them."""
    return {
        name: AsyncDatacenterReader(redis_clients.async_client(url), settings.redis_prefix, name)
        for name, url in settings.datacenter_urls.items()
    }
