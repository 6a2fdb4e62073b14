"""API keys on the ``IM-API-KEY`` header, with a short in-process cache."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from metering.accounts import service as accounts
from metering.accounts.schemas import KeyInfo
from metering.core.database import unit_of_work
from metering.core.errors import AuthenticationError, PermissionDeniedError

PERMISSION_MESSAGES = {
    "platform": "Platform API permission required",
    "stats": "Stats API permission required",
    "admission": "Admission API permission required",
    "billing": "Billing API permission required",
}
_MAX_KEY_LENGTH = 256


class KeyCache:
    """Digest -> key info (or None: unknown) for ``ttl`` seconds.

    Revoking a key takes effect within ``ttl``. Entries are keyed by the key's digest, never
    the key itself.
    """

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyInfo | None]] = {}

    async def lookup(self, key: str) -> KeyInfo | None:
        digest = accounts.digest(key)
        now = time.monotonic()
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = await run_in_threadpool(self._load, key)
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (now + self.ttl, info)
        return info

    @staticmethod
    def _load(key: str) -> KeyInfo | None:
        with unit_of_work() as session:
            return accounts.authenticate(session, key)


async def _key_info(
    request: Request, im_api_key: Annotated[str | None, Header(alias="IM-API-KEY")] = None
) -> KeyInfo:
    if not im_api_key or len(im_api_key) > _MAX_KEY_LENGTH:
        raise AuthenticationError("Invalid or missing API key")
    cache: KeyCache = request.app.state.key_cache
    info = await cache.lookup(im_api_key.strip())
    if info is None:
        raise AuthenticationError("Invalid or missing API key")
    return info


def require(permission: str) -> Callable[..., Awaitable[KeyInfo]]:
    """A dependency: the request's key, which must carry ``permission``."""

    async def dependency(info: Annotated[KeyInfo, Depends(_key_info)]) -> KeyInfo:
        if permission not in info.permissions:
            raise PermissionDeniedError(PERMISSION_MESSAGES[permission])
        return info

    return dependency
