"""What staff do: packages and their limits, an account's package, overrides, alerts.

Services never commit: the caller's unit of work does. A change that moves what gateways
enforce returns the accounts' new admission rows; the caller mirrors them to Redis (with
``AdmissionStore.write``) once the transaction committed, and gateways apply them at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metering.accounts.models import METRICS, Account, Package, PackageChange, PackageLimit
from metering.core.database import upsert_one
from metering.core.errors import NotFoundError, ValidationError
from metering.core.ids import is_id
from metering.limits import levels
from metering.limits.models import AccountAdmission, AccountOverride, AlertDelivery, LimitAlert
from metering.limits.repository import AdmissionRow, LimitsRepository
from metering.limits.schemas import (
    AccountPackageOut,
    AdmissionOut,
    AlertOut,
    LimitOut,
    OverrideOut,
    PackageOut,
)
from metering.limits.service import desired_admission

MAX_LIMIT = 10**15  # far beyond any real package; keeps every sum well inside int64
_LIMIT = re.compile(r"^\s*([a-z]+)\s*=\s*(-?\d+)\s*(?::\s*(-?\d+)\s*)?$")
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


@dataclass(frozen=True)
class Change:
    """A staff change's result, and the admission rows to mirror once it committed."""

    result: object
    admission: dict[int, AdmissionRow]


def parse_limit(text: str) -> tuple[str, int, int]:
    """``METRIC=QUOTA[:HARD]`` -> (metric, quota, hard limit); the hard limit defaults to
    2.5 x the quota, rounded up."""
    m = _LIMIT.match(text)
    if m is None:
        raise ValidationError(
            f"limit {text!r}: expected METRIC=QUOTA[:HARD], e.g. connections=100:250"
        )
    metric, quota, hard = m.group(1), int(m.group(2)), m.group(3)
    return (metric, *check_limit(metric, quota, None if hard is None else int(hard)))


def check_limit(metric: str, quota: int, hard: int | None) -> tuple[int, int]:
    """A limit that makes sense, as (quota, hard limit), or a clear error."""
    if metric not in METRICS:
        raise ValidationError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if quota < 0:
        raise ValidationError(f"{metric}: the quota must not be negative, got {quota}")
    if quota > MAX_LIMIT:
        raise ValidationError(f"{metric}: the quota must be at most {MAX_LIMIT}")
    hard = levels.default_hard(quota) if hard is None else hard
    if hard < quota:
        raise ValidationError(
            f"{metric}: the hard limit ({hard}) must not be below the quota ({quota})"
        )
    if hard > MAX_LIMIT:
        raise ValidationError(f"{metric}: the hard limit must be at most {MAX_LIMIT}")
    return quota, hard


