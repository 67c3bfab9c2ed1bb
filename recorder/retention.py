"""Retention: history purged by age and count, never a run still running or not yet fully recorded.

A run is purged, with its log entries and its claim, once it has ended (a finished run never
changes again, see recorder/service.py) longer ago than `keep_days`, or when more than
`keep_runs` finished runs are newer, and only while no runner holds anything of it that a
recorder has not confirmed (a row in `run_outbox`): those conditions are in the DELETE itself,
so a run that changed since it was looked at stays. Also purged past `keep_days`: log entries
without a run (2015's), claims that ended, dead letters, and automation fires but each
automation's latest (where its scheduler resumes) and the waiting ones. Node history is rolled up
and purged by its own settings (hacer/history.py).

Deletes go in batches, a transaction each, so writers wait for one batch at most. SQLite then
gives the freed pages back to the file system (incremental vacuum); PostgreSQL's autovacuum does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import ColumnElement, delete, exists, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import aliased

from hacer import runstates
from hacer.history import HistoryRetention, millis, roll_up
from hacer.models import (
    AutomationFire,
    AutomationHeld,
    AutomationStep,
    DeadLetter,
    Run,
    RunClaim,
    RunOutbox,
    ScriptLogEntry,
    utc_datetime,
)
from hacer.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500
DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """How much history is kept."""

    keep_days: float = 30.0
    keep_runs: int = 100_000  # finished runs at most, the newest; 0: any number
    history: HistoryRetention = HistoryRetention()

    @classmethod
    def from_settings(cls, settings: Settings) -> Retention:
        """The retention the settings ask for."""
        history = HistoryRetention(settings.history_raw_days, settings.history_keep_days, settings.history_step)
        return cls(settings.keep_days, settings.keep_runs, history)


@dataclass
class Purged:
    """Rows a purge removed."""

    runs: int = 0
    log_entries: int = 0
    claims: int = 0
    automation_fires: int = 0
    dead_letters: int = 0
    samples_rolled_up: int = 0
    node_history: int = 0

    def __bool__(self) -> bool:
        return any(getattr(self, field.name) for field in fields(self))

    def __str__(self) -> str:
        return ", ".join(f"{getattr(self, field.name)} {field.name}" for field in fields(self))


def purge(engine: Engine, retention: Retention, now: float, batch: int = BATCH) -> Purged:
    """Remove the history `retention` no longer keeps, as of Unix time `now`."""
    cutoff = utc_datetime(now - retention.keep_days * DAY)
    purged = Purged()
    held = exists().where(RunOutbox.run_id == Run.run_id)
    ended = RunClaim.state.in_(runstates.FINISHED_STATES)
    with engine.connect() as connection:
        old = or_(Run.finished_at < cutoff, Run.finished_at.is_(None) & (Run.requested_at < cutoff))
        with connection.begin():
            newest_dropped = _newest_run_past_count(connection, retention.keep_runs)
        if newest_dropped is not None:
            old = old | (Run.id <= newest_dropped)
        purgeable = Run.state.in_(runstates.FINISHED_STATES) & old & ~held
        while True:
            with connection.begin():  # a run goes with its log entries and its claim, or not at all
                chosen = connection.scalars(select(Run.id).where(purgeable).order_by(Run.id).limit(batch)).all()
                if not chosen:  # nothing to take SQLite's write lock for
                    break
                runs = connection.execute(
                    delete(Run).where(Run.id.in_(chosen), purgeable).returning(Run.id, Run.run_id)
                ).all()
                if runs:
                    purged.log_entries += _count(
                        connection.execute(
                            delete(ScriptLogEntry).where(ScriptLogEntry.thread_id.in_([r.id for r in runs]))
                        )
                    )
                    purged.claims += _count(
                        connection.execute(delete(RunClaim).where(RunClaim.run_id.in_([r.run_id for r in runs]), ended))
                    )
            purged.runs += len(runs)
            if len(chosen) < batch:
                break
        orphan = ~exists().where(Run.id == ScriptLogEntry.thread_id)
        purged.log_entries += _purge_all(
            connection, ScriptLogEntry.id, (ScriptLogEntry.timestamp < cutoff) & orphan, batch
        )
        unheld = ~exists().where(RunOutbox.run_id == RunClaim.run_id)
        purged.claims += _purge_all(connection, RunClaim.run_id, (RunClaim.updated_at < cutoff) & ended & unheld, batch)
        later = aliased(AutomationFire)
        superseded = exists().where(
            later.automation_id == AutomationFire.automation_id, later.due_at > AutomationFire.due_at
        )
        purged.automation_fires += _purge_all(
            connection,
            AutomationFire.id,
            (AutomationFire.fired_at < cutoff) & AutomationFire.pending.is_(False) & superseded,
            batch,
        )
        fired = exists().where(AutomationFire.run_id == AutomationStep.run_id)  # steps go with their fire
        purged.automation_fires += _purge_all(connection, AutomationStep.run_id, ~fired, batch)
        # What automations did not run for: an automation keeps its latest few, a deleted one's go by age.
        purged.automation_fires += _purge_all(connection, AutomationHeld.due_at, AutomationHeld.seen_at < cutoff, batch)
        purged.dead_letters += _purge_all(connection, DeadLetter.id, DeadLetter.at < cutoff, batch)
        purged.samples_rolled_up, purged.node_history = roll_up(connection, retention.history, millis(now))
        if purged and connection.dialect.name == "sqlite":
            # A no-op unless auto_vacuum is on (new files; older ones after `purge --vacuum`). It frees
            # a page a step: executescript() steps it to the end, where execute() stops after one.
            connection.connection.driver_connection.executescript("PRAGMA incremental_vacuum")  # type: ignore[union-attr]
    return purged


def vacuum(engine: Engine) -> None:
    """Rewrite a SQLite file compactly, which also turns incremental vacuum on for files made before it."""
    if engine.dialect.name == "sqlite":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM")


def _newest_run_past_count(connection: Connection, keep_runs: int) -> int | None:
    """The id of the newest finished run beyond the `keep_runs` newest; None when there are not more."""
    if keep_runs <= 0:
        return None
    finished = select(Run.id).where(Run.state.in_(runstates.FINISHED_STATES)).order_by(Run.id.desc())
    return connection.scalar(finished.offset(keep_runs).limit(1))


def _purge_all(connection: Connection, key: Any, condition: ColumnElement[bool], batch: int) -> int:
    """Delete every row matching `condition`, a batch a transaction; return how many."""
    total = 0
    while True:
        with connection.begin():
            chosen = connection.scalars(select(key).where(condition).limit(batch)).all()
            if chosen:
                total += _count(connection.execute(delete(key.class_).where(key.in_(chosen), condition)))
        if len(chosen) < batch:
            return total


def _count(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


class Purger:
    """A purge with its settings, called by the recorder now and then and by `manage.py purge`."""

    def __init__(self, engine: Engine, retention: Retention, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.retention = retention
        self.clock = clock

    def __call__(self) -> Purged:
        """Purge once, and say what went."""
        purged = purge(self.engine, self.retention, self.clock())
        if purged:
            log.info("purged %s (kept: %s days, %s runs)", purged, self.retention.keep_days, self.retention.keep_runs)
        return purged
