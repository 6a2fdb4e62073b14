"""Shared by the benchmarks: where Redis is, a throwaway key prefix, printing a result line."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

REDIS_URL = os.environ.get("METERING_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextmanager
def scratch_prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(match=f"{{{prefix}*", count=5000):
            client.delete(key)


def row(*cells: object, widths: tuple[int, ...] = (34, 14, 14, 10)) -> str:
    return "".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))
