"""Schema migrations: the models and the migrations agree, and an upgrade keeps every row (SQLite, PostgreSQL)."""

import subprocess
import sys
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, select, text

from hacer import migrations
from hacer.models import (
    LOG_ENTRY_TYPES,
    Base,
    Database,
    Node,
    NodeType,
    Run,
    ScriptLogEntry,
    ScriptLogEntryType,
    schema_revision,
)
from hacer.nodewire import NODE_TYPES
from hacer.settings import PROJECT_DIR

AT = datetime(2026, 11, 30, 21, 0, 0, 123000)

# Rows of every table as the schema before migrations (revision 0001) holds them, in key order.
ROWS: dict[str, list[dict[str, object]]] = {
    "node_type": [{"id": i, "name": name} for i, name in enumerate(NODE_TYPES, start=1)],
    "script_log_entry_type": [{"id": i, "name": name} for i, name in enumerate(LOG_ENTRY_TYPES, start=1)],
    "node": [
        {"id": 1000, "name": None, "type_id": 1, "ip": "", "last_update": None, "online": False},
        {"id": 2**53 - 1, "name": "salon", "type_id": 4, "ip": "10.0.0.7", "last_update": AT, "online": True},
    ],
    "run": [
        {
            "id": 1,
            "run_id": "a1b2c3",
            "script": "toggle",
            "params": '["salon", "1"]',
            "state": "succeeded",
            "runner": "pi",
            "exit_code": 0,
            "error": None,
            "requested_by": "api",
            "requested_at": AT,
            "queued_at": AT,
            "started_at": AT,
            "finished_at": AT,
            "request": '{"run_id": "a1b2c3"}',
        },
        {
            "id": 2,
            "run_id": "d4e5",
            "script": "gettemp",
            "params": "[]",
            "state": "running",
            "runner": "pi",
            "exit_code": None,
            "error": None,
            "requested_by": "",
            "requested_at": AT,
            "queued_at": None,
            "started_at": AT,
            "finished_at": None,
            "request": "",
        },
    ],
    "script_log_entry": [
        {
            "id": 1,
            "seq": None,
            "timestamp": AT,
            "thread_id": 7,
            "script_name": "old",
            "params": "[]",
            "entry_type_id": 2,
            "data": "a 2015 row",
        },  # fmt: skip
        {
            "id": 2,
            "seq": 1,
            "timestamp": AT,
            "thread_id": 1,
            "script_name": "toggle",
            "params": '["salon", "1"]',
            "entry_type_id": 1,
            "data": "",
        },  # fmt: skip
        {
            "id": 3,
            "seq": 2,
            "timestamp": AT,
            "thread_id": 1,
            "script_name": "toggle",
            "params": '["salon", "1"]',
            "entry_type_id": 7,
            "data": "success",
        },  # fmt: skip
    ],
    "run_claim": [
        {"run_id": "a1b2c3", "runner_id": "pi", "state": "done", "request": "{}", "claimed_at": AT, "updated_at": AT}
    ],
    "runner_heartbeat": [{"runner_id": "pi", "beat": 2**40, "beat_at": AT}],
    "run_outbox": [
        {
            "id": 1,
            "runner_id": "pi",
            "run_id": "d4e5",
            "seq": 0,
            "state": "running",
            "topic": "hacer/runs/d4e5/status",
            "payload": "{}",
            "size": 2,
            "sent_at": 1764536400.25,
            "sends": 3,
        },  # fmt: skip
    ],
    "dead_letter": [
        {"id": 1, "topic": "hacer/runs/x/log", "payload": "b'\\x00'", "error": "NUL", "recorder": "r", "at": AT}
    ],  # fmt: skip
    "automation": [
        {
            "id": 1,
            "name": "night",
            "definition": "{}",
            "enabled": True,
            "changed_at": AT,
            "last_fired_at": AT,
            "active_run": "a1b2c3",
        },  # fmt: skip
    ],
    "automation_trigger": [{"automation_id": 1, "armed": False, "value": "21.5", "version": AT}],
    "automation_fire": [
        {
            "id": 1,
            "automation_id": 1,
            "due_at": AT,
            "fired_at": AT,
            "run_id": "a1b2c3",
            "scheduler": "s",
            "late": True,
            "pending": False,
        },  # fmt: skip
    ],
}
TABLES_OF_2015 = ("node_type", "script_log_entry_type", "node", "script_log_entry")


