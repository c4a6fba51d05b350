"""Deliveries fail one by one: ``failed_at`` marks a destination that refused the results for good
(a permanent error such as a SOP class it does not accept, or a destination removed from the
config), so the job's other destinations are still retried. Empty for every existing delivery.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("failed_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("failed_at")
