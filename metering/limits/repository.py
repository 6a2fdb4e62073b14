"""All SQL of package limits, alerts and admission.

It works on a ``Connection`` (the aggregator's cycle holds one, and a ``Session`` lends its
own), and runs the same on Postgres and on SQLite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, insert, or_, select

from metering.accounts.models import METRICS, Account, Package, PackageLimit
from metering.core.database import dialect_insert, upsert_one
from metering.limits.levels import Ints
from metering.limits.models import AccountAdmission, AccountOverride, AlertDelivery, LimitAlert
from metering.rollups import bulk


@dataclass(frozen=True, slots=True)
class NewAlert:
    account_id: int
    metric: str
    level: str
    usage: int
    threshold: int
    quota: int
    hard_limit: int
    package_id: int
    rejects: bool


@dataclass(frozen=True, slots=True)
class AdmissionRow:
    """What gateways enforce for one account (``AccountAdmission`` without its bookkeeping)."""

    connections_hard: int | None = None
    channels_hard: int | None = None
    publish_blocked_month: str | None = None
    publish_blocked_by: str | None = None

    @property
    def empty(self) -> bool:
        return self == AdmissionRow()


class LimitsRepository:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- limits -----------------------------------------------------------------------

    def account_packages(self) -> Ints:
        """(account id, package id) of every account on a package, sorted by account."""
        return bulk.select_array(
            self.conn,
            "SELECT id, package_id FROM accounts WHERE package_id IS NOT NULL ORDER BY id",
            "accounts",
            ("id", "package_id"),
        )

    def package_limits(self) -> list[Any]:
        """Every package's limits: (package id, enforce_hard, metric, quota, hard_limit);
        metric None for a package without limits."""
        query = (
            select(
                Package.id,
                Package.enforce_hard,
                PackageLimit.metric,
                PackageLimit.quota,
                PackageLimit.hard_limit,
            )
            .select_from(Package)
            .outerjoin(PackageLimit, PackageLimit.package_id == Package.id)
        )
        return list(self.conn.execute(query).all())

    def overridden(self, now: datetime) -> set[int]:
        """Accounts under a staff override now."""
        query = select(AccountOverride.account_id).where(
            or_(AccountOverride.until.is_(None), AccountOverride.until > now)
        )
        return set(self.conn.scalars(query))

    def alerted_levels(self, month: str) -> list[tuple[int, str, str]]:
        """(account, metric, level) of the month's alerts."""
        query = select(LimitAlert.account_id, LimitAlert.metric, LimitAlert.level).where(
            LimitAlert.month == month
        )
        return [(r[0], r[1], r[2]) for r in self.conn.execute(query).all()]

    # -- alerts -------------------------------------------------------------------------

    def insert_alerts(
        self, month: str, alerts: Sequence[NewAlert], detected_at: datetime
    ) -> list[tuple[int, NewAlert]]:
        """Record the alerts not recorded yet (the unique key decides), each with its id."""
        if not alerts:
            return []
        upsert = dialect_insert(self.conn)
        recorded: list[tuple[int, NewAlert]] = []
        for alert in alerts:
            stmt = (
                upsert(LimitAlert)
                .values(month=month, detected_at=detected_at, **dataclasses.asdict(alert))
                .on_conflict_do_nothing(index_elements=["account_id", "month", "metric", "level"])
                .returning(LimitAlert.id)
            )
            alert_id = self.conn.execute(stmt).scalar()
            if alert_id is not None:
                recorded.append((alert_id, alert))
        return recorded

    def insert_deliveries(self, alert_ids: Iterable[int], channels: Iterable[str]) -> list[int]:
        rows = [{"alert_id": a, "channel": c} for a in alert_ids for c in channels]
        if not rows:
            return []
        return list(self.conn.scalars(insert(AlertDelivery).returning(AlertDelivery.id), rows))

    # -- admission ----------------------------------------------------------------------

    def admission(self, account_ids: Sequence[int] | None = None) -> dict[int, AdmissionRow]:
        query = select(AccountAdmission)
        if account_ids is not None:
            query = query.where(AccountAdmission.account_id.in_(list(account_ids)))
        return {
            r.account_id: AdmissionRow(
                r.connections_hard, r.channels_hard, r.publish_blocked_month, r.publish_blocked_by
            )
            for r in self.conn.execute(query).all()
        }

    def set_admission(self, rows: dict[int, AdmissionRow], now: datetime) -> None:
        """Write the accounts' admission rows (an empty one is deleted)."""
        gone = [a for a, r in rows.items() if r.empty]
        kept = {a: r for a, r in rows.items() if not r.empty}
        if gone:
            self.conn.execute(delete(AccountAdmission).where(AccountAdmission.account_id.in_(gone)))
        for account_id, r in kept.items():
            values = {
                "connections_hard": r.connections_hard,
                "channels_hard": r.channels_hard,
                "publish_blocked_month": r.publish_blocked_month,
                "publish_blocked_by": r.publish_blocked_by,
                "updated_at": now,
            }
            upsert_one(self.conn, AccountAdmission, {"account_id": account_id}, values)

    def block_publishing(
        self, account_id: int, month: str, metric: str, now: datetime
    ) -> AdmissionRow | None:
        """Refuse the account's messages for the rest of ``month``: its new admission row, or
        None if it was so already."""
        current = self.admission([account_id]).get(account_id, AdmissionRow())
        if current.publish_blocked_month == month:
            return None
        blocked = AdmissionRow(current.connections_hard, current.channels_hard, month, metric)
        self.set_admission({account_id: blocked}, now)
        return blocked

    def accounts_with_packages(self, account_ids: Sequence[int]) -> dict[int, int | None]:
        """Each account's package (None: none); accounts that do not exist are left out."""
        query = select(Account.id, Account.package_id).where(Account.id.in_(list(account_ids)))
        return {r[0]: r[1] for r in self.conn.execute(query).all()}

    def limits_of(self, package_id: int) -> tuple[bool, dict[str, tuple[int, int]]]:
        """A package's enforce_hard flag and its (quota, hard limit) per metric."""
        enforce = self.conn.scalar(select(Package.enforce_hard).where(Package.id == package_id))
        rows = self.conn.execute(
            select(PackageLimit.metric, PackageLimit.quota, PackageLimit.hard_limit).where(
                PackageLimit.package_id == package_id
            )
        ).all()
        return bool(enforce), {r[0]: (r[1], r[2]) for r in rows}


def limit_matrix(
    packages: Ints, package_rows: list[Any]
) -> tuple[Ints, Ints, np.ndarray[Any, np.dtype[np.bool_]]]:
    """Per account (``packages``: its package id each), its quota and hard limit per metric
    (``METRICS`` order; -1 where its package sets none) and whether its package rejects."""
    ids = sorted({r[0] for r in package_rows})
    index = {p: i for i, p in enumerate(ids)}
    quota = np.full((len(ids) + 1, len(METRICS)), -1, dtype=np.int64)  # last: unknown package
    hard = quota.copy()
    enforce = np.zeros(len(ids) + 1, dtype=np.bool_)
    for pkg, enforce_hard, metric, q, h in package_rows:
        i = index[pkg]
        enforce[i] = bool(enforce_hard)
        if metric is not None:
            m = METRICS.index(metric)
            quota[i, m], hard[i, m] = q, h
    known = np.array(ids, dtype=np.int64)
    pos = np.searchsorted(known, packages)
    pos = np.where(
        (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == packages), pos, len(ids)
    )
    return quota[pos], hard[pos], enforce[pos]


__all__ = ["AdmissionRow", "LimitsRepository", "NewAlert", "limit_matrix"]
