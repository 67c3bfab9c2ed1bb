"""Who named a node (a user's name wins over a beacon's), an automation's planning failure, and
automation ids never reused on SQLite (AUTOINCREMENT: a new automation never shows a deleted one's fires)."""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node") as node:
        node.add_column(sa.Column("named_by_user", sa.Boolean(), nullable=False, server_default=sa.false()))
    # A node named before this revision was named by a user or took a free name from its beacon; which,
    # nobody knows: the name stays, and counts as the user's (a beacon's later claim never takes it).
    op.execute(sa.text("UPDATE node SET named_by_user = true WHERE name IS NOT NULL"))
    with op.batch_alter_table("automation", recreate="always", table_kwargs={"sqlite_autoincrement": True}) as table:
        table.add_column(sa.Column("failure", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("automation", recreate="always") as table:
        table.drop_column("failure")
    with op.batch_alter_table("node") as node:
        node.drop_column("named_by_user")
