"""A fire's trace on its row: what triggered it, each condition with the value it saw, and the
automation's definition as it was then (the run it made is joined by its id); and the waits of
`for` triggers, kept so that a restart neither restarts nor loses them."""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("automation_fire") as fire:
        fire.add_column(sa.Column("cause", sa.Text(), nullable=True))
        fire.add_column(sa.Column("conditions", sa.Text(), nullable=True))
        fire.add_column(sa.Column("definition", sa.Text(), nullable=True))
    op.create_table(
        "automation_wait",
        sa.Column("automation_id", sa.Integer(), primary_key=True),
        sa.Column("began_at", sa.DateTime(), primary_key=True),
        sa.Column("due_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("automation_wait")
    with op.batch_alter_table("automation_fire") as fire:
        fire.drop_column("definition")
        fire.drop_column("conditions")
        fire.drop_column("cause")
