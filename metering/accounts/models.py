"""Accounts own apps; apps own API keys; an account is on one package."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    String,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from metering.core.database import Base, utcnow

METRICS = ("connections", "channels", "messages", "data")
# staff: the platform's own staff (packages, limits, alerts, overrides of every account).
PERMISSIONS = ("platform", "stats", "admission", "billing", "staff")


class Package(Base):
    __tablename__ = "packages"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # At the hard level: refuse new connections, attaches or messages (True), or only notify
    # staff (for accounts that must never be cut off).
    enforce_hard: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PackageLimit(Base):
    """Per metric: the quota (soft limit) and the hard limit."""

    __tablename__ = "package_limits"
    __table_args__ = (
        UniqueConstraint("package_id", "metric"),
        CheckConstraint("quota >= 0", name="quota_not_negative"),
        CheckConstraint("hard_limit >= quota", name="hard_not_below_quota"),
        CheckConstraint(
            "metric IN ('connections', 'channels', 'messages', 'data')", name="metric_known"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(20))
    quota: Mapped[int] = mapped_column(BigInteger)
    hard_limit: Mapped[int] = mapped_column(BigInteger)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    package_id: Mapped[int | None] = mapped_column(ForeignKey("packages.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PackageChange(Base):
    """Every package an account was put on, and when: the month's bill takes the one in force
    at the month's end and lists the changes within it."""

    __tablename__ = "package_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    package_id: Mapped[int | None] = mapped_column(ForeignKey("packages.id"))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    changed_by: Mapped[str] = mapped_column(String(200))


class App(Base):
    __tablename__ = "apps"

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A key is shown once at creation; only its SHA-256 digest is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, to tell keys apart in listings without revealing them.
    key_prefix: Mapped[str] = mapped_column(String(16))
    # Space-separated, from PERMISSIONS.
    permissions: Mapped[str] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
