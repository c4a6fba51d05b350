"""The queue of cxrnode 0.1.0: instances, jobs (SEG and SR paths as columns), events, deliveries, associations.

Queues made by 0.1.0 have these tables and no alembic_version; they are stamped with this
revision before the later ones are applied (:func:`node.queue.migrate.upgrade`).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("started_at", sa.DateTime, nullable=False, index=True),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("peer_address", sa.String(64), nullable=False),
        sa.Column("peer_port", sa.Integer, nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("called_ae_title", sa.String(16), nullable=False),
        sa.Column("tls", sa.Boolean, nullable=False),
        sa.Column("tls_peer", sa.String(256)),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("c_store", sa.Integer, nullable=False),
        sa.Column("c_store_failed", sa.Integer, nullable=False),
        sa.Column("c_echo", sa.Integer, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime),
        sa.Column("fail_stage", sa.String(16)),
        sa.Column("last_error", sa.Text),
        sa.Column("discard_reason", sa.Text),
        sa.Column("tb_score", sa.Float),
        sa.Column("seg_path", sa.Text),
        sa.Column("sr_path", sa.Text),
        sa.Column("seg_sop_instance_uid", sa.String(64)),
        sa.Column("sr_sop_instance_uid", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("encoded_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_table(
        "job_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("from_status", sa.String(16)),
        sa.Column("to_status", sa.String(16)),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("delivered_at", sa.DateTime),
        sa.Column("last_error", sa.Text),
    )


def downgrade() -> None:
    for table in ("deliveries", "job_events", "jobs", "associations", "instances"):
        op.drop_table(table)
