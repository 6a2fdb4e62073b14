"""Billing: package prices, months closed, invoices and their lines.

Revision ID: 0008
Revises: 0007

Money is NUMERIC on Postgres and the decimal's text on SQLite (``billing.money.Money``), never
a float.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _money(precision: int, scale: int) -> sa.types.TypeEngine[object]:
    return sa.Numeric(precision, scale).with_variant(sa.String(precision + 2), "sqlite")


def upgrade() -> None:
    op.create_table(
        "package_pricing",
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("base_fee", _money(24, 4), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"],
            name=op.f("fk_package_pricing_package_id_packages"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("package_id", name=op.f("pk_package_pricing")),
    )  # fmt: skip
    op.create_table(
        "package_prices",
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("included", sa.BigInteger(), nullable=False),
        sa.Column("unit_price", _money(28, 12), nullable=False),
        sa.Column("unit_size", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("included >= 0", name=op.f("ck_package_prices_included_not_negative")),
        sa.CheckConstraint("unit_size > 0", name=op.f("ck_package_prices_unit_size_positive")),
        sa.CheckConstraint(
            "metric IN ('connections', 'channels', 'messages', 'data')",
            name=op.f("ck_package_prices_metric_known"),
        ),
        sa.ForeignKeyConstraint(
            ["package_id"], ["package_pricing.package_id"],
            name=op.f("fk_package_prices_package_id_package_pricing"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("package_id", "metric", name=op.f("pk_package_prices")),
    )  # fmt: skip
    op.create_table(
        "billing_months",
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_by", sa.String(length=200), nullable=False),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("month", name=op.f("pk_billing_months")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("package_name", sa.String(length=100), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total", _money(24, 4), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("package_changes", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_invoices_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["month"], ["billing_months.month"], name=op.f("fk_invoices_month_billing_months")
        ),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"], name=op.f("fk_invoices_package_id_packages")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("account_id", "month", name=op.f("uq_invoices_account_id_month")),
    )
    op.create_index(op.f("ix_invoices_month"), "invoices", ["month"], unique=False)
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.SmallInteger(), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("usage", sa.BigInteger(), nullable=True),
        sa.Column("included", sa.BigInteger(), nullable=True),
        sa.Column("overage", sa.BigInteger(), nullable=True),
        sa.Column("unit_size", sa.BigInteger(), nullable=True),
        sa.Column("unit_price", _money(28, 12), nullable=False),
        sa.Column("amount", _money(24, 4), nullable=False),
        sa.Column("peak_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("peak_resolution", sa.String(length=10), nullable=True),
        sa.Column("top_app_id", sa.Integer(), nullable=True),
        sa.Column("top_app_peak", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "metric IN ('base_fee', 'connections', 'channels', 'messages', 'data')",
            name=op.f("ck_invoice_lines_metric_known"),
        ),
        sa.PrimaryKeyConstraint("invoice_id", "position", name=op.f("pk_invoice_lines")),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("invoice_lines")
    op.drop_index(op.f("ix_invoices_month"), table_name="invoices")
    op.drop_table("invoices")
    op.drop_table("billing_months")
    op.drop_table("package_prices")
    op.drop_table("package_pricing")
