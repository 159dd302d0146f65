"""plans.result: the planner's result document; the run's metadata leaves plans.measured

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:00:00

Until 0007 a plan row kept the run's metadata (evaluations, search details, timings) and other
plan-level data (uniform points, activation terms, exclusions, layer nodes) inside ``measured``,
beside the chosen configuration's measurements. From 0008 ``result`` holds
``planner.PlanResult.to_dict()`` less its sensitivity (stored as a row of its own), and ``measured``
holds measurements only. Rows stored before are moved: their extra keys go to ``result`` (the run's
metadata under ``run``, as PlanResult.to_dict() has it), and the downgrade moves them back.
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

RUN_KEYS = ("evaluations", "search", "timings")
PLAN_KEYS = ("uniform", "activation_terms", "excluded", "layer_nodes")

plans = sa.table("plans", sa.column("id", sa.String), sa.column("measured", sa.JSON), sa.column("result", sa.JSON))


def upgrade() -> None:
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result", sa.JSON(), server_default="{}", nullable=False))
    for plan_id, measured, _ in _rows():
        moved = {key: measured.pop(key) for key in (*RUN_KEYS, *PLAN_KEYS) if key in measured}
        result = {key: moved[key] for key in PLAN_KEYS if key in moved}
        result["run"] = {key: moved[key] for key in RUN_KEYS if key in moved}
        _write(plan_id, measured, result)


def downgrade() -> None:
    for plan_id, measured, result in _rows():
        run = result.get("run") or {}
        measured.update({key: run[key] for key in RUN_KEYS if key in run})
        measured.update({key: result[key] for key in PLAN_KEYS if key in result})
        _write(plan_id, measured, {})
    with op.batch_alter_table("plans", schema=None) as batch_op:
        batch_op.drop_column("result")


def _rows() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    rows = op.get_bind().execute(sa.select(plans.c.id, plans.c.measured, plans.c.result)).all()
    return [(row.id, dict(row.measured or {}), dict(row.result or {})) for row in rows]


def _write(plan_id: str, measured: dict[str, Any], result: dict[str, Any]) -> None:
    op.get_bind().execute(plans.update().where(plans.c.id == plan_id).values(measured=measured, result=result))
