"""The app registry mirrored to the primary Redis: app id -> account id.

Postgres is the record; this copy lets gateways reject unknown apps and the tick sum apps per
account without a database round trip. It is rewritten after every change and by a periodic
task, so an emptied Redis heals by itself.

Keys, in the global hash-tag group ``{<prefix>}``:

- ``{p}:apps`` (hash): app id -> account id.
- ``{p}:apps:synced`` (string): set, with the whole hash, by every full sync from the
  database. Without it (Redis restarted empty, or only single apps published since) the hash
  may lack apps that exist: an app missing from it is then not known to be unknown.
- ``{p}:apps:refill`` (string, expiring): the claim of whoever asked for a full sync, so that
  one is asked for at a time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metering.core.redis import Redis


def registry_key(prefix: str) -> str:
    return f"{{{prefix}}}:apps"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The mirror as read at one moment."""

    apps: dict[str, int]  # app id -> account id
    complete: bool  # written whole by a sync from the database since Redis last lost it


class RegistryStore:
    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.key = registry_key(prefix)
        self.synced_key = f"{self.key}:synced"
        self.refill_key = f"{self.key}:refill"

    def publish(self, owners: Mapping[int, int], *, replace: bool = False) -> None:
        """Write app -> account; with ``replace``, ``owners`` is every app in the database:
        drop the others, and mark the mirror complete."""
        pipe = self.client.pipeline(transaction=True)
        if replace:
            stale = {int(a) for a in self.client.hkeys(self.key)} - set(owners)
            if stale:
                pipe.hdel(self.key, *[str(a) for a in stale])
        items = list(owners.items())
        for i in range(0, len(items), 10_000):
            pipe.hset(self.key, mapping={str(a): str(acc) for a, acc in items[i : i + 10_000]})
        if replace:
            pipe.set(self.synced_key, repr(time.time()))
            pipe.delete(self.refill_key)
        pipe.execute()

    def owner(self, app: str) -> tuple[int | None, bool]:
        """The app's account (None if the mirror lacks it), and whether the mirror is complete."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self.key, app)
        pipe.exists(self.synced_key)
        value, complete = pipe.execute()
        return (int(value) if value is not None else None), bool(complete)

    def snapshot(self) -> Snapshot:
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(self.key)
        pipe.exists(self.synced_key)
        apps, complete = pipe.execute()
        return Snapshot({_s(k): int(v) for k, v in apps.items()}, bool(complete))

    def all(self) -> dict[str, int]:
        return self.snapshot().apps

    def complete(self) -> bool:
        return bool(self.client.exists(self.synced_key))

    def claim_refill(self, ttl: float) -> bool:
        """True for the one caller (within ``ttl`` seconds) that should run a full sync."""
        return bool(self.client.set(self.refill_key, "1", nx=True, px=max(1, int(ttl * 1000))))
