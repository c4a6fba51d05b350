"""Retention: jobs an operator pinned (never purged), and when a job's files were purged.

``pinned`` is false for every existing job. ``purged_at`` stays empty until the retention purge
deletes the job's archived source and results (its rows are kept until ``retention.history_days``).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("purged_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("purged_at")
        batch.drop_column("pinned")
