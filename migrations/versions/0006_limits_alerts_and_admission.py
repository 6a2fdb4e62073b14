"""Package limits: the hard level rejects or notifies, package history, alerts with their
delivery outbox and log, staff overrides, and the admission state mirrored to gateways.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "account_admission",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("connections_hard", sa.BigInteger(), nullable=True),
        sa.Column("channels_hard", sa.BigInteger(), nullable=True),
        sa.Column("publish_blocked_month", sa.String(length=7), nullable=True),
        sa.Column("publish_blocked_by", sa.String(length=20), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_admission_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_admission")),
    )
    op.create_table(
        "account_overrides",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_overrides_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_account_overrides")),
    )
    op.create_table(
        "limit_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("metric", sa.String(length=20), nullable=False),
        sa.Column("level", sa.String(length=10), nullable=False),
        sa.Column("usage", sa.BigInteger(), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("quota", sa.BigInteger(), nullable=False),
        sa.Column("hard_limit", sa.BigInteger(), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=True),
        sa.Column("rejects", sa.Boolean(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=200), nullable=True),
        sa.CheckConstraint(
            "level IN ('warning', 'soft', 'hard')", name=op.f("ck_limit_alerts_level_known")
        ),
        sa.CheckConstraint(
            "metric IN ('connections', 'channels', 'messages', 'data')",
            name=op.f("ck_limit_alerts_metric_known"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_limit_alerts_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"], name=op.f("fk_limit_alerts_package_id_packages")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_alerts")),
        sa.UniqueConstraint(
            "account_id",
            "month",
            "metric",
            "level",
            name=op.f("uq_limit_alerts_account_id_month_metric_level"),
        ),
    )
    with op.batch_alter_table("limit_alerts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_limit_alerts_account_id"), ["account_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_limit_alerts_detected_at"), ["detected_at"], unique=False
        )

    op.create_table(
        "package_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_package_changes_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["package_id"], ["packages.id"], name=op.f("fk_package_changes_package_id_packages")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_package_changes")),
    )
    with op.batch_alter_table("package_changes", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_package_changes_account_id"), ["account_id"], unique=False
        )

    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=10), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "channel IN ('webhook', 'email')", name=op.f("ck_alert_deliveries_channel_known")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_alert_deliveries_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["limit_alerts.id"],
            name=op.f("fk_alert_deliveries_alert_id_limit_alerts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_deliveries")),
        sa.UniqueConstraint(
            "alert_id", "channel", name=op.f("uq_alert_deliveries_alert_id_channel")
        ),
    )
    with op.batch_alter_table("alert_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_alert_deliveries_status_next_attempt_at"),
            ["status", "next_attempt_at"],
            unique=False,
        )

    op.create_table(
        "alert_delivery_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["alert_deliveries.id"],
            name=op.f("fk_alert_delivery_attempts_delivery_id_alert_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_delivery_attempts")),
    )
    with op.batch_alter_table("alert_delivery_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_alert_delivery_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("enforce_hard", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    # The history starts with the package each account is on now.
    op.execute(
        "INSERT INTO package_changes (account_id, package_id, changed_at, changed_by) "
        "SELECT id, package_id, created_at, 'migration 0006' FROM accounts "
        "WHERE package_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("packages", schema=None) as batch_op:
        batch_op.drop_column("enforce_hard")

    with op.batch_alter_table("alert_delivery_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alert_delivery_attempts_delivery_id"))

    op.drop_table("alert_delivery_attempts")
    with op.batch_alter_table("alert_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alert_deliveries_status_next_attempt_at"))

    op.drop_table("alert_deliveries")
    with op.batch_alter_table("package_changes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_package_changes_account_id"))

    op.drop_table("package_changes")
    with op.batch_alter_table("limit_alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_limit_alerts_detected_at"))
        batch_op.drop_index(batch_op.f("ix_limit_alerts_account_id"))

    op.drop_table("limit_alerts")
    op.drop_table("account_overrides")
    op.drop_table("account_admission")