def _name(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 100:
        raise ValidationError("package name must be 1 to 100 characters")
    return value


def _package_out(session: Session, package: Package) -> PackageOut:
    limits = session.scalars(select(PackageLimit).where(PackageLimit.package_id == package.id))
    return PackageOut(
        id=package.id,
        name=package.name,
        enforce_hard=package.enforce_hard,
        limits={
            lim.metric: LimitOut(quota=lim.quota, hard_limit=lim.hard_limit)
            for lim in sorted(limits, key=lambda lim: METRICS.index(lim.metric))
        },
        created_at=package.created_at,
    )


def create_package(
    session: Session,
    name: str,
    limits: dict[str, tuple[int, int | None]],
    *,
    enforce_hard: bool = True,
) -> PackageOut:
    """A new package with a (quota, hard limit or None for the default) per metric."""
    name = _name(name)
    checked = {m: check_limit(m, q, h) for m, (q, h) in limits.items()}
    if session.scalar(select(Package.id).where(Package.name == name)) is not None:
        raise ValidationError(f"a package named {name!r} exists already", code="PACKAGE_EXISTS")
    package = Package(name=name, enforce_hard=enforce_hard)
    session.add(package)
    try:
        session.flush()
    except IntegrityError as exc:  # created meanwhile by someone else: the unique name says so
        raise ValidationError(
            f"a package named {name!r} exists already", code="PACKAGE_EXISTS"
        ) from exc
    for metric, (quota, hard) in checked.items():
        session.add(
            PackageLimit(package_id=package.id, metric=metric, quota=quota, hard_limit=hard)
        )
    session.flush()
    return _package_out(session, package)


def list_packages(session: Session) -> list[PackageOut]:
    return [_package_out(session, p) for p in session.scalars(select(Package).order_by(Package.id))]


def find_package(session: Session, ref: str) -> Package:
    """A package by name, or by id."""
    package = session.scalar(select(Package).where(Package.name == ref.strip()))
    if package is None and ref.strip().isdigit() and is_id(int(ref)):
        package = session.get(Package, int(ref))
    if package is None:
        raise NotFoundError(f"no package {ref!r}", code="PACKAGE_NOT_FOUND")
    return package


def _by(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 200:
        raise ValidationError("who made the change (by) must be 1 to 200 characters")
    return value


def _account(session: Session, account_id: int) -> Account:
    account = session.get(Account, account_id) if is_id(account_id) else None
    if account is None:
        raise NotFoundError(f"account {account_id} does not exist", code="ACCOUNT_NOT_FOUND")
    return account


def _rebuild(session: Session, account_id: int, now: datetime) -> dict[int, AdmissionRow]:
    """Rebuild the account's admission row from its package, override and usage."""
    conn = session.connection()
    rows = desired_admission(conn, [account_id], now)
    LimitsRepository(conn).set_admission(rows, now)
    return rows


def set_package(
    session: Session,
    account_id: int,
    package_ref: str | None,
    *,
    by: str,
    now: datetime | None = None,
) -> Change:
    """Put the account on a package (None: on none); what it enforces changes at once."""
    now, by = now or datetime.now(UTC), _by(by)
    account = _account(session, account_id)
    package = None if package_ref is None else find_package(session, package_ref)
    account.package_id = None if package is None else package.id
    session.add(
        PackageChange(
            account_id=account_id, package_id=account.package_id, changed_at=now, changed_by=by
        )
    )
    session.flush()
    out = AccountPackageOut(
        account_id=account_id,
        package=None if package is None else package.name,
        package_id=account.package_id,
        changed_at=now,
    )
    return Change(out, _rebuild(session, account_id, now))


def set_override(
    session: Session,
    account_id: int,
    *,
    reason: str,
    by: str,
    until: datetime | None = None,
    now: datetime | None = None,
) -> Change:
    """Lift every rejection of the account (until ``until``, or until removed)."""
    now, by = now or datetime.now(UTC), _by(by)
    _account(session, account_id)
    reason = reason.strip()
    if not reason or len(reason) > 500:
        raise ValidationError("an override needs a reason of 1 to 500 characters")
    if until is not None:
        if until.tzinfo is None:
            raise ValidationError("until must carry a time zone (e.g. 2026-12-01T00:00:00Z)")
        if until <= now:
            raise ValidationError("until must be in the future")
    values = {"until": until, "reason": reason, "created_by": by, "created_at": now}
    upsert_one(session.connection(), AccountOverride, {"account_id": account_id}, values)
    override = session.get(AccountOverride, account_id, populate_existing=True)
    assert override is not None
    return Change(_override_out(override), _rebuild(session, account_id, now))


def clear_override(session: Session, account_id: int, *, now: datetime | None = None) -> Change:
    now = now or datetime.now(UTC)
    _account(session, account_id)
    override = session.get(AccountOverride, account_id)
    if override is None:
        raise NotFoundError(f"account {account_id} has no override", code="OVERRIDE_NOT_FOUND")
    session.delete(override)
    session.flush()
    return Change(None, _rebuild(session, account_id, now))


def _override_out(o: AccountOverride) -> OverrideOut:
    return OverrideOut(
        account_id=o.account_id,
        until=o.until,
        reason=o.reason,
        created_by=o.created_by,
        created_at=o.created_at,
    )


def admission(session: Session, account_id: int, *, now: datetime | None = None) -> AdmissionOut:
    now = now or datetime.now(UTC)
    _account(session, account_id)
    row = session.get(AccountAdmission, account_id)
    override = session.get(AccountOverride, account_id)
    if override is not None and override.until is not None and override.until <= now:
        override = None
    return AdmissionOut(
        account_id=account_id,
        connections_hard=None if row is None else row.connections_hard,
        channels_hard=None if row is None else row.channels_hard,
        publish_blocked_month=None if row is None else row.publish_blocked_month,
        publish_blocked_by=None if row is None else row.publish_blocked_by,
        override=None if override is None else _override_out(override),
    )


def list_alerts(
    session: Session,
    *,
    account_id: int | None = None,
    month: str | None = None,
    unacknowledged: bool = False,
    limit: int = 100,
) -> list[AlertOut]:
    """The newest alerts first."""
    if not 1 <= limit <= 1000:
        raise ValidationError(f"limit must be between 1 and 1000, got {limit}")
    if month is not None and not _MONTH.match(month):
        raise ValidationError(f"month must be YYYY-MM, got {month!r}")
    query = select(LimitAlert).order_by(LimitAlert.detected_at.desc(), LimitAlert.id.desc())
    if account_id is not None:
        query = query.where(LimitAlert.account_id == account_id)
    if month is not None:
        query = query.where(LimitAlert.month == month)
    if unacknowledged:
        query = query.where(LimitAlert.acknowledged_at.is_(None))
    alerts = list(session.scalars(query.limit(limit)))
    deliveries: dict[int, dict[str, str]] = {}
    if alerts:
        found = session.execute(
            select(AlertDelivery.alert_id, AlertDelivery.channel, AlertDelivery.status).where(
                AlertDelivery.alert_id.in_([a.id for a in alerts])
            )
        ).all()
        for alert_id, channel, status in found:
            deliveries.setdefault(alert_id, {})[channel] = status
    return [_alert_out(a, deliveries.get(a.id, {})) for a in alerts]


def _alert_out(a: LimitAlert, deliveries: dict[str, str]) -> AlertOut:
    return AlertOut(
        id=a.id,
        account_id=a.account_id,
        month=a.month,
        metric=a.metric,
        level=a.level,
        usage=a.usage,
        threshold=a.threshold,
        quota=a.quota,
        hard_limit=a.hard_limit,
        rejects=a.rejects,
        detected_at=a.detected_at,
        acknowledged_at=a.acknowledged_at,
        acknowledged_by=a.acknowledged_by,
        deliveries=deliveries,
    )


def acknowledge(
    session: Session, alert_id: int, *, by: str, now: datetime | None = None
) -> AlertOut:
    """Mark an alert seen by staff (acknowledging it again keeps the first acknowledgement)."""
    by = _by(by)
    # Locked: of two staff acknowledging at once, the first one is kept.
    alert = session.get(LimitAlert, alert_id, with_for_update=True) if is_id(alert_id) else None
    if alert is None:
        raise NotFoundError(f"alert {alert_id} does not exist", code="ALERT_NOT_FOUND")
    if alert.acknowledged_at is None:
        alert.acknowledged_at, alert.acknowledged_by = now or datetime.now(UTC), by
        session.flush()
    found = session.execute(
        select(AlertDelivery.channel, AlertDelivery.status).where(
            AlertDelivery.alert_id == alert_id
        )
    ).all()
    deliveries = dict(found)
    return _alert_out(alert, deliveries)
