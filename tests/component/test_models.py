"""Schema and fixed rows on SQLite and PostgreSQL; `initdb` and the 2015 shell set-up."""

import subprocess
import sys

from sqlalchemy import select

from hacer.models import LOG_ENTRY_TYPES, Database, Node, NodeType, ScriptLogEntryType
from hacer.nodewire import NODE_TYPES
from hacer.settings import PROJECT_DIR


def fixed_rows(db):
    with db.session() as session:
        return (
            sorted(session.scalars(select(NodeType.name))),
            sorted(session.scalars(select(ScriptLogEntryType.name))),
        )


def test_init_is_idempotent(database_url):
    db = Database(database_url)
    db.init()
    db.init()
    assert fixed_rows(db) == (sorted(NODE_TYPES), sorted(LOG_ENTRY_TYPES))
    with db.session() as session:
        session.add(Node(id=2**53 - 1, name="big", type_id=1, ip="10.0.0.2"))
        session.commit()
        assert session.get(Node, 2**53 - 1).type.name == "toggle"
    db.engine.dispose()


def test_2015_shell_setup_still_works(database_url):
    db = Database(database_url).make_current()
    db.create_all()
    NodeType.insert_types()
    ScriptLogEntryType.insert_types()
    NodeType.insert_types()
    assert fixed_rows(db) == (sorted(NODE_TYPES), sorted(LOG_ENTRY_TYPES))
    db.engine.dispose()


def run_manage(args, env, stdin=None):
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_initdb_command_uses_hadb_path_and_database_url(hacer_env, tmp_path):
    for _ in range(2):
        done = run_manage(["initdb"], hacer_env)
        assert done.returncode == 0, done.stderr
    assert fixed_rows(Database(f"sqlite:///{hacer_env['HADB_PATH']}"))[0] == sorted(NODE_TYPES)
    other = tmp_path / "other.db"
    done = run_manage(["initdb"], {**hacer_env, "HACER_DATABASE_URL": f"sqlite:///{other}"})
    assert done.returncode == 0 and other.exists()


def test_shell_runs_the_2015_setup(hacer_env):
    done = run_manage(
        ["shell"],
        hacer_env,
        stdin="db.create_all()\nNodeType.insert_types()\n"
        "ScriptLogEntryType.insert_types()\nprint(sorted(t.name for t in db.session().scalars(select(NodeType))))\n",
    )
    assert done.returncode == 0, done.stderr
    assert str(sorted(NODE_TYPES)) in done.stdout


def test_a_driver_statement_writes_what_execute_would_and_raises_sqlalchemys_errors(database):
    """Straight on the driver's cursor, on each database: values as SQLAlchemy binds them, its errors."""
    import pytest
    from sqlalchemy import bindparam, delete, insert
    from sqlalchemy.exc import IntegrityError

    from hacer.models import DriverStatement, RunClaim, driver_connection, driver_transaction, utc_datetime

    columns = ("run_id", "runner_id", "state", "request", "claimed_at", "updated_at")
    claim = DriverStatement(insert(RunClaim), database.engine.dialect, columns)
    let_go = DriverStatement(
        delete(RunClaim).where(RunClaim.run_id == bindparam("run"), RunClaim.state == "queued"), database.engine.dialect
    )
    moment = utc_datetime(1_800_000_000.25)
    row = dict(zip(columns, ("a", "r", "queued", "{}", moment, moment), strict=True))
    with database.engine.begin() as connection:
        driver = driver_connection(connection)
        assert claim.execute(driver, [row, {**row, "run_id": "b", "state": "running"}]) == 2
        assert let_go.execute(driver, [{"run": "a"}, {"run": "b"}]) == 1  # a literal of the statement kept
    with database.session() as session:
        assert [(c.run_id, c.claimed_at) for c in session.scalars(select(RunClaim))] == [("b", moment)]
    with pytest.raises(IntegrityError), driver_transaction(database.engine) as driver:
        claim.execute(driver, [{**row, "run_id": "c"}])  # rolled back with what failed after it
        claim.execute(driver, [{**row, "run_id": "b"}])
    with driver_transaction(database.engine) as driver:
        claim.execute(driver, [{**row, "run_id": "d"}])
    with database.session() as session:
        assert sorted(session.scalars(select(RunClaim.run_id))) == ["b", "d"]


def test_a_driver_transaction_whose_connection_died_raises_sqlalchemys_error_and_the_next_one_works(postgres_url):
    """A PostgreSQL restart mid-transaction: callers see a database error, and the pool forgets the connection."""
    import pytest
    from sqlalchemy import insert, text
    from sqlalchemy.exc import OperationalError

    from hacer.models import Database, DriverStatement, RunClaim, driver_transaction, utc_datetime

    database = Database(postgres_url)
    database.init()
    columns = ("run_id", "runner_id", "state", "request", "claimed_at", "updated_at")
    claim = DriverStatement(insert(RunClaim), database.engine.dialect, columns)
    moment = utc_datetime(1_800_000_000.0)
    row = dict(zip(columns, ("a", "r", "queued", "{}", moment, moment), strict=True))
    try:
        with pytest.raises(OperationalError), driver_transaction(database.engine) as driver:
            with database.engine.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": driver.info.backend_pid})
            claim.execute(driver, [row])
        with driver_transaction(database.engine) as driver:
            assert claim.execute(driver, [row]) == 1
    finally:
        database.engine.dispose()
