"""The gateway's view of the app registry: which app ids exist, and their accounts.

Known apps are answered from memory (loaded at start, refreshed by a daemon thread), so a
connect costs no Redis round trip. A miss asks Redis once, off the event loop; misses are
remembered briefly so that a client retrying an unknown id cannot hammer Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict

import redis

from metering.accounts.store import RegistryStore
from metering.core.logging import get_logger

log = get_logger(__name__)

MAX_APP_ID_LENGTH = 20  # digits of the largest unsigned 64-bit integer


def valid_app_id(app: str) -> bool:
    """App ids are decimal integers written as strings."""
    return 0 < len(app) <= MAX_APP_ID_LENGTH and app.isascii() and app.isdigit()


class AppRegistry:
    """In-process cache of app id -> account id, backed by the Redis mirror of the registry."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        refresh_interval: float = 30.0,
        negative_ttl: float = 2.0,
        negative_max: int = 10_000,
    ) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.negative_ttl = negative_ttl
        self.negative_max = negative_max
        # Both are replaced as a whole by refresh() on its thread, never mutated there.
        self._apps: dict[str, int] = {}
        self._missing: OrderedDict[str, float] = OrderedDict()  # app -> expiry (monotonic)
        self._pending: dict[str, asyncio.Future[int | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lookups = 0  # Redis lookups made on a miss (for tests and health checks)

    def __len__(self) -> int:
        return len(self._apps)

    def start(self) -> None:
        """Load every app, then keep refreshing in a daemon thread."""
        try:
            self.refresh()
        except redis.RedisError as exc:
            # Misses still ask Redis one by one; the thread loads the rest once it answers.
            log.warning("gateway.registry_unavailable", error=str(exc))
        self._thread = threading.Thread(target=self._run, name="gateway-registry", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def refresh(self) -> int:
        """Reload the whole registry (an app deleted there stops resolving); returns its size."""
        apps = self.store.all()
        self._apps = apps
        self._missing = OrderedDict()  # an app created since its miss resolves at once
        return len(apps)

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh()
            except redis.RedisError as exc:
                # Keep serving the last copy: known apps keep working while Redis is away.
                log.warning("gateway.registry_refresh_failed", error=str(exc))

    def known(self, app: str) -> int | None:
        """The account of ``app`` if it is in memory (no I/O); None otherwise."""
        return self._apps.get(app)

    async def resolve(self, app: str) -> int | None:
        """The account that owns ``app``, or None if the app is unknown (or Redis is down)."""
        account = self._apps.get(app)
        if account is not None:
            return account
        if not valid_app_id(app):
            return None
        expiry = self._missing.get(app)
        if expiry is not None:
            if expiry > time.monotonic():
                return None
            self._missing.pop(app, None)
        # Concurrent misses for the same app (a crowd reconnecting) share one lookup, which
        # runs as a task of its own so that a caller going away does not cancel it for others.
        task = self._pending.get(app)
        if task is None:
            task = self._pending[app] = asyncio.ensure_future(self._lookup(app))
            task.add_done_callback(lambda _: self._pending.pop(app, None))
        return await asyncio.shield(task)

    async def _lookup(self, app: str) -> int | None:
        self.lookups += 1
        try:
            account = await asyncio.to_thread(self.store.owner, app)
        except redis.RedisError as exc:
            log.warning("gateway.registry_lookup_failed", app=app, error=str(exc))
            account = None
        if account is None:
            self._missing[app] = time.monotonic() + self.negative_ttl
            while len(self._missing) > self.negative_max:
                self._missing.popitem(last=False)
        else:
            self._apps[app] = account
        return account
