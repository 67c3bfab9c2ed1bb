"""The highest log entry seq a runner has published of a run (its output is held in memory first:
a runner that takes over numbers its entries after it, never reusing one a recorder may yet get)."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_claim") as claim:
        claim.add_column(sa.Column("published_seq", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("run_claim") as claim:
        claim.drop_column("published_seq")
