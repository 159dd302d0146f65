"""frontier point predictions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 17:36:24.291305
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("frontier_points", schema=None) as batch_op:
        batch_op.add_column(sa.Column("predicted", sa.JSON(), server_default="{}", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("frontier_points", schema=None) as batch_op:
        batch_op.drop_column("predicted")
