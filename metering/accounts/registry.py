"""Keeping the Redis mirror of the app registry in step with Postgres."""

from __future__ import annotations

from metering.accounts import service
from metering.accounts.store import RegistryStore
from metering.core.database import unit_of_work


def sync_registry(store: RegistryStore) -> int:
    """Rewrite the mirror from the database; returns how many apps it holds."""
    with unit_of_work() as session:
        owners = service.app_owners(session)
    store.publish(owners, replace=True)
    return len(owners)
