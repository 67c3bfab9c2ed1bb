"""Database calls off eventlet's hub: the api's DBAPI connections run their blocking calls in a
native thread, so a locked or slow database delays requests that need it and nothing else.

SQLAlchemy's own work (sessions, pools, ORM) stays in the green threads: its locks are eventlet's
once monkey-patched and must not be taken from a native thread. Only the calls into the database
driver (connect, execute, fetch, commit, rollback, close) go through `eventlet.tpool`, which is
given a few threads: a connection is used by one green thread at a time (the pool checks it out),
so its calls never run in two native threads at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

Runner = Callable[..., Any]
DRIVER_THREADS = 4  # database calls at once; each may wait on a lock up to the busy timeout


class OffHubCursor:
    """A DBAPI cursor whose blocking calls go through `run`."""

    def __init__(self, cursor: Any, run: Runner) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_run", run)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self._run(self._cursor.execute, *args, **kwargs)
        return self

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        self._run(self._cursor.executemany, *args, **kwargs)
        return self

    def fetchone(self) -> Any:
        return self._run(self._cursor.fetchone)

    def fetchmany(self, *args: Any) -> Any:
        return self._run(self._cursor.fetchmany, *args)

    def fetchall(self) -> Any:
        return self._run(self._cursor.fetchall)

    def __iter__(self) -> Any:
        return iter(self.fetchall())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)


class OffHubConnection:
    """A DBAPI connection whose blocking calls go through `run`."""

    def __init__(self, connection: Any, run: Runner) -> None:
        object.__setattr__(self, "_connection", connection)
        object.__setattr__(self, "_run", run)

    def cursor(self, *args: Any, **kwargs: Any) -> OffHubCursor:
        return OffHubCursor(self._connection.cursor(*args, **kwargs), self._run)

    def commit(self) -> None:
        self._run(self._connection.commit)

    def rollback(self) -> None:
        self._run(self._connection.rollback)

    def close(self) -> None:
        self._run(self._connection.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._connection, name, value)


def move_off_hub(engine: Engine, run: Runner) -> None:
    """Make every new connection of `engine` run its driver calls through `run`."""

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> OffHubConnection:
        return OffHubConnection(run(dialect.loaded_dbapi.connect, *cargs, **cparams), run)


def eventlet_runner() -> Runner:
    """Return eventlet's tpool.execute, with DRIVER_THREADS native threads."""
    from eventlet import tpool

    tpool.set_num_threads(DRIVER_THREADS)
    return tpool.execute
