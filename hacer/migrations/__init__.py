"""Schema migrations (Alembic): a database of any earlier hacer, or 2015's, upgraded in place, every row kept.

A new revision goes in versions/ (`alembic -c hacer/migrations/alembic.ini revision -m "..."`) and
moves HEAD; tests/component/test_migrations.py checks that the models and the migrated schema agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

HEAD = "0009"  # the newest revision; a database here needs no Alembic import at start-up
VERSION_TABLE = "alembic_version"


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade the schema inside the connection's open transaction (the caller commits)."""
    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin, every upgrade
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
