"""Three indexes fewer on a run's hot path, each a page more written by every commit that touched it
(an SD card's wear): script_log_entry's thread_id index repeats the lead of its (thread_id, seq)
unique index; run_claim's runner_id and updated_at indexes served only a runner's start (its
claims) and the retention purge, which read the table whole as cheaply, seldom."""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DROPPED = (("script_log_entry", "thread_id"), ("run_claim", "runner_id"), ("run_claim", "updated_at"))


def upgrade() -> None:
    for table, column in DROPPED:
        op.drop_index(f"ix_{table}_{column}", table_name=table)


def downgrade() -> None:
    for table, column in DROPPED:
        op.create_index(f"ix_{table}_{column}", table, [column])
