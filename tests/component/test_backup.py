"""Backup and restore through `manage.py`, on SQLite and PostgreSQL: the history reads back as it was."""

import subprocess
import sys

from sqlalchemy import MetaData, delete, insert
from test_migrations import ROWS, all_rows

from hacer.models import Database, Node, Run, ScriptLogEntry
from hacer.settings import PROJECT_DIR

FIXED = ("node_type", "script_log_entry_type")  # inserted by init() as ROWS has them


def manage(env, *args, cwd=None):
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_a_restore_brings_back_every_row(database_url, hacer_env, tmp_path):
    env = {**hacer_env, "HACER_DATABASE_URL": database_url}
    database = Database(database_url)
    database.init()
    metadata = MetaData()
    with database.engine.begin() as connection:
        metadata.reflect(connection)
        for table in metadata.sorted_tables:
            if table.name in ROWS and table.name not in FIXED:
                connection.execute(table.insert(), ROWS[table.name])
    saved = tmp_path / "hacer.backup"
    done = manage(env, "backup", str(saved))
    assert done.returncode == 0, done.stderr
    with database.engine.begin() as connection:  # what happens after the backup is undone by the restore
        connection.execute(delete(ScriptLogEntry))
        connection.execute(delete(Run))
        connection.execute(insert(Node), {"id": 5, "name": "new", "type_id": 1, "ip": "", "online": False})

    done = manage(env, "restore", str(saved))

    assert done.returncode == 0, done.stderr
    rows = all_rows(database, ROWS)
    assert {name: [{key: row[key] for key in ROWS[name][0]} for row in rows[name]] for name in ROWS} == ROWS
    database.engine.dispose()


def test_relative_paths_mean_the_folder_the_command_started_in_and_backups_are_private(hacer_env, tmp_path):
    started_in = tmp_path / "home"
    started_in.mkdir()
    env = {**hacer_env, "HADB_PATH": "relative.db"}
    for command in (["initdb"], ["backup", "relative.backup"]):
        done = manage(env, *command, cwd=started_in)
        assert done.returncode == 0, done.stderr
    assert (started_in / "relative.db").exists() and not (PROJECT_DIR / "relative.db").exists()
    assert (started_in / "relative.backup").stat().st_mode & 0o777 == 0o600
    assert not (PROJECT_DIR / "relative.backup").exists()


def test_a_restore_refuses_what_is_not_a_backup_of_its_kind(hacer_env, tmp_path):
    env = {**hacer_env, "HACER_DATABASE_URL": f"sqlite:///{tmp_path / 'live.db'}"}
    Database(env["HACER_DATABASE_URL"]).init()
    junk = tmp_path / "junk"
    junk.write_bytes(b"PGDMP\x01\x0e")
    done = manage(env, "restore", str(junk))
    assert done.returncode != 0
    assert "is not a backup of a sqlite database (it is a PostgreSQL backup)" in done.stderr
    done = manage(env, "restore", str(tmp_path / "missing"))
    assert done.returncode != 0 and "cannot read" in done.stderr
