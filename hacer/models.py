"""Database models (SQLAlchemy 2.x) with the fixed rows of 2015, and the engine set-up.

Table and column names follow the 2015 schema (`node`, `node_type`, `script_log_entry`,
`script_log_entry_type`), so a 2015 database file opens as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    false,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.sql.expression import UpdateBase

from hacer import migrations
from hacer.messages import LOG_ENTRY_TYPES, NodeMeta
from hacer.nodewire import NODE_TYPES
from hacer.settings import private_dir

log = logging.getLogger(__name__)

MAX_ROW_ID = 2**63 - 1  # the largest id a database row can have (a signed 64-bit integer)
SCHEMA_LOCK_KEY = 7775_7777  # any constant: the advisory lock every part takes to create the schema


def utc_datetime(timestamp: float) -> datetime:
    """A naive UTC datetime, as every DateTime column here holds, from a Unix time."""
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


def naive_utc(moment: datetime) -> datetime:
    """An aware datetime as every DateTime column here holds it (naive UTC)."""
    return (moment if moment.tzinfo is UTC else moment.astimezone(UTC)).replace(tzinfo=None)


def aware_utc(moment: datetime) -> datetime:
    """A DateTime column's value (naive UTC) as an aware datetime."""
    return moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base of every hacer table."""


class _FixedRows:
    """Tables whose rows are a fixed list of names, inserted by insert_types()."""

    NAMES: ClassVar[tuple[str, ...]] = ()
    id: Mapped[int]
    name: Mapped[str]

    @classmethod
    def insert_types(cls, session: Session | None = None) -> None:
        """Insert the missing fixed rows (idempotent), as the 2015 shell set-up did."""
        if session is None:
            session = Database.current().session()
            with session:
                cls.insert_types(session)
                session.commit()
            return
        present = set(session.scalars(select(cls.name)))
        for position, name in enumerate(cls.NAMES, start=1):
            if name not in present:
                session.add(cls(id=position, name=name))  # type: ignore[call-arg]
        session.flush()


class NodeType(_FixedRows, Base):
    """Node types: toggle, light_rgb, sensor_temp, thermostat, other."""

    __tablename__ = "node_type"
    NAMES = NODE_TYPES
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class ScriptLogEntryType(_FixedRows, Base):
    """Script log entry types: launch, output, sent_set, sent_get, result, exception, exit_status."""

    __tablename__ = "script_log_entry_type"
    NAMES = LOG_ENTRY_TYPES
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class Node(Base):
    """A node seen on the network; `id` is its ESP chip id."""

    __tablename__ = "node"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(64), unique=True)
    # A name a user gave (REST, the app) wins over one a beacon claimed, which only takes a free name.
    named_by_user: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    type_id: Mapped[int] = mapped_column(ForeignKey("node_type.id"))
    ip: Mapped[str] = mapped_column(String(64), default="")
    last_update: Mapped[datetime | None] = mapped_column(DateTime)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    type: Mapped[NodeType] = relationship(lazy="joined")

    def meta(self) -> NodeMeta:
        """The node's retained `meta` message."""
        return NodeMeta(self.id, self.name or "", self.type.name)


class NodeSample(Base):
    """One value a node had from `at_ms` on (Unix milliseconds: bucket arithmetic is the same in every database)."""

    __tablename__ = "node_sample"
    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    at_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    value: Mapped[float | None] = mapped_column(Float)  # a number
    text: Mapped[str | None] = mapped_column(Text)  # or a string


class NodeRollup(Base):
    """The samples of one time bucket of a node's key, once its raw samples are purged."""

    __tablename__ = "node_rollup"
    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    step_ms: Mapped[int] = mapped_column(BigInteger)
    low: Mapped[float] = mapped_column(Float)
    high: Mapped[float] = mapped_column(Float)
    total: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(BigInteger)


class NodeAvailability(Base):
    """A change of a node's presence (`online`, `offline`) or answering (`answering`, `not_answering`)."""

    __tablename__ = "node_availability"
    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    reason: Mapped[str | None] = mapped_column(Text)


class Run(Base):
    """A run as the recorder saw it; `id` is the integer thread id of the 2015 API."""

    __tablename__ = "run"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    script: Mapped[str] = mapped_column(String(255), default="")
    params: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, the node name first
    state: Mapped[str] = mapped_column(String(16), index=True)  # hacer.runstates
    runner: Mapped[str] = mapped_column(String(128), default="")  # "" until a runner took it
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(64), default="")
    requested_at: Mapped[datetime] = mapped_column(DateTime)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
    request: Mapped[str] = mapped_column(Text, default="")  # as published, to send again


