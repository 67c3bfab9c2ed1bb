"""Retention: old history goes, a run still running or not yet fully recorded never does (SQLite, PostgreSQL)."""

import subprocess
import sys
import time

from sqlalchemy import func, insert, select

from hacer.models import (
    AutomationFire,
    AutomationHeld,
    AutomationStep,
    Database,
    DeadLetter,
    Run,
    RunClaim,
    RunOutbox,
    ScriptLogEntry,
    utc_datetime,
)
from hacer.settings import PROJECT_DIR
from recorder.retention import DAY, Purged, Retention, purge

NOW = 1_796_000_000.0  # 2026-11-30


def ago(days: float):
    return utc_datetime(NOW - days * DAY)


def add_run(connection, run_id: str, state: str, days: float, finished: bool = True, entries: int = 2) -> int:
    thread_id = connection.execute(
        insert(Run).returning(Run.id),
        {
            "run_id": run_id,
            "script": "toggle",
            "params": "[]",
            "state": state,
            "runner": "pi",
            "requested_by": "",
            "request": "{}",
            "requested_at": ago(days),
            "finished_at": ago(days) if finished else None,
        },
    ).scalar_one()
    for seq in range(1, entries + 1):
        connection.execute(
            insert(ScriptLogEntry),
            {"seq": seq, "timestamp": ago(days), "thread_id": thread_id, "script_name": "toggle", "entry_type_id": 2},
        )
    add_claim(connection, run_id, state, days)
    return thread_id


def add_claim(connection, run_id: str, state: str, days: float) -> None:
    connection.execute(
        insert(RunClaim),
        {
            "run_id": run_id,
            "runner_id": "pi",
            "state": state,
            "request": "{}",
            "claimed_at": ago(days),
            "updated_at": ago(days),
        },  # fmt: skip
    )


def run_ids(connection) -> list[str]:
    return sorted(connection.scalars(select(Run.run_id)))


def count(connection, model, *where) -> int:
    return connection.scalar(select(func.count()).select_from(model).where(*where))


def test_a_purge_keeps_what_runs_or_is_not_fully_recorded(database):
    with database.engine.begin() as connection:
        old_done = add_run(connection, "old-done", "succeeded", 40)
        add_run(connection, "old-lost-never-finished", "lost", 40, finished=False)
        add_run(connection, "old-running", "running", 40, finished=False)
        add_run(connection, "old-queued", "queued", 40, finished=False, entries=0)
        add_run(connection, "old-held", "failed", 40)  # its runner still holds an entry no recorder confirmed
        connection.execute(
            insert(RunOutbox),
            {
                "runner_id": "pi",
                "run_id": "old-held",
                "seq": 3,
                "state": "",
                "topic": "t",
                "payload": "{}",
                "size": 2,
                "sent_at": NOW,
            },  # fmt: skip
        )
        add_run(connection, "new-done", "succeeded", 1)
        for days, thread_id in ((40, 987_654), (1, 987_655)):  # 2015 entries: no run row
            connection.execute(
                insert(ScriptLogEntry),
                {"timestamp": ago(days), "thread_id": thread_id, "script_name": "old", "entry_type_id": 2},
            )
        add_claim(connection, "old-refused", "failed", 40)
        add_claim(connection, "old-claim-running", "running", 40)
        for due, pending in ((44, False), (43, False), (42, True), (41, False)):  # 42 waits for a run
            connection.execute(
                insert(AutomationFire),
                {
                    "automation_id": 1,
                    "due_at": ago(due),
                    "fired_at": ago(due),
                    "run_id": f"fire-{due}",
                    "scheduler": "s",
                    "pending": pending,
                },  # fmt: skip
            )
        connection.execute(
            insert(AutomationFire),
            {"automation_id": 2, "due_at": ago(50), "fired_at": ago(50), "run_id": "fire-only", "scheduler": "s"},
        )
        for fire, position in (("fire-43", 0), ("fire-43", 1), ("fire-41", 0)):  # a purged fire's steps go with it
            step = {"run_id": fire, "position": position, "automation_id": 1, "kind": "wait", "state": "done"}
            connection.execute(insert(AutomationStep), {**step, "started_at": ago(43)})
        for days in (40, 1):
            connection.execute(insert(DeadLetter), {"topic": "t", "payload": "p", "error": "e", "at": ago(days)})
            held = {"automation_id": 3, "due_at": ago(days), "seen_at": ago(days), "scheduler": "s", "why": "cooldown"}
            connection.execute(insert(AutomationHeld), {**held, "cause": "{}", "conditions": "[]", "definition": "{}"})

    purged = purge(database.engine, Retention(keep_days=30, keep_runs=0), NOW, batch=2)

    assert purged == Purged(runs=2, log_entries=5, claims=3, automation_fires=5, dead_letters=1)
    with database.engine.connect() as connection:
        assert run_ids(connection) == ["new-done", "old-held", "old-queued", "old-running"]
        assert count(connection, ScriptLogEntry, ScriptLogEntry.thread_id == old_done) == 0
        assert count(connection, ScriptLogEntry) == 2 + 2 + 2 + 1  # new-done, old-held, old-running, a 2015 one
        assert sorted(connection.scalars(select(RunClaim.run_id))) == [
            "new-done",
            "old-claim-running",
            "old-held",
            "old-queued",
            "old-running",
        ]
        assert sorted(connection.scalars(select(AutomationFire.run_id))) == ["fire-41", "fire-42", "fire-only"]
        assert list(connection.execute(select(AutomationStep.run_id, AutomationStep.position))) == [("fire-41", 0)]
        assert count(connection, DeadLetter) == 1
    assert not purge(database.engine, Retention(keep_days=30, keep_runs=0), NOW)


def test_a_purge_keeps_the_newest_finished_runs_by_count(database):
    with database.engine.begin() as connection:
        add_run(connection, "a-running", "running", 5, finished=False)
        for name in ("b", "c", "d", "e"):
            add_run(connection, name, "succeeded", 5)
    purged = purge(database.engine, Retention(keep_days=365, keep_runs=2), NOW, batch=1)
    assert (purged.runs, purged.log_entries, purged.claims) == (2, 4, 2)
    with database.engine.connect() as connection:
        assert run_ids(connection) == ["a-running", "d", "e"]


def test_purge_command_gives_the_space_back(hacer_env, tmp_path):
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    database = Database(url)
    database.init()
    now = time.time()
    with database.engine.begin() as connection:
        assert connection.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # incremental, from the first table
        for day in range(60):
            thread_id = add_run_at(connection, f"run-{day}", now - (day + 0.5) * DAY)
            connection.execute(
                insert(ScriptLogEntry),
                [
                    {
                        "seq": seq,
                        "timestamp": utc_datetime(now),
                        "thread_id": thread_id,
                        "script_name": "s",
                        "entry_type_id": 2,
                        "data": "x" * 2000,
                    }
                    for seq in range(1, 30)
                ],  # fmt: skip
            )
    database.checkpoint()
    size = (tmp_path / "kept.db").stat().st_size
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), "purge"],
        env={**hacer_env, "HACER_DATABASE_URL": url, "HACER_KEEP_DAYS": "10"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "purged 50 runs, 1450 log_entries, 50 claims" in done.stdout
    database.checkpoint()
    assert (tmp_path / "kept.db").stat().st_size < size * 0.4
    with database.engine.connect() as connection:
        assert len(run_ids(connection)) == 10
    database.engine.dispose()


def add_run_at(connection, run_id: str, finished: float) -> int:
    return add_run(connection, run_id, "succeeded", (NOW - finished) / DAY, entries=0)
