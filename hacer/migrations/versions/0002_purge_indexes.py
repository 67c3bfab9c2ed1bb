"""Indexes that let history be purged by age without reading whole tables."""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BY_AGE = (("run", "finished_at"), ("script_log_entry", "timestamp"), ("run_claim", "updated_at"), ("dead_letter", "at"))


def upgrade() -> None:
    for table, column in BY_AGE:
        op.create_index(f"ix_{table}_{column}", table, [column])


def downgrade() -> None:
    for table, column in BY_AGE:
        op.drop_index(f"ix_{table}_{column}", table_name=table)
