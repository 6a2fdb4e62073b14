"""API keys on the ``IM-API-KEY`` header, with a short in-process cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from metering.accounts import service as accounts
from metering.accounts.schemas import KeyInfo
from metering.core.coalesce import Coalescer
from metering.core.database import unit_of_work
from metering.core.errors import AuthenticationError, PermissionDeniedError

PERMISSION_MESSAGES = {
    "platform": "Platform API permission required",
    "stats": "Stats API permission required",
    "admission": "Admission API permission required",
    "billing": "Billing API permission required",
    "staff": "Staff permission required",
}
_MAX_KEY_LENGTH = 256


class KeyCache:
    """Digest -> key info (or None: unknown) for ``ttl`` seconds.

    Revoking a key takes effect within ``ttl``. Entries are keyed by the key's digest, never
    the key itself. Requests that miss together share one database lookup.
    """

    def __init__(self, ttl: float) -> None:
        self._cache: Coalescer[str, KeyInfo | None] = Coalescer(ttl)

    async def lookup(self, key: str) -> KeyInfo | None:
        return await self._cache.get(
            accounts.digest(key), lambda: run_in_threadpool(self._load, key)
        )

    @staticmethod
    def _load(key: str) -> KeyInfo | None:
        with unit_of_work() as session:
            return accounts.authenticate(session, key)


async def authorize(request: Request, key: str | None, permission: str) -> KeyInfo:
    """The key's app and permissions; 401 for a missing or unknown key, 403 without ``permission``.

    Called inline by each endpoint (not as a chain of dependencies): it sits on the hot path
    of the admin endpoint, where every microsecond shows in requests per second.
    """
    if not key or len(key) > _MAX_KEY_LENGTH:
        raise AuthenticationError("Invalid or missing API key")
    cache: KeyCache = request.app.state.key_cache
    info = await cache.lookup(key.strip())
    if info is None:
        raise AuthenticationError("Invalid or missing API key")
    if permission not in info.permissions:
        raise PermissionDeniedError(PERMISSION_MESSAGES[permission])
    return info


def key_with(permission: str) -> Callable[[Request], Awaitable[KeyInfo]]:
    """A dependency: the request's key, which must carry ``permission``. As a dependency it
    runs before the body and the parameters are validated: a caller without a key learns
    nothing about what a request should look like."""

    async def key(request: Request) -> KeyInfo:
        return await authorize(request, request.headers.get(API_KEY_HEADER), permission)

    return key


API_KEY_HEADER = "IM-API-KEY"
# For endpoints that read the header themselves, so that the OpenAPI document still shows it.
API_KEY_PARAMETER = {
    "name": API_KEY_HEADER,
    "in": "header",
    "required": True,
    "description": "Your platform API Key",
    "schema": {"type": "string"},
}
