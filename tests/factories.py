"""Creating accounts, apps and keys the way an operator does, committed for real."""

from __future__ import annotations

from dataclasses import dataclass

from metering.accounts import service
from metering.accounts.registry import sync_registry
from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.core.database import unit_of_work
from metering.core.settings import get_settings


@dataclass(frozen=True)
class Tenant:
    account_id: int
    app_id: int
    key: str


def tenant(*permissions: str, account_id: int | None = None, name: str = "acme") -> Tenant:
    """An app (in a new account unless given one) with a key carrying ``permissions``."""
    with unit_of_work() as session:
        if account_id is None:
            account_id = service.create_account(session, name).id
        app = service.create_app(session, account_id, f"{name}-app")
        key = service.create_key(session, app.id, list(permissions or ("platform",)))
    store = RegistryStore(redis_clients.primary(), get_settings().redis_prefix)
    if store.complete():
        store.publish({app.id: account_id})
    else:  # as the engine's first sync (or a refill) does: the whole registry, once
        sync_registry(store)
    return Tenant(account_id=account_id, app_id=app.id, key=key.key)
