"""The limits machinery of one process, built from settings (for the composition roots)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from metering.core import redis as redis_clients
from metering.core.settings import Settings
from metering.limits import outbox
from metering.limits.channels import channels_from
from metering.limits.repository import LimitsRepository
from metering.limits.service import (
    AfterCommit,
    AggregateLimits,
    LimitChecker,
    LiveLimits,
    desired_admission,
    month_of,
)
from metering.limits.store import AdmissionStore


@dataclass
class Limits:
    """The two places usage is checked: after each tick, and in each aggregation cycle."""

    live: LiveLimits
    aggregate: AggregateLimits


def admission_store(settings: Settings) -> AdmissionStore:
    return AdmissionStore(redis_clients.primary(), settings.redis_prefix)


def build(settings: Settings, engine: Engine, dispatch: Callable[[list[int]], None]) -> Limits:
    """``dispatch`` sends deliveries once their alert committed (a Celery task each, or a
    thread in the embedded engine)."""
    channels = channels_from(settings)
    refresh = settings.limits_refresh_interval.total_seconds()
    checker = LimitChecker(engine, sorted(channels), refresh=refresh)
    store = admission_store(settings)
    after = AfterCommit(checker, store, dispatch)
    return Limits(
        live=LiveLimits(engine, checker, store, after, refresh=refresh),
        aggregate=AggregateLimits(checker, after),
    )


def _retries(settings: Settings) -> dict[str, Any]:
    return {
        "max_attempts": settings.alert_max_attempts,
        "retry_base": settings.alert_retry_base,
        "retry_max": settings.alert_retry_max,
    }


def deliver(settings: Settings, engine: Engine, delivery_id: int) -> outbox.Outcome:
    return outbox.deliver(engine, delivery_id, channels_from(settings), **_retries(settings))


def sweep(settings: Settings, engine: Engine) -> outbox.SweepResult:
    return outbox.sweep(engine, channels_from(settings), **_retries(settings))


def sync_admission(engine: Engine, store: AdmissionStore, now: datetime | None = None) -> int:
    """Rebuild the admission rows whose publishing block belongs to a month that ended, then
    mirror every row to Redis whole (an emptied or drifted copy heals); returns the rows."""
    now = now or datetime.now(UTC)
    month = month_of(now)
    with engine.begin() as conn:
        repo = LimitsRepository(conn)
        rows = repo.admission()
        ended = [a for a, r in rows.items() if r.publish_blocked_month not in (None, month)]
        if ended:
            rebuilt = desired_admission(conn, ended, now)
            repo.set_admission(rebuilt, now)
            rows.update(rebuilt)
    store.write(rows, replace=True)
    return sum(1 for r in rows.values() if not r.empty)
