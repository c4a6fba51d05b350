"""Shadow mode: ``shadow_results`` holds, per job, how a challenger run beside the champion
compared with it (lung Dice, TB scores and calls, time, or the error). Empty for existing jobs.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("at", sa.DateTime, nullable=False, index=True),
        sa.Column("shadow_ref", sa.String(300), nullable=False),
        sa.Column("champion_segmenter", sa.String(140), nullable=False),
        sa.Column("champion_tb", sa.String(140), nullable=False),
        sa.Column("shadow_segmenter", sa.String(140)),
        sa.Column("shadow_tb", sa.String(140)),
        sa.Column("dice_lungs", sa.Float),
        sa.Column("dice_right", sa.Float),
        sa.Column("dice_left", sa.Float),
        sa.Column("champion_tb_score", sa.Float),
        sa.Column("shadow_tb_score", sa.Float),
        sa.Column("champion_threshold", sa.Float),
        sa.Column("shadow_threshold", sa.Float),
        sa.Column("champion_call", sa.Boolean),
        sa.Column("shadow_call", sa.Boolean),
        sa.Column("agree", sa.Boolean),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("shadow_results")
