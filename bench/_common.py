"""Shared by the benchmarks: where Redis is, a throwaway key prefix, printing a result line,
the aggregator's bulk write done by hand."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from tests import processes
from tests.factories import tenant
from tests.scratch import REDIS_URL, delete_keys, reset_caches, scratch_database


@contextmanager
def scratch_prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    try:
        yield prefix
    finally:
        delete_keys(client, prefix)


def row(*cells: object, widths: tuple[int, ...] = (34, 14, 14, 10)) -> str:
    return "".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))


# -- a scratch engine for the benchmarks that run real processes -----------------------------


@dataclass(frozen=True)
class Scratch:
    """A migrated scratch database, a Redis key prefix, and an app with a platform key."""

    vars: dict[str, str]
    prefix: str
    app_id: int
    key: str

    def child_env(self) -> dict[str, str]:
        """The inherited environment without any other ``METERING_*``, plus ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
        env.update(self.vars)
        return env


@contextmanager
def scratch_engine() -> Iterator[Scratch]:
    """Create the database and tenant, point this process at them; drop it all at the end."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    saved = {k: v for k, v in os.environ.items() if k.startswith("METERING_")}
    with scratch_database("bench") as url:
        values = {
            "METERING_DATABASE_URL": url,
            "METERING_REDIS_URL": REDIS_URL,
            "METERING_REDIS_PREFIX": prefix,
            "METERING_DATACENTER": "dc1",
        }
        try:
            for k in saved:
                if not k.startswith("METERING_TEST_"):
                    del os.environ[k]
            os.environ.update(values)
            reset_caches()
            t = tenant("platform", name="bench")
            yield Scratch(vars=values, prefix=prefix, app_id=t.app_id, key=t.key)
        finally:
            reset_caches()
            for k in values:
                os.environ.pop(k, None)
            os.environ.update(saved)
            client = redis.Redis.from_url(REDIS_URL)
            delete_keys(client, prefix)
            client.close()


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that the cleanup (children, database, keys) runs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def start(stack: ExitStack, proc: processes.Process) -> processes.Process:
    """Stop ``proc`` when ``stack`` closes (after success, an error or Ctrl-C)."""
    stack.callback(proc.stop)
    return proc


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


MERGE = (
    "peak_at = CASE WHEN excluded.peak > t.peak THEN excluded.peak_at ELSE t.peak_at END, "
    "peak = GREATEST(t.peak, excluded.peak), min = LEAST(t.min, excluded.min), "
    "ws_peak = GREATEST(t.ws_peak, excluded.ws_peak), "
    "ch_peak = GREATEST(t.ch_peak, excluded.ch_peak), ch_min = LEAST(t.ch_min, excluded.ch_min)"
)  # the aggregator's merge of usage_rollups (service._ROW_MERGE)


def copy_and_merge(
    conn: psycopg.Connection[Any],
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[int]],
    merge: str,
) -> float:
    """Seconds to COPY ``rows`` into the temporary table ``bench_stage`` (made by the caller)
    and merge them into ``table`` with one ``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE
    SET merge`` (``t``: the stored row), committed: what the aggregator does on Postgres."""
    cols = ", ".join(columns)
    started = time.perf_counter()
    with conn.cursor() as cur:
        with cur.copy(f"COPY bench_stage ({cols}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)
        cur.execute(
            f"INSERT INTO {table} AS t ({cols}) SELECT {cols} FROM bench_stage "
            f"ON CONFLICT (scope, entity_id, unit, period_start) DO UPDATE SET {merge}"
        )
    conn.commit()
    return time.perf_counter() - started
