"""What packages, alerts, overrides and admission look like to API and CLI users."""

from __future__ import annotations

from datetime import datetime

from metering.accounts.schemas import Schema


class LimitOut(Schema):
    quota: int
    hard_limit: int


class PackageOut(Schema):
    id: int
    name: str
    enforce_hard: bool
    limits: dict[str, LimitOut]
    created_at: datetime


class AccountPackageOut(Schema):
    account_id: int
    package: str | None
    package_id: int | None
    changed_at: datetime


class AlertOut(Schema):
    id: int
    account_id: int
    month: str
    metric: str
    level: str
    usage: int
    threshold: int
    quota: int
    hard_limit: int
    rejects: bool
    detected_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    # Per channel: pending, sent or failed.
    deliveries: dict[str, str]


class OverrideOut(Schema):
    account_id: int
    until: datetime | None
    reason: str
    created_by: str
    created_at: datetime


class AdmissionOut(Schema):
    """What gateways enforce for an account now."""

    account_id: int
    connections_hard: int | None
    channels_hard: int | None
    publish_blocked_month: str | None
    publish_blocked_by: str | None
    override: OverrideOut | None


class AdmissionDecision(Schema):
    """``GET /v1/admission``: may the app do ``action`` now?"""

    app_id: int
    action: str
    allowed: bool
    code: int | None = None
    reason: str | None = None
    retry_after: int | None = None
