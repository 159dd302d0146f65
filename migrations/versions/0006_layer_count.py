"""models.layer_count: lists of models leave their layers out

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 23:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("layer_count", sa.Integer(), server_default="0", nullable=False))
    # json_array_length exists in SQLite and PostgreSQL alike (the column is JSON text / json)
    op.execute("UPDATE models SET layer_count = json_array_length(layers)")


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("layer_count")