class ScriptLogEntry(Base):
    """One entry of a script run's log; `thread_id` numbers the run, as in 2015."""

    __tablename__ = "script_log_entry"
    __table_args__ = (UniqueConstraint("thread_id", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int | None] = mapped_column(Integer)  # the bus's numbering (none in 2015 rows)
    timestamp: Mapped[datetime] = mapped_column(DateTime, index=True)
    thread_id: Mapped[int] = mapped_column(BigInteger)  # led by the (thread_id, seq) index
    script_name: Mapped[str] = mapped_column(String(255))
    params: Mapped[str] = mapped_column(Text, default="[]")
    entry_type_id: Mapped[int] = mapped_column(ForeignKey("script_log_entry_type.id"))
    data: Mapped[str] = mapped_column(Text, default="")
    entry_type: Mapped[ScriptLogEntryType] = relationship(lazy="joined")


class RunClaim(Base):
    """A run request a runner has taken: the one place that makes a run id run only once."""

    __tablename__ = "run_claim"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Not indexed, nor updated_at: a runner reads its claims at its start, the purge by age now and
    # then; an index is a page more written by each commit of a run's (migration 0006).
    runner_id: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    request: Mapped[str] = mapped_column(Text)
    claimed_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class RunnerHeartbeat(Base):
    """A runner's heartbeat: a counter it moves on while it lives (see runner/claims.py)."""

    __tablename__ = "runner_heartbeat"
    runner_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    beat: Mapped[int] = mapped_column(BigInteger, default=0)
    beat_at: Mapped[datetime] = mapped_column(DateTime)  # for people: the runner's clock


class RunOutbox(Base):
    """A run's status or log entry a runner published and no recorder has confirmed yet (runner/outbox.py)."""

    __tablename__ = "run_outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Not indexed: a runner reads its rows whole (they are nearly all its own), and an index is a
    # page more written by every commit of a runner's.
    runner_id: Mapped[str] = mapped_column(String(128))
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 0: the run's latest status; else the log entry's seq
    state: Mapped[str] = mapped_column(String(16), default="")  # of a status
    topic: Mapped[str] = mapped_column(String(512))
    payload: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[float] = mapped_column(Float)  # Unix time of the last send
    sends: Mapped[int] = mapped_column(Integer, default=1)


class DeadLetter(Base):
    """A bus message a recorder could not write, set aside (acknowledged) instead of retried forever."""

    __tablename__ = "dead_letter"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    topic: Mapped[str] = mapped_column(String(512))
    payload: Mapped[str] = mapped_column(Text)  # its first bytes, as repr() text (it may hold anything)
    error: Mapped[str] = mapped_column(Text)
    recorder: Mapped[str] = mapped_column(String(128), default="")
    at: Mapped[datetime] = mapped_column(DateTime, index=True)


class Automation(Base):
    """An automation: its definition (hacer/automations.py) and when it last changed."""

    __tablename__ = "automation"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused: a deleted one's fires stay its own
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    definition: Mapped[str] = mapped_column(Text)  # AutomationSpec JSON
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime)
    # The fences of a bus trigger's fires: `cooldown` from the last one, and (mode `single`) the
    # run that must have ended before another starts. Changed only by conditional UPDATEs.
    last_fired_at: Mapped[datetime | None] = mapped_column(DateTime)
    active_run: Mapped[str | None] = mapped_column(String(64))
    # Why the scheduler cannot plan it (shown, never fired), for the definition of `changed_at`.
    failure: Mapped[str | None] = mapped_column(Text)


class AutomationTrigger(Base):
    """What a value trigger last saw of its node: whether a crossing may fire (armed), the last value."""

    __tablename__ = "automation_trigger"
    automation_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    armed: Mapped[bool] = mapped_column(Boolean)
    value: Mapped[str] = mapped_column(Text, default="")  # JSON of the last value seen
    version: Mapped[datetime] = mapped_column(DateTime)  # the definition's changed_at it was seen for


