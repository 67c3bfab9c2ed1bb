"""An automation's steps (`set`, `run`, `wait`, `wait_for`): a row each as a fire reaches it."""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "automation_step",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("automation_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
    )
    op.create_index("ix_automation_step_state", "automation_step", ["state"])


def downgrade() -> None:
    op.drop_index("ix_automation_step_state", "automation_step")
    op.drop_table("automation_step")
