"""What the dashboard shows, assembled from the rollups, the limits and the live counts.

Everything is scoped to the key's account: its apps, its package, its month so far, its alerts
and what gateways enforce for it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from metering.accounts.models import METRICS, Account, App, Package
from metering.core.errors import PermissionDeniedError
from metering.core.ids import is_id
from metering.limits import levels, staff
from metering.limits.repository import LimitsRepository
from metering.limits.service import month_entry, month_of, usage_of
from metering.rollups import query
from metering.rollups.periods import Unit

LEVEL_NAMES = ("ok", *levels.LEVELS)
MAX_POINTS = 1000  # periods of one graph


def apps_of(conn: Connection, account_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(App.id, App.name).where(App.account_id == account_id).order_by(App.id)
    ).all()
    return [{"id": a, "name": n} for a, n in rows]


def check_app(conn: Connection, account_id: int, app_id: int) -> None:
    """An app of another account is refused, as if it did not exist."""
    owner = (
        conn.execute(select(App.account_id).where(App.id == app_id)).scalar()
        if is_id(app_id)
        else None
    )
    if owner != account_id:
        raise PermissionDeniedError(f"app {app_id} is not an app of this key's account")


def overview(session: Session, account_id: int, *, now: datetime | None = None) -> dict[str, Any]:
    """The account, its apps, its package's limits, the month so far against them, recent
    alerts, and any rejection in force."""
    now = now or datetime.now(UTC)
    conn = session.connection()
    account = session.get(Account, account_id)
    assert account is not None  # the key's own account
    package = None if account.package_id is None else session.get(Package, account.package_id)
    limits: dict[str, tuple[int, int]] = {}
    if package is not None:
        _enforce, limits = LimitsRepository(conn).limits_of(package.id)
    month = month_of(now)
    this_month = month_entry(conn, account_id, month)
    usage = usage_of(this_month)
    figures: dict[str, Any] = {}
    for metric in METRICS:
        quota, hard = limits.get(metric, (None, None))
        level = 0
        if quota is not None and hard is not None:
            found = levels.level_of(np.array([usage[metric]]), np.array([quota]), np.array([hard]))
            level = int(found[0])
        figures[metric] = {
            "usage": usage[metric], "quota": quota, "hard": hard, "level": LEVEL_NAMES[level],
        }  # fmt: skip
    if this_month is not None:
        figures["connections"]["at"] = this_month["connections.all.peakAt"]
    admission = staff.admission(session, account_id, now=now)
    alerts = staff.list_alerts(session, account_id=account_id, limit=20)
    rejections = []
    if admission.override is None:
        if admission.publish_blocked_month == month and admission.publish_blocked_by:
            rejections.append(
                f"new messages are refused for the rest of {month} "
                f"(the {admission.publish_blocked_by} hard limit was reached)"
            )
        for metric, hard in (("connections", admission.connections_hard),
                             ("channels", admission.channels_hard)):  # fmt: skip
            if hard is not None and figures[metric]["level"] == "hard":
                rejections.append(f"new {metric} are refused while the account is at {hard}")
    return {
        "account": {"id": account.id, "name": account.name},
        "apps": apps_of(conn, account_id),
        "package": None if package is None else {"id": package.id, "name": package.name},
        "month": month,
        "figures": figures,
        "alerts": [a.model_dump(mode="json", by_alias=True) for a in alerts],
        "override": None
        if admission.override is None
        else admission.override.model_dump(mode="json", by_alias=True),
        "rejections": rejections,
    }


def series(
    conn: Connection, scope: int, entity_id: int, *, unit: Unit, start: int, end: int
) -> list[dict[str, Any]]:
    """The periods of [start, end) in time order, at most ``MAX_POINTS``."""
    q = query.Query(scope, entity_id, unit, start, end, limit=MAX_POINTS, backwards=False)
    return query.periods(conn, q)
