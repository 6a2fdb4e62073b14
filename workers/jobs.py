"""The periodic jobs as plain functions, by task name.

Celery wraps them in ``workers.tasks``; ``metering run`` calls them in-process. Neither place
holds logic of its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from billing import jobs as billing
from metering.accounts.registry import sync_registry as _sync_registry
from metering.accounts.store import RegistryStore
from metering.core import database
from metering.core import redis as redis_clients
from metering.core.logging import get_logger
from metering.core.settings import Settings, get_settings
from metering.limits import wiring as limits_wiring
from metering.live import service as live
from metering.live.wiring import datacenter_stores, global_store
from metering.rollups import retention as rollup_retention
from metering.rollups import service as rollups
from metering.rollups.periods import Unit

log = get_logger(__name__)


def tick() -> dict[str, Any]:
    settings = get_settings()
    result = live.tick(
        global_store(settings),
        datacenter_stores(settings),
        liveness_timeout=settings.liveness_timeout.total_seconds(),
        sample_retention=settings.sample_retention,
    )
    _refill_if_emptied(settings)
    alerts = 0
    if result.committed:
        # Within the second: the concurrent metrics' levels, and the live counts gateways
        # weigh their admission decisions with.
        alerts = len(limits().live.after_tick(result.second, result.accounts).alerts)
    return {
        "second": result.second,
        "committed": result.committed,
        "apps": result.apps_changed,
        "alerts": alerts,
    }


# Seconds a refill request holds its claim: one request while the syncs run, another if lost.
REFILL_CLAIM = 10.0
REFILLS = ("metering.accounts.sync_registry", "metering.limits.sync_admission")


def _refill_if_emptied(settings: Settings) -> None:
    """Ask for the registry and admission mirrors to be rewritten when Redis lost them (it
    restarted empty): gateways keep their last copies meanwhile, but cannot learn of a new
    app, and every second the tick sees this is a second sooner than the periodic sync."""
    store = RegistryStore(redis_clients.primary(), settings.redis_prefix)
    if store.complete() or not store.claim_refill(REFILL_CLAIM):
        return
    log.warning("registry.mirror_lost", hint="Redis lost the registry copy: refilling it now")
    run_elsewhere(REFILLS)


def run_elsewhere(tasks: tuple[str, ...]) -> None:
    """Run jobs by name off this one: a Celery task each; in the embedded engine, a thread."""
    if get_settings().embedded:
        threading.Thread(
            target=lambda: [JOBS[t]() for t in tasks], name="refill", daemon=True
        ).start()
        return
    from workers.celeryapp import app  # noqa: PLC0415 (the Celery app imports the jobs' module)

    for task in tasks:
        app.send_task(task)


T = TypeVar("T")


def _per_process(build: Callable[[Settings], T]) -> Callable[[], T]:
    """``build(settings)`` once per process and database/Redis (settings change in tests):
    what it built keeps its memory between jobs."""
    built: dict[tuple[str, str, str], T] = {}

    def get() -> T:
        settings = get_settings()
        key = (settings.database_url, settings.redis_url, settings.redis_prefix)
        if key not in built:
            built.clear()
            built[key] = build(settings)
        return built[key]

    return get


# This process's limits checker, admission mirror and delivery dispatch.
limits = _per_process(lambda s: limits_wiring.build(s, database.get_engine(), dispatch))


def dispatch(delivery_ids: list[int]) -> None:
    """Send deliveries whose alert just committed: a Celery task each; in the embedded
    engine, a thread (the periodic sweep catches whatever either loses)."""
    if get_settings().embedded:
        threading.Thread(
            target=lambda: [deliver(i) for i in delivery_ids], name="alert-delivery", daemon=True
        ).start()
        return
    from workers.celeryapp import app  # noqa: PLC0415 (the Celery app imports the jobs' module)

    for delivery_id in delivery_ids:
        app.send_task(DELIVER, args=[delivery_id])


DELIVER = "metering.limits.deliver"


# Tests only: hold each delivery (and sweep) this long before it claims anything, so that a test
# can kill the worker between an alert's commit and its send (tests/limits/test_enforcement_e2e.py).
_TEST_PAUSE = float(os.environ.get("METERING_TEST_DELIVERY_PAUSE", "0") or 0)


def _test_pause(**where: object) -> None:
    if _TEST_PAUSE:
        log.info("limits.test_pause", stage="before_send", **where)
        time.sleep(_TEST_PAUSE)


def deliver(delivery_id: int) -> dict[str, Any]:
    _test_pause(delivery=delivery_id)
    outcome = limits_wiring.deliver(get_settings(), database.get_engine(), delivery_id)
    return {
        "delivery": delivery_id,
        "status": outcome.status,
        "attempt": outcome.attempt,
        "retry_at": None if outcome.retry_at is None else outcome.retry_at.isoformat(),
    }


def sweep_deliveries() -> dict[str, Any]:
    _test_pause(sweep=True)
    result = limits_wiring.sweep(get_settings(), database.get_engine())
    return {"sent": result.sent, "retried": result.retried, "failed": result.failed}


def sync_admission() -> int:
    return limits_wiring.sync_admission(
        database.get_engine(), limits_wiring.admission_store(get_settings())
    )


def sync_registry() -> int:
    settings = get_settings()
    return _sync_registry(RegistryStore(redis_clients.primary(), settings.redis_prefix))


# This process's aggregator: it keeps what it loaded between cycles (see its module).
aggregator = _per_process(
    lambda s: rollups.Aggregator(
        database.get_engine(),
        global_store(s),
        datacenter_stores(s),
        max_samples=s.aggregate_max_samples,
        on_accounts=limits().aggregate,
    )
)


def aggregate() -> dict[str, Any]:
    result = aggregator().run()
    return {
        "committed": result.committed,
        "second": result.second,
        "samples": result.samples,
        "rows": result.rows_written,
        "states": result.states_written,
        "ms": round(result.duration * 1000, 1),
    }


def retention() -> dict[str, Any]:
    settings = get_settings()
    kept = {
        unit: (None if d is None else d.total_seconds())
        for unit, d in (
            (Unit.MINUTE, settings.retention_minute),
            (Unit.HOUR, settings.retention_hour),
            (Unit.DAY, settings.retention_day),
            (Unit.MONTH, settings.retention_month),
        )
    }
    result = rollup_retention.enforce_retention(
        database.get_engine(), datacenter_stores(settings), kept
    )
    return {
        "deleted": result.deleted,
        "dropped": result.dropped,
        "created": result.created,
        "marks_forgotten": result.marks_forgotten,
    }


def close_due_month() -> dict[str, Any]:
    return billing.close_due(database.get_engine(), grace=get_settings().billing_grace)


JOBS: dict[str, Callable[[], Any]] = {
    "metering.live.tick": tick,
    "metering.accounts.sync_registry": sync_registry,
    "metering.rollups.aggregate": aggregate,
    "metering.rollups.retention": retention,
    "metering.limits.sweep_deliveries": sweep_deliveries,
    "metering.limits.sync_admission": sync_admission,
    "billing.close_due_month": close_due_month,
}
