"""The Celery tasks: one per job, named by its explicit dotted string."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Task

from workers.celeryapp import app
from workers.jobs import DELIVER, JOBS, deliver

for _name, _job in JOBS.items():
    app.task(name=_name)(_job)


@app.task(name=DELIVER, bind=True, max_retries=None, acks_late=True)
def deliver_alert(self: Task[Any, Any], delivery_id: int) -> dict[str, Any]:
    """One delivery of a committed alert; a failure comes back after the outbox's backoff
    (the row holds the attempt count and the next time, so a lost retry is swept up)."""
    outcome = deliver(delivery_id)
    if outcome["status"] == "retry" and outcome["retry_at"] is not None:
        wait = datetime.fromisoformat(outcome["retry_at"]) - datetime.now(UTC)
        raise self.retry(countdown=max(0.0, wait.total_seconds()))
    return outcome
