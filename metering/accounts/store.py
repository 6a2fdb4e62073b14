"""The app registry mirrored to the primary Redis: app id -> account id.

Postgres is the record; this copy lets gateways reject unknown apps and the tick sum apps per
account without a database round trip. It is rewritten after every change and by a periodic
task, so an emptied Redis heals by itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from metering.core.redis import Redis


def registry_key(prefix: str) -> str:
    return f"{{{prefix}}}:apps"


class RegistryStore:
    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.key = registry_key(prefix)

    def publish(self, owners: Mapping[int, int], *, replace: bool = False) -> None:
        """Write app -> account; with ``replace``, also drop apps no longer in ``owners``."""
        pipe = self.client.pipeline(transaction=True)
        if replace:
            stale = {int(a) for a in self.client.hkeys(self.key)} - set(owners)
            if stale:
                pipe.hdel(self.key, *[str(a) for a in stale])
        items = list(owners.items())
        for i in range(0, len(items), 10_000):
            pipe.hset(self.key, mapping={str(a): str(acc) for a, acc in items[i : i + 10_000]})
        pipe.execute()

    def owner(self, app: str) -> int | None:
        value = self.client.hget(self.key, app)
        return int(value) if value is not None else None

    def all(self) -> dict[str, int]:
        return {
            (k.decode() if isinstance(k, bytes) else k): int(v)
            for k, v in self.client.hgetall(self.key).items()
        }
