"""Backup and restore of the database: SQLite's online backup, PostgreSQL's pg_dump and pg_restore.

A backup is taken while every part runs (a consistent snapshot: SQLite's backup reads in one
read transaction, pg_dump in one repeatable-read transaction). A restore replaces everything in
the database, in one transaction on SQLite, then upgrades the schema if the backup is older; stop
the parts first, or they go on from what they had in memory.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from hacer.models import Database

SQLITE_MAGIC = b"SQLite format 3\0"
PG_DUMP_MAGIC = b"PGDMP"


class BackupError(Exception):
    """A backup or restore could not be done; the message says why."""


def backup(database: Database, path: Path) -> None:
    """Write a backup of the database to `path` (replaced if it exists)."""
    partial = path.with_name(path.name + ".partial")  # a failed backup never leaves a file that looks whole
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # as private as the database
    if database.engine.dialect.name == "sqlite":
        _sqlite_copy(_sqlite(database), sqlite3.connect(partial))
    elif database.engine.dialect.name == "postgresql":
        with database.engine.connect() as connection:
            schema = connection.scalar(text("SELECT current_schema()"))
        _pg(database, "pg_dump", "--format=custom", f"--schema={schema}", f"--file={partial}")
    else:
        raise BackupError(f"no backup for {database.engine.dialect.name} databases")
    partial.replace(path)


def restore(database: Database, path: Path) -> None:
    """Replace the database's contents with the backup at `path`, then upgrade its schema."""
    try:
        with open(path, "rb") as file:
            magic = file.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    kind = database.engine.dialect.name
    if magic.startswith(SQLITE_MAGIC) and kind == "sqlite":
        _sqlite_copy(sqlite3.connect(f"file:{path}?mode=ro", uri=True), _sqlite(database))
    elif magic.startswith(PG_DUMP_MAGIC) and kind == "postgresql":
        _pg(database, "pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction", str(path))
    else:
        what = "SQLite" if magic.startswith(SQLITE_MAGIC) else "PostgreSQL" if magic.startswith(PG_DUMP_MAGIC) else ""
        raise BackupError(
            f"{path} is not a backup of a {kind} database" + (f" (it is a {what} backup)" if what else "")
        )
    database.engine.dispose()  # connections that saw the old schema
    database.init()


def _sqlite(database: Database) -> sqlite3.Connection:
    return sqlite3.connect(str(database.engine.url.database), timeout=30)


def _sqlite_copy(source: sqlite3.Connection, target: sqlite3.Connection) -> None:
    """Copy every page in one step: one read transaction on the source, one write on the target."""
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def _pg(database: Database, tool: str, *args: str) -> None:
    """Run pg_dump or pg_restore on the database; its password goes in the environment, never in argv."""
    program = shutil.which(tool)
    if program is None:
        raise BackupError(f"{tool} is not installed (Debian: apt-get install postgresql-client)")
    url = make_url(database.url).set(drivername="postgresql")  # libpq's form: no SQLAlchemy driver name
    env = {**os.environ, **({"PGPASSWORD": url.password} if url.password else {})}
    dbname = url.set(password=None).render_as_string(hide_password=False)
    done = subprocess.run([program, *args, f"--dbname={dbname}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"{tool} failed: {done.stderr.strip()}")
