"""run_outbox without its runner_id index: every commit of a runner's wrote a page of it (an SD
card's wear), and it saved nothing: a runner's outbox rows are nearly all its own, read whole."""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_run_outbox_runner_id", table_name="run_outbox")


def downgrade() -> None:
    op.create_index("ix_run_outbox_runner_id", "run_outbox", ["runner_id"])
