"""The gateway's view of the app registry: which app ids exist, and their accounts.

Known apps are answered from memory (loaded at start, refreshed by a daemon thread), so a
connect costs no Redis round trip. A miss asks Redis once, off the event loop; misses are
remembered briefly so that a client retrying an unknown id cannot hammer Redis.

An app is refused as unknown only on evidence: the mirror, written whole by a sync from the
database, lacks it. A mirror that is not such a copy (Redis restarted empty, or unreachable)
is no evidence: the last good copy is kept, a miss waits a little for the engine to refill the
mirror (the tick asks for it within a second), and if it cannot tell by then the request is
answered as unavailable, never as unknown.
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
REFILL_POLL = 0.25  # seconds between looks at a mirror being refilled


def valid_app_id(app: str) -> bool:
    """App ids are decimal integers written as strings."""
    return 0 < len(app) <= MAX_APP_ID_LENGTH and app.isascii() and app.isdigit()


class RegistryUnavailable(Exception):
    """Whether the app exists cannot be told now (Redis unreachable, or its mirror incomplete
    and not refilled in time)."""


def _by_account(apps: dict[str, int]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for app, account in apps.items():
        out.setdefault(account, []).append(app)
    return {account: tuple(owned) for account, owned in out.items()}


class AppRegistry:
    """In-process cache of app id -> account id, backed by the Redis mirror of the registry."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        refresh_interval: float = 30.0,
        negative_ttl: float = 2.0,
        negative_max: int = 10_000,
        refill_wait: float = 5.0,
    ) -> None:
        self.store = store
        self.refresh_interval = refresh_interval
        self.negative_ttl = negative_ttl
        self.negative_max = negative_max
        self.refill_wait = refill_wait
        # Replaced as a whole by refresh() on its thread, never mutated there.
        self._apps: dict[str, int] = {}
        self._accounts: dict[int, tuple[str, ...]] = {}
        self._missing: OrderedDict[str, float] = OrderedDict()  # app -> expiry (monotonic)
        self._pending: dict[str, asyncio.Future[int | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.complete = False  # the copy came whole from a sync of the database
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
        """Reload the registry; returns its size. From a complete mirror the copy is replaced
        (an app deleted there stops resolving); from an incomplete one it only gains apps."""
        snapshot = self.store.snapshot()
        if snapshot.complete:
            apps = snapshot.apps
            self._missing = OrderedDict()  # an app created since its miss resolves at once
        else:
            if self.complete or (self._apps and len(snapshot.apps) < len(self._apps)):
                log.warning(
                    "gateway.registry_incomplete",
                    kept=len(self._apps),
                    mirror=len(snapshot.apps),
                    hint="the Redis mirror was not written by a full sync (emptied?): "
                    "keeping the last copy until the engine refills it",
                )
            apps = {**self._apps, **snapshot.apps}
        self._apps = apps
        self._accounts = _by_account(apps)
        self.complete = snapshot.complete
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

    def apps_of(self, account: int) -> tuple[str, ...]:
        """The apps of ``account`` this copy knows (no I/O)."""
        return self._accounts.get(account, ())

    async def resolve(self, app: str) -> int | None:
        """The account that owns ``app``, or None if the app is unknown: not a valid id, or
        missing from a complete mirror. Raises :class:`RegistryUnavailable` when that cannot
        be told."""
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
        deadline = time.monotonic() + self.refill_wait
        while True:
            self.lookups += 1
            try:
                account, complete = await asyncio.to_thread(self.store.owner, app)
            except redis.RedisError as exc:
                log.warning("gateway.registry_lookup_failed", app=app, error=str(exc))
                raise RegistryUnavailable(f"the app registry is unreachable: {exc}") from None
            if account is not None:
                self._apps[app] = account
                self._accounts[account] = (*self._accounts.get(account, ()), app)
                return account
            if complete:
                self._missing[app] = time.monotonic() + self.negative_ttl
                while len(self._missing) > self.negative_max:
                    self._missing.popitem(last=False)
                return None
            if time.monotonic() >= deadline:
                log.warning("gateway.registry_not_refilled", app=app, waited=self.refill_wait)
                raise RegistryUnavailable("the app registry is being refilled: try again")
            await asyncio.sleep(REFILL_POLL)
