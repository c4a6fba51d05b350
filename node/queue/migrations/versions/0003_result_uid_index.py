"""An index on ``results.sop_instance_uid``: every C-STORE asks whether the object is one of ours.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_results_sop_instance_uid", "results", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_index("ix_results_sop_instance_uid", table_name="results")
