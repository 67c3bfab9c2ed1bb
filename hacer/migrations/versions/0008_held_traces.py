"""The traces of what automations did not run for: a due time or bus event held back by a
condition, the cooldown or the mode, the latest few of each automation."""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "automation_held",
        sa.Column("automation_id", sa.Integer(), primary_key=True),
        sa.Column("due_at", sa.DateTime(), primary_key=True),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.Column("scheduler", sa.String(128), nullable=False),
        sa.Column("why", sa.String(32), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("conditions", sa.Text(), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("automation_held")
