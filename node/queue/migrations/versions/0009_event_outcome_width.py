"""``job_events.outcome`` widened from 16 to 32 characters: ``duplicate-different`` (19) did not
fit. SQLite never enforced the length; PostgreSQL refused the event, so on a PostgreSQL queue a
duplicate with different content was answered 0xA700 instead of being kept as a version.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("outcome", existing_type=sa.String(16), type_=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("outcome", existing_type=sa.String(32), type_=sa.String(16), existing_nullable=False)
