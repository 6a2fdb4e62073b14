"""Prices of packages, invoices and their lines, and the months closed.

Invariant 6 (DESIGN.md): a finalized invoice never changes, and closing a month twice gives the
same invoices. The keys say so, not the code that closes: one ``billing_months`` row per month
closed (taken first in the closing transaction, so a second closer waits on it), and one
invoice per (account, month).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from billing.money import Money
from metering.core.database import Base, utcnow

PRICED_METRICS = ("connections", "channels", "messages", "data")
BASE_FEE = "base_fee"  # the line of the package's monthly fee


class PackagePricing(Base):
    """What a package costs a month: its currency and base fee (its per-metric prices in
    ``package_prices``)."""

    __tablename__ = "package_pricing"

    package_id: Mapped[int] = mapped_column(
        ForeignKey("packages.id", ondelete="CASCADE"), primary_key=True
    )
    currency: Mapped[str] = mapped_column(String(3))
    base_fee: Mapped[Decimal] = mapped_column(Money(24, 4))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(200))


class PackagePrice(Base):
    """Per metric: usage up to ``included`` is in the base fee; beyond it, ``unit_price`` per
    ``unit_size`` (per 1 000 messages, per 1 000 000 000 bytes), prorated."""

    __tablename__ = "package_prices"
    __table_args__ = (
        CheckConstraint("included >= 0", name="included_not_negative"),
        CheckConstraint("unit_size > 0", name="unit_size_positive"),
        CheckConstraint(
            "metric IN ('connections', 'channels', 'messages', 'data')", name="metric_known"
        ),
    )

    package_id: Mapped[int] = mapped_column(
        ForeignKey("package_pricing.package_id", ondelete="CASCADE"), primary_key=True
    )
    metric: Mapped[str] = mapped_column(String(20), primary_key=True)
    included: Mapped[int] = mapped_column(BigInteger)
    unit_price: Mapped[Decimal] = mapped_column(Money(28, 12))
    unit_size: Mapped[int] = mapped_column(BigInteger)


class BillingMonth(Base):
    """A month closed: its invoices are final. Written first in the closing transaction."""

    __tablename__ = "billing_months"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # 'YYYY-MM', UTC
    closed_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_by: Mapped[str] = mapped_column(String(200))
    invoices: Mapped[int] = mapped_column(Integer)
    # The aggregation watermark (last second folded) the invoices were computed at.
    watermark: Mapped[int] = mapped_column(BigInteger)


class Invoice(Base):
    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("account_id", "month"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    month: Mapped[str] = mapped_column(
        ForeignKey("billing_months.month"), index=True
    )  # 'YYYY-MM', UTC
    # The package in force at the month's end, as priced then (names and prices may change
    # later; the invoice keeps what it was computed from).
    package_id: Mapped[int] = mapped_column(ForeignKey("packages.id"))
    package_name: Mapped[str] = mapped_column(String(100))
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[Decimal] = mapped_column(Money(24, 4))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    # JSON: the package changes within the month ([{at, from, to, by}]).
    package_changes: Mapped[str] = mapped_column(Text)
    # JSON: the rollups the figures come from (keys) and the aggregation watermark.
    source: Mapped[str] = mapped_column(Text)


class InvoiceLine(Base):
    """One line: the base fee, or a metric's usage, what is included, the overage and its
    price. The quantities of the base fee's line are null."""

    __tablename__ = "invoice_lines"
    __table_args__ = (
        CheckConstraint(
            "metric IN ('base_fee', 'connections', 'channels', 'messages', 'data')",
            name="metric_known",
        ),
    )

    # No foreign key to ``invoices``: a line is written only by the close, in its invoice's
    # transaction, and invoices are never deleted. Checked per row, the key cost the close of
    # 100 000 accounts (500 000 lines) about 4 s (bench/billing_close.py), and it made the
    # lines wait for their invoices instead of streaming while they are computed.
    invoice_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    metric: Mapped[str] = mapped_column(String(20))
    usage: Mapped[int | None] = mapped_column(BigInteger)
    # Null: the package sets no price for the metric (it is not billed beyond the base fee).
    included: Mapped[int | None] = mapped_column(BigInteger)
    overage: Mapped[int | None] = mapped_column(BigInteger)
    unit_size: Mapped[int | None] = mapped_column(BigInteger)
    unit_price: Mapped[Decimal] = mapped_column(Money(28, 12))
    amount: Mapped[Decimal] = mapped_column(Money(24, 4))
    # Peak metrics: when the peak was reached (to the second, or the start of the hour it was
    # first reached in: ``peak_resolution``), and the app with the highest peak of its own.
    peak_at: Mapped[datetime | None]
    peak_resolution: Mapped[str | None] = mapped_column(String(10))
    top_app_id: Mapped[int | None] = mapped_column(Integer)
    top_app_peak: Mapped[int | None] = mapped_column(BigInteger)