def all_rows(database: Database, tables) -> dict[str, list[dict[str, object]]]:
    metadata = MetaData()
    with database.engine.connect() as connection:
        metadata.reflect(connection, only=list(tables))
        return {
            name: [dict(row._mapping) for row in connection.execute(select(metadata.tables[name]).order_by(text("1")))]
            for name in tables
        }


def test_head_is_the_newest_revision():
    script = ScriptDirectory(str(PROJECT_DIR / "hacer" / "migrations"))
    assert script.get_current_head() == migrations.HEAD


def test_the_migrated_schema_is_what_the_models_declare(database_url):
    database = Database(database_url)
    database.init()
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    database.engine.dispose()
    assert differences == [], "a model changed without a migration in hacer/migrations/versions"


@pytest.mark.parametrize("earlier", ["revision 0001", "hacer before migrations", "2015 tables only"])
def test_an_upgrade_keeps_every_row(database_url, earlier):
    database = Database(database_url)
    with database.engine.connect() as connection:
        migrations.upgrade(connection, "0001")
        if earlier != "revision 0001":  # as create_all() left it: the tables and no version
            connection.execute(text(f"DROP TABLE {migrations.VERSION_TABLE}"))
        if earlier == "2015 tables only":
            for table in reversed(Base.metadata.sorted_tables):
                if table.name not in TABLES_OF_2015:
                    connection.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
        connection.commit()
    kept = {name: rows for name, rows in ROWS.items() if earlier != "2015 tables only" or name in TABLES_OF_2015}
    metadata = MetaData()
    with database.engine.begin() as connection:
        metadata.reflect(connection)
        for name in (table.name for table in Base.metadata.sorted_tables if table.name in kept):
            connection.execute(metadata.tables[name].insert(), kept[name])

    database.init()

    rows = all_rows(database, kept)
    assert {name: [{key: row[key] for key in kept[name][0]} for row in rows[name]] for name in kept} == kept
    # Columns added since: a name already there counts as the user's (no beacon may take it).
    assert [(row["name"], row["named_by_user"]) for row in rows["node"]] == [(None, False), ("salon", True)]
    with database.engine.connect() as connection:
        assert schema_revision(connection) == migrations.HEAD
    with database.session() as session:  # and the models read them
        assert [(node.name, node.type.name) for node in session.scalars(select(Node).order_by(Node.id))] == [
            (None, "toggle"),
            ("salon", "thermostat"),
        ]
        entries = session.scalars(select(ScriptLogEntry).order_by(ScriptLogEntry.id)).all()
        assert [(entry.seq, entry.entry_type.name, entry.data) for entry in entries] == [
            (None, LOG_ENTRY_TYPES[1], "a 2015 row"),
            (1, LOG_ENTRY_TYPES[0], ""),
            (2, LOG_ENTRY_TYPES[6], "success"),
        ]
        runs = session.scalars(select(Run).order_by(Run.id)).all()
        assert [(run.run_id, run.state) for run in runs] == (
            [] if earlier == "2015 tables only" else [("a1b2c3", "succeeded"), ("d4e5", "running")]
        )
        assert len(session.scalars(select(NodeType)).all()) == len(NODE_TYPES)
        assert len(session.scalars(select(ScriptLogEntryType)).all()) == len(LOG_ENTRY_TYPES)
    database.engine.dispose()


def test_parts_starting_at_once_upgrade_once(database_url, hacer_env):
    env = {**hacer_env, "HACER_DATABASE_URL": database_url}
    command = [sys.executable, str(PROJECT_DIR / "manage.py"), "initdb"]
    starting = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for process in starting:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors
    database = Database(database_url)
    with database.engine.connect() as connection:
        assert connection.execute(text(f"SELECT version_num FROM {migrations.VERSION_TABLE}")).all() == [
            (migrations.HEAD,)
        ]
    with database.session() as session:
        assert sorted(session.scalars(select(NodeType.name))) == sorted(NODE_TYPES)
    database.engine.dispose()
