"""latency_tables: measured per-layer latency tables (planner.latency_table), reused across plans

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

KEY = ["model_sha256", "device_description", "provider", "onnxruntime_version", "batch_size", "candidates"]


def upgrade() -> None:
    op.create_table(
        "latency_tables",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_description", sa.String(length=300), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("onnxruntime_version", sa.String(length=64), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("candidates", sa.String(length=200), nullable=False),
        sa.Column("table", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("latency_tables", schema=None) as batch_op:
        batch_op.create_index("ix_latency_tables_key", KEY, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("latency_tables", schema=None) as batch_op:
        batch_op.drop_index("ix_latency_tables_key")
    op.drop_table("latency_tables")
