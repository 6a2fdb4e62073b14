"""Alerts, their deliveries, staff overrides, and the admission state mirrored to gateways.

Levels (DESIGN.md "Limits and enforcement"): warning at 80 % of the quota, soft at the quota,
hard at the hard limit. Each (account, month, metric, level) alerts once: the unique key of
``limit_alerts`` is what makes it so, not the code that checks first.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from metering.core.database import Base, utcnow


class LimitAlert(Base):
    """Usage of an account reached a level of its package's limit for a metric, in a month."""

    __tablename__ = "limit_alerts"
    __table_args__ = (
        UniqueConstraint("account_id", "month", "metric", "level"),
        CheckConstraint("level IN ('warning', 'soft', 'hard')", name="level_known"),
        CheckConstraint(
            "metric IN ('connections', 'channels', 'messages', 'data')", name="metric_known"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    month: Mapped[str] = mapped_column(String(7))  # UTC calendar month, 'YYYY-MM'
    metric: Mapped[str] = mapped_column(String(20))
    level: Mapped[str] = mapped_column(String(10))
    # What was seen, and the package's limits then (a later package change leaves them).
    usage: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[int] = mapped_column(BigInteger)
    quota: Mapped[int] = mapped_column(BigInteger)
    hard_limit: Mapped[int] = mapped_column(BigInteger)
    package_id: Mapped[int | None] = mapped_column(ForeignKey("packages.id"))
    # The hard level rejects (the package enforces it) or only notifies.
    rejects: Mapped[bool] = mapped_column(Boolean)
    detected_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(200))


class AlertDelivery(Base):
    """The outbox: one row per alert and channel, written in the transaction that records the
    alert, sent only after that commits."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("alert_id", "channel"),
        CheckConstraint("channel IN ('webhook', 'email')", name="channel_known"),
        CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status_known"),
        Index(None, "status", "next_attempt_at"),  # what is due
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("limit_alerts.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Not before this; also the lease of an attempt under way (a sender that died frees it).
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeliveryAttempt(Base):
    """The delivery log: one row per attempt, what happened and how long it took."""

    __tablename__ = "alert_delivery_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("alert_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)


class AccountOverride(Base):
    """A staff override: no rejection for the account while it holds (alerts still go)."""

    __tablename__ = "account_overrides"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    until: Mapped[datetime | None]  # None: until removed
    reason: Mapped[str] = mapped_column(String(500))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AccountAdmission(Base):
    """What gateways enforce for an account: derived from its package, an override and the
    month's usage, rebuilt whenever one of them changes, and mirrored to Redis.

    A row exists only for an account with something to enforce."""

    __tablename__ = "account_admission"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    # New connections / channel attaches are refused while the live count is at or over these.
    connections_hard: Mapped[int | None] = mapped_column(BigInteger)
    channels_hard: Mapped[int | None] = mapped_column(BigInteger)
    # Publishing is refused for the rest of this month ('YYYY-MM'): the month's messages or
    # data passed the hard limit (``publish_blocked_by``).
    publish_blocked_month: Mapped[str | None] = mapped_column(String(7))
    publish_blocked_by: Mapped[str | None] = mapped_column(String(20))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
