"""The Celery app. Tasks are thin: each opens what it needs and calls ``metering``."""

from __future__ import annotations

from celery import Celery
from celery.signals import beat_init, celeryd_init, worker_process_init
from kombu import Queue

from metering.core import redis as redis_clients
from metering.core.logging import configure
from metering.core.settings import get_settings
from workers.schedule import beat_schedule

settings = get_settings()

app = Celery("metering", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_default_queue="celery",
    # A worker started without -Q consumes them all; production gives "live" and "rollups"
    # workers of their own.
    task_queues=(Queue("celery"), Queue("live"), Queue("rollups")),
    task_routes={
        # The 1-second tick has a queue of its own, so a backlog of other work never delays it.
        "metering.live.tick": {"queue": "live"},
        # Aggregation keeps what it loaded between cycles, in the process: one process (a
        # worker with --concurrency 1 on this queue) runs every cycle warm; a cycle that
        # lands in another process reloads everything from Postgres first.
        "metering.rollups.aggregate": {"queue": "rollups"},
    },
    beat_schedule=beat_schedule(settings),
    # Beat wakes at least every second, or a 1-second schedule drifts.
    beat_max_loop_interval=1,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    timezone="UTC",
)
configure(settings.log_level, json=settings.log_json)


@celeryd_init.connect
@beat_init.connect
def _refuse_embedded(**_: object) -> None:
    # Importing this module is fine anywhere (``metering run`` imports the jobs); starting a
    # worker or beat on the in-process stand-in would count nothing anyone can see.
    if settings.embedded:
        raise SystemExit(
            "Celery needs a real Redis: set METERING_REDIS_URL (the embedded default runs its "
            "schedule in-process with `metering run`)"
        )


@worker_process_init.connect
def _fresh_clients(**_: object) -> None:
    # Connections must not be shared across the fork of a prefork worker.
    redis_clients.reset_clients()
