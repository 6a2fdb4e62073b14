"""Billing's units of work: each opens its transaction, calls the service, commits.

Called by the CLI, the API and the periodic task; the services themselves never commit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from billing import service
from billing.service import CloseResult, Progress
from metering.core.logging import get_logger
from metering.limits.service import month_of

log = get_logger(__name__)


def close_month(
    engine: Engine,
    month: str,
    *,
    by: str,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> CloseResult:
    """Close ``month`` in one transaction. A closer that lost a race to another (Postgres
    waits on the month's lock and then finds it closed; SQLite refuses the second writer, or
    the month's key does) reads what the winner made."""
    for attempt in (1, 2):
        try:
            with engine.begin() as conn:
                return service.close(conn, month, by=by, now=now, progress=progress)
        except (IntegrityError, OperationalError) as exc:
            if attempt == 2 or not _lost_race(engine, exc):
                raise
            log.info("billing.close_raced", month=month, error=str(exc.orig))
    raise AssertionError  # unreachable


def _lost_race(engine: Engine, exc: IntegrityError | OperationalError) -> bool:
    if isinstance(exc, IntegrityError):
        return True  # the month's row or an invoice's key: another close committed them
    return engine.dialect.name == "sqlite" and "locked" in str(exc.orig)


def close_due(engine: Engine, *, grace: timedelta, now: datetime | None = None) -> dict[str, Any]:
    """The periodic close: the previous month, once its grace window has passed, and only
    once the rollups reach its end (late aggregates land first)."""
    now = now or datetime.now(UTC)
    month = service.due(now, grace)
    if month is None:
        return {"month": None, "status": "in grace window"}
    with engine.connect() as conn:
        if service.is_closed(conn, month):
            return {"month": month, "status": "closed already"}
        if not service.counted_in(conn, month):
            return {"month": month, "status": "nothing counted in it"}
        if not service.aggregated_through(conn, month):
            log.warning("billing.close_waiting_for_rollups", month=month)
            return {"month": month, "status": "waiting for the rollups"}
    result = close_month(engine, month, by="billing.close_due", now=now)
    return {"month": month, "status": "closed", "invoices": result.invoices}


def preview(engine: Engine, account_id: int, *, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    with engine.connect() as conn:
        draft = service.preview(conn, account_id, now=now)
    return service.draft_view(draft, month_of(now), now)


def invoices(
    engine: Engine, month: str, *, after: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return service.invoices(conn, month, after=after, limit=limit)


def invoice(engine: Engine, invoice_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return service.invoice(conn, invoice_id)