class AutomationFire(Base):
    """One fire of an automation: the row whose insert decides which scheduler fires a due time."""

    __tablename__ = "automation_fire"
    __table_args__ = (UniqueConstraint("automation_id", "due_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    automation_id: Mapped[int] = mapped_column(Integer, index=True)  # no foreign key: history outlives it
    due_at: Mapped[datetime] = mapped_column(DateTime)
    fired_at: Mapped[datetime] = mapped_column(DateTime)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    scheduler: Mapped[str] = mapped_column(String(128), default="")
    late: Mapped[bool] = mapped_column(Boolean, default=False)  # a missed due time run on start (run_once)
    pending: Mapped[bool] = mapped_column(Boolean, default=False)  # mode `queued`: waits for the runs before it
    # Its trace (JSON; NULL on fires older than traces): what triggered it, each condition with the
    # value it saw, the definition as it was. The run it made is the run row of `run_id`.
    cause: Mapped[str | None] = mapped_column(Text, nullable=True)
    conditions: Mapped[str | None] = mapped_column(Text, nullable=True)
    definition: Mapped[str | None] = mapped_column(Text, nullable=True)


class AutomationHeld(Base):
    """A due time or bus event an automation did not run for (a condition, its cooldown, its mode):
    its trace, the latest `HELD_KEPT` an automation's (scheduler/firing.py)."""

    __tablename__ = "automation_held"
    automation_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # no foreign key, as fires
    due_at: Mapped[datetime] = mapped_column(DateTime, primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime)
    scheduler: Mapped[str] = mapped_column(String(128), default="")
    why: Mapped[str] = mapped_column(String(32))
    cause: Mapped[str] = mapped_column(Text)
    conditions: Mapped[str] = mapped_column(Text)
    definition: Mapped[str] = mapped_column(Text)


class AutomationStep(Base):
    """One step of a fire (the fire's `run_id`, its place): begun in the transaction that ended the one
    before, ended by a conditional UPDATE of its state, so each is done once whatever scheduler gets there."""

    __tablename__ = "automation_step"
    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the fire's
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    automation_id: Mapped[int] = mapped_column(Integer)  # no foreign key, as fires
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # waiting, done, failed, timed_out, cancelled
    started_at: Mapped[datetime] = mapped_column(DateTime)
    due_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # a wait's end, a timeout
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # a `set`'s command, last sent
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: its run, the node's results, ...


class AutomationWait(Base):
    """A `for` trigger's condition as a scheduler saw it begin: due `for` seconds later, if it lasts."""

    __tablename__ = "automation_wait"
    automation_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # no foreign key, as fires
    began_at: Mapped[datetime] = mapped_column(DateTime, primary_key=True)
    due_at: Mapped[datetime] = mapped_column(DateTime)


def insert_ignoring_duplicates(session: Session, table: Any, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """INSERT rows, skipping those whose `keys` already exist (SQLite and PostgreSQL)."""
    if not rows:
        return
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    # Rows as parameters (executemany), not a VALUES list: the statement compiles once, cached.
    session.execute(dialect.insert(table).on_conflict_do_nothing(index_elements=keys), rows)


class Database:
    """An engine and its session factory for one database URL."""

    _current: ClassVar[Database | None] = None

    def __init__(
        self, url: str, busy_timeout: float = 10.0, checkpoint_apart: bool = False, **engine_options: Any
    ) -> None:
        self.url = url
        self.engine: Engine = make_engine(url, busy_timeout, **engine_options)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self._checkpointer: Any = None
        if checkpoint_apart and self.engine.dialect.name == "sqlite":
            # A commit that crosses SQLite's WAL threshold checkpoints the whole WAL and fsyncs,
            # in the committing thread (24 ms measured, in the middle of a run's start): here
            # checkpoint() does it instead, from a connection of its own.
            event.listen(self.engine, "connect", _no_autocheckpoint)

    def checkpoint(self) -> None:
        """Move a SQLite WAL's committed pages into the database file (PASSIVE: it waits for no one)."""
        if self.engine.dialect.name != "sqlite" or not self.engine.url.database:
            return
        sqlite3 = self.engine.dialect.loaded_dbapi
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.engine.url.database, timeout=0, check_same_thread=False)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # busy now: the next call does it
            log.warning("checkpointing %s failed: %s", self.engine.url.database, exc)

    def create_all(self) -> None:
        """Create the missing tables, or upgrade them (the 2015 `db.create_all()`)."""
        self.init(fixed_rows=False)

    def init(self, fixed_rows: bool = True) -> None:
        """Create or upgrade the schema, and insert the fixed rows; safe for parts starting at once."""
        with self.engine.connect() as connection:
            # One migrator at a time, until commit; the others then find the schema at HEAD.
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            elif connection.dialect.name == "sqlite":  # pysqlite begins no transaction before DDL by itself
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            if schema_revision(connection) != migrations.HEAD:
                migrations.upgrade(connection)
            if fixed_rows:
                with Session(connection) as session:
                    NodeType.insert_types(session)
                    ScriptLogEntryType.insert_types(session)
            connection.commit()

    def make_current(self) -> Database:
        """Make this the database of argument-less 2015 calls such as NodeType.insert_types()."""
        Database._current = self
        return self

    @classmethod
    def current(cls) -> Database:
        """Return the database made current (by `manage.py shell`)."""
        if cls._current is None:
            raise RuntimeError("no current database: pass a session, or use `python manage.py shell`")
        return cls._current


def schema_revision(connection: Connection) -> str | None:
    """The migration a database's schema is at; None before migrations (an empty or a `create_all()` database)."""
    if not inspect(connection).has_table(migrations.VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {migrations.VERSION_TABLE}")).scalar()


def make_engine(url: str, busy_timeout: float = 10.0, **options: Any) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so several processes can share it."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        options.setdefault("connect_args", {"timeout": busy_timeout})
    engine = create_engine(url, **options)
    if engine.dialect.name == "sqlite":
        if engine.url.database and engine.url.database != ":memory:":
            _create_private_file(Path(engine.url.database))
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _create_private_file(path: Path) -> None:
    """Create a SQLite file readable by its owner only (SQLite gives its -wal and -shm files the same mode)."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def driver_connection(connection: Connection) -> Any:
    """The driver's connection under a SQLAlchemy connection, in its transaction (for DriverStatement)."""
    return connection.connection.driver_connection


@contextmanager
def driver_transaction(engine: Engine) -> Iterator[Any]:
    """A transaction on a pooled connection's driver connection, committed at the end, rolled back on an error.

    For the runner's hot path: engine.begin()'s connection cost 0.1 ms more, cold (0.33 against
    0.23 ms for an empty transaction). A failed commit raises SQLAlchemy's error, as commit() would.
    """
    error = engine.dialect.loaded_dbapi.Error
    pooled = engine.raw_connection()
    try:
        yield pooled.driver_connection
        try:
            pooled.commit()
        except error as exc:
            raise DBAPIError.instance("COMMIT", None, exc, error) from exc
    except BaseException:
        try:
            pooled.rollback()
        except error:  # the connection is gone (a database restart): not back to the pool
            pooled.invalidate()
        raise
    finally:
        pooled.close()


class DriverStatement:
    """A Core statement compiled once for a dialect, run straight on the driver's cursor in a driver's transaction.

    For the runner's hot path: SQLAlchemy's execution of a run's start (three small statements)
    cost 0.3 ms more than SQLite's, cold. Errors are raised as SQLAlchemy's, as execute() would.
    """

    def __init__(self, statement: UpdateBase, dialect: Dialect, columns: Sequence[str] = ()) -> None:
        self._compiled = statement.compile(dialect=dialect, column_keys=list(columns) or None)
        self._dialect = dialect
        self.sql = str(self._compiled)
        self._positions = self._compiled.positiontup if self._compiled.positional else None
        self._processors = {
            name: processor
            for name, bind in self._compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def execute(self, driver: Any, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute once a row of values (by column or bind name) on a driver connection; return the rows changed."""
        params = [self._driver_params(row) for row in rows]
        cursor = driver.cursor()
        try:
            cursor.executemany(self.sql, params)
            return int(cursor.rowcount)
        except self._dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(self.sql, params, exc, self._dialect.loaded_dbapi.Error) from exc
        finally:
            cursor.close()

    def _driver_params(self, row: Mapping[str, Any]) -> Any:
        values = self._compiled.construct_params(row)
        for name, processor in self._processors.items():
            values[name] = processor(values[name])
        return values if self._positions is None else tuple(values[name] for name in self._positions)


class CommitSync:
    """Makes what an engine's connections have committed survive a power cut, not only a crash, when called.

    SQLite in WAL mode with synchronous=NORMAL (every connection here) syncs at checkpoints only: a
    commit is seen by everyone and survives any crash of the process, but may roll back in a power
    cut. Called after a commit, this syncs the WAL file as synchronous=FULL would have inside the
    commit, so what needs only the commit does not wait on the disk (0.5-1 ms cold). PostgreSQL
    syncs every commit itself.
    """

    def __init__(self, engine: Engine) -> None:
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self.wal = Path(f"{database}-wal") if database and database != ":memory:" else None
        self._named = -1  # the inode of the WAL file whose name was synced into its folder

    def __call__(self) -> None:
        if self.wal is None:
            return
        try:
            wal = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:  # the last connection closed: its checkpoint synced everything into the database
            return
        try:
            os.fdatasync(wal)
            inode = os.fstat(wal).st_ino
            if inode != self._named:  # a new WAL file: its name must reach the disk too
                folder = os.open(self.wal.parent, os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
                self._named = inode
        finally:
            os.close(wal)


def _no_autocheckpoint(dbapi_connection: Any, record: Any) -> None:
    dbapi_connection.execute("PRAGMA wal_autocheckpoint=0")


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Small pages for a new file (set before anything reads it; an existing file keeps its own): a
    # commit writes whole pages, and a run's few rows touch a handful of them. 4 KiB pages made a
    # run of five lines cost 151 KB of writes, 1 KiB pages 73 KB (bench/bench_disk.py, an SD card's wear).
    cursor.execute("PRAGMA page_size=1024")
    if cursor.execute("PRAGMA page_count").fetchone()[0] == 0:
        # A new file gives deleted pages back (recorder/retention.py). Only while it is empty, and
        # before WAL writes the header: on a file with tables, setting it waits for the write lock.
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
