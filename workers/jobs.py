"""The periodic jobs as plain functions, by task name.

Celery wraps them in ``workers.tasks``; ``metering run`` calls them in-process. Neither place
holds logic of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metering.accounts.registry import sync_registry as _sync_registry
from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.core.settings import get_settings
from metering.live import service as live
from metering.live.wiring import datacenter_stores, global_store


def tick() -> dict[str, Any]:
    settings = get_settings()
    result = live.tick(
        global_store(settings),
        datacenter_stores(settings),
        liveness_timeout=settings.liveness_timeout.total_seconds(),
        sample_retention=settings.sample_retention,
    )
    return {"second": result.second, "committed": result.committed, "apps": result.apps_changed}


def sync_registry() -> int:
    settings = get_settings()
    return _sync_registry(RegistryStore(redis_clients.primary(), settings.redis_prefix))


JOBS: dict[str, Callable[[], Any]] = {
    "metering.live.tick": tick,
    "metering.accounts.sync_registry": sync_registry,
}
