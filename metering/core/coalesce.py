"""Coalescing reads: concurrent loads of one key share a single call, and a successful result
is reused for a while. Used where many requests ask the same question at once (API keys,
live counts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """``get(key, load)``: the result of one ``load()`` per key per ``ttl`` seconds.

    A caller arriving while a load is under way awaits that load; one arriving within ``ttl``
    after it started gets its result. A load that failed is not reused: the next caller tries
    again. The wait is shielded, so one caller going away never cancels the others' load.
    """

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, asyncio.Future[V]]] = {}

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None:
            started, pending = entry
            if not pending.done():
                return await asyncio.shield(pending)
            if now - started < self.ttl and not pending.cancelled() and not pending.exception():
                return pending.result()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if not v[1].done()}
        pending = asyncio.ensure_future(load())
        self._entries[key] = (now, pending)
        return await asyncio.shield(pending)
