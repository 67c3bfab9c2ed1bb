"""Alembic's entry: migrations run on the connection hacer.models.Database.init() passes, in its transaction."""

from alembic import context

from hacer.models import Base, make_engine

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic revision --autogenerate` from the command line
    from hacer.settings import Settings

    connection = make_engine(Settings.from_env().database_url).connect()

# Batch mode: SQLite alters a table by copying it, which Alembic does only when asked.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
