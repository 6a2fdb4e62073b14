"""The Celery tasks: one per job, named by its explicit dotted string."""

from __future__ import annotations

from workers.celeryapp import app
from workers.jobs import JOBS

for _name, _job in JOBS.items():
    app.task(name=_name)(_job)
