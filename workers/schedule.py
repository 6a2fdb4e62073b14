"""Every periodic task, in one place: (task name, interval, options).

Celery beat uses it in production; ``metering run`` runs the same entries in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metering.core.settings import Settings


@dataclass(frozen=True)
class Periodic:
    task: str
    every: float  # seconds
    options: dict[str, Any] = field(default_factory=dict)


def periodic_tasks(settings: Settings) -> list[Periodic]:
    tick = settings.tick_interval.total_seconds()
    return [
        # A tick not started within its own second is useless: the next one covers the time.
        Periodic("metering.live.tick", tick, {"expires": tick, "queue": "live"}),
        Periodic(
            "metering.accounts.sync_registry",
            settings.registry_refresh_interval.total_seconds(),
            {"expires": settings.registry_refresh_interval.total_seconds()},
        ),
        # A cycle that did not start within its interval is covered by the next one.
        Periodic(
            "metering.rollups.aggregate",
            settings.aggregate_interval.total_seconds(),
            {"expires": settings.aggregate_interval.total_seconds(), "queue": "rollups"},
        ),
        # Deliveries whose task was lost (a worker killed after the alert committed).
        Periodic(
            "metering.limits.sweep_deliveries",
            settings.alert_sweep_interval.total_seconds(),
            {"expires": settings.alert_sweep_interval.total_seconds()},
        ),
        # The admission mirror rewritten whole (Redis emptied), month blocks lifted at a new month.
        Periodic(
            "metering.limits.sync_admission",
            settings.registry_refresh_interval.total_seconds(),
            {"expires": settings.registry_refresh_interval.total_seconds()},
        ),
        # The previous month closed once its grace window has passed (a no-op until then).
        Periodic(
            "billing.close_due_month",
            settings.billing_close_interval.total_seconds(),
            {"expires": settings.billing_close_interval.total_seconds()},
        ),
        Periodic(
            "metering.rollups.retention",
            settings.retention_interval.total_seconds(),
            {"expires": settings.retention_interval.total_seconds()},
        ),
    ]


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    return {
        p.task: {"task": p.task, "schedule": p.every, "options": p.options}
        for p in periodic_tasks(settings)
    }
