"""A job's results become rows of their own (``results``: kind, SOP UIDs, path), any number per job.

The SEG and SR of every job encoded by 0.1.0 are moved into ``results`` (kinds ``seg`` and
``sr``, with their SOP classes), then the four columns leave ``jobs``.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("job_id", "kind", name="uq_results_job_kind"),
    )
    for kind, sop_class in (("seg", SEGMENTATION_STORAGE), ("sr", COMPREHENSIVE_3D_SR_STORAGE)):
        op.execute(
            f"INSERT INTO results (job_id, kind, sop_class_uid, sop_instance_uid, path, created_at) "
            f"SELECT id, '{kind}', '{sop_class}', {kind}_sop_instance_uid, {kind}_path, "
            f"COALESCE(encoded_at, updated_at) FROM jobs "
            f"WHERE {kind}_path IS NOT NULL AND {kind}_sop_instance_uid IS NOT NULL ORDER BY id"
        )
    with op.batch_alter_table("jobs") as batch:
        for column in ("seg_path", "sr_path", "seg_sop_instance_uid", "sr_sop_instance_uid"):
            batch.drop_column(column)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("seg_path", sa.Text))
        batch.add_column(sa.Column("sr_path", sa.Text))
        batch.add_column(sa.Column("seg_sop_instance_uid", sa.String(64)))
        batch.add_column(sa.Column("sr_sop_instance_uid", sa.String(64)))
    for kind in ("seg", "sr"):
        op.execute(
            f"UPDATE jobs SET {kind}_path = (SELECT path FROM results r WHERE r.job_id = jobs.id AND r.kind = '{kind}'), "
            f"{kind}_sop_instance_uid = (SELECT sop_instance_uid FROM results r "
            f"WHERE r.job_id = jobs.id AND r.kind = '{kind}')"
        )
    op.drop_table("results")
