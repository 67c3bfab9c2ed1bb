"""Node history: value samples, their rollups once purged, and availability changes."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_sample",
        sa.Column("node_id", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("node_id", "key", "at_ms"),
    )
    op.create_table(
        "node_rollup",
        sa.Column("node_id", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("step_ms", sa.BigInteger(), nullable=False),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id", "key", "start_ms"),
    )
    op.create_table(
        "node_availability",
        sa.Column("node_id", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("node_id", "at_ms", "state"),
    )


def downgrade() -> None:
    for table in ("node_availability", "node_rollup", "node_sample"):
        op.drop_table(table)
