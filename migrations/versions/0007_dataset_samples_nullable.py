"""datasets.num_samples nullable: arrays whose first dims differ (per-input sample axes) are counted against the model

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00

A dataset for a model whose inputs hold their samples on different axes (silero-vad: input [N, 576],
state [2, N, 128], a rank-0 sr) has no one first dim: its num_samples is NULL, and a job counts its
samples against the model when it is submitted. Rows stored before keep their count (every array
shared its first dim: uploads were refused otherwise).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("num_samples", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    # NOT NULL again would need a count that the older schema reads as "every array's first dim":
    # such rows have none, so they are named rather than given a made-up one or deleted
    uncounted = op.get_bind().scalar(sa.text("SELECT count(*) FROM datasets WHERE num_samples IS NULL"))
    if uncounted:
        raise RuntimeError(
            f"{uncounted} datasets have no common first dim (num_samples NULL: per-input sample "
            "axes), which the schema before 0007 cannot hold; delete them before downgrading"
        )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("num_samples", existing_type=sa.Integer(), nullable=False)
